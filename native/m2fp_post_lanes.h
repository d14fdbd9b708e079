/* The per-pixel kernels of post-processing, in vectors as wide as the target's registers: included once
 * per target by m2fp_post.c (the build's own target) and, in a build for x86-64's levels, by
 * m2fp_post_avx2.c and m2fp_post_avx512.c. Each exports its functions with its width in their names
 * (m2fp_paste_vote_w16, ...); m2fp_post_lanes() names the widest the CPU runs, and
 * imaging/fused.py binds that one's. */
#include "m2fp_post.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#define M2FP_WIDE_(name, lanes) name##_w##lanes
#define M2FP_WIDE__(name, lanes) M2FP_WIDE_(name, lanes)
#define M2FP_WIDE(name) M2FP_WIDE__(name, LANES)

/* Vectors of LANES floats (GCC's vector extensions), as wide as the target's registers: a vector wider
 * than them is split by the compiler, and its comparisons done lane by lane (6x slower with AVX2). */
#define LANES M2FP_TARGET_LANES
typedef float lanes_t __attribute__((vector_size(4 * LANES)));
typedef int32_t ilanes_t __attribute__((vector_size(4 * LANES)));
typedef uint32_t ulanes_t __attribute__((vector_size(4 * LANES)));
typedef uint8_t bytes_t __attribute__((vector_size(LANES)));

static inline __attribute__((always_inline)) lanes_t select_lanes(ilanes_t m, lanes_t a, lanes_t b) {
    return (lanes_t)((m & (ilanes_t)a) | (~m & (ilanes_t)b));
}

/* Vectors squashed side by side in the row pass: one vector's squash is a chain of ~20 dependent steps,
 * which the CPU overlaps with the next ones only as far as its scheduler reaches; taking each step for
 * GROUP vectors before the next makes the chains independent neighbours (the mask scores' pass 1.2x as
 * fast, the same values). */
#define GROUP 4
_Static_assert(4096 % (GROUP * LANES) == 0, "the row pass's runs of 4096 values start at a group of blocks");

/* exp(x) of n <= GROUP vectors, each step for all n before the next, for x in [-18, 0] (callers
 * clamp; 1 + exp(x) rounds to 1 below ln 2^-24 = -16.6, so the sigmoid needs no more), without branches.
 *
 * With 8 or 16 lanes: 2^(k / 16) e^r with k = round(16 x / ln 2) (adding and subtracting 1.5 * 2^23
 * rounds to nearest), r = x - k ln 2 / 16 in two parts (|r| <= ln 2 / 32), 2^(j / 16) for j = k mod 16
 * from a table of 16 in one register (AVX-512) or two (AVX2) by a lane permute, 2^(k div 16) added to
 * its exponent, and e^r by its degree-3 Taylor polynomial (error < 1e-8): a shorter chain than Cephes'
 * expf, the sigmoid within an ulp of it. With 4 lanes (no lane permute in SSE2): Cephes' expf, 2^k p(r)
 * with k = round(x / ln 2) and p of degree 7. Within 2 ulp of expf either way. */
static inline __attribute__((always_inline)) void exp_clamped_lanes(const lanes_t *x, lanes_t *e, int n) {
    const float round = 12582912.0f;
#if LANES >= 8
    const float c = 23.0831206542234f /* 16 / ln 2 */, ln2_hi = 0.0433349609375f, ln2_lo = -1.326215250e-5f;
    /* 2^(j / 16)'s bits, less j << 19: adding k << 19 (k = 16 q + j) adds q to the exponent. */
    const int32_t bits[16] = {0x3f800000, 0x3f85aac3 - (1 << 19), 0x3f8b95c2 - (2 << 19), 0x3f91c3d3 - (3 << 19),
                              0x3f9837f0 - (4 << 19), 0x3f9ef532 - (5 << 19), 0x3fa5fed7 - (6 << 19),
                              0x3fad583f - (7 << 19), 0x3fb504f3 - (8 << 19), 0x3fbd08a4 - (9 << 19),
                              0x3fc5672a - (10 << 19), 0x3fce248c - (11 << 19), 0x3fd744fd - (12 << 19),
                              0x3fe0ccdf - (13 << 19), 0x3feac0c7 - (14 << 19), 0x3ff5257d - (15 << 19)};
    ilanes_t low, high;  /* the table's first and last LANES entries (the same register with 16 lanes) */
    __builtin_memcpy(&low, bits, sizeof low);
    __builtin_memcpy(&high, bits + 16 - LANES, sizeof high);
    lanes_t big[GROUP], k[GROUP], r[GROUP], p[GROUP];
    for (int g = 0; g < n; ++g) big[g] = x[g] * c + round;
    for (int g = 0; g < n; ++g) k[g] = big[g] - round;
    for (int g = 0; g < n; ++g) r[g] = x[g] - k[g] * ln2_hi - k[g] * ln2_lo;
    for (int g = 0; g < n; ++g) p[g] = r[g] * (1.0f / 6.0f) + 0.5f;
    for (int g = 0; g < n; ++g) p[g] = p[g] * r[g] + 1.0f;
    for (int g = 0; g < n; ++g) p[g] = p[g] * r[g] + 1.0f;
    for (int g = 0; g < n; ++g) {
        ilanes_t j = (ilanes_t)big[g];  /* k + 1.5 * 2^23's bits: the same residues mod 16, and << 19 */
#if LANES == 16
        ilanes_t scale = (ilanes_t)_mm512_permutexvar_epi32((__m512i)j, (__m512i)low);  /* indices mod 16 */
#else
        ilanes_t first = (ilanes_t)_mm256_permutevar8x32_epi32((__m256i)low, (__m256i)j);  /* indices mod 8 */
        ilanes_t last = (ilanes_t)_mm256_permutevar8x32_epi32((__m256i)high, (__m256i)j);
        ilanes_t upper = (j & 8) != 0;  /* j mod 16 >= 8: the table's second half */
        ilanes_t scale = (first & ~upper) | (last & upper);
#endif
        e[g] = p[g] * (lanes_t)(scale + (ilanes_t)((ulanes_t)j << 19));
    }
#else
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    lanes_t k[GROUP], r[GROUP], p[GROUP];
    for (int g = 0; g < n; ++g) k[g] = (x[g] * log2e + round) - round;
    for (int g = 0; g < n; ++g) r[g] = x[g] - k[g] * ln2_hi - k[g] * ln2_lo;
    for (int g = 0; g < n; ++g) p[g] = r[g] * 1.9875691500e-4f + 1.3981999507e-3f;
    for (int g = 0; g < n; ++g) p[g] = p[g] * r[g] + 8.3334519073e-3f;
    for (int g = 0; g < n; ++g) p[g] = p[g] * r[g] + 4.1665795894e-2f;
    for (int g = 0; g < n; ++g) p[g] = p[g] * r[g] + 1.6666665459e-1f;
    for (int g = 0; g < n; ++g) p[g] = p[g] * r[g] + 5.0000001201e-1f;
    for (int g = 0; g < n; ++g) p[g] = p[g] * r[g] * r[g] + r[g] + 1.0f;
    for (int g = 0; g < n; ++g) e[g] = p[g] * (lanes_t)((__builtin_convertvector(k[g], ilanes_t) + 127) << 23);
#endif
}

