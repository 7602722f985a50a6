#include <string.h>

extern char app_secret[4096];
static int calls; /* the plugin's own data: compartment 2 */

int plugin_process(int x) { return x + (++calls) * 2; }

int plugin_peek(void) { return (int)strlen(app_secret); }
