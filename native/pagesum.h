/* Page checksums shared by the dio, uffd, iopool and fastpath shims
 * (header-only; each shim gets its own copy of the tables).
 *
 * Each 4 KiB page gets a CRC32C (Castagnoli, the checksum of iSCSI, ext4
 * metadata and btrfs) of its slot copy, and an exact all-zero flag computed
 * in the same pass over the page. The flag, not the checksum, decides that a
 * page needs no slot: a page whose checksum merely equals the zero page's is
 * real data and is written like any other. (A CRC catches accidental
 * damage -- every burst of up to 32 bits, other damage but for 1 in 2^32 --
 * but it is linear: a page built to share the zero page's CRC is easy to
 * make, so nothing may rest on two CRCs being equal but the check itself.)
 *
 * The CRC uses the SSE4.2 crc32 instruction where the CPU has it (checked
 * once, when the shim is loaded) and a table-driven software CRC otherwise;
 * both give the same value. All 32 bits are kept: nothing treats a checksum
 * of 0 as "no checksum" (only pages with a slot are ever checked). The CRC
 * is seeded with ~0 and inverted at the end (the standard CRC32C), so an
 * all-zero page does not sum to 0 and a lost write that reads back zeros
 * fails its check unless the page itself was zeros. */
#ifndef USWAP_PAGESUM_H
#define USWAP_PAGESUM_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#define US_CRC_X86 1
#endif

#define US_CRC32C_POLY 0x82F63B78u   /* Castagnoli, bit-reflected */

/* What the dio shim exports of these to Python (dio_build.py reads this
 * section through cdef_reader.py; the definitions are below). */
/* cdef: begin */
static void us_page_sums(uint64_t addr, uint64_t npages, uint32_t *sums, uint8_t *zero);
static inline uint32_t us_crc32c(const void *data, uint64_t len, int hw);
static inline int us_crc32c_hw_available(void);
/* cdef: end */

/* A page is checksummed in three interleaved streams of US_CRC_LANE bytes
 * plus a 16-byte tail: the crc32 instruction has a latency of 3 cycles and a
 * throughput of 1, so three independent streams run three times faster than
 * one. The streams are joined with us_crc_shift: advancing a CRC state over
 * US_CRC_LANE zero bytes is a linear map, kept as 4 tables of 256 entries. */
#define US_CRC_LANE 1360   /* 170 words; 3 * 1360 + 16 = 4096 */

/* Slicing-by-8 tables for the software CRC, the lane-shift tables, and
 * whether the crc32 instruction is usable; all set by us_crc32c_init() when
 * the shim loads, before any thread can call in, and read-only afterwards. */
static uint32_t us_crc_table[8][256];
static uint32_t us_crc_shift_table[4][256];
static int us_crc_hw;

static uint32_t us_crc32c_words_sw(uint32_t crc, const uint64_t *w, size_t nwords, uint64_t *any);

__attribute__((constructor)) static void us_crc32c_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (US_CRC32C_POLY & (0u - (c & 1u)));
        us_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            us_crc_table[t][i] = (us_crc_table[t - 1][i] >> 8) ^ us_crc_table[0][us_crc_table[t - 1][i] & 0xFF];
    /* Column i of the shift map: state 1<<i advanced over a lane of zeros. */
    static const uint64_t zeros[US_CRC_LANE / 8];
    uint32_t column[32];
    uint64_t any = 0;
    for (int i = 0; i < 32; i++)
        column[i] = us_crc32c_words_sw(1u << i, zeros, US_CRC_LANE / 8, &any);
    for (int k = 0; k < 4; k++)
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int i = 0; i < 8; i++)
                if (b >> i & 1)
                    v ^= column[8 * k + i];
            us_crc_shift_table[k][b] = v;
        }
#ifdef US_CRC_X86
    __builtin_cpu_init();
    us_crc_hw = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

/* A running CRC state advanced over US_CRC_LANE zero bytes. */
static inline uint32_t us_crc_shift(uint32_t crc)
{
    return us_crc_shift_table[0][crc & 0xFF] ^ us_crc_shift_table[1][(crc >> 8) & 0xFF] ^
           us_crc_shift_table[2][(crc >> 16) & 0xFF] ^ us_crc_shift_table[3][crc >> 24];
}

/* Software CRC32C over 8-byte words (crc in its running, un-inverted form);
 * ORs every word into *any. Little-endian word order, as the crc32
 * instruction reads them. */
