/* Anonymous memory semantics under `uswap exec` (tests/system/test_exec_semantics.py):
 * every check prints "ok NAME" or "FAIL NAME ..." and the exit status is the
 * number of failures. Mappings are regions when at least USWAP_EXEC_MIN_SIZE. */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define P 4096UL
#define MB (1UL << 20)
static int failures;
static sigjmp_buf jump;

static void check(int ok, const char *name)
{
    printf("%s %s\n", ok ? "ok" : "FAIL", name);
    fflush(stdout);
    failures += !ok;
}

static void on_segv(int sig) { (void)sig; siglongjmp(jump, 1); }

/* 1 when touching addr (a read, or a write of 1 byte) raises SIGSEGV. */
static int faults(volatile char *addr, int write)
{
    if (sigsetjmp(jump, 1))
        return 1;
    if (write)
        *addr = 1;
    else
        (void)*addr;
    return 0;
}

static int in_region(void *addr)
{
    char line[512], want[32];
    snprintf(want, sizeof want, "%lx-", (unsigned long)addr);
    FILE *f = fopen("/proc/self/maps", "r");
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, want, strlen(want)) == 0 && strstr(line, "uswap-region"))
            found = 1;
    fclose(f);
    return found;
}

static void fill(unsigned long *w, size_t bytes, unsigned long tag)
{
    for (size_t p = 0; p < bytes / P; p++)
        w[p * 512] = tag + p;
}

static size_t bad(const unsigned long *w, size_t bytes, unsigned long tag)
{
    size_t n = 0;
    for (size_t p = 0; p < bytes / P; p++)
        n += w[p * 512] != tag + p;
    return n;
}

static size_t nonzero(const char *a, size_t bytes)
{
    size_t n = 0;
    for (size_t i = 0; i < bytes; i += 64)
        n += a[i] != 0;
    return n;
}

static void *thread_main(void *arg)
{
    unsigned long id = (unsigned long)arg, errs = 0;
    for (int round = 0; round < 20; round++) {
        size_t len = (4 + (round % 3)) * MB;
        unsigned long *w = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (w == MAP_FAILED)
            return (void *)1;
        errs += nonzero((char *)w, len) != 0;
        fill(w, len, id << 32 | (unsigned long)round << 20);
        madvise(w, MB, MADV_DONTNEED);
        errs += nonzero((char *)w, MB) != 0;
        errs += bad(w + MB / 8, len - MB, (id << 32 | (unsigned long)round << 20) + MB / P) != 0;
        munmap(w, len);
    }
    return (void *)errs;
}