/* A run's per-lane sums added to the mask score's parts, and zeroed for the next run (float partial
 * sums over runs of at most 4096 values). */
static inline __attribute__((always_inline)) void add_lanes(lanes_t *acc, ilanes_t *hits, double *sum,
                                                            int64_t *count) {
    float total = 0.0f;
    int64_t positive = 0;
    for (int l = 0; l < LANES; ++l) total += (*acc)[l], positive -= (*hits)[l];
    *sum += total;
    *count += positive;
    *acc = (lanes_t){0}, *hits = (ilanes_t){0};
}

/* Whether any lane of a comparison's result (0 or -1 per lane) is set: the sign bits gathered into
 * a mask where the target has the instruction (the generic narrowing to bytes takes 5 instructions). */
static inline __attribute__((always_inline)) int any_lane(ilanes_t m) {
#if LANES == 16 && defined(__AVX512F__)
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif LANES == 8 && defined(__AVX__)
    return _mm256_movemask_ps((__m256)m) != 0;
#elif LANES == 4 && defined(__SSE__)
    return _mm_movemask_ps((__m128)m) != 0;
#else
    bytes_t narrow = __builtin_convertvector(m, bytes_t);
    uint64_t words[(LANES + 7) / 8] = {0};
    __builtin_memcpy(words, &narrow, sizeof narrow);
    uint64_t any = 0;
    for (int i = 0; i < (LANES + 7) / 8; ++i) any |= words[i];
    return any != 0;
#endif
}

/* n <= GROUP vectors of logits squashed into s: sigmoid(v) where v > 0, else 0 (NaN too), the only
 * values of a mask's probability ever read (the mask score sums it where v > 0; an instance is pasted
 * where sig * score > 0.5 with a score <= 1, so only where v > 0); each vector's sig added, in order,
 * to the run's sums *acc and its positive lanes counted in *hits (as -1s). */
static inline __attribute__((always_inline)) void squash_vectors(const lanes_t *v, lanes_t *s, int n,
                                                                 lanes_t *acc, ilanes_t *hits) {
    const lanes_t zero = {0};
    ilanes_t pos[GROUP];
    lanes_t t[GROUP], e[GROUP];
    for (int g = 0; g < n; ++g) pos[g] = v[g] > 0.0f;
    for (int g = 0; g < n; ++g) t[g] = select_lanes(pos[g], -v[g], zero);
    for (int g = 0; g < n; ++g) t[g] = select_lanes(t[g] < -18.0f, zero - 18.0f, t[g]);
    exp_clamped_lanes(t, e, n);
    for (int g = 0; g < n; ++g) s[g] = select_lanes(pos[g], 1.0f / (1.0f + e[g]), zero);
    for (int g = 0; g < n; ++g) *acc += s[g], *hits += pos[g];
}

/* One vector squashed (squash_vectors). */
static inline __attribute__((always_inline)) lanes_t squash_lanes(lanes_t v, lanes_t *acc, ilanes_t *hits) {
    lanes_t s;
    squash_vectors(&v, &s, 1, acc, hits);
    return s;
}

/* n logits squashed (squash_lanes) into sig, the mask score's parts added to *sum (the sum of sig
 * where logits > 0) and *count (how many such pixels); float partial sums over runs of 4096. */
static inline __attribute__((always_inline)) void squash(const float *restrict logits, int64_t n,
                                                         float *restrict sig, double *sum, int64_t *count) {
    lanes_t acc = {0};
    ilanes_t hits = {0};
    for (int64_t i = 0; i < n; i += LANES) {
        if (i % 4096 == 0 && i > 0) add_lanes(&acc, &hits, sum, count);
        lanes_t v = {0};  /* a last, partial vector padded with 0s: not positive, so not counted */
        if (n - i >= LANES) {
            __builtin_memcpy(&v, logits + i, sizeof v);
            lanes_t s = squash_lanes(v, &acc, &hits);
            __builtin_memcpy(sig + i, &s, sizeof s);
        } else {
            __builtin_memcpy(&v, logits + i, sizeof(float) * (size_t)(n - i));
            lanes_t s = squash_lanes(v, &acc, &hits);
            __builtin_memcpy(sig + i, &s, sizeof(float) * (size_t)(n - i));
        }
    }
    add_lanes(&acc, &hits, sum, count);
}

