/* Products of a few input rows with a 4- or 8-bit QuantLinear, read straight from its packed codes (decode steps).
 *
 * packed: the little-endian bytes of `weight_packed`, weight row r at packed + r * ld; element j of a row is byte j
 *   (8-bit) or nibble j & 1 of byte j >> 1 (4-bit, element 0 in the low nibble): the stored unsigned code u.
 * scale, center: fp32 [rows or 1, groups], weight row r at + r * q_ld (q_ld 0: one set for every row). Element j
 *   belongs to group j / group_size; cols is a multiple of 128 (4-bit) or 64 (8-bit), and group_size a multiple of
 *   that or one of its divisors down to 8 (4-bit) / 4 (8-bit) codes, with groups * group_size == cols.
 * x: bf16 [n, cols]; out: bf16 [n, rows], out[t][r] = sum_j (u_rj - c_rg(j)) * s_rg(j) * x_tj, computed as
 *   sum_g s_rg * (sum_{j in g} u_rj x_tj - c_rg * sum_{j in g} x_tj) in fp32 and rounded once to bf16.
 *
 * Why: torch's int4 / int8 weight-only CPU kernels need their own copy of the weights in their own layout (as large
 * as the packed tensors: a second copy of the model in memory once it decodes). Here the codes become exact bf16
 * values in registers and AVX512-BF16 dot-product instructions multiply them with the activations (bf16 products
 * are exact in fp32); no dequantized weight is written to memory. Returns 0, or -1 for shapes it does not take.
 *
 * Built only where the compiler targets AVX512-BF16 (-march=native on such a CPU): elsewhere
 * `packed_matmul_supported` returns 0 and the callers keep torch's kernels. nthreads is torch's thread count.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PREFETCH_BYTES 2048 /* how far ahead in the weight rows the decode loop asks for the codes */
#define X_ROWS_PER_PASS 4 /* input rows multiplied per pass over a weight row (codes unpacked once for them) */

int packed_matmul_supported(void) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

/* A block is what one 64-byte load of a weight row holds: 128 codes (4-bit) or 64 (8-bit). Each 16-bit word of it
 * holds four nibbles; nibble k of every word, OR-ed with 0x4300, is the exact bf16 value 128 + nibble (exponent 2^7,
 * the nibble in the low mantissa bits), so a shift and one ternary-logic op make 32 bf16 weights, no shuffles.
 * 4-bit: nibble k of word w is code 4w + k. 8-bit: nibbles 0 / 1 of word w are the low / high halves of code 2w,
 * nibbles 2 / 3 those of code 2w + 1 (u = l + 16 h: the high halves meet activations scaled by 16, exact in bf16).
 * The activations are rearranged once per call into the same four vectors per block (`prepare_inputs`); the 128
 * added to every nibble is taken back with the group sums of the activations: sum(nibble vectors . x vectors) =
 * dot + OFFSET * sum(x), OFFSET = 128 (4-bit) or 128 * 17 (8-bit). An fp32 lane of the dot-product accumulator
 * covers block / 16 consecutive codes, so groups smaller than a block get a per-lane scale vector. */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* xr [n, 4 * 32 per block]: the four activation vectors of each block; sums [n, groups]: sum of x per group. */
static void prepare_inputs(const uint16_t* x, int64_t n, int64_t cols, int64_t group_size, int bits, uint16_t* xr,
                           float* sums) {
    const int64_t block = bits == 4 ? 128 : 64, groups = cols / group_size;
    for (int64_t t = 0; t < n; ++t) {
        const uint16_t* xt = x + t * cols;
        uint16_t* rt = xr + t * (cols / block) * 128;
        for (int64_t b = 0; b < cols; b += block, rt += 128) {
            for (int k = 0; k < 4; ++k) {
                for (int w = 0; w < 32; ++w) {
                    uint16_t v;
                    if (bits == 4) {
                        v = xt[b + 4 * w + k];
                    } else {
                        v = xt[b + 2 * w + (k >> 1)];
                        if (k & 1) v = f32_to_bf16(16.0f * bf16_to_f32(v)); /* exact: a power of two */
                    }
                    rt[32 * k + w] = v;
                }
            }
        }
        for (int64_t g = 0; g < groups; ++g) {
            float sum = 0.0f;
            for (int64_t j = g * group_size; j < (g + 1) * group_size; ++j) sum += bf16_to_f32(xt[j]);
            sums[t * groups + g] = sum;
        }
    }
}

/* acc[k] += nibble vector k . activation vector k of one block (at xb): four independent chains, so that the
 * dot products' latency overlaps. */
static inline __attribute__((always_inline)) void block_dot(__m512 acc[4], const __m512i nib[4], const uint16_t* xb) {
    for (int k = 0; k < 4; ++k)
        acc[k] = _mm512_dpbf16_ps(acc[k], (__m512bh)nib[k], (__m512bh)_mm512_loadu_si512((const void*)(xb + 32 * k)));
}

