#include <dlfcn.h>
#include <ia2shim.h>
#include <stdio.h>
#include <string.h>

static int calls; /* the plugin's own data: compartment 2 */

int plugin_process(int x) {
    printf("plugin: running as compartment %d\n", ia2shim_present() ? ia2_get_compartment() : -1);
    return x + (++calls) * 2;
}

/* The "bug": the plugin finds the app's secret by name at run time. (Had it
 * linked against `extern char app_secret[]`, the import would be a
 * declared interface, which the shim shares: IA2_SHARE_DATA_IMPORTS.) */
int plugin_peek(void) {
    const char *secret = dlsym(RTLD_DEFAULT, "app_secret");
    return secret ? (int)strlen(secret) : -1;
}