/* dst[x] = sum_k w[x * taps + k] * src[idx[x * taps + k]] over the taps whose weight is not 0. With
 * finite inputs a zero weight adds an exact 0, so the common tap counts run without branches (and
 * vectorise); a row with an infinity or NaN takes the loop that skips zero weights. */
static inline void resample_row(const float *restrict src, int64_t n_src, const int32_t *restrict idx,
                                const float *restrict w, int64_t taps, int64_t n, float *restrict dst) {
    int finite = 1;
    for (int64_t i = 0; i < n_src; ++i) finite &= src[i] - src[i] == 0.0f;  /* false for inf and NaN */
    if (finite && taps == 1) {
#pragma omp simd
        for (int64_t x = 0; x < n; ++x) dst[x] = w[x] * src[idx[x]];
        return;
    }
    if (finite && taps == 2) {
#pragma omp simd
        for (int64_t x = 0; x < n; ++x) dst[x] = w[2 * x] * src[idx[2 * x]] + w[2 * x + 1] * src[idx[2 * x + 1]];
        return;
    }
    if (finite && taps == 3) {
#pragma omp simd
        for (int64_t x = 0; x < n; ++x)
            dst[x] = w[3 * x] * src[idx[3 * x]] + w[3 * x + 1] * src[idx[3 * x + 1]] + w[3 * x + 2] * src[idx[3 * x + 2]];
        return;
    }
    for (int64_t x = 0; x < n; ++x) {
        float acc = 0.0f;
        for (int64_t k = 0; k < taps; ++k)
            if (w[x * taps + k] != 0.0f) acc += w[x * taps + k] * src[idx[x * taps + k]];
        dst[x] = acc;
    }
}

/* Columns by blocks of LANES outputs, without gathers: when each block's taps (those of non-zero
 * weight) lie within WINDOW consecutive inputs, as when upsampling (at 720p each input column feeds
 * ~4.4 outputs), a block of a row is WINDOW multiply-adds of a broadcast input by the vector of the
 * block's weights on it (0 where an output does not read that input). */
#define WINDOW 8

/* m2fp_paste_vote's tiles: about this many pixels (rows of the output's width). Each instance's squash
 * is a call per tile, which resamples again the low rows the tile shares with the next: at 720p,
 * tiles of 25 rows made the paste 1.08-1.20x as fast as tiles of 12 (bench photo, one thread, on a Xeon
 * with 2 MB of L2 a core, when a tile of sig was stored too); the tile's own maps (sums, best, counts,
 * labels: 10 bytes a pixel, 330 kB; the scratch rows come on top) stay within a 512 kB L2's reach (tiles
 * of 49,152 and 65,536 pixels were no faster there within the noise). */
#define TILE_VALUES 32768

typedef struct {
    int64_t count;   /* 0: the taps do not fit (or a weight is negative): resample_row instead */
    int32_t *base;   /* per block: its window's first input */
    lanes_t *weight; /* per block, WINDOW vectors */
} blocks_t;

static void free_blocks(blocks_t *b) {
    free(b->base);
    free(b->weight);
    b->count = 0, b->base = NULL, b->weight = NULL;
}

/* The blocks of taps idx, w (n x taps, over n_src inputs). */
static blocks_t make_blocks(int64_t n_src, const int32_t *restrict idx, const float *restrict w, int64_t taps,
                            int64_t n) {
    blocks_t b = {(n + LANES - 1) / LANES, NULL, NULL};
    if (n_src < WINDOW || n == 0) return (blocks_t){0, NULL, NULL};
    b.base = malloc(sizeof(int32_t) * b.count);
    b.weight = aligned_alloc(sizeof(lanes_t), sizeof(lanes_t) * WINDOW * b.count);
    if (b.base == NULL || b.weight == NULL) goto unfit;
    for (int64_t k = 0; k < b.count; ++k) {
        int64_t first = k * LANES, end = first + LANES < n ? first + LANES : n, lo = n_src, hi = -1;
        for (int64_t i = first * taps; i < end * taps; ++i) {
            if (!(w[i] >= 0.0f)) goto unfit;  /* negative or NaN: the sign test below needs w >= 0 */
            if (w[i] == 0.0f) continue;
            lo = idx[i] < lo ? idx[i] : lo;
            hi = idx[i] > hi ? idx[i] : hi;
        }
        lo = lo < n_src - WINDOW ? lo : n_src - WINDOW;  /* the window stays inside the row */
        if (hi >= lo + WINDOW) goto unfit;
        b.base[k] = (int32_t)lo;
        float *wk = (float *)(b.weight + k * WINDOW);
        for (int64_t i = 0; i < WINDOW * LANES; ++i) wk[i] = 0.0f;
        for (int64_t x = first; x < end; ++x)
            for (int64_t t = 0; t < taps; ++t)
                if (w[x * taps + t] != 0.0f) wk[(idx[x * taps + t] - lo) * LANES + (x - first)] += w[x * taps + t];
    }
    return b;
unfit:
    free_blocks(&b);
    return b;
}

static inline int finite_row(const float *restrict src, int64_t n) {
    int finite = 1;
    for (int64_t i = 0; i < n; ++i) finite &= src[i] - src[i] == 0.0f;  /* false for inf and NaN */
    return finite;
}

/* One finite row resampled by the blocks into dst (out_w values), and per block whether any of its
 * values is > 0 (`live`): with row weights >= 0, output rows drawn only from blocks without one are
 * <= 0 there. */
