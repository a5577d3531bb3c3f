/* A forked child of a program whose regions a file mapping split
 * (tests/system/test_exec_forksplit.py): run under `uswap exec` as
 *
 *   exec_forksplit FILE private|shared
 *
 * Two regions, one mmapped and one malloc'ed, are filled, FILE is mapped
 * MAP_FIXED (MAP_PRIVATE or MAP_SHARED) over part of each, and a range in
 * the middle of the mmapped one is munmapped. Then the program forks: the
 * parent rewrites every word of the regions' untaken parts, and only then
 * does the child check that it sees every word as it was at the fork,
 * write its own values and check them; the parent checks that it sees
 * its own values, never the child's. Both check the file's content in the
 * file-mapped parts (a MAP_SHARED mapping is shared by the two, a
 * MAP_PRIVATE one is not) and that the munmapped range faults. The child
 * forks a grandchild that checks the child's values the same way (a fork
 * of a forked split region). Then both munmap the mmapped region; the
 * parent prints "released", and waits for a line (or EOF) on stdin while
 * the test looks at the daemon. Every check prints "ok NAME" or
 * "FAIL NAME ..."; the last line is "failures N" (the parent's, the
 * child's and the grandchild's), and the exit status is 0 only when N is 0.
 *
 * FILE holds FILE_BYTES bytes, word j holding FILE_TAG | j. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define P 4096UL
#define MB (1UL << 20)
#define FILE_BYTES (4 * MB)
#define FILE_TAG 0xf11e000000000000UL
#define AT_FORK 1UL     /* the tags of word values: tag << 40 | word index */
#define PARENT 2UL
#define CHILD 3UL

static int failures;
static sigjmp_buf jump;

static void check(int ok, const char *who, const char *name, size_t bad)
{
    if (ok)
        printf("ok %s-%s\n", who, name);
    else
        printf("FAIL %s-%s: %zu bad words\n", who, name, bad);
    fflush(stdout);
    failures += !ok;
}

static void on_segv(int sig) { (void)sig; siglongjmp(jump, 1); }

/* 1 when reading addr raises SIGSEGV. Any other SIGSEGV kills the
 * process (a child that lost its memory must not pass). */
static int read_faults(volatile char *addr)
{
    int faulted = 1;
    signal(SIGSEGV, on_segv);
    if (!sigsetjmp(jump, 1)) {
        (void)*addr;
        faulted = 0;
    }
    signal(SIGSEGV, SIG_DFL);
    return faulted;
}

/* One region and the parts of it that are not its own any more. */
struct area {
    unsigned long *w;
    size_t words;
    size_t file_lo, file_hi;   /* words a file mapping took */
    size_t hole_lo, hole_hi;   /* words munmapped (empty range when equal) */
};

static int untaken(const struct area *a, size_t i)
{
    return !(i >= a->file_lo && i < a->file_hi) && !(i >= a->hole_lo && i < a->hole_hi);
}

static void fill(const struct area *a, unsigned long tag)
{
    for (size_t i = 0; i < a->words; i++)
        if (untaken(a, i))
            a->w[i] = tag << 40 | i;
}

static size_t bad_words(const struct area *a, unsigned long tag)
{
    size_t bad = 0;
    for (size_t i = 0; i < a->words; i++)
        if (untaken(a, i) && a->w[i] != (tag << 40 | i))
            bad++;
    return bad;
}

/* The file-mapped part shows the file's content (word 0 excepted: the
 * shared case's marker). */
static size_t bad_file_words(const struct area *a)
{
    size_t bad = 0;
    for (size_t i = a->file_lo + 1; i < a->file_hi; i++)
        bad += a->w[i] != (FILE_TAG | (i - a->file_lo));
    return bad;
}

