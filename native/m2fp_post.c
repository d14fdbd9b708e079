/* Post-processing's per-pixel work, fused: libm2fp_post.so (plain C, no dependencies).
 *
 * imaging/postprocess.py's OpenCV/numpy path takes each query's mask logits through two bilinear
 * resizes (to the padded input, then the crop to the work size) and eight passes over work-size
 * arrays (negate, exp, add, reciprocal for the sigmoid; threshold, multiply, sum, count for the mask
 * score), adds each instance in five (multiply, threshold, add, compare, add), then averages and
 * votes each class's map in seven more. At 720p each pass streams 3.7 MB. Here the two resizes are
 * the one resampling they compose to, done with the squash in one pass, and each other step is one
 * pass. Results agree with the Python path to float rounding (the resampling and the sigmoid) or
 * exactly (the rest): tests/imaging/test_fused.py.
 *
 * Called through ctypes on row bands from several threads (ctypes releases the GIL): the functions
 * keep no state and write only the values they are given.
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define M2FP_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define M2FP_CLONES
#endif
#define M2FP_EXPORT __attribute__((visibility("default")))

M2FP_EXPORT int m2fp_post_abi(void) { return 3; }

/* exp(x) for x in [-88, 88] (callers clamp), without branches so loops over it vectorize: 2^n p(r)
 * with n = round(x / ln 2) (adding and subtracting 1.5 * 2^23 rounds to nearest), r = x - n ln 2 in
 * two parts, p a degree-7 polynomial (Cephes' expf). Within 2 ulp of expf. */