static inline __attribute__((always_inline)) void resample_blocks(const blocks_t *b, const float *restrict src,
                                                                  int64_t out_w, float *restrict dst,
                                                                  uint8_t *restrict live) {
    for (int64_t k = 0; k < b->count; ++k) {
        const lanes_t *wk = b->weight + k * WINDOW;
        const float *s = src + b->base[k];
        lanes_t acc = wk[0] * s[0];
        for (int t = 1; t < WINDOW; ++t) acc += wk[t] * s[t];
        live[k] = (uint8_t)any_lane(acc > 0.0f);
        int64_t x0 = k * LANES;
        if (x0 + LANES <= out_w)
            __builtin_memcpy(dst + x0, &acc, sizeof acc);
        else
            for (int64_t x = x0; x < out_w; ++x) dst[x] = acc[x - x0];
    }
}

/* One output row of the row pass: the sum of the rows `rows + (idx[k] - first_row) * n` (k < taps,
 * weight w[k] not 0), in tap order, into v (0s without any). */
static inline void plain_row(const float *rows, int64_t first_row, int64_t n, const int32_t *restrict idx,
                             const float *restrict w, int64_t taps, float *restrict v) {
    int first = 1;
    for (int64_t k = 0; k < taps; ++k) {
        if (w[k] == 0.0f) continue;
        const float *src = rows + (idx[k] - first_row) * n;
        if (first) {
            for (int64_t x = 0; x < n; ++x) v[x] = w[k] * src[x];
            first = 0;
        } else {
            for (int64_t x = 0; x < n; ++x) v[x] += w[k] * src[x];
        }
    }
    if (first)
        for (int64_t x = 0; x < n; ++x) v[x] = 0.0f;
}

/* Where m2fp_paste_vote adds the sig it squashes, for one output row: add_instance's arguments. */
typedef struct {
    float score;
    float *probs;
    uint8_t *counts;
    int first;
} paste_t;

/* One vector of sig at x of the row added to its class (add_instance's step; a vector without a hit
 * leaves probs and counts alone unless it is the class's first). */
static inline __attribute__((always_inline)) void paste_lanes(lanes_t sig, const paste_t *paste, int64_t x) {
    lanes_t p = sig * paste->score, sums;
    ilanes_t hit = p > 0.5f;
    bytes_t hit8 = __builtin_convertvector(hit, bytes_t), c;  /* 255 where hit */
    if (paste->first) {
        sums = select_lanes(hit, p, (lanes_t){0});
        c = hit8 & 1;
    } else {
        if (!any_lane(hit)) return;
        __builtin_memcpy(&sums, paste->probs + x, sizeof sums);
        sums += select_lanes(hit, p, (lanes_t){0});
        __builtin_memcpy(&c, paste->counts + x, sizeof c);
        c -= hit8;  /* - 255 = + 1 (mod 256) */
    }
    __builtin_memcpy(paste->probs + x, &sums, sizeof sums);
    __builtin_memcpy(paste->counts + x, &c, sizeof c);
}

/* n vectors of sig 0 at x0 pasted: the class's first instance writes 0s, later ones add nothing. */
static inline __attribute__((always_inline)) void paste_zeros(const paste_t *paste, int64_t x0, int64_t n) {
    if (!paste->first) return;
    __builtin_memset(paste->probs + x0, 0, (size_t)n * sizeof(float));
    __builtin_memset(paste->counts + x0, 0, (size_t)n);
}

/* Adds one instance to its class: with p = sig * score, probs += p and counts += 1 where p > 0.5
 * (one pass for numpy's five). `n` values from each pointer (a band of rows). With `first` (the
 * class's first instance) probs and counts are written, not added to: the same values as adding to
 * zeros, without the pass that zeroes them. */
static inline __attribute__((always_inline)) void add_instance(const float *restrict sig, int64_t n, float score,
                                                          float *restrict probs, uint8_t *restrict counts,
                                                          int first) {
    const paste_t paste = {score, probs, counts, first};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        lanes_t v;
        __builtin_memcpy(&v, sig + i, sizeof v);
        paste_lanes(v, &paste, i);
    }
    for (; i < n; ++i) {
        float p = sig[i] * score;
        int hit = p > 0.5f;
        probs[i] = (first ? 0.0f : probs[i]) + (hit ? p : 0.0f);
        counts[i] = (uint8_t)((first ? 0 : counts[i]) + hit);
    }
}

/* Values x0..x0 + n of a row where no logit is > 0: positive 0s, or pasted as sig 0s (paste_zeros), or
 * sig 0s. */
static inline __attribute__((always_inline)) void none_positive(int64_t x0, int64_t n, float *restrict s,
                                                                const paste_t *paste, uint8_t *restrict positive) {
    if (positive != NULL)
        __builtin_memset(positive + x0, 0, (size_t)n);
    else if (paste != NULL)
        paste_zeros(paste, x0, n);
    else
        __builtin_memset(s + x0, 0, (size_t)n * sizeof(float));
}

/* n <= GROUP consecutive blocks of one output row from x0: the row pass from `taps` rows of scratch
 * (src, weights w, their blocks' live flags) into v when `keep`, and the squash into s, blocks
 * without a live input not squashed (sig 0) when none of the n has one; a dead block among live ones
 * is squashed too (its logits are <= 0 or NaN: sig 0, nothing added, as when skipped). The sig added
 * to the run's sums *acc and *hits; with `paste`, added to its class's sums instead of stored; with
 * `positive`, not computed: positive = 1 where the logits are > 0 (0 for blocks without a live input). */