static void map_file_over(struct area *a, int fd, size_t off, size_t len, int shared)
{
    char *at = (char *)a->w + off;
    void *got = mmap(at, len, PROT_READ | PROT_WRITE, (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED, fd, 0);
    if (got != at) {
        perror("mmap of the file over the region");
        exit(2);
    }
    a->file_lo = off / 8;
    a->file_hi = (off + len) / 8;
}

static void check_areas(struct area *areas, int n, unsigned long tag, const char *who, const char *name)
{
    size_t bad = 0;
    for (int k = 0; k < n; k++)
        bad += bad_words(&areas[k], tag);
    check(bad == 0, who, name, bad);
    bad = 0;
    for (int k = 0; k < n; k++)
        bad += bad_file_words(&areas[k]);
    check(bad == 0, who, "file-part-has-the-file", bad);
    check(read_faults((char *)areas[0].w + areas[0].hole_lo * 8), who, "munmapped-range-faults", 0);
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[2], "private") && strcmp(argv[2], "shared"))) {
        fprintf(stderr, "usage: exec_forksplit FILE private|shared\n");
        return 2;
    }
    int shared = strcmp(argv[2], "shared") == 0;
    int fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror(argv[1]);
        return 2;
    }

    struct area areas[2];
    memset(areas, 0, sizeof areas);
    size_t mlen = 36 * MB;   /* a size the allocator's regions do not have (the test looks for it) */
    areas[0].w = mmap(NULL, mlen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    areas[0].words = mlen / 8;
    char *heap = malloc(24 * MB + P);
    areas[1].w = (unsigned long *)(((uintptr_t)heap + P - 1) & ~(P - 1));
    areas[1].words = 24 * MB / 8;
    if (areas[0].w == MAP_FAILED || !heap) {
        perror("the regions");
        return 2;
    }
    fill(&areas[0], AT_FORK);
    fill(&areas[1], AT_FORK);
    map_file_over(&areas[0], fd, 8 * MB, FILE_BYTES, shared);
    map_file_over(&areas[1], fd, 4 * MB, 2 * MB, shared);
    munmap((char *)areas[0].w + 20 * MB, MB);
    areas[0].hole_lo = 20 * MB / 8;
    areas[0].hole_hi = 21 * MB / 8;
    check(bad_words(&areas[0], AT_FORK) == 0 && bad_words(&areas[1], AT_FORK) == 0, "parent", "filled", 0);

    int parent_wrote[2], child_wrote[2];
    if (pipe(parent_wrote) || pipe(child_wrote)) {
        perror("pipe");
        return 2;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        return 2;
    }
    char byte = 0;
    if (pid == 0) {
        close(parent_wrote[1]);
        close(child_wrote[0]);
        if (read(parent_wrote[0], &byte, 1) != 1)
            _exit(100);
        check_areas(areas, 2, AT_FORK, "child", "sees-the-fork-snapshot");
        fill(&areas[0], CHILD);
        fill(&areas[1], CHILD);
        areas[0].w[areas[0].file_lo] = CHILD;   /* the marker in the file mapping */
        check_areas(areas, 2, CHILD, "child", "sees-its-own-writes");
        fflush(stdout);
        pid_t grandchild = fork();
        if (grandchild == 0) {
            check_areas(areas, 2, CHILD, "grandchild", "sees-the-child-at-its-fork");
            _exit(failures);
        }
        int gst = 0;
        if (grandchild < 0 || waitpid(grandchild, &gst, 0) != grandchild || !WIFEXITED(gst))
            check(0, "child", "grandchild-exit", 1);
        else
            failures += WEXITSTATUS(gst);
        check(munmap(areas[0].w, mlen) == 0, "child", "munmap-split-region", 0);
        if (write(child_wrote[1], &byte, 1) != 1)
            _exit(100);
        _exit(failures);
    }
    close(parent_wrote[0]);
    close(child_wrote[1]);   /* a child that dies: the read below sees EOF */
    fill(&areas[0], PARENT);
    fill(&areas[1], PARENT);
    if (write(parent_wrote[1], &byte, 1) != 1 || read(child_wrote[0], &byte, 1) != 1)
        check(0, "parent", "child-ran", 1);
    check_areas(areas, 2, PARENT, "parent", "sees-its-own-writes");
    unsigned long marker = areas[0].w[areas[0].file_lo];
    check(shared ? marker == CHILD : marker == FILE_TAG, "parent",
          shared ? "shared-file-mapping-shared" : "private-file-mapping-private", 0);
    check(munmap(areas[0].w, mlen) == 0, "parent", "munmap-split-region", 0);
    int st = 0;
    waitpid(pid, &st, 0);
    int child_failures = WIFEXITED(st) ? WEXITSTATUS(st) : 1000 + (WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    check(child_failures == 0, "parent", "child-exit", (size_t)child_failures);
    printf("released\n");
    fflush(stdout);
    (void)getchar();
    printf("failures %d\n", failures + child_failures);
    return failures + child_failures != 0;
}