static inline __m512 sum4(const __m512 acc[4]) {
    return _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
}

static inline __attribute__((always_inline)) void nibbles(const uint8_t* p, __m512i nib[4]) {
    const __m512i words = _mm512_loadu_si512((const void*)p);
    const __m512i low = _mm512_set1_epi16(15), exponent = _mm512_set1_epi16(0x4300);
    nib[0] = _mm512_ternarylogic_epi32(words, low, exponent, 0xEA); /* (a & b) | c */
    nib[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), low, exponent, 0xEA);
    nib[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), low, exponent, 0xEA);
    nib[3] = _mm512_or_si512(_mm512_srli_epi16(words, 12), exponent);
}

/* out_t = sum_g s_g * dot_tg - sum_g s_g * (c_g + offset) * sums_tg for inputs t0 .. t0 + nt of one weight row. */
/* One weight row against inputs t0 .. t0 + nt. One input (a decode step) takes a written-out loop whose
 * accumulators stay in registers; with several, they live on the stack (nt is not a constant). */
static void weight_row(const uint8_t* p, const float* s, const float* c, int64_t cols, int64_t group_size, int bits,
                       const uint16_t* xr, const float* sums, int64_t nt, int64_t t0, float* acc_out) {
    const int64_t block = bits == 4 ? 128 : 64, groups = cols / group_size, xr_ld = (cols / block) * 128;
    const float offset = bits == 4 ? 128.0f : 128.0f * 17.0f;
    __m512 total[X_ROWS_PER_PASS], part[X_ROWS_PER_PASS][4];
    __m512i nib[4];
    for (int t = 0; t < X_ROWS_PER_PASS; ++t) total[t] = _mm512_setzero_ps();
    if (nt == 1 && group_size >= block) { /* one input: measured 2x the general loop */
        const int64_t blocks_per_group = group_size / block;
        const uint16_t* xt = xr + t0 * xr_ld;
        for (int64_t g = 0; g < groups; ++g) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t blk = g * blocks_per_group; blk < (g + 1) * blocks_per_group; ++blk) {
                _mm_prefetch((const char*)(p + blk * 64 + PREFETCH_BYTES), _MM_HINT_T0);
                nibbles(p + blk * 64, nib);
                const uint16_t* xb = xt + blk * 128;
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)nib[0], (__m512bh)_mm512_loadu_si512((const void*)xb));
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)nib[1], (__m512bh)_mm512_loadu_si512((const void*)(xb + 32)));
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)nib[2], (__m512bh)_mm512_loadu_si512((const void*)(xb + 64)));
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)nib[3], (__m512bh)_mm512_loadu_si512((const void*)(xb + 96)));
            }
            const __m512 dot = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
            total[0] = _mm512_fmadd_ps(dot, _mm512_set1_ps(s[g]), total[0]);
        }
    } else if (group_size >= block) {
        const int64_t blocks_per_group = group_size / block;
        for (int64_t g = 0; g < groups; ++g) {
            for (int t = 0; t < nt; ++t)
                for (int k = 0; k < 4; ++k) part[t][k] = _mm512_setzero_ps();
            for (int64_t i = 0; i < blocks_per_group; ++i) {
                const int64_t blk = g * blocks_per_group + i;
                nibbles(p + blk * 64, nib);
                for (int t = 0; t < nt; ++t) block_dot(part[t], nib, xr + (t0 + t) * xr_ld + blk * 128);
            }
            const __m512 sg = _mm512_set1_ps(s[g]);
            for (int t = 0; t < nt; ++t) total[t] = _mm512_fmadd_ps(sum4(part[t]), sg, total[t]);
        }
    } else { /* several groups per block: lane i covers codes block / 16 * i .. of the block */
        const int64_t per_block = block / group_size;
        int32_t lane_group[16];
        for (int i = 0; i < 16; ++i) lane_group[i] = (int32_t)(i * (block / 16) / group_size);
        const __m512i lanes = _mm512_loadu_si512((const void*)lane_group);
        const __mmask16 used = (__mmask16)((1u << per_block) - 1u);
        for (int64_t blk = 0; blk < cols / block; ++blk) {
            nibbles(p + blk * 64, nib);
            const __m512 sv = _mm512_permutexvar_ps(lanes, _mm512_maskz_loadu_ps(used, s + blk * per_block));
            if (nt == 1) { /* written out, as above */
                const uint16_t* xb = xr + t0 * xr_ld + blk * 128;
                const __m512 z = _mm512_setzero_ps();
                const __m512 a0 = _mm512_dpbf16_ps(z, (__m512bh)nib[0], (__m512bh)_mm512_loadu_si512((const void*)xb));
                const __m512 a1 =
                    _mm512_dpbf16_ps(z, (__m512bh)nib[1], (__m512bh)_mm512_loadu_si512((const void*)(xb + 32)));
                const __m512 a2 =
                    _mm512_dpbf16_ps(z, (__m512bh)nib[2], (__m512bh)_mm512_loadu_si512((const void*)(xb + 64)));
                const __m512 a3 =
                    _mm512_dpbf16_ps(z, (__m512bh)nib[3], (__m512bh)_mm512_loadu_si512((const void*)(xb + 96)));
                total[0] = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), sv, total[0]);
                continue;
            }
            for (int t = 0; t < nt; ++t) {
                for (int k = 0; k < 4; ++k) part[t][k] = _mm512_setzero_ps();
                block_dot(part[t], nib, xr + (t0 + t) * xr_ld + blk * 128);
                total[t] = _mm512_fmadd_ps(sum4(part[t]), sv, total[t]);
            }
        }
    }
    const __m512 off = _mm512_set1_ps(offset);
    for (int t = 0; t < nt; ++t) {
        const float* st = sums + (t0 + t) * groups;
        __m512 shift = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g += 16) {
            const __mmask16 m = groups - g >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (groups - g)) - 1u);
            const __m512 sc = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + g),
                                            _mm512_add_ps(_mm512_maskz_loadu_ps(m, c + g), off));
            shift = _mm512_fmadd_ps(sc, _mm512_maskz_loadu_ps(m, st + g), shift);
        }
        acc_out[t] = _mm512_reduce_add_ps(total[t]) - _mm512_reduce_add_ps(shift);
    }
}