static inline __attribute__((always_inline)) void row_group(int n, int taps, int keep, const float *const *src,
                                                            const uint8_t *const *src_live, const float *w,
                                                            int64_t x0, float *restrict v, float *restrict s,
                                                            lanes_t *acc, ilanes_t *hits, const paste_t *paste,
                                                            uint8_t *restrict positive) {
    int64_t k = x0 / LANES;
    int any = 0;
    for (int t = 0; t < taps; ++t)
        for (int g = 0; g < n; ++g) any |= src_live[t][k + g];
    if (!any && !keep) {  /* every logit <= 0 */
        none_positive(x0, n * LANES, s, paste, positive);
        return;
    }
    lanes_t in, out[GROUP], q[GROUP];
    for (int g = 0; g < n; ++g) {
        out[g] = (lanes_t){0};  /* a row without a tap of weight > 0: its logits are 0s */
        for (int t = 0; t < taps; ++t) {
            __builtin_memcpy(&in, src[t] + x0 + g * LANES, sizeof in);
            out[g] = t == 0 ? w[t] * in : out[g] + w[t] * in;
        }
    }
    if (keep) __builtin_memcpy(v + x0, out, (size_t)n * sizeof(lanes_t));
    if (positive != NULL) {  /* where the logits are > 0 (NaN is not), no squash */
        for (int g = 0; g < n; ++g) {
            bytes_t one = __builtin_convertvector(out[g] > 0.0f, bytes_t) & 1;
            __builtin_memcpy(positive + x0 + g * LANES, &one, sizeof one);
        }
        return;
    }
    if (!any) {
        none_positive(x0, n * LANES, s, paste, NULL);
        return;
    }
    squash_vectors(out, q, n, acc, hits);
    if (paste != NULL)
        for (int g = 0; g < n; ++g) paste_lanes(q[g], paste, x0 + g * LANES);
    else
        __builtin_memcpy(s + x0, q, (size_t)n * sizeof(lanes_t));
}

/* One output row's whole blocks of LANES (row_group), GROUP at a time, then the rest one by one. The
 * mask score's parts added to *sum and *count. */
static inline __attribute__((always_inline)) void row_blocks(int taps, int keep, const float *const *src,
                                                             const uint8_t *const *src_live, const float *w,
                                                             int64_t whole, float *restrict v, float *restrict s,
                                                             double *sum, int64_t *count, const paste_t *paste,
                                                             uint8_t *restrict positive) {
    lanes_t acc = {0};
    ilanes_t hits = {0};
    int64_t x0 = 0;
    for (; x0 + GROUP * LANES <= whole; x0 += GROUP * LANES) {
        if (x0 % 4096 == 0 && x0 > 0) add_lanes(&acc, &hits, sum, count);  /* runs of 4096 */
        row_group(GROUP, taps, keep, src, src_live, w, x0, v, s, &acc, &hits, paste, positive);
    }
    for (; x0 < whole; x0 += LANES) {
        if (x0 % 4096 == 0 && x0 > 0) add_lanes(&acc, &hits, sum, count);
        row_group(1, taps, keep, src, src_live, w, x0, v, s, &acc, &hits, paste, positive);
    }
    add_lanes(&acc, &hits, sum, count);
}

/* The column blocks of taps (make_blocks) when the row weights are all >= 0 (the blocks' skipping of
 * columns without a positive input needs it), with room for their live flags (low_h x count) in
 * *live; none (count 0, *live NULL: the plain loops) when they do not fit or get no memory. */
static blocks_t column_plan(int64_t low_h, int64_t low_w, const int32_t *restrict col_idx,
                            const float *restrict col_w, int64_t col_taps, int64_t out_w, const float *restrict row_w,
                            int64_t rows, int64_t row_taps, uint8_t **live) {
    int rows_fit = 1;
    for (int64_t i = 0; i < rows * row_taps; ++i) rows_fit &= row_w[i] >= 0.0f;
    blocks_t cols = rows_fit ? make_blocks(low_w, col_idx, col_w, col_taps, out_w) : (blocks_t){0, NULL, NULL};
    *live = cols.count > 0 ? malloc((size_t)(low_h * (cols.count + 2))) : NULL;
    if (*live == NULL) free_blocks(&cols);
    return cols;
}

/* Whether any of n values is > 0 (NaN is not). */
static inline int any_positive(const float *restrict src, int64_t n) {
    int any = 0;
    for (int64_t i = 0; i < n; ++i) any |= src[i] > 0.0f;
    return any;
}

/* Whether an output row reads (with a weight not 0) a low row flagged in positive[row - lo]. */
static inline int reads_positive(const int32_t *restrict idx, const float *restrict w, int64_t taps,
                                 const uint8_t *positive, int64_t lo) {
    int any = 0;
    for (int64_t k = 0; k < taps; ++k) any |= w[k] != 0.0f && positive[idx[k] - lo];
    return any;
}

/* Values x0..x0 + n of a row's logits v taken as asked, outside the block loops: positive = 1 where
 * v > 0 (NaN not), or squashed into s (the score's parts into *sum, *count) and, with `paste`, added to
 * its class. */
static inline __attribute__((always_inline)) void finish_values(const float *restrict v, int64_t x0, int64_t n,
                                                                float *restrict s, double *sum, int64_t *count,
                                                                const paste_t *paste, uint8_t *restrict positive) {
    if (positive != NULL) {
        for (int64_t x = x0; x < x0 + n; ++x) positive[x] = v[x] > 0.0f;
        return;
    }
    squash(v + x0, n, s + x0, sum, count);
    if (paste != NULL) add_instance(s + x0, n, paste->score, paste->probs + x0, paste->counts + x0, paste->first);
}

/* The paste of row i of a band (`pasted` at its first row) in *row, or NULL without one. */
static inline __attribute__((always_inline)) const paste_t *row_paste(const paste_t *pasted, int64_t i,
                                                                      int64_t out_w, paste_t *row) {
    if (pasted == NULL) return NULL;
    *row = *pasted;
    row->probs += i * out_w, row->counts += i * out_w;
    return row;
}

