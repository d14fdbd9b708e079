/* Preprocessing's resize, part of libm2fp_post.so: Pillow's bilinear resize of an RGB image
 * (Image.resize(size, Image.BILINEAR) without a box), the same bytes, written straight into the model's
 * planar float input and done on row bands in parallel (imaging/preprocess.py).
 *
 * Pillow resizes in two passes, each output value a fixed-point sum of its inputs: first along rows
 * (into 8-bit values, only for the rows the second pass reads), then along columns. (Pillow 12.2 and
 * later take the columns first for some tall images, which rounds otherwise: the caller keeps Pillow's
 * own resize there, fused.pillow_rows_first; this file takes the rows first only.) Its coefficients
 * come from the triangle filter stretched by the scale when shrinking (an antialiased resize), in
 * double precision, normalised to sum 1 and rounded to 22 fractional bits (Pillow's
 * src/libImaging/Resample.c: precompute_coeffs, normalize_coeffs_8bpc,
 * ImagingResample{Horizontal,Vertical}_8bpc). Here the same coefficients, by the same double
 * operations in the same order (none of them fusable into a multiply-add that would round otherwise),
 * and the same integer sums: each output value equals Pillow's, whatever band it is computed in
 * (tests/imaging/test_resize.py compares them on images of many sizes). */
#include "m2fp_post.h"

#include <math.h>
#include <string.h>

#define PRECISION_BITS 22 /* Pillow's for 8-bit images: 32 - 8 - 2 */

/* The taps of one axis's resize from in_size to out_size: for output o, its first input bounds[2o],
 * its count bounds[2o + 1] and their fixed-point weights coeffs[o * ksize + k]. Returns ksize, or 0
 * when there is no memory (nothing to free then). */
