/* Post-processing's per-pixel work, fused: libm2fp_post.so (plain C, no dependencies).
 *
 * imaging/postprocess.py's OpenCV/numpy path takes each query's mask logits through two bilinear
 * resizes (to the padded input, then the crop to the work size) and eight passes over work-size
 * arrays (negate, exp, add, reciprocal for the sigmoid; threshold, multiply, sum, count for the mask
 * score), adds each instance in five (multiply, threshold, add, compare, add), then averages and
 * votes each class's map in seven more. At 720p each pass streams 3.7 MB. Here the two resizes are
 * the one resampling they compose to, done with the squash in one pass (and skipped, sigmoid and all,
 * where no logit can be positive), and each other step is one pass. Results agree with the Python
 * path to float rounding (the resampling and the sigmoid) or exactly (the rest):
 * tests/imaging/test_fused.py.
 *
 * Where the work is at the label map's size, two passes write no full-size map but the labels:
 * m2fp_mask_scores sums every query's mask score storing nothing, then m2fp_paste_vote makes a band's
 * labels tile by tile of a few rows, each pasted instance squashed again, added, each class averaged
 * and voted in the cache (the same operations on every pixel as the one-step functions; working
 * memory their own).
 *
 * Compositing's full-size passes too (imaging/compose.py): applying the guided filter's coefficients
 * (three resizes, a multiply, a channel sum, an add, four snapping passes and a masked copy, each
 * streaming 3.7 to 11 MB at 720p) and the border's foreground colour with the blend over the backdrop
 * (finding the border, sampling, the formula, a scatter and OpenCV's blend) are one pass each.
 *
 * The per-pixel kernels of post-processing are in m2fp_post_lanes.h, built here for this build's target
 * and, in a build for x86-64's levels, again for AVX2 and AVX-512 (m2fp_post_avx2.c,
 * m2fp_post_avx512.c), each with vectors as wide as that level's registers: a vector wider than them
 * has its comparisons done lane by lane (GCC 12), which made the AVX2 clone of one 16-float build 6x
 * slower than the AVX-512 one and slower than OpenCV/numpy. m2fp_post_lanes() says which the CPU runs.
 *
 * Called through ctypes on row bands from several threads (ctypes releases the GIL): the functions
 * keep no state and write only the values they are given.
 */
#include "m2fp_post.h"

M2FP_EXPORT int m2fp_post_abi(void) { return 10; }  /* 10: m2fp_upsample_positive; 9: mask rows; 8: resize */

/* The vector width of the per-pixel kernels the CPU runs best: 16 (their names end in _w16), 8 or 4. */
M2FP_EXPORT int m2fp_post_lanes(void) {
#ifdef M2FP_WIDTHS
    __builtin_cpu_init();
    if (M2FP_TARGET_LANES < 16 && __builtin_cpu_supports("x86-64-v4")) return 16;
    if (M2FP_TARGET_LANES < 8 && __builtin_cpu_supports("x86-64-v3")) return 8;
#endif
    return M2FP_TARGET_LANES;
}

#include "m2fp_post_lanes.h"

/* A class's pasted probabilities averaged, in place: probs /= max(counts, 1) (one pass for numpy's
 * three). */
M2FP_CLONES M2FP_EXPORT void m2fp_average(float *restrict probs, const uint8_t *restrict counts, int64_t n) {
    for (int64_t i = 0; i < n; ++i) probs[i] = averaged(probs[i], counts[i]);
}

/* One class's turn in the argmax (vote_at at every pixel: one pass for OpenCV's compare, max, and,
 * max). */
M2FP_CLONES M2FP_EXPORT void m2fp_vote(const float *restrict prob, int64_t n, uint8_t class_id, float *restrict best,
                                       uint8_t *restrict labels) {
    for (int64_t i = 0; i < n; ++i) vote_at(prob[i], class_id, best + i, labels + i);
}

/* average_vote over n values: the step m2fp_paste_vote takes per class and tile, exported as the
 * tests' reference for it. */
M2FP_CLONES M2FP_EXPORT void m2fp_average_vote(const float *restrict probs, const uint8_t *restrict counts, int64_t n,
                                               uint8_t class_id, float *restrict best, uint8_t *restrict labels) {
    average_vote(probs, counts, n, class_id, best, labels);
}

/* ---- encoding ------------------------------------------------------------------------------- */

