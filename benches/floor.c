/* The start-up floor (benches/startup.rs): a preloaded C library whose
 * constructor makes only the system calls that the shim cannot avoid for a
 * program with one compartment, in default mode, and nothing else: no
 * allocator, no Rust runtime, no analysis. The shim's start-up minus this
 * library's is what its own design and implementation add.
 *
 * Each step is the shim's, cut to its system calls:
 *   keys        pkey_alloc for the compartment and the shim's own key
 *   census      /proc/self/maps, read whole (dl_iterate_phdr for objects)
 *   apply       pkey_mprotect of the executable's writable segment (only
 *               when keys exist: sim mode makes none)
 *   GOT gates   the executable's RELRO page made writable, written, restored
 *   handlers    SIGSEGV (faults) and SIGSYS (the filter), on an alternate
 *               stack with a guard page; every other signal's disposition
 *               asked once (handlers installed before the constructor)
 *   pkey guard  libc's pkey_set entry page made writable, written, restored
 *   filter      no_new_privs and a seccomp program of the shim's length
 *               (80 instructions) and shape, that allows everything
 */
#define _GNU_SOURCE
#include <link.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <fcntl.h>
#include <dlfcn.h>

static char maps[64 << 10];
static uintptr_t relro, data_start, data_end;

static void on_signal(int sig, siginfo_t *si, void *ctx) {
    (void)sig; (void)si; (void)ctx;
    _exit(99);
}

static int executable(struct dl_phdr_info *info, size_t size, void *arg) {
    (void)size; (void)arg;
    /* The first object is the executable. */
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *p = &info->dlpi_phdr[i];
        if (p->p_type == PT_GNU_RELRO)
            relro = (info->dlpi_addr + p->p_vaddr) & ~4095UL;
        if (p->p_type == PT_LOAD && (p->p_flags & PF_W)) {
            data_start = (info->dlpi_addr + p->p_vaddr) & ~4095UL;
            data_end = (info->dlpi_addr + p->p_vaddr + p->p_memsz + 4095) & ~4095UL;
        }
    }
    return 1;
}

static void rewrite(uintptr_t page, int during, int after, volatile uint8_t *at) {
    if (mprotect((void *)page, 4096, during) == 0) {
        *at = *at;
        mprotect((void *)page, 4096, after);
    }
}

__attribute__((constructor)) static void floor_init(void) {
    /* keys */
    int key = (int)syscall(SYS_pkey_alloc, 0, 0);
    int shim_key = (int)syscall(SYS_pkey_alloc, 0, 0);
    (void)shim_key;

    /* census */
    dl_iterate_phdr(executable, NULL);
    int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        size_t n = 0;
        ssize_t r;
        while (n < sizeof maps && (r = read(fd, maps + n, sizeof maps - n)) > 0)
            n += (size_t)r;
        close(fd);
    }

    /* apply */
    if (key > 0 && data_end > data_start)
        syscall(SYS_pkey_mprotect, data_start, data_end - data_start,
                PROT_READ | PROT_WRITE, key);

    /* GOT gates */
    if (relro)
        rewrite(relro, PROT_READ | PROT_WRITE, PROT_READ, (volatile uint8_t *)relro);

    /* handlers */
    size_t stack = 256 << 10;
    char *alt = mmap(NULL, stack + 4096, PROT_NONE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (alt != MAP_FAILED && mprotect(alt + 4096, stack, PROT_READ | PROT_WRITE) == 0) {
        stack_t ss = {.ss_sp = alt + 4096, .ss_size = stack, .ss_flags = 0};
        sigaltstack(&ss, NULL);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, NULL);
    for (int sig = 1; sig < 65; sig++) {
        struct sigaction old;
        if (sig != SIGKILL && sig != SIGSTOP && sig != SIGSEGV && sig != SIGSYS)
            syscall(SYS_rt_sigaction, sig, NULL, &old, 8);
    }

    /* pkey guard */
    uintptr_t entry = (uintptr_t)dlsym(RTLD_DEFAULT, "pkey_set");
    if (entry)
        rewrite(entry & ~4095UL, PROT_READ | PROT_WRITE | PROT_EXEC,
                PROT_READ | PROT_EXEC, (volatile uint8_t *)entry);

    /* filter */
    sigaction(SIGSYS, &sa, NULL);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    struct sock_filter prog[80];
    int n = 0;
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, instruction_pointer));
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
    while (n < 79)
        prog[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0xffff0000u + n, 0, 0);
    prog[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
    struct sock_fprog fprog = {.len = (unsigned short)n, .filter = prog};
    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &fprog);
}
