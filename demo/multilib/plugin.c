#include <ia2shim.h>
#include <stdio.h>
#include <string.h>

extern char app_secret[4096];
static int calls; /* the plugin's own data: compartment 2 */

int plugin_process(int x) {
    printf("plugin: running as compartment %d\n", ia2shim_present() ? ia2_get_compartment() : -1);
    return x + (++calls) * 2;
}

int plugin_peek(void) { return (int)strlen(app_secret); }