/* Rows of one query's mask upsampled and squashed (m2fp_upsample_squash, whose description this is),
 * with the column blocks `cols` made once by the caller (count 0: the plain loops), `live` room for
 * low_h x (cols->count + 2) flags, and sig advancing by `sig_stride` values per output row (0: every
 * row into the same row, when only the mask score is wanted, or when `pasted`).
 *
 * With `pasted` (its probs and counts: rows x out_w), each row's sig is added to them as the row is
 * squashed (add_instance; paste_lanes from the vectors while they are in registers), not stored.
 * With `positive` (rows x out_w bytes), nothing is squashed: positive = 1 where the resampled logit is
 * > 0, else 0 (NaN too), skipping what cannot be positive as the squash does (m2fp_upsample_positive).
 *
 * Without `logits` (only sig and the score wanted, or `positive`), an output row whose rows of low
 * logits hold no value > 0 is not resampled at all: with weights >= 0 its logits are <= 0 (or NaN), so
 * its sig is 0 and it adds nothing to the score; nor is a low row that only such output rows read. Most
 * rows of a trained mask (one person's part); few of an untrained one's. */
static inline __attribute__((always_inline)) void squash_rows(
    const blocks_t *cols, const float *restrict low, int64_t low_h, int64_t low_w, const int32_t *restrict col_idx,
    const float *restrict col_w, int64_t out_w, int64_t col_taps, const int32_t *restrict row_idx,
    const float *restrict row_w, int64_t rows, int64_t row_taps, float *restrict scratch, uint8_t *restrict live,
    float *restrict logits, float *restrict sig, int64_t sig_stride, double *sum, int64_t *count,
    const paste_t *pasted, uint8_t *restrict positive) {
    *sum = 0.0;
    *count = 0;
    int64_t lo = low_h, hi = -1;
    for (int64_t i = 0; i < rows * row_taps; ++i) {
        if (row_w[i] != 0.0f) {
            lo = row_idx[i] < lo ? row_idx[i] : lo;
            hi = row_idx[i] > hi ? row_idx[i] : hi;
        }
    }
    float *spare = scratch + low_h * out_w;
    if (cols->count == 0 || hi < lo) {  /* the plain loops */
        for (int64_t r = lo; r <= hi; ++r)  /* columns: the low rows these rows read */
            resample_row(low + r * low_w, low_w, col_idx, col_w, col_taps, out_w, scratch + (r - lo) * out_w);
        for (int64_t i = 0; i < rows; ++i) {  /* rows: each output row from the rows it weighs on */
            float *v = logits != NULL ? logits + i * out_w : spare;
            paste_t stretch;
            plain_row(scratch, lo, out_w, row_idx + i * row_taps, row_w + i * row_taps, row_taps, v);
            finish_values(v, 0, out_w, sig + i * sig_stride, sum, count, row_paste(pasted, i, out_w, &stretch),
                          positive != NULL ? positive + i * out_w : NULL);
        }
        return;
    }
    /* Which low rows hold a value > 0 (positive_low), and which are read by an output row that reads one
     * (needed); every low row is needed when the logits are kept. */
    uint8_t *positive_low = live + low_h * cols->count, *needed = positive_low + low_h;
    for (int64_t r = lo; r <= hi; ++r) {
        positive_low[r - lo] = logits != NULL || any_positive(low + r * low_w, low_w);
        needed[r - lo] = logits != NULL;
    }
    if (logits == NULL)
        for (int64_t i = 0; i < rows; ++i)
            if (reads_positive(row_idx + i * row_taps, row_w + i * row_taps, row_taps, positive_low, lo))
                for (int64_t k = 0; k < row_taps; ++k)
                    if (row_w[i * row_taps + k] != 0.0f) needed[row_idx[i * row_taps + k] - lo] = 1;
    for (int64_t r = lo; r <= hi; ++r) {
        const float *src = low + r * low_w;
        float *dst = scratch + (r - lo) * out_w;
        uint8_t *row_live = live + (r - lo) * cols->count;
        if (!needed[r - lo]) continue;  /* read by no output row that can be positive */
        if (finite_row(src, low_w)) {
            resample_blocks(cols, src, out_w, dst, row_live);
        } else {  /* zero weights skipped, not multiplied (0 x inf is NaN); never skipped after */
            resample_row(src, low_w, col_idx, col_w, col_taps, out_w, dst);
            for (int64_t k = 0; k < cols->count; ++k) row_live[k] = 1;
        }
    }
    int64_t whole = out_w / LANES * LANES;
    for (int64_t i = 0; i < rows; ++i) {
        const float *src[8];
        const uint8_t *src_live[8];
        float w[8];
        int taps = 0;
        for (int64_t k = 0; k < row_taps; ++k) {
            float wk = row_w[i * row_taps + k];
            if (wk == 0.0f) continue;
            if (taps == 8) {  /* more than 8 taps: sum them in the plain loop's order */
                taps = -1;
                break;
            }
            int64_t r = row_idx[i * row_taps + k] - lo;
            src[taps] = scratch + r * out_w, src_live[taps] = live + r * cols->count, w[taps] = wk;
            ++taps;
        }
        float *v = logits != NULL ? logits + i * out_w : spare;
        float *s = sig + i * sig_stride;
        paste_t stretch;  /* this row's share of the instance's paste */
        const paste_t *paste = row_paste(pasted, i, out_w, &stretch);
        uint8_t *row_positive = positive != NULL ? positive + i * out_w : NULL;
        if (logits == NULL && !reads_positive(row_idx + i * row_taps, row_w + i * row_taps, row_taps, positive_low, lo)) {
            none_positive(0, out_w, s, paste, row_positive);  /* every logit <= 0 (or NaN) */
            continue;
        }
        if (taps < 0) {
            plain_row(scratch, lo, out_w, row_idx + i * row_taps, row_w + i * row_taps, row_taps, v);
            finish_values(v, 0, out_w, s, sum, count, paste, row_positive);
            continue;
        }
        if (logits != NULL) {
            switch (taps) {  /* constant tap counts: the loops over taps unrolled, the pointers in registers */
            case 1: row_blocks(1, 1, src, src_live, w, whole, v, s, sum, count, paste, row_positive); break;
            case 2: row_blocks(2, 1, src, src_live, w, whole, v, s, sum, count, paste, row_positive); break;
            case 3: row_blocks(3, 1, src, src_live, w, whole, v, s, sum, count, paste, row_positive); break;
            default: row_blocks(taps, 1, src, src_live, w, whole, v, s, sum, count, paste, row_positive);
            }
        } else {
            switch (taps) {
            case 1: row_blocks(1, 0, src, src_live, w, whole, v, s, sum, count, paste, row_positive); break;
            case 2: row_blocks(2, 0, src, src_live, w, whole, v, s, sum, count, paste, row_positive); break;
            case 3: row_blocks(3, 0, src, src_live, w, whole, v, s, sum, count, paste, row_positive); break;
            default: row_blocks(taps, 0, src, src_live, w, whole, v, s, sum, count, paste, row_positive);
            }
        }
        if (whole < out_w) {  /* the last, partial block */
            for (int64_t x = whole; x < out_w; ++x) {
                float o = 0.0f;
                for (int t = 0; t < taps; ++t) o = t == 0 ? w[t] * src[t][x] : o + w[t] * src[t][x];
                v[x] = o;
            }
            finish_values(v, whole, out_w - whole, s, sum, count, paste, row_positive);
        }
    }
}