static int64_t resize_taps(int64_t in_size, int64_t out_size, int32_t **bounds_out, int32_t **coeffs_out) {
    /* Pillow's box is floats (0, in_size); in1 - in0 is taken in float, then in double. */
    double scale = (double)((float)in_size - 0.0f) / (double)out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 1.0 * filterscale; /* the triangle filter's support is 1 */
    int64_t ksize = (int64_t)ceil(support) * 2 + 1;
    double *weights = malloc(sizeof(double) * (size_t)ksize);
    int32_t *bounds = malloc(sizeof(int32_t) * 2 * (size_t)out_size);
    int32_t *coeffs = malloc(sizeof(int32_t) * (size_t)(out_size * ksize));
    if (weights == NULL || bounds == NULL || coeffs == NULL) {
        free(weights), free(bounds), free(coeffs);
        return 0;
    }
    for (int64_t o = 0; o < out_size; ++o) {
        double center = 0.0 + ((double)o + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int64_t lo = (int)(center - support + 0.5), hi = (int)(center + support + 0.5);
        lo = lo < 0 ? 0 : lo;
        hi = (hi > in_size ? in_size : hi) - lo;
        for (int64_t x = 0; x < hi; ++x) {
            double t = ((double)(x + lo) - center + 0.5) * ss, w = t < 0.0 ? -t : t;
            weights[x] = w < 1.0 ? 1.0 - w : 0.0;
            ww += weights[x];
        }
        for (int64_t x = 0; x < ksize; ++x) {
            double k = x < hi ? (ww != 0.0 ? weights[x] / ww : weights[x]) : 0.0;
            coeffs[o * ksize + x] = k < 0 ? (int32_t)(-0.5 + k * (1 << PRECISION_BITS))
                                          : (int32_t)(0.5 + k * (1 << PRECISION_BITS));
        }
        bounds[2 * o] = (int32_t)lo, bounds[2 * o + 1] = (int32_t)hi;
    }
    free(weights);
    *bounds_out = bounds, *coeffs_out = coeffs;
    return ksize;
}

/* Pillow's clip8: a fixed-point sum to 0..255. */
static inline uint8_t clip8(int32_t sum) {
    int32_t v = sum >> PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* One input row resized along the row (the first pass) into 3 out_w bytes: output x's count taps from
 * input bounds[2x], weights coeffs[x * ksize + t], each channel's sum as Pillow's. */
M2FP_CLONES static void across_row(const uint8_t *restrict in, int64_t out_w, const int32_t *restrict bounds,
                                   const int32_t *restrict coeffs, int64_t ksize, uint8_t *restrict out) {
    for (int64_t x = 0; x < out_w; ++x) {
        const uint8_t *p = in + 3 * (int64_t)bounds[2 * x];
        const int32_t *k = coeffs + x * ksize;
        int32_t s0 = 1 << (PRECISION_BITS - 1), s1 = s0, s2 = s0;
        switch (bounds[2 * x + 1]) { /* the common counts unrolled */
        case 3:
            s0 += p[6] * k[2], s1 += p[7] * k[2], s2 += p[8] * k[2];
            /* fall through */
        case 2:
            s0 += p[0] * k[0] + p[3] * k[1], s1 += p[1] * k[0] + p[4] * k[1], s2 += p[2] * k[0] + p[5] * k[1];
            break;
        default:
            for (int64_t t = 0; t < bounds[2 * x + 1]; ++t)
                s0 += p[3 * t] * k[t], s1 += p[3 * t + 1] * k[t], s2 += p[3 * t + 2] * k[t];
        }
        out[3 * x] = clip8(s0), out[3 * x + 1] = clip8(s1), out[3 * x + 2] = clip8(s2);
    }
}

/* One output row from `count` rows of the first pass's output (3 out_w bytes apart) with weights k
 * (the second pass), as floats into the planar rows r, r + plane, r + 2 plane; `sums` has room for
 * 3 out_w int32s. */
M2FP_CLONES static void down_row(const uint8_t *restrict in, int64_t out_w, const int32_t *restrict k, int64_t count,
                                 int32_t *restrict sums, float *restrict r, int64_t plane) {
    int64_t n = 3 * out_w;
    for (int64_t i = 0; i < n; ++i) sums[i] = 1 << (PRECISION_BITS - 1);
    for (int64_t t = 0; t < count; ++t)
        for (int64_t i = 0; i < n; ++i) sums[i] += in[t * n + i] * k[t];
    float *restrict g = r + plane, *restrict b = g + plane;
    for (int64_t x = 0; x < out_w; ++x) {
        r[x] = (float)clip8(sums[3 * x]);
        g[x] = (float)clip8(sums[3 * x + 1]);
        b[x] = (float)clip8(sums[3 * x + 2]);
    }
}

/* Rows y0..y1 (of out_h) of the (in_h, in_w, 3) RGB image `src` resized to (out_h, out_w) as Pillow's
 * bilinear resize makes them, written as floats into the planar (3, dst_h, dst_w) `dst` (rows y0..y1,
 * columns 0..out_w; the rest is left alone). Returns 0, -1 without memory or -2 for sizes or rows that do
 * not fit (nothing written either way; fused.PostKernel.resize_rgb checks them first). */
M2FP_EXPORT int m2fp_resize_rgb(const uint8_t *restrict src, int64_t in_h, int64_t in_w, int64_t out_h,
                                int64_t out_w, int64_t y0, int64_t y1, float *restrict dst, int64_t dst_h,
                                int64_t dst_w) {
    if (in_h <= 0 || in_w <= 0 || out_w <= 0 || out_w > dst_w || out_h > dst_h || y0 < 0 || y1 > out_h || y0 > y1)
        return -2;
    if (y0 == y1) return 0;
    int32_t *rb, *rk, *cb, *ck;
    int64_t rsize = resize_taps(in_h, out_h, &rb, &rk);
    if (rsize == 0) return -1;
    int64_t csize = resize_taps(in_w, out_w, &cb, &ck);
    if (csize == 0) {
        free(rb), free(rk);
        return -1;
    }
    /* The input rows this band reads, resized along the row first (8-bit, as Pillow keeps them). */
    int64_t first = rb[2 * y0], last = rb[2 * (y1 - 1)] + rb[2 * (y1 - 1) + 1];
    uint8_t *across = malloc((size_t)((last - first) * 3 * out_w));
    int32_t *sums = malloc(sizeof(int32_t) * (size_t)(3 * out_w));
    int status = across == NULL || sums == NULL ? -1 : 0;
    if (status == 0) {
        for (int64_t y = first; y < last; ++y)
            across_row(src + y * in_w * 3, out_w, cb, ck, csize, across + (y - first) * 3 * out_w);
        for (int64_t y = y0; y < y1; ++y)
            down_row(across + (rb[2 * y] - first) * 3 * out_w, out_w, rk + y * rsize, rb[2 * y + 1], sums,
                     dst + y * dst_w, dst_h * dst_w);
    }
    free(sums), free(across);
    free(rb), free(rk), free(cb), free(ck);
    return status;
}
