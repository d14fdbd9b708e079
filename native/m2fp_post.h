/* What libm2fp_post.so's translation units share (m2fp_post.c, m2fp_post_avx2.c, m2fp_post_avx512.c,
 * m2fp_resize.c): how functions are built and exported, the vector width of the build's own target, and
 * the per-pixel steps of the argmax that both the exported loops and m2fp_paste_vote take. */
#ifndef M2FP_POST_H
#define M2FP_POST_H

#include <stdint.h>
#include <stdlib.h>

/* Each exported loop is built for three x86-64 levels, the CPU's widest picked at load time; a build
 * given -DM2FP_CLONES= (and a -march) has one (tests/imaging/test_fused.py tests the narrower ones).
 * The per-pixel kernels are built once per level, each with its own vector width (m2fp_post_lanes.h). */
#ifndef M2FP_CLONES
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define M2FP_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#define M2FP_WIDTHS 1 /* and the per-pixel kernels built for each level too (m2fp_post_lanes.h) */
#else
#define M2FP_CLONES
#endif
#endif
#define M2FP_EXPORT __attribute__((visibility("default")))


/* The vector width (floats) of the per-pixel kernels for the target being compiled: a 512-bit
 * register's with AVX-512, a 256-bit one's with AVX2, else 128 bits (SSE2, NEON). */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define M2FP_TARGET_LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#define M2FP_TARGET_LANES 8
#else
#define M2FP_TARGET_LANES 4
#endif

/* A class's pasted sum at one pixel averaged over the instances pasted there. */
static inline float averaged(float sum, uint8_t count) { return sum / (float)(count > 1 ? count : 1); }

/* One pixel's turn in the per-pixel argmax over classes taken in increasing order: where prob beats
 * the best so far (strictly, so ties keep the lower class), best = prob and label = class_id. */
static inline void vote_at(float prob, uint8_t class_id, float *best, uint8_t *label) {
    int win = prob > *best;
    *best = win ? prob : *best;
    *label = win ? class_id : *label;
}

/* m2fp_average then m2fp_vote in one pass, for a class whose map is already at the label map's size:
 * the same division and the same comparison per pixel, probs left as they were. */
static inline __attribute__((always_inline)) void average_vote(const float *restrict probs,
                                                          const uint8_t *restrict counts, int64_t n,
                                                          uint8_t class_id, float *restrict best,
                                                          uint8_t *restrict labels) {
    for (int64_t i = 0; i < n; ++i) vote_at(averaged(probs[i], counts[i]), class_id, best + i, labels + i);
}

#endif
