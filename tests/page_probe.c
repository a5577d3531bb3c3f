/* Test helper: read a page of memory and report a SIGBUS instead of dying of it.
 *
 * A poisoned page (read_failure: sigbus) raises SIGBUS on access, and Python
 * cannot resume after a signal raised by a memory access. probe_read_page()
 * copies one page with a SIGBUS handler armed that jumps back out of the
 * copy, so a reader can count lost pages one by one. Single-threaded use only
 * (one jump buffer). Built at test time by tests/page_probe.py. */
#include <setjmp.h>
#include <signal.h>
#include <string.h>

static sigjmp_buf probe_env;
static volatile sig_atomic_t probing;

static void on_sigbus(int sig, siginfo_t *info, void *ctx)
{
    (void)info;
    (void)ctx;
    if (probing) {
        probing = 0;
        siglongjmp(probe_env, 1);
    }
    /* A SIGBUS outside a probe is a real crash: die of it. */
    signal(sig, SIG_DFL);
    raise(sig);
}

int probe_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, NULL);
}

/* Copy the 4096 bytes at src to dst: 0, or 1 if the read raised SIGBUS. */
int probe_read_page(const void *src, void *dst)
{
    if (sigsetjmp(probe_env, 1))   /* 1: the handler's mask is undone on the jump */
        return 1;
    probing = 1;
    memcpy(dst, src, 4096);
    probing = 0;
    return 0;
}