/* One class's mask (255 where labels == class_id, else 0) as PNG rows filtered "up" (each row's
 * filter byte 2, then the row minus the row above, modulo 256; the first row's above is zeros), into
 * out (h x (w + 1) bytes): imaging/render.py's class_mask and encode_png's filter in one pass, without
 * the mask (the seed envelope's 17 masks: 1.2-1.3x as fast, encoding included). */
M2FP_CLONES M2FP_EXPORT void m2fp_mask_rows_up(const uint8_t *restrict labels, int64_t h, int64_t w, uint8_t class_id,
                                               uint8_t *restrict out) {
    for (int64_t y = 0; y < h; ++y) {
        const uint8_t *row = labels + y * w;
        uint8_t *o = out + y * (w + 1);
        o[0] = 2;
        if (y == 0)
            for (int64_t x = 0; x < w; ++x) o[1 + x] = row[x] == class_id ? 255 : 0;
        else
            for (int64_t x = 0; x < w; ++x)
                o[1 + x] = (uint8_t)((row[x] == class_id ? 255 : 0) - (row[x - w] == class_id ? 255 : 0));
    }
}

/* ---- compositing ------------------------------------------------------------------------------ */

/* alpha clipped to 0..1, values within 1/255 of 0 or 1 set to them (NaN gives 0): compose._snap. */
static inline float snap(float q) {
    const float tol = 1.0f / 255.0f;
    q = q > tol ? q : 0.0f;
    q = q < 1.0f ? q : 1.0f;
    return q > 1.0f - tol ? 1.0f : q;
}

/* Rounds a float in [0, 2^22) to the nearest integer, ties to even (as OpenCV's saturate_cast). */
static inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* A bilinear sample of channel c of an (.., ws, cn) map at rows (r0, r1) and columns (i0, i1). */
static inline float bilinear_at(const float *restrict map, int64_t ws, int64_t cn, int32_t r0, int32_t r1,
                                float v0, float v1, int32_t i0, int32_t i1, float u0, float u1, int64_t c) {
    const float *top = map + (int64_t)r0 * ws * cn, *bottom = map + (int64_t)r1 * ws * cn;
    return v0 * (u0 * top[i0 * cn + c] + u1 * top[i1 * cn + c]) + v1 * (u0 * bottom[i0 * cn + c] + u1 * bottom[i1 * cn + c]);
}

/* The products the colour guided filter box-averages, per pixel: I (3), p, I p (3), then the six of
 * I I^T (rr, rg, rb, gg, gb, bb). guide: (n, 3), p: (n), out: (n, 13). */
M2FP_CLONES M2FP_EXPORT void m2fp_guided_products(const float *restrict guide, const float *restrict p, int64_t n,
                                                  float *restrict out) {
    for (int64_t i = 0; i < n; ++i) {
        const float *g = guide + 3 * i;
        float *o = out + 13 * i;
        o[0] = g[0], o[1] = g[1], o[2] = g[2], o[3] = p[i];
        o[4] = g[0] * p[i], o[5] = g[1] * p[i], o[6] = g[2] * p[i];
        o[7] = g[0] * g[0], o[8] = g[0] * g[1], o[9] = g[0] * g[2];
        o[10] = g[1] * g[1], o[11] = g[1] * g[2], o[12] = g[2] * g[2];
    }
}

/* The guided filter's linear model per pixel from the box means of m2fp_guided_products: the guide's
 * covariance plus eps on its diagonal, inverted by its adjugate, times the covariance of guide and p
 * gives a; b = mean p - a . mean I. means: (n, 13), coef: (n, 4) = a0, a1, a2, b. */