static int packed_matmul(int bits, const uint8_t* packed, int64_t ld, int64_t rows, int64_t cols, const float* scale,
                         const float* center, int64_t q_ld, int64_t group_size, const uint16_t* x, int64_t n,
                         uint16_t* out, int nthreads) {
    const int64_t block = bits == 4 ? 128 : 64, lane = block / 16;
    const int fits = group_size >= block ? group_size % block == 0 : group_size % lane == 0 && block % group_size == 0;
    if (group_size <= 0 || !fits || cols % group_size || cols % block) return -1;
    const int64_t groups = cols / group_size;
    uint16_t* xr = (uint16_t*)malloc((size_t)(n * (cols / block) * 128) * sizeof(uint16_t));
    float* sums = (float*)malloc((size_t)(n * groups) * sizeof(float));
    if (!xr || !sums) {
        free(xr);
        free(sums);
        return -2;
    }
    prepare_inputs(x, n, cols, group_size, bits, xr, sums);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        float acc[X_ROWS_PER_PASS];
        for (int64_t t0 = 0; t0 < n; t0 += X_ROWS_PER_PASS) {
            const int64_t nt = n - t0 < X_ROWS_PER_PASS ? n - t0 : X_ROWS_PER_PASS;
            weight_row(packed + r * ld, scale + r * q_ld, center + r * q_ld, cols, group_size, bits, xr, sums, nt, t0,
                       acc);
            for (int64_t t = 0; t < nt; ++t) out[(t0 + t) * rows + r] = f32_to_bf16(acc[t]);
        }
    }
    free(xr);
    free(sums);
    return 0;
}

int packed_matmul_4(const uint8_t* packed, int64_t ld, int64_t rows, int64_t cols, const float* scale,
                    const float* center, int64_t q_ld, int64_t group_size, const uint16_t* x, int64_t n,
                    uint16_t* out, int nthreads) {
    return packed_matmul(4, packed, ld, rows, cols, scale, center, q_ld, group_size, x, n, out, nthreads);
}

int packed_matmul_8(const uint8_t* packed, int64_t ld, int64_t rows, int64_t cols, const float* scale,
                    const float* center, int64_t q_ld, int64_t group_size, const uint16_t* x, int64_t n,
                    uint16_t* out, int nthreads) {
    return packed_matmul(8, packed, ld, rows, cols, scale, center, q_ld, group_size, x, n, out, nthreads);
}

#else
int packed_matmul_4(const uint8_t* packed, int64_t ld, int64_t rows, int64_t cols, const float* scale,
                    const float* center, int64_t q_ld, int64_t group_size, const uint16_t* x, int64_t n,
                    uint16_t* out, int nthreads) {
    (void)packed, (void)ld, (void)rows, (void)cols, (void)scale, (void)center, (void)q_ld, (void)group_size;
    (void)x, (void)n, (void)out, (void)nthreads;
    return -1;
}
int packed_matmul_8(const uint8_t* packed, int64_t ld, int64_t rows, int64_t cols, const float* scale,
                    const float* center, int64_t q_ld, int64_t group_size, const uint16_t* x, int64_t n,
                    uint16_t* out, int nthreads) {
    return packed_matmul_4(packed, ld, rows, cols, scale, center, q_ld, group_size, x, n, out, nthreads);
}
#endif
