/* The demo application (compartment 1) and its plugin (compartment 2).
 * The plugin is "buggy": besides its own work it peeks at the app's secret.
 * ia2shim tags each object's data with its own key, so the peek is denied
 * by the CPU's key check and reported. */
#include <ia2shim.h>
#include <stdio.h>

/* A page of its own: data that shares a page with a carveout (here the
 * executable's copy of libc's stdout) stays shared, see IA2_REPORT=plan. */
char app_secret[4096] __attribute__((aligned(4096))) = "hunter2";
int plugin_process(int x);
int plugin_peek(void);

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    printf("app: running as compartment %d, secret at %p is in compartment %d\n",
           ia2shim_present() ? ia2_get_compartment() : -1, (void *)app_secret,
           ia2shim_present() ? ia2_addr_compartment(app_secret) : -1);
    /* Each call into the plugin goes through a call gate that switches to
     * the plugin's compartment (2) and back. */
    printf("plugin: process(20) = %d (its own data works)\n", plugin_process(20));
    printf("plugin: now reading the app's secret...\n");
    int leaked = plugin_peek();
    printf("app: the plugin read %d bytes of the secret: NOT isolated\n", leaked);
    return 1;
}
