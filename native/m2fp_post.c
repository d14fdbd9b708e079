/* Post-processing's per-pixel work, fused: libm2fp_post.so (plain C, no dependencies).
 *
 * imaging/postprocess.py squashes every query's upsampled mask with OpenCV and numpy in eight
 * passes over work-size arrays (negate, exp, add, reciprocal for the sigmoid; threshold, multiply,
 * sum, count for the mask score) and adds each instance in five (multiply, threshold, add, compare,
 * add), then averages and votes each class's map in seven more. At 720p each pass streams 3.7 MB;
 * here each step is one pass. Results agree with the Python path to float rounding (the sigmoid)
 * or exactly (the rest): tests/imaging/test_fused.py.
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

M2FP_EXPORT int m2fp_post_abi(void) { return 1; }

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

/* sigmoid(v); NaN gives NaN. */
static inline float sigmoid(float v) {
    float t = -v;
    t = t < -88.0f ? -88.0f : t;
    t = t > 88.0f ? 88.0f : t;
    return 1.0f / (1.0f + exp_clamped(t));
}

/* One query's logits (n values, a band of rows) squashed: sig = sigmoid(logits), and the mask
 * score's parts: *sum = the sum of sig where logits > 0, *count = how many such pixels. One pass
 * for what OpenCV and numpy do in eight (negate, exp, add, reciprocal; threshold, multiply,
 * sumElems, countNonZero). A NaN logit gives a NaN sig and counts nowhere. */
M2FP_CLONES M2FP_EXPORT void m2fp_squash(const float *restrict logits, int64_t n, float *restrict sig, double *sum,
                                         int64_t *count) {
    double total = 0.0;
    int64_t positive = 0;
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
        total += acc;
        positive += hits;
    }
    *sum = total;
    *count = positive;
}

/* Adds one instance to its class: with p = sig * score, probs += p and counts += 1 where p > 0.5
 * (one pass for numpy's five). `n` values from each pointer (a band of rows). */
M2FP_CLONES M2FP_EXPORT void m2fp_add_instance(const float *restrict sig, int64_t n, float score,
                                               float *restrict probs, uint8_t *restrict counts) {
    for (int64_t i = 0; i < n; ++i) {
        float p = sig[i] * score;
        int hit = p > 0.5f;
        probs[i] += hit ? p : 0.0f;
        counts[i] += (uint8_t)hit;
    }
}

/* A class's pasted probabilities averaged over the instances pasted at each pixel, in place:
 * probs /= max(counts, 1) (one pass for numpy's three). */
M2FP_CLONES M2FP_EXPORT void m2fp_average(float *restrict probs, const uint8_t *restrict counts, int64_t n) {
    for (int64_t i = 0; i < n; ++i) probs[i] /= (float)(counts[i] > 1 ? counts[i] : 1);
}

/* One class's turn in the per-pixel argmax over classes taken in increasing order: where prob beats
 * the best so far (strictly, so ties keep the lower class), best = prob and label = class_id (one
 * pass for OpenCV's compare, max, and, max). */
M2FP_CLONES M2FP_EXPORT void m2fp_vote(const float *restrict prob, int64_t n, uint8_t class_id, float *restrict best,
                                       uint8_t *restrict labels) {
    for (int64_t i = 0; i < n; ++i) {
        int win = prob[i] > best[i];
        best[i] = win ? prob[i] : best[i];
        labels[i] = win ? class_id : labels[i];
    }
}
