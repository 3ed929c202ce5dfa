/* W8A8 on CPU: the two memory-bound passes around the int8 matmul, one pass each instead of torch's 4-6.
 *
 * quantize_*: activations x [rows, cols] (row stride ld elements, bf16 or fp32) -> int8 q [rows, cols] and the
 *   activation scale; per token: scale[r] = max|x[r]| / 127 and q = round_half_even(x * (127 / max|x[r]|));
 *   per tensor: q = round_half_even(clamp(x * (1 / scale), -127, 127)).
 * rescale_*: int32 acc [rows, cols] -> y = (float(acc) * sx[r]) * sw[c] (+ bias[c]), fp32 or bf16
 *   (round to nearest even).
 * Every operation is the fp32 operation torch performs on the same path (hf_ptq/kernels/w8a8.py), in the same
 * order, so both give identical bits: 127 / m is computed as (1 / m) * 127 like torch's scalar / tensor, and the
 * file is compiled with -ffp-contract=off (a fused multiply-add would skip a rounding). Built and loaded by
 * hf_ptq/kernels/native.py; nthreads is torch's thread count (ignored without OpenMP).
 */
#include <float.h>
#include <stdint.h>
#include <string.h>

#define PARALLEL_MIN_ELEMENTS 65536

static inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float from_f32(float f) { return f; }

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float to_f32(float f) { return f; }

/* Round to the nearest integer, ties to even, for |v| < 2^22 (the default rounding mode does the work). */
static inline float round_half_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

/* |x| orders like the bits below the sign for every non-NaN float, so max |x| is an integer max (which
 * vectorizes without -ffast-math); a NaN gives a NaN maximum, as torch's amax does. */
#define DEFINE_QUANTIZE(NAME, T, BITS_T, MAGNITUDE_MASK, LOAD)                                                  \
    void quantize_per_token_##NAME(const T* x, int64_t rows, int64_t cols, int64_t ld, int8_t* q, float* scale, \
                                   int nthreads) {                                                              \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)") \
        for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const T* xr = x + r * ld;                                                                           \
            const BITS_T* bits = (const BITS_T*)xr;                                                             \
            int8_t* qr = q + r * cols;                                                                          \
            BITS_T magnitude = 0;                                                                               \
            for (int64_t c = 0; c < cols; ++c) {                                                                \
                const BITS_T m = bits[c] & MAGNITUDE_MASK;                                                      \
                magnitude = m > magnitude ? m : magnitude;                                                      \
            }                                                                                                   \
            T largest;                                                                                          \
            memcpy(&largest, &magnitude, sizeof largest);                                                       \
            float amax = LOAD(largest);                                                                         \
            if (amax < FLT_MIN) amax = FLT_MIN;                                                                 \
            const float k = (1.0f / amax) * 127.0f;                                                             \
            for (int64_t c = 0; c < cols; ++c) qr[c] = (int8_t)(int32_t)round_half_even(LOAD(xr[c]) * k);      \
            scale[r] = amax / 127.0f;                                                                           \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    void quantize_per_tensor_##NAME(const T* x, int64_t rows, int64_t cols, int64_t ld, float scale, int8_t* q, \
                                    int nthreads) {                                                             \
        const float inverse = 1.0f / scale;                                                                     \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)") \
        for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const T* xr = x + r * ld;                                                                           \
            int8_t* qr = q + r * cols;                                                                          \
            for (int64_t c = 0; c < cols; ++c) {                                                                \
                float v = LOAD(xr[c]) * inverse;                                                                \
                v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);                                          \
                qr[c] = (int8_t)(int32_t)round_half_even(v);                                                    \
            }                                                                                                   \
        }                                                                                                       \
    }

DEFINE_QUANTIZE(bf16, uint16_t, uint16_t, 0x7fffu, from_bf16)
DEFINE_QUANTIZE(f32, float, uint32_t, 0x7fffffffu, from_f32)

/* sx has one value per row (sx_stride 1) or one for all rows (sx_stride 0); bias may be NULL. */
#define DEFINE_RESCALE(NAME, T, STORE)                                                                          \
    void rescale_##NAME(const int32_t* acc, int64_t rows, int64_t cols, const float* sx, int64_t sx_stride,     \
                        const float* sw, const float* bias, T* y, int nthreads) {                               \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)") \
        for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const int32_t* ar = acc + r * cols;                                                                 \
            T* yr = y + r * cols;                                                                               \
            const float s = sx[r * sx_stride];                                                                  \
            if (bias) {                                                                                         \
                for (int64_t c = 0; c < cols; ++c) yr[c] = STORE(((float)ar[c] * s) * sw[c] + bias[c]);         \
            } else {                                                                                            \
                for (int64_t c = 0; c < cols; ++c) yr[c] = STORE(((float)ar[c] * s) * sw[c]);                  \
            }                                                                                                   \
        }                                                                                                       \
    }

DEFINE_RESCALE(bf16, uint16_t, to_bf16)
DEFINE_RESCALE(f32, float, to_f32)
