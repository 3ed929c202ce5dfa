/* The dense weight of a 4- or 8-bit QuantLinear, straight from its packed codes, in one pass.
 *
 * packed: the little-endian bytes of `weight_packed`, row r at packed + r * ld; element j of a row is byte j (8-bit)
 *   or nibble j & 1 of byte j >> 1 (4-bit, element 0 in the low nibble): the stored unsigned code u.
 * scale, center: fp32 [rows or 1, groups], row r at + r * q_ld (q_ld 0: one set for every row, per-tensor).
 * Element j belongs to group j / group_size, or to g_idx[j] when g_idx is not NULL (act-order: int32 [cols], every
 *   value in [0, groups)).
 * out [rows, cols] = (float(u) - center) * scale, rounded once to bf16 (nearest even) or kept in fp32.
 *
 * These are the fp32 operations of QuantLinear's torch path (`(u - c) * s` in hf_ptq/nn/quant_linear.py), so both
 * give identical bits; compiled with -ffp-contract=off. Act-order rows look their qparams up by g_idx: with AVX-512
 * and at most 128 groups from registers (vpermt2ps over the row's scales and centers, about as fast as the natural
 * order), else one load each. Built and loaded by hf_ptq/kernels/native.py; nthreads is torch's thread count
 * (ignored without OpenMP).
 */
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TABLE_VECTORS 8 /* qparams of up to 8 x 16 = 128 groups held in registers */
#endif

#define PARALLEL_MIN_ELEMENTS 65536

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float to_f32(float f) { return f; }

static inline float code4(const uint8_t* row, int64_t j) { return (float)((row[j >> 1] >> ((j & 1) << 2)) & 15u); }

#if defined(__AVX512F__)
/* Codes j .. j + 15 (j even) of a 4-bit row, as fp32. */
static inline __m512 codes16(const uint8_t* row, int64_t j) {
    const __m128i bytes = _mm_loadl_epi64((const __m128i*)(row + j / 2));
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i low = _mm_and_si128(bytes, mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(low, high)));
}

/* table[g] for 16 group indices g < 16 * TABLE_VECTORS: vpermt2ps over pairs of table vectors, lanes picked by g / 32. */
static inline __m512 lookup(const __m512* table, int pairs, __m512i g) {
    __m512 value = _mm512_permutex2var_ps(table[0], g, table[1]);
    const __m512i pair = _mm512_srli_epi32(g, 5);
    for (int k = 1; k < pairs; ++k) {
        const __mmask16 here = _mm512_cmpeq_epi32_mask(pair, _mm512_set1_epi32(k));
        value = _mm512_mask_mov_ps(value, here, _mm512_permutex2var_ps(table[2 * k], g, table[2 * k + 1]));
    }
    return value;
}

/* to_bf16 of 16 floats. */
static inline void store16_bf16(uint16_t* out, __m512 w) {
    const __m512i u = _mm512_castps_si512(w);
    const __m512i high = _mm512_srli_epi32(u, 16);
    const __m512i rounded = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)))),
        16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    const __m512i bits = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i*)out, _mm512_cvtepi32_epi16(bits));
}

static inline void store16_f32(float* out, __m512 w) { _mm512_storeu_ps(out, w); }

/* Row j0 .. of an act-order 4-bit row from register tables; returns the first column left for the scalar loop. */
#define DEFINE_ACT_ORDER_VECTOR(NAME, T)                                                                             \
    static int64_t act_order_row_4_##NAME(const uint8_t* p, const float* s, const float* c, int64_t groups,         \
                                          const int32_t* g_idx, int64_t cols, T* o) {                               \
        if (groups > 16 * TABLE_VECTORS) return 0;                                                                  \
        __m512 st[TABLE_VECTORS], ct[TABLE_VECTORS];                                                                \
        for (int t = 0; t < TABLE_VECTORS; ++t) {                                                                   \
            const int64_t left = groups - 16 * t;                                                                   \
            const __mmask16 valid = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;  \
            st[t] = _mm512_maskz_loadu_ps(valid, s + 16 * t);                                                       \
            ct[t] = _mm512_maskz_loadu_ps(valid, c + 16 * t);                                                       \
        }                                                                                                           \
        const int pairs = (int)((groups + 31) / 32);                                                                \
        int64_t j = 0;                                                                                              \
        for (; j + 16 <= cols; j += 16) {                                                                           \
            const __m512i g = _mm512_loadu_si512((const void*)(g_idx + j));                                         \
            const __m512 w = _mm512_mul_ps(_mm512_sub_ps(codes16(p, j), lookup(ct, pairs, g)), lookup(st, pairs, g)); \
            store16_##NAME(o + j, w);                                                                               \
        }                                                                                                           \
        return j;                                                                                                   \
    }