static inline float exp_clamped(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    const float round = 12582912.0f;
    float n = (x * log2e + round) - round;
    float r = x - n * ln2_hi - n * ln2_lo;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* sigmoid(v); NaN gives NaN (the exponential is taken of 0 instead: converting NaN to an integer is
 * undefined behaviour). */
static inline float sigmoid(float v) {
    float t = -v;
    t = t < -88.0f ? -88.0f : t;
    t = t > 88.0f ? 88.0f : t;
    t = t == t ? t : 0.0f;
    float s = 1.0f / (1.0f + exp_clamped(t));
    return v == v ? s : v;
}

/* n logits squashed: sig = sigmoid(logits), and the mask score's parts added to *sum (the sum of
 * sig where logits > 0) and *count (how many such pixels). A NaN logit gives a NaN sig and counts
 * nowhere. */
static inline void squash(const float *restrict logits, int64_t n, float *restrict sig, double *sum,
                          int64_t *count) {
    for (int64_t start = 0; start < n; start += 4096) {  /* float partial sums over short runs */
        int64_t end = n - start < 4096 ? n : start + 4096;
        float acc = 0.0f;
        int32_t hits = 0;
#pragma omp simd reduction(+ : acc, hits)
        for (int64_t i = start; i < end; ++i) {
            float v = logits[i];
            float s = sigmoid(v);
            sig[i] = s;
            int pos = v > 0.0f;
            acc += pos ? s : 0.0f;
            hits += pos;
        }
        *sum += acc;
        *count += hits;
    }
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

/* One band of rows of one query's mask, upsampled and squashed in one pass: what OpenCV's two
 * bilinear resizes (the mask logits to the padded input, then the crop to the work size) and the
 * squash's eight passes did over work-size arrays.
 *
 * The two resizes compose into one linear map per axis, given as taps (postprocess.composite_taps):
 * output position o takes sum_k w[o * K + k] * in[idx[o * K + k]] over the K taps whose weight
 * is not 0 (so a non-finite logit reaches only the outputs it weighs on). Columns first, on the low
 * rows the band reads (~1/4 of the band's height), into `scratch`; then each output row, as up to
 * `row_taps` contiguous rows of that, into `logits` (or scratch's last row when `logits` is NULL), and
 * squashed from there while it is in L1.
 *
 * low: (low_h, low_w) logits. col_idx, col_w: out_w x col_taps. row_idx, row_w: rows x row_taps (indices
 * into low's rows). scratch: (low_h + 1) x out_w floats. logits (or NULL), sig: rows x out_w.
 * *sum, *count: as squash's, over the band. */
M2FP_CLONES M2FP_EXPORT void m2fp_upsample_squash(const float *restrict low, int64_t low_h, int64_t low_w,
                                                  const int32_t *restrict col_idx, const float *restrict col_w,
                                                  int64_t out_w, int64_t col_taps, const int32_t *restrict row_idx,
                                                  const float *restrict row_w, int64_t rows, int64_t row_taps,
                                                  float *restrict scratch, float *restrict logits,
                                                  float *restrict sig, double *sum, int64_t *count) {
    *sum = 0.0;
    *count = 0;
    int64_t lo = low_h, hi = -1;
    for (int64_t i = 0; i < rows * row_taps; ++i) {
        if (row_w[i] != 0.0f) {
            lo = row_idx[i] < lo ? row_idx[i] : lo;
            hi = row_idx[i] > hi ? row_idx[i] : hi;
        }
    }
    for (int64_t r = lo; r <= hi; ++r)  /* columns: the low rows this band reads */
        resample_row(low + r * low_w, low_w, col_idx, col_w, col_taps, out_w, scratch + (r - lo) * out_w);
    float *spare = scratch + low_h * out_w;
    for (int64_t i = 0; i < rows; ++i) {  /* rows: each output row from the rows it weighs on */
        float *v = logits != NULL ? logits + i * out_w : spare;
        int first = 1;
        for (int64_t k = 0; k < row_taps; ++k) {
            float w = row_w[i * row_taps + k];
            if (w == 0.0f) continue;
            const float *src = scratch + (row_idx[i * row_taps + k] - lo) * out_w;
            if (first) {
                for (int64_t x = 0; x < out_w; ++x) v[x] = w * src[x];
                first = 0;
            } else {
                for (int64_t x = 0; x < out_w; ++x) v[x] += w * src[x];
            }
        }
        if (first)
            for (int64_t x = 0; x < out_w; ++x) v[x] = 0.0f;
        squash(v, out_w, sig + i * out_w, sum, count);
    }
}

/* Adds one instance to its class: with p = sig * score, probs += p and counts += 1 where p > 0.5
 * (one pass for numpy's five). `n` values from each pointer (a band of rows). With `first` (the
 * class's first instance) probs and counts are written, not added to: the same values as adding to
 * zeros, without the pass that zeroes them. */
M2FP_CLONES M2FP_EXPORT void m2fp_add_instance(const float *restrict sig, int64_t n, float score,
                                               float *restrict probs, uint8_t *restrict counts, int first) {
    if (first) {
        for (int64_t i = 0; i < n; ++i) {
            float p = sig[i] * score;
            int hit = p > 0.5f;
            probs[i] = hit ? p : 0.0f;
            counts[i] = (uint8_t)hit;
        }
        return;
    }
    for (int64_t i = 0; i < n; ++i) {
        float p = sig[i] * score;
        int hit = p > 0.5f;
        probs[i] += hit ? p : 0.0f;
        counts[i] += (uint8_t)hit;
    }
}

/* A class's pasted sum at one pixel averaged over the instances pasted there. */
static inline float averaged(float sum, uint8_t count) { return sum / (float)(count > 1 ? count : 1); }

/* One pixel's turn in the per-pixel argmax over classes taken in increasing order: where prob beats
 * the best so far (strictly, so ties keep the lower class), best = prob and label = class_id. */
static inline void vote_at(float prob, uint8_t class_id, float *best, uint8_t *label) {
    int win = prob > *best;
    *best = win ? prob : *best;
    *label = win ? class_id : *label;
}

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

/* m2fp_average then m2fp_vote in one pass, for a class whose map is already at the label map's size:
 * the same division and the same comparison per pixel, probs left as they were. */
M2FP_CLONES M2FP_EXPORT void m2fp_average_vote(const float *restrict probs, const uint8_t *restrict counts, int64_t n,
                                               uint8_t class_id, float *restrict best, uint8_t *restrict labels) {
    for (int64_t i = 0; i < n; ++i) vote_at(averaged(probs[i], counts[i]), class_id, best + i, labels + i);
}