M2FP_CLONES M2FP_EXPORT void m2fp_guided_solve(const float *restrict means, int64_t n, float eps,
                                               float *restrict coef) {
    for (int64_t i = 0; i < n; ++i) {
        const float *m = means + 13 * i;
        float mr = m[0], mg = m[1], mb = m[2], mp = m[3];
        float c0 = m[4] - mr * mp, c1 = m[5] - mg * mp, c2 = m[6] - mb * mp;
        float rr = m[7] - mr * mr + eps, rg = m[8] - mr * mg, rb = m[9] - mr * mb;
        float gg = m[10] - mg * mg + eps, gb = m[11] - mg * mb, bb = m[12] - mb * mb + eps;
        float i_rr = gg * bb - gb * gb, i_rg = gb * rb - rg * bb, i_rb = rg * gb - gg * rb;
        float i_gg = rr * bb - rb * rb, i_gb = rb * rg - rr * gb, i_bb = rr * gg - rg * rg;
        float inv_det = 1.0f / (rr * i_rr + rg * i_rg + rb * i_rb);
        float a0 = (i_rr * c0 + i_rg * c1 + i_rb * c2) * inv_det;
        float a1 = (i_rg * c0 + i_gg * c1 + i_gb * c2) * inv_det;
        float a2 = (i_rb * c0 + i_gb * c1 + i_bb * c2) * inv_det;
        float *o = coef + 4 * i;
        o[0] = a0, o[1] = a1, o[2] = a2, o[3] = mp - (a0 * mr + a1 * mg + a2 * mb);
    }
}

/* The guided filter's output where `busy`, alpha elsewhere: out = snap(a . guide + b) with the
 * coefficients (a0, a1, a2, b) bilinearly upsampled from the small map `coef` (contrast and the
 * guide's 1/255 already folded in), one row at a time: the row's two small rows mixed into `tmp`,
 * then each pixel from two of its columns.
 *
 * coef: (hs, ws, 4). row_idx, row_w: (h, 2) into coef's rows. col_idx, col_w: (w, 2) into its
 * columns. guide: (h, w, 3). busy: (h, w), non-zero where the filter applies. alpha, out: (h, w).
 * tmp: ws * 4 floats. */
M2FP_CLONES M2FP_EXPORT void m2fp_guided_apply(const float *restrict coef, int64_t ws,
                                               const int32_t *restrict row_idx, const float *restrict row_w,
                                               const int32_t *restrict col_idx, const float *restrict col_w,
                                               const uint8_t *restrict guide, const uint8_t *restrict busy,
                                               const float *restrict alpha, int64_t h, int64_t w,
                                               float *restrict tmp, float *restrict out) {
    for (int64_t y = 0; y < h; ++y) {
        const float *top = coef + (int64_t)row_idx[2 * y] * ws * 4, *bottom = coef + (int64_t)row_idx[2 * y + 1] * ws * 4;
        float v0 = row_w[2 * y], v1 = row_w[2 * y + 1];
        for (int64_t i = 0; i < ws * 4; ++i) tmp[i] = v0 * top[i] + v1 * bottom[i];
        const uint8_t *g = guide + y * w * 3, *on = busy + y * w;
        const float *in = alpha + y * w;
        float *o = out + y * w;
        for (int64_t x = 0; x < w; ++x) {
            if (!on[x]) {
                o[x] = in[x];
                continue;
            }
            const float *c0 = tmp + 4 * col_idx[2 * x], *c1 = tmp + 4 * col_idx[2 * x + 1];
            float u0 = col_w[2 * x], u1 = col_w[2 * x + 1];
            float q = u0 * c0[3] + u1 * c1[3];
            for (int k = 0; k < 3; ++k) q += (u0 * c0[k] + u1 * c1[k]) * (float)g[3 * x + k];
            o[x] = snap(q);
        }
    }
}

/* One side's local mean colour at a border pixel (compose._mean_at): the narrow box's weighted mean
 * where it holds weight, else the wide box's, else the pixel's own colour. narrow, wide: (hs, ws, 4)
 * maps of weighted colour sums and the weight sum. */
static inline void side_mean(const float *restrict narrow, const float *restrict wide, int64_t ws, int32_t r0,
                             int32_t r1, float v0, float v1, int32_t i0, int32_t i1, float u0, float u1,
                             const float *restrict own, float *restrict mean) {
    float den = bilinear_at(narrow, ws, 4, r0, r1, v0, v1, i0, i1, u0, u1, 3);
    const float *map = narrow;
    if (!(den > 1e-3f)) {
        den = bilinear_at(wide, ws, 4, r0, r1, v0, v1, i0, i1, u0, u1, 3);
        map = wide;
        if (!(den > 1e-4f)) {
            for (int k = 0; k < 3; ++k) mean[k] = own[k];
            return;
        }
    }
    for (int k = 0; k < 3; ++k) mean[k] = bilinear_at(map, ws, 4, r0, r1, v0, v1, i0, i1, u0, u1, k) / den;
}