DEFINE_ACT_ORDER_VECTOR(bf16, uint16_t)
DEFINE_ACT_ORDER_VECTOR(f32, float)
#define ACT_ORDER_VECTOR(NAME, p, s, c, groups, g_idx, cols, o) act_order_row_4_##NAME(p, s, c, groups, g_idx, cols, o)
#else
#define ACT_ORDER_VECTOR(NAME, p, s, c, groups, g_idx, cols, o) 0
#endif

#define DEFINE_DENSE_WEIGHT(NAME, T, STORE)                                                                          \
    void dense_weight_4_##NAME(const uint8_t* packed, int64_t ld, int64_t rows, int64_t cols, const float* scale,   \
                               const float* center, int64_t q_ld, int64_t groups, int64_t group_size,               \
                               const int32_t* g_idx, T* out, int nthreads) {                                        \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)") \
        for (int64_t r = 0; r < rows; ++r) {                                                                        \
            const uint8_t* p = packed + r * ld;                                                                     \
            const float* s = scale + r * q_ld;                                                                      \
            const float* c = center + r * q_ld;                                                                     \
            T* o = out + r * cols;                                                                                  \
            if (g_idx) {                                                                                            \
                for (int64_t j = ACT_ORDER_VECTOR(NAME, p, s, c, groups, g_idx, cols, o); j < cols; ++j)            \
                    o[j] = STORE((code4(p, j) - c[g_idx[j]]) * s[g_idx[j]]);                                        \
            } else if (group_size % 2 == 0) {                                                                       \
                for (int64_t g = 0; g < groups; ++g) {                                                              \
                    const float sg = s[g], cg = c[g];                                                               \
                    const uint8_t* pg = p + g * group_size / 2;                                                     \
                    T* og = o + g * group_size;                                                                     \
                    for (int64_t b = 0; b < group_size / 2; ++b) {                                                  \
                        const uint8_t v = pg[b];                                                                    \
                        og[2 * b] = STORE(((float)(v & 15u) - cg) * sg);                                           \
                        og[2 * b + 1] = STORE(((float)(v >> 4) - cg) * sg);                                        \
                    }                                                                                               \
                }                                                                                                   \
            } else {                                                                                                \
                for (int64_t j = 0; j < cols; ++j) {                                                                \
                    const int64_t g = j / group_size;                                                               \
                    o[j] = STORE((code4(p, j) - c[g]) * s[g]);                                                      \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    void dense_weight_8_##NAME(const uint8_t* packed, int64_t ld, int64_t rows, int64_t cols, const float* scale,   \
                               const float* center, int64_t q_ld, int64_t groups, int64_t group_size,               \
                               const int32_t* g_idx, T* out, int nthreads) {                                        \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (rows * cols >= PARALLEL_MIN_ELEMENTS)") \
        for (int64_t r = 0; r < rows; ++r) {                                                                        \
            const uint8_t* p = packed + r * ld;                                                                     \
            const float* s = scale + r * q_ld;                                                                      \
            const float* c = center + r * q_ld;                                                                     \
            T* o = out + r * cols;                                                                                  \
            if (g_idx) {                                                                                            \
                for (int64_t j = 0; j < cols; ++j) o[j] = STORE(((float)p[j] - c[g_idx[j]]) * s[g_idx[j]]);        \
            } else {                                                                                                \
                for (int64_t g = 0; g < groups; ++g) {                                                              \
                    const float sg = s[g], cg = c[g];                                                               \
                    const int64_t end = (g + 1) * group_size < cols ? (g + 1) * group_size : cols;                  \
                    for (int64_t j = g * group_size; j < end; ++j) o[j] = STORE(((float)p[j] - cg) * sg);          \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }

DEFINE_DENSE_WEIGHT(bf16, uint16_t, to_bf16)
DEFINE_DENSE_WEIGHT(f32, float, to_f32)