/* One band of rows of one query's mask, upsampled and squashed in one pass: what OpenCV's two
 * bilinear resizes (the mask logits to the padded input, then the crop to the work size) and the
 * squash's eight passes did over work-size arrays.
 *
 * The two resizes compose into one linear map per axis, given as taps (postprocess.composite_taps):
 * output position o takes sum_k w[o * K + k] * in[idx[o * K + k]] over the K taps whose weight
 * is not 0 (so a non-finite logit reaches only the outputs it weighs on). Columns first, on the low
 * rows the band reads (~1/4 of the band's height), into `scratch`; then each output row, as up to
 * `row_taps` contiguous rows of that, into `logits` (or a row of scratch when `logits` is NULL), and
 * squashed from there while it is in L1 (sig = sigmoid where the logit is > 0, else 0: squash).
 *
 * When the taps allow (blocks_t: upsampling, weights >= 0), both passes go by blocks of LANES output
 * columns, and an output block whose column-resampled rows are all <= 0 there is not squashed: its
 * logits are <= 0, so its sig is 0 (most of a trained mask; about a quarter of an untrained one's).
 *
 * low: (low_h, low_w) logits. col_idx, col_w: out_w x col_taps. row_idx, row_w: rows x row_taps (indices
 * into low's rows). scratch: (low_h + 1) x out_w floats. logits (or NULL), sig: rows x out_w.
 * *sum, *count: as squash's, over the band. */
M2FP_EXPORT void M2FP_WIDE(m2fp_upsample_squash)(const float *restrict low, int64_t low_h, int64_t low_w,
                                                 const int32_t *restrict col_idx, const float *restrict col_w,
                                                 int64_t out_w, int64_t col_taps, const int32_t *restrict row_idx,
                                                 const float *restrict row_w, int64_t rows, int64_t row_taps,
                                                 float *restrict scratch, float *restrict logits,
                                                 float *restrict sig, double *sum, int64_t *count) {
    uint8_t *live;
    blocks_t cols = column_plan(low_h, low_w, col_idx, col_w, col_taps, out_w, row_w, rows, row_taps, &live);
    squash_rows(&cols, low, low_h, low_w, col_idx, col_w, out_w, col_taps, row_idx, row_w, rows, row_taps, scratch,
                live, logits, sig, out_w, sum, count, NULL, NULL);
    free(live);
    free_blocks(&cols);
}

/* The mask scores' parts (m2fp_upsample_squash's *sum and *count) of n queries over one band of rows,
 * into sums[q] and counts[q]: the same values, with nothing stored but a row at a time (the full-size
 * sig is not written, only the sums are wanted). lows[q]: query q's (low_h, low_w) logits. Working
 * memory is the function's own. Returns 0, or -1 when it could not get it (nothing written). */
M2FP_EXPORT int M2FP_WIDE(m2fp_mask_scores)(const float *const *lows, int64_t n, int64_t low_h, int64_t low_w,
                                            const int32_t *restrict col_idx, const float *restrict col_w,
                                            int64_t out_w, int64_t col_taps, const int32_t *restrict row_idx,
                                            const float *restrict row_w, int64_t rows, int64_t row_taps,
                                            double *restrict sums, int64_t *restrict counts) {
    for (int64_t q = 0; q < n; ++q) sums[q] = 0.0, counts[q] = 0;  /* an empty band's */
    if (n <= 0 || rows <= 0 || out_w <= 0) return 0;
    uint8_t *live;
    blocks_t cols = column_plan(low_h, low_w, col_idx, col_w, col_taps, out_w, row_w, rows, row_taps, &live);
    float *scratch = malloc(sizeof(float) * (size_t)((low_h + 2) * out_w));
    int status = scratch == NULL ? -1 : 0;
    for (int64_t q = 0; q < n && status == 0; ++q)
        squash_rows(&cols, lows[q], low_h, low_w, col_idx, col_w, out_w, col_taps, row_idx, row_w, rows, row_taps,
                    scratch, live, NULL, scratch + (low_h + 1) * out_w, 0, sums + q, counts + q, NULL, NULL);
    free(scratch);
    free(live);
    free_blocks(&cols);
    return status;
}

