/* A MAP_FIXED mapping over a region that the kernel refuses, and a forked
 * child whose region the daemon refuses, under `uswap exec`
 * (tests/system/test_exec_failed_fixed.py):
 *
 *   exec_failed_fixed FILE whole|part|attach|munmap
 *
 * A 36 MiB region is filled, then FILE (opened read-only) is mapped
 * MAP_SHARED | MAP_FIXED with PROT_WRITE over all of it ("whole") or over
 * 4 MiB in its middle ("part"): the kernel says EACCES and leaves the range
 * as it was. The program must still see every word it wrote, and so must
 * a forked child.
 *
 * "attach": a 36 MiB region is filled; FILE is mapped MAP_FIXED over 4 MiB
 * of it (the preload records that part as taken), and then the region's
 * own memfd, opened through /proc/self/map_files, is mapped back over that
 * part by a raw system call the preload does not see: the kernel's view
 * (the memfd in place, which the fork's snapshot follows) and the
 * preload's (a part taken) now differ, so the child's registration does
 * not cover the snapshot and the daemon refuses its fork_attach. The child
 * must be told and go on without the region (it exits 0 without touching
 * it); the parent must keep every word of the untaken parts.
 *
 * Prints "ok NAME" or "FAIL NAME ..." a check, then "failures N"; exits 0
 * only when N is 0. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MB (1UL << 20)

static int failures;

static void check(int ok, const char *name, size_t bad)
{
    printf(ok ? "ok %s\n" : "FAIL %s: %zu\n", name, bad);
    fflush(stdout);
    failures += !ok;
}

static size_t bad_words(const unsigned long *w, size_t words)
{
    size_t bad = 0;
    for (size_t i = 0; i < words; i++)
        bad += w[i] != (i | 0xabc0000000000000UL);
    return bad;
}

/* "attach": the kernel's view and the preload's made to differ (see the
 * top), so that the daemon refuses the child's fork_attach. */
static void refused_attach(int fd)
{
    size_t len = 36 * MB, words = len / 8, lo = 8 * MB / 8, hi = 12 * MB / 8;
    unsigned long *w = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fd < 0 || w == MAP_FAILED) {
        perror("set-up");
        exit(2);
    }
    for (size_t i = 0; i < words; i++)
        w[i] = i;
    char *part = (char *)w + 8 * MB;
    if (mmap(part, 4 * MB, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) != part) {
        perror("file over the region");
        exit(2);
    }
    char path[128];
    snprintf(path, sizeof path, "/proc/self/map_files/%lx-%lx", (unsigned long)w, (unsigned long)part);
    int memfd = open(path, O_RDWR);
    if (memfd < 0 || syscall(SYS_mmap, part, 4 * MB, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, memfd,
                             8 * MB) != (long)part) {
        perror(path);
        exit(2);
    }
    close(memfd);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);   /* told on stderr that the region is not here; never touches it */
    int st = 0;
    check(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0, "child-exit", 0);
    size_t bad = 0;
    for (size_t i = 0; i < words; i++)
        if (i < lo || i >= hi)
            bad += w[i] != i;
    check(bad == 0, "parent-keeps-its-data", bad);
}

/* "munmap": FILE mapped MAP_FIXED over 4 MiB of a region; the program
 * munmaps that part, maps it again, then munmaps the whole region: as
 * without uswap, no mapping of FILE may be left. */
static int file_mappings(const char *name)
{
    char line[640];
    int n = 0;
    FILE *f = fopen("/proc/self/maps", "r");
    while (f && fgets(line, sizeof line, f))
        n += strstr(line, name) != NULL;
    if (f)
        fclose(f);
    return n;
}

static void munmapped_file_part(int fd, const char *name)
{
    size_t len = 36 * MB;
    char *w = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (w == MAP_FAILED || mmap(w + 8 * MB, 4 * MB, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) != w + 8 * MB) {
        perror("set-up");
        exit(2);
    }
    check(munmap(w + 8 * MB, 4 * MB) == 0 && file_mappings(name) == 0, "file-part-munmapped", 0);
    if (mmap(w + 16 * MB, 4 * MB, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0) != w + 16 * MB) {
        perror("mapped again");
        exit(2);
    }
    check(munmap(w, len) == 0 && file_mappings(name) == 0, "nothing-left-after-munmap-of-the-region", 0);
}

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[2], "whole") && strcmp(argv[2], "part") && strcmp(argv[2], "attach")
                      && strcmp(argv[2], "munmap"))) {
        fprintf(stderr, "usage: exec_failed_fixed FILE whole|part|attach|munmap\n");
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    if (fd >= 0 && strcmp(argv[2], "munmap") == 0) {
        munmapped_file_part(fd, argv[1]);
        printf("failures %d\n", failures);
        return failures != 0;
    }
    if (fd >= 0 && strcmp(argv[2], "attach") == 0) {
        refused_attach(fd);
        printf("failures %d\n", failures);
        return failures != 0;
    }
    size_t len = 36 * MB, words = len / 8;
    unsigned long *w = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fd < 0 || w == MAP_FAILED) {
        perror("set-up");
        return 2;
    }
    for (size_t i = 0; i < words; i++)
        w[i] = i | 0xabc0000000000000UL;
    int whole = strcmp(argv[2], "whole") == 0;
    char *at = whole ? (char *)w : (char *)w + 8 * MB;
    void *got = mmap(at, whole ? len : 4 * MB, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    check(got == MAP_FAILED && errno == EACCES, "kernel-refused-the-mapping", 0);
    size_t bad = bad_words(w, words);
    check(bad == 0, "region-intact-after-refused-mapping", bad);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        bad = bad_words(w, words);
        check(bad == 0, "child-sees-the-region", bad);
        _exit(failures);
    }
    int st = 0;
    if (pid < 0 || waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
        check(0, "child-exit", (size_t)st);
    else
        failures += WEXITSTATUS(st);
    check(munmap(w, len) == 0, "munmap-region", 0);
    printf("failures %d\n", failures);
    return failures != 0;
}