/* The composed picture (compose.composite's estimate_foreground and blend), a row at a time: where
 * alpha is strictly between 0 and 1 the subject's own colour is estimated (blur-fusion,
 * F = F^ + a (I - a F^ - (1 - a) B^), with F^ and B^ the local means of the solid subject and the
 * solid background, bilinearly sampled from the small maps `sums`), elsewhere the photo's pixel is the
 * subject; those colours go to `row` (a sparse pass over the border). Then, in a pass without
 * branches, with a backdrop out = (S a + back (1 - a)) / (a + (1 - a) + 1e-5) rounded (OpenCV's
 * blendLinear); without one (transparent), out = RGBA (S, alpha * 255 rounded).
 *
 * image: (h, w, 3). alpha: (h, w) in 0..1. back: (h, w, 3) or NULL. sums: (4, hs, ws, 4): the solid
 * subject's narrow and wide sums, then the solid background's. row_idx, row_w: (h, 2) into the sums'
 * rows; col_idx, col_w: (w, 2) into their columns. row: 9 * w floats. out: (h, w, 3), or (h, w, 4)
 * without a backdrop. */
M2FP_CLONES M2FP_EXPORT void m2fp_compose(const uint8_t *restrict image, const float *restrict alpha,
                                          const uint8_t *restrict back, int64_t h, int64_t w,
                                          const float *restrict sums, int64_t hs, int64_t ws,
                                          const int32_t *restrict row_idx, const float *restrict row_w,
                                          const int32_t *restrict col_idx, const float *restrict col_w,
                                          float *restrict row, uint8_t *restrict out) {
    const float tiny = 1e-7f;
    const int64_t plane = hs * ws * 4;
    for (int64_t y = 0; y < h; ++y) {
        const uint8_t *img = image + y * w * 3;
        const float *al = alpha + y * w;
        for (int64_t i = 0; i < 3 * w; ++i) row[i] = (float)img[i];
        int32_t r0 = row_idx[2 * y], r1 = row_idx[2 * y + 1];
        float v0 = row_w[2 * y], v1 = row_w[2 * y + 1];
        for (int64_t x = 0; x < w; ++x) {
            float a = al[x];
            if (!(a >= tiny && a <= 1.0f - tiny)) continue;
            int32_t i0 = col_idx[2 * x], i1 = col_idx[2 * x + 1];
            float u0 = col_w[2 * x], u1 = col_w[2 * x + 1];
            float own[3], f[3], b[3];
            for (int k = 0; k < 3; ++k) own[k] = row[3 * x + k] * (1.0f / 255.0f);
            side_mean(sums, sums + plane, ws, r0, r1, v0, v1, i0, i1, u0, u1, own, f);
            side_mean(sums + 2 * plane, sums + 3 * plane, ws, r0, r1, v0, v1, i0, i1, u0, u1, own, b);
            for (int k = 0; k < 3; ++k) {
                float v = (f[k] + a * (own[k] - a * f[k] - (1.0f - a) * b[k])) * 255.0f + 0.5f;
                v = v > 0.0f ? v : 0.0f;
                row[3 * x + k] = (float)(uint8_t)(v < 255.0f ? v : 255.0f);
            }
        }
        if (back == NULL) {
            uint8_t *o = out + y * w * 4;
            for (int64_t x = 0; x < w; ++x) {
                for (int k = 0; k < 3; ++k) o[4 * x + k] = (uint8_t)row[3 * x + k];
                float v = al[x] * 255.0f;
                v = v > 0.0f ? v : -v;
                o[4 * x + 3] = (uint8_t)round_even(v < 255.0f ? v : 255.0f);
            }
            continue;
        }
        const uint8_t *bk = back + y * w * 3;
        uint8_t *o = out + y * w * 3;
        float *wa = row + 3 * w, *wb = row + 6 * w;  /* each pixel's two weights, per channel */
        for (int64_t x = 0; x < w; ++x)
            for (int k = 0; k < 3; ++k) {
                wa[3 * x + k] = al[x];
                wb[3 * x + k] = 1.0f - al[x];
            }
        for (int64_t i = 0; i < 3 * w; ++i) {
            float v = (row[i] * wa[i] + (float)bk[i] * wb[i]) / (wa[i] + wb[i] + 1e-5f);
            v = v > 0.0f ? v : 0.0f;
            o[i] = (uint8_t)round_even(v < 255.0f ? v : 255.0f);
        }
    }
}
