/* Page checksums shared by the dio and uffd shims (header-only). */
#ifndef USWAP_PAGESUM_H
#define USWAP_PAGESUM_H
#include <stdint.h>

/* 32-bit checksum of each 4 KiB page in [addr, addr + npages*4096): a
 * multiply-xorshift hash over 64-bit words, seeded with a constant so an
 * all-zero page does not sum to zero (a lost write that reads back zeros
 * must fail its check). */
static void us_page_sums(uint64_t addr, uint64_t npages, uint32_t *out)
{
    for (uint64_t p = 0; p < npages; p++) {
        const uint64_t *w = (const uint64_t *)(addr + p * 4096);
        uint64_t h1 = 0x9E3779B97F4A7C15ull, h2 = 0xC2B2AE3D27D4EB4Full;
        for (int i = 0; i < 512; i += 2) {
            h1 = (h1 ^ w[i]) * 0xFF51AFD7ED558CCDull;
            h2 = (h2 ^ w[i + 1]) * 0xC4CEB9FE1A85EC53ull;
            h1 ^= h1 >> 29;
            h2 ^= h2 >> 31;
        }
        uint64_t h = h1 ^ (h2 * 0x9E3779B97F4A7C15ull);
        h ^= h >> 32;
        out[p] = (uint32_t)h | 1u;   /* never 0: 0 marks "no checksum" */
    }
}

#endif