static uint32_t us_crc32c_words_sw(uint32_t crc, const uint64_t *w, size_t nwords, uint64_t *any)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < nwords; i++) {
        uint64_t v = w[i];
        acc |= v;
        uint64_t x = v ^ crc;
        crc = us_crc_table[7][x & 0xFF] ^ us_crc_table[6][(x >> 8) & 0xFF] ^
              us_crc_table[5][(x >> 16) & 0xFF] ^ us_crc_table[4][(x >> 24) & 0xFF] ^
              us_crc_table[3][(x >> 32) & 0xFF] ^ us_crc_table[2][(x >> 40) & 0xFF] ^
              us_crc_table[1][(x >> 48) & 0xFF] ^ us_crc_table[0][x >> 56];
    }
    *any |= acc;
    return crc;
}

#ifdef US_CRC_X86
__attribute__((target("sse4.2")))
static uint32_t us_crc32c_words_hw(uint32_t crc, const uint64_t *w, size_t nwords, uint64_t *any)
{
    uint64_t c = crc, acc = 0;
    for (size_t i = 0; i < nwords; i++) {
        acc |= w[i];
        c = _mm_crc32_u64(c, w[i]);
    }
    *any |= acc;
    return (uint32_t)c;
}

/* The running CRC of one whole page from state ~0, in three streams (see
 * US_CRC_LANE); the same value as us_crc32c_words_hw over the page. */
__attribute__((target("sse4.2")))
static uint32_t us_crc32c_page_hw(const uint64_t *w, uint64_t *any)
{
    const size_t lane = US_CRC_LANE / 8;
    const uint64_t *a = w, *b = w + lane, *c = w + 2 * lane;
    uint64_t ca = ~0u, cb = 0, cc = 0, acc = 0;
    for (size_t i = 0; i < lane; i++) {
        acc |= a[i] | b[i] | c[i];
        ca = _mm_crc32_u64(ca, a[i]);
        cb = _mm_crc32_u64(cb, b[i]);
        cc = _mm_crc32_u64(cc, c[i]);
    }
    /* Processing data from state s equals processing it from 0, XOR s
     * advanced over as many zero bytes (the CRC is linear). */
    uint32_t crc = us_crc_shift(us_crc_shift((uint32_t)ca) ^ (uint32_t)cb) ^ (uint32_t)cc;
    *any |= acc;
    return us_crc32c_words_hw(crc, w + 3 * lane, 2, any);
}
#endif

static uint32_t us_crc32c_words(uint32_t crc, const uint64_t *w, size_t nwords, uint64_t *any)
{
#ifdef US_CRC_X86
    if (us_crc_hw)
        return us_crc32c_words_hw(crc, w, nwords, any);
#endif
    return us_crc32c_words_sw(crc, w, nwords, any);
}

/* CRC32C of `len` bytes (standard form: seeded with ~0, inverted at the end);
 * `hw` 0 forces the software path. For tests and the benchmark. */
static inline uint32_t us_crc32c(const void *data, uint64_t len, int hw)
{
    const uint8_t *p = data;
    uint32_t crc = ~0u;
    uint64_t any = 0, words = len / 8;
    uint64_t buf[64];
    while (words) {   /* through an aligned bounce buffer: `data` may be unaligned */
        size_t k = words < 64 ? (size_t)words : 64;
        memcpy(buf, p, k * 8);
        crc = hw ? us_crc32c_words(crc, buf, k, &any) : us_crc32c_words_sw(crc, buf, k, &any);
        p += k * 8;
        words -= k;
    }
    for (uint64_t i = 0; i < len % 8; i++)
        crc = (crc >> 8) ^ us_crc_table[0][(crc ^ p[i]) & 0xFF];
    return ~crc;
}

static inline int us_crc32c_hw_available(void)
{
    return us_crc_hw;
}

/* For each 4 KiB page in [addr, addr + npages*4096): its CRC32C in sums[p]
 * and, when `zero` is not NULL, zero[p] = 1 if every byte is 0, else 0.
 * One pass over each page. */
static void us_page_sums(uint64_t addr, uint64_t npages, uint32_t *sums, uint8_t *zero)
{
    for (uint64_t p = 0; p < npages; p++) {
        const uint64_t *w = (const uint64_t *)(uintptr_t)(addr + p * 4096);
        uint64_t any = 0;
#ifdef US_CRC_X86
        if (us_crc_hw)
            sums[p] = ~us_crc32c_page_hw(w, &any);
        else
#endif
            sums[p] = ~us_crc32c_words_sw(~0u, w, 512, &any);
        if (zero)
            zero[p] = any == 0;
    }
}

#endif