int main(void)
{
    struct sigaction sa = { .sa_handler = on_segv };
    sigaction(SIGSEGV, &sa, NULL);
    size_t len = 16 * MB;
    unsigned long *w = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *c = (char *)w;
    check(w != MAP_FAILED && in_region(w), "mmap-is-a-region");
    check(nonzero(c, len) == 0, "zero-on-first-touch");
    fill(w, len, 1000);
    check(bad(w, len, 1000) == 0, "written-and-read-back");

    madvise(c + 2 * MB, MB, MADV_DONTNEED);
    madvise(c + 4 * MB, MB, MADV_FREE);
    check(nonzero(c + 2 * MB, MB) == 0 && nonzero(c + 4 * MB, MB) == 0, "dontneed-free-read-zeros");
    check(bad(w, 2 * MB, 1000) == 0 && bad(w + 3 * MB / 8, MB, 1000 + 3 * MB / P) == 0
          && bad(w + 5 * MB / 8, len - 5 * MB, 1000 + 5 * MB / P) == 0, "dontneed-rest-intact");
    fill(w, len, 2000);

    munmap(c + 6 * MB, MB);
    check(faults(c + 6 * MB + 100, 0), "munmapped-part-faults");
    check(bad(w, 6 * MB, 2000) == 0 && bad(w + 7 * MB / 8, len - 7 * MB, 2000 + 7 * MB / P) == 0,
          "munmap-rest-intact");

    void *fixed = mmap(c + 8 * MB, MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    check(fixed == c + 8 * MB && nonzero(c + 8 * MB, MB) == 0, "map-fixed-over-part-zeros");
    check(bad(w + 9 * MB / 8, len - 9 * MB, 2000 + 9 * MB / P) == 0, "map-fixed-rest-intact");

    mprotect(c + 10 * MB, MB, PROT_READ);
    check(faults(c + 10 * MB, 1) && !faults(c + 10 * MB, 0) && !faults(c + 11 * MB, 1), "mprotect-part");
    mprotect(c + 10 * MB, MB, PROT_READ | PROT_WRITE);
    check(!faults(c + 10 * MB, 1), "mprotect-back");
    w[10 * MB / 8] = 2000 + 10 * MB / P;   /* the probes' writes undone */
    w[11 * MB / 8] = 2000 + 11 * MB / P;
    check(mlock(c + 12 * MB, MB) == 0 && munlock(c + 12 * MB, MB) == 0, "mlock-part");

    /* fork: the child sees the memory as it was; writes stay on their side. */
    pid_t pid = fork();
    if (pid == 0) {
        int ok = bad(w + 12 * MB / 8, 4 * MB, 2000 + 12 * MB / P) == 0;
        fill(w + 12 * MB / 8, 2 * MB, 7000);
        ok = ok && bad(w + 12 * MB / 8, 2 * MB, 7000) == 0;
        _exit(ok ? 0 : 1);
    }
    fill(w + 14 * MB / 8, 2 * MB, 8000);
    int st = 0;
    waitpid(pid, &st, 0);
    check(WIFEXITED(st) && WEXITSTATUS(st) == 0, "fork-child-sees-snapshot");
    check(bad(w + 12 * MB / 8, 2 * MB, 2000 + 12 * MB / P) == 0 && bad(w + 14 * MB / 8, 2 * MB, 8000) == 0,
          "fork-writes-stay-private");

    /* mremap: grown (moved) keeps the contents, the new tail reads zeros; shrunk keeps the head. */
    unsigned long *m = mmap(NULL, 4 * MB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    fill(m, 4 * MB, 3000);
    unsigned long *g = mremap(m, 4 * MB, 12 * MB, MREMAP_MAYMOVE);
    check(g != MAP_FAILED && in_region(g) && bad(g, 4 * MB, 3000) == 0 && nonzero((char *)g + 4 * MB, 8 * MB) == 0,
          "mremap-grow");
    unsigned long *s = mremap(g, 12 * MB, 2 * MB, 0);
    check(s == g && bad(s, 2 * MB, 3000) == 0, "mremap-shrink");
    unsigned long *again = mremap(s, 2 * MB, 3 * MB, 0);
    check(again == s && bad(s, 2 * MB, 3000) == 0 && nonzero((char *)s + 2 * MB, MB) == 0, "mremap-regrow-in-place");
    munmap(s, 3 * MB);

    pthread_t t[4];
    for (unsigned long i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, thread_main, (void *)i);
    unsigned long errs = 0;
    for (int i = 0; i < 4; i++) {
        void *r;
        pthread_join(t[i], &r);
        errs += (unsigned long)r;
    }
    check(errs == 0, "threads");

    /* malloc (the preloaded allocator) of a large block: a region too. */
    char *h = malloc(32 * MB);
    memset(h, 5, 32 * MB);
    size_t hb = 0;
    for (size_t i = 0; i < 32 * MB; i += P)
        hb += h[i] != 5;
    check(hb == 0, "malloc-large");
    free(h);

    size_t b1 = bad(w, 6 * MB, 2000), b2 = bad(w + 9 * MB / 8, 5 * MB, 2000 + 9 * MB / P),
           b3 = bad(w + 14 * MB / 8, 2 * MB, 8000);
    if (b1 || b2 || b3)
        printf("bad pages: %zu below 6 MiB, %zu in 9..14 MiB, %zu in 14..16 MiB\n", b1, b2, b3);
    check(b1 + b2 + b3 == 0, "final-contents");
    munmap(w, len);
    printf("failures %d\n", failures);
    return failures;
}