/* Where one query's resampled logits (m2fp_upsample_squash's, the same values) are > 0 over a band of rows:
 * positive (rows x out_w bytes) = 1 there, else 0 (NaN too), with no sigmoid, and the rows and blocks that
 * cannot be positive skipped as the squash skips them (a person's mask: most of a trained one is 0). Working
 * memory is the function's own. Returns 0, or -1 when it could not get it (nothing written). */
M2FP_EXPORT int M2FP_WIDE(m2fp_upsample_positive)(const float *restrict low, int64_t low_h, int64_t low_w,
                                                  const int32_t *restrict col_idx, const float *restrict col_w,
                                                  int64_t out_w, int64_t col_taps, const int32_t *restrict row_idx,
                                                  const float *restrict row_w, int64_t rows, int64_t row_taps,
                                                  uint8_t *restrict positive) {
    if (rows <= 0 || out_w <= 0) return 0;
    uint8_t *live;
    blocks_t cols = column_plan(low_h, low_w, col_idx, col_w, col_taps, out_w, row_w, rows, row_taps, &live);
    float *scratch = malloc(sizeof(float) * (size_t)((low_h + 2) * out_w));
    int status = scratch == NULL ? -1 : 0;
    if (status == 0) {
        double sum;
        int64_t count;
        squash_rows(&cols, low, low_h, low_w, col_idx, col_w, out_w, col_taps, row_idx, row_w, rows, row_taps,
                    scratch, live, NULL, scratch + (low_h + 1) * out_w, 0, &sum, &count, NULL, positive);
    }
    free(scratch);
    free(live);
    free_blocks(&cols);
    return status;
}

M2FP_EXPORT void M2FP_WIDE(m2fp_add_instance)(const float *restrict sig, int64_t n, float score,
                                              float *restrict probs, uint8_t *restrict counts, int first) {
    add_instance(sig, n, score, probs, counts, first);
}

/* One band of the label map from the instances pasted into it: for each class in increasing order,
 * its instances' masks upsampled and squashed (squash_rows), added to the class's sums where
 * sig * score > 0.5 as each row is squashed (add_instance: paste_t), averaged and voted
 * (average_vote), the labels starting at 0 (background) and the best probability at 0. The same
 * operations on every pixel as m2fp_upsample_squash, m2fp_add_instance and m2fp_average_vote over the
 * whole band, so the same labels; done tile by tile of a few rows, so that the class's sums and the
 * best probabilities stay in the cache and no full-size map is written but the labels (the paste's
 * sig is stored only a row at a time, on the plain paths: 1.03-1.05x as fast as a tile of it written
 * and read back).
 *
 * lows[i], scores[i] (in [0, 1]), classes[i]: instance i's (low_h, low_w) logits, score and class,
 * the classes non-decreasing (the caller checks). labels: rows x out_w, written. Working memory is
 * the function's own. Returns 0, or -1 when it could not get it (nothing written). */
M2FP_EXPORT int M2FP_WIDE(m2fp_paste_vote)(const float *const *lows, const float *restrict scores,
                                           const uint8_t *restrict classes, int64_t n, int64_t low_h,
                                           int64_t low_w, const int32_t *restrict col_idx,
                                           const float *restrict col_w, int64_t out_w, int64_t col_taps,
                                           const int32_t *restrict row_idx, const float *restrict row_w,
                                           int64_t rows, int64_t row_taps, uint8_t *restrict labels) {
    if (rows <= 0 || out_w <= 0) return 0;
    int64_t tile = TILE_VALUES / out_w > 0 ? TILE_VALUES / out_w : 1;
    tile = tile < rows ? tile : rows;
    uint8_t *live;
    blocks_t cols = column_plan(low_h, low_w, col_idx, col_w, col_taps, out_w, row_w, rows, row_taps, &live);
    float *scratch = malloc(sizeof(float) * (size_t)((low_h + 1) * out_w));
    float *sig = malloc(sizeof(float) * (size_t)((2 * tile + 1) * out_w));  /* a row of sig, sums, best */
    uint8_t *counts = malloc((size_t)(tile * out_w));
    int status = scratch == NULL || sig == NULL || counts == NULL ? -1 : 0;
    float *probs = status == 0 ? sig + out_w : NULL, *best = status == 0 ? probs + tile * out_w : NULL;
    for (int64_t r0 = 0; r0 < rows && status == 0; r0 += tile) {
        int64_t height = rows - r0 < tile ? rows - r0 : tile, values = height * out_w;
        uint8_t *tile_labels = labels + r0 * out_w;
        for (int64_t i = 0; i < values; ++i) best[i] = 0.0f, tile_labels[i] = 0;
        for (int64_t i = 0; i < n;) {
            uint8_t class_id = classes[i];
            for (int first = 1; i < n && classes[i] == class_id; ++i, first = 0) {
                double sum;
                int64_t count;
                paste_t paste = {scores[i], probs, counts, first};  /* added as each row is squashed */
                squash_rows(&cols, lows[i], low_h, low_w, col_idx, col_w, out_w, col_taps, row_idx + r0 * row_taps,
                            row_w + r0 * row_taps, height, row_taps, scratch, live, NULL, sig, 0, &sum, &count,
                            &paste, NULL);
            }
            average_vote(probs, counts, values, class_id, best, tile_labels);
        }
    }
    free(counts);
    free(sig);
    free(scratch);
    free(live);
    free_blocks(&cols);
    return status;
}
