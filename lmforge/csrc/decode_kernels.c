/* lmforge's own CPU kernels for decoding (lmforge/kernels.py builds, loads and checks them): weight-only int8/int4
 * matrix-vector products, and one-query attention.
 *
 * Decoding one token multiplies a few activation rows x (M, K), M = 1 for one sequence, by every weight matrix
 * W (N, K). Each weight is read once per token and used M times, so the step takes as long as streaming the
 * weights from memory, plus the arithmetic if that is slower. int8 weights stream 4x fewer bytes than fp32 and
 * int4 8x fewer; widening each weight to fp32 before multiplying (what a plain dequantize + matmul does) costs
 * more instructions than the memory saves. So these loops do what llama.cpp's q8_0/q4 dot products do:
 *
 *   1. quantize each activation row to int8 in blocks of 32, one fp32 scale per block (xq, sx),
 *   2. multiply int8 activations by int8 (or 4-bit) weights in integer registers, 32 products summed per block
 *      (one VNNI `vpdpbusd` on AVX-512 VNNI or AVX-VNNI CPUs; `vpmaddubsw` + `vpmaddwd` on AVX2),
 *   3. scale each block's integer sum to fp32 once: by sx * (the weight's scale).
 *
 *   int8:  y[m, n] = wscale[n] * sum_b sx[m, b] * sum_{k in b} xq[m, k] * W[n, k]                 (+ bias[n])
 *   int4:  y[m, n] = sum_b sx[m, b] * s[n, g(b)] * sum_{k in b} xq[m, k] * (q[n, k] - z[n, g(b)])  (+ bias[n])
 *
 * Rounding the activations to int8 per block of 32 is the one approximation (llama.cpp's q8_0 and q4_0 dot
 * products make the same one); the integer sums are exact. lmforge's quantized perplexity figures are measured
 * through these kernels.
 *
 * int4 weights use a layout made for these loops (lmforge.kernels.int4_gemv_pack makes it): every 64 codes of a
 * row are 32 bytes, byte j holding code j in its low nibble and code j + 32 in its high one, so one 32-byte load
 * gives two 32-code blocks in order after a mask and a shift. The scales (fp16) and zeros (uint8) are QuantLinear's
 * own (N, K/G) buffers, G a multiple of 32.
 *
 * The file also holds the attention of a decode step (`lmf_attend_one`, at the end): one query per sequence against
 * its key/value cache, in one call.
 *
 * Rows are shared among threads with OpenMP (PyTorch's own libgomp serves it: the library is loaded into a
 * process that already holds it). lmforge compiles this file on the machine that runs it with -march=native, so
 * the loop is whichever the CPU has (VNNI, AVX2 or plain C), and checks its answers once in a child process
 * before the first use.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define BLOCK 32 /* activations per int8 block, and weights per integer dot product */
#define ROWS 4   /* int8 weight rows per step: their dot products share each activation load */
#ifndef PREFETCH
#define PREFETCH 8192 /* bytes of weights requested ahead of the int8 loop (measured: 4-32 KB all beat none by 1.9x) */
#endif
#ifndef PREFETCH4
#define PREFETCH4 4096 /* the same for the int4 loop */
#endif

static inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: shift the mantissa up until its leading one is the implicit bit */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* ---------------------------------------------------------------------------------------------------------- */
/* step 1: activations -> int8 blocks                                                                           */
/* ---------------------------------------------------------------------------------------------------------- */

/* x (K,) -> xq (K,) int8 and sx (K/32,) with x ~= xq * sx per block; xs (K/32,) the blocks' code sums (exact
   integers, kept as floats) */
static void quantize_row(const float *x, int8_t *xq, float *sx, float *xs, int64_t K) {
    for (int64_t b = 0; b < K / BLOCK; b++) {
        const float *xb = x + b * BLOCK;
        float amax = 0.f;
        for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int32_t s = 0;
        for (int j = 0; j < BLOCK; j++) {
            int v = (int)lrintf(xb[j] * inv);
            xq[b * BLOCK + j] = (int8_t)v;
            s += v;
        }
        sx[b] = d;
        xs[b] = (float)s;
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* step 2: 32 unsigned x signed byte products summed into 8 int32 lanes                                         */
/* ---------------------------------------------------------------------------------------------------------- */
#if defined(__AVX2__)
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else /* pairs of u8 * s8 into int16 (|sum| <= 2 * 255 * 127 only when u > 127: our u is |w| <= 128 or q <= 15) */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---------------------------------------------------------------------------------------------------------- */
/* int8 weights, one scale per output row                                                                       */
/* ---------------------------------------------------------------------------------------------------------- */

/* sum_b sx[b] * (xq . w) over block b, for R consecutive weight rows */
static void int8_rows(const int8_t *xq, const float *sx, const int8_t *w, int64_t K, int R, float *out) {
    int64_t nb = K / BLOCK;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(LMF_NO_AVX512_LOOP)
    if (R == ROWS && K % 64 == 0) { /* two blocks per 64-byte register: half the instructions of the AVX2 loop */
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        const __m512i zero = _mm512_setzero_si512();
        for (int64_t b = 0; b < nb; b += 2) {
            _mm_prefetch((const char *)(w + PREFETCH + ROWS * BLOCK * b), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + PREFETCH + ROWS * BLOCK * b + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + PREFETCH + ROWS * BLOCK * b + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + PREFETCH + ROWS * BLOCK * b + 192), _MM_HINT_T0);
            __m512i xv = _mm512_loadu_si512((const void *)(xq + b * BLOCK));
            __m512 s = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(sx + b)),
                                          _mm256_broadcast_ss(sx + b + 1), 1); /* lanes 0-7: block b, 8-15: b + 1 */
#define ROW8(a, wr)                                                                                     \
    do {                                                                                                \
        __m512i wv = _mm512_loadu_si512((const void *)((wr) + b * BLOCK));                              \
        __m512i xs = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), zero, xv); /* x * sign(w) */     \
        a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, _mm512_abs_epi8(wv), xs)), s, a); \
    } while (0)
            ROW8(a0, w);
            ROW8(a1, w + K);
            ROW8(a2, w + 2 * K);
            ROW8(a3, w + 3 * K);
#undef ROW8
        }
        out[0] = _mm512_reduce_add_ps(a0); out[1] = _mm512_reduce_add_ps(a1);
        out[2] = _mm512_reduce_add_ps(a2); out[3] = _mm512_reduce_add_ps(a3);
        return;
    }
#endif
#if defined(__AVX2__)
    if (R == ROWS) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            /* the rows after these four follow them in memory: fetch PREFETCH bytes ahead while these are
               multiplied (the hardware prefetcher alone restarts at every row and leaves the core waiting) */
            _mm_prefetch((const char *)(w + PREFETCH + ROWS * BLOCK * b), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + PREFETCH + ROWS * BLOCK * b + 64), _MM_HINT_T0);
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK));
            __m256 s = _mm256_broadcast_ss(sx + b);
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + b * BLOCK));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + K + b * BLOCK));
            __m256i w2 = _mm256_loadu_si256((const __m256i *)(w + 2 * K + b * BLOCK));
            __m256i w3 = _mm256_loadu_si256((const __m256i *)(w + 3 * K + b * BLOCK));
            /* |w| is unsigned, x takes w's sign: the product is unchanged and fits the u8 x s8 instruction */
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(w0), _mm256_sign_epi8(xv, w0))), s, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(w1), _mm256_sign_epi8(xv, w1))), s, a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(w2), _mm256_sign_epi8(xv, w2))), s, a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(w3), _mm256_sign_epi8(xv, w3))), s, a3);
        }
        out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
        return;
    }
    for (int r = 0; r < R; r++) {
        const int8_t *wr = w + r * K;
        __m256 a = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + b * BLOCK));
            __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + b * BLOCK));
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv))),
                                _mm256_broadcast_ss(sx + b), a);
        }
        out[r] = hsum(a);
    }
#else
    for (int r = 0; r < R; r++) {
        const int8_t *wr = w + r * K;
        float a = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t d = 0;
            for (int j = 0; j < BLOCK; j++) d += (int32_t)xq[b * BLOCK + j] * wr[b * BLOCK + j];
            a += sx[b] * (float)d;
        }
        out[r] = a;
    }
#endif
}

/* Which of `count` matrices the i-th of all their units (row blocks, or rows) belongs to, and where its columns
   start in y: the matrices are side by side in y, as (q | k | v) or (gate | up) are. */
static int which(int64_t i, int count, const int64_t *units, int64_t *first_unit, int64_t *col, const int64_t *N) {
    int j = 0;
    *first_unit = 0;
    *col = 0;
    while (j < count - 1 && i >= *first_unit + units[j]) {
        *first_unit += units[j];
        *col += N[j];
        j++;
    }
    return j;
}

#define MAX_GROUP 16 /* matrices per call */

/* `count` matrices side by side, cut into units of ROWS weight rows (the last unit of each may be shorter):
   units[j] per matrix; returns their total and sets *width to the sum of N */
static int64_t row_units(int count, const int64_t *N, int64_t *units, int64_t *width) {
    int64_t total = 0;
    *width = 0;
    for (int j = 0; j < count; j++) {
        units[j] = (N[j] + ROWS - 1) / ROWS;
        total += units[j];
        *width += N[j];
    }
    return total;
}

/* unit i -> its matrix *j, its first row *n and where that row's output goes (*col); returns its number of rows */
static int unit_rows(int64_t i, int count, const int64_t *units, const int64_t *N, int *j, int64_t *n, int64_t *col) {
    int64_t first;
    *j = which(i, count, units, &first, col, N);
    *n = (i - first) * ROWS;
    return (int)(N[*j] - *n < ROWS ? N[*j] - *n : ROWS);
}

/* y (M, sum N) = x (M, K) @ [w_0 * wscale_0; w_1 * wscale_1; ...].T + [bias_0, bias_1, ...]: `count` int8
   matrices w_j (N[j], K) that read the same input (one call for q, k and v: one quantization of x, one parallel
   region), bias_j may be NULL.  K % 32 == 0.  scratch: at least M * (K + 8 * K / 32) bytes */
void lmf_int8_gemv(const float *x, int count, const int8_t *const *w, const float *const *wscale,
                   const float *const *bias, const int64_t *N, float *y, void *scratch, int64_t M, int64_t K,
                   int threads) {
    int64_t nb = K / BLOCK, units[MAX_GROUP], width;
    int8_t *xq = (int8_t *)scratch;
    float *sx = (float *)(xq + M * K);
    float *xs = sx + M * nb;
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, xq + m * K, sx + m * nb, xs + m * nb, K);
    int64_t total = row_units(count, N, units, &width);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < total; i++) {
        int j;
        int64_t n, col;
        int R = unit_rows(i, count, units, N, &j, &n, &col);
        float out[ROWS];
        for (int64_t m = 0; m < M; m++) { /* the R weight rows stay in L1 while every activation row uses them */
            int8_rows(xq + m * K, sx + m * nb, w[j] + n * K, K, R, out);
            for (int r = 0; r < R; r++)
                y[m * width + col + n + r] = out[r] * wscale[j][n + r] + (bias[j] ? bias[j][n + r] : 0.f);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* int4 weights, groups of G codes with an fp16 scale and a zero each                                          */
/* ---------------------------------------------------------------------------------------------------------- */

/* one weight row: w (K/2 bytes in the 64-code layout), scale (K/G fp16), zero (K/G bytes); cb: K/32 floats of room */
static float int4_row(const int8_t *xq, const int8_t *xp, const float *sx, const float *xs, const uint8_t *w,
                      const uint16_t *scale, const uint8_t *zero, int64_t K, int64_t G, float *cb) {
    int64_t nb = K / BLOCK, per_group = G / BLOCK;
    /* each block's factor sx * s, and the zeros' share sum_b sx * s * z * (the block's sum of xq) */
    float corr = 0.f;
    int64_t b = 0;
#if defined(__AVX2__) && defined(__F16C__)
    if (per_group == 1) { /* G = 32: one scale and zero per block, eight blocks per step */
        __m256 cv = _mm256_setzero_ps();
        for (; b + 8 <= nb; b += 8) {
            __m256 f = _mm256_mul_ps(_mm256_loadu_ps(sx + b),
                                     _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + b))));
            _mm256_storeu_ps(cb + b, f);
            __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zero + b))));
            cv = _mm256_fmadd_ps(_mm256_mul_ps(f, z), _mm256_loadu_ps(xs + b), cv);
        }
        corr = hsum(cv);
    }
#endif
    for (; b < nb; b++) {
        int64_t g = b / per_group;
        cb[b] = sx[b] * half_to_float(scale[g]);
        corr += cb[b] * (float)zero[g] * xs[b];
    }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(LMF_NO_AVX512_LOOP)
    if (xp) { /* 128 codes per step: one 64-byte load holds chunks 2p and 2p + 1 */
        __m512 acc = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps();
        const __m512i nib = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
        for (int64_t p = 0; p < K / 128; p++) {
            _mm_prefetch((const char *)(w + 64 * p + PREFETCH4), _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512((const void *)(w + 64 * p));
            __m512i lo = _mm512_and_si512(v, nib);                          /* blocks 4p and 4p + 2 */
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);    /* blocks 4p + 1 and 4p + 3 */
            __m512i d0 = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512((const void *)(xp + 128 * p)));
            __m512i d1 = _mm512_dpbusd_epi32(zero, hi, _mm512_loadu_si512((const void *)(xp + 128 * p + 64)));
            const float *c = cb + 4 * p;
            __m512 s0 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(c)), _mm256_broadcast_ss(c + 2), 1);
            __m512 s1 = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_broadcast_ss(c + 1)), _mm256_broadcast_ss(c + 3), 1);
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), s0, acc);
            acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), s1, acc2);
        }
        return _mm512_reduce_add_ps(_mm512_add_ps(acc, acc2)) - corr;
    }
#endif
    (void)xp;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps();
    const __m256i nib = _mm256_set1_epi8(0x0F);
    for (int64_t c = 0; c < K / 64; c++) {
        _mm_prefetch((const char *)(w + 32 * c + PREFETCH4), _MM_HINT_T0);
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * c));
        __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
        __m256i d0 = dot_u8s8(lo, _mm256_loadu_si256((const __m256i *)(xq + 64 * c)));
        __m256i d1 = dot_u8s8(hi, _mm256_loadu_si256((const __m256i *)(xq + 64 * c + 32)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_broadcast_ss(cb + 2 * c), acc);
        acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_broadcast_ss(cb + 2 * c + 1), acc2);
    }
    return hsum(_mm256_add_ps(acc, acc2)) - corr;
#else
    float acc = 0.f;
    for (int64_t c = 0; c < K / 64; c++) {
        const uint8_t *p = w + 32 * c;
        for (int half = 0; half < 2; half++) {
            int64_t bb = 2 * c + half;
            int32_t d = 0;
            for (int j = 0; j < 32; j++) d += (int32_t)(half ? p[j] >> 4 : p[j] & 0x0F) * xq[bb * BLOCK + j];
            acc += cb[bb] * (float)d;
        }
    }
    return acc - corr;
#endif
}

/* y (M, sum N) = x (M, K) @ [dequantized w_0; w_1; ...].T + biases, for `count` int4 matrices w_j (N[j], K/2) in
   the 64-code layout, with scale_j (N[j], K/G) fp16 bits and zero_j (N[j], K/G) uint8; bias_j may be NULL.
   K % 64 == 0, G % 32 == 0, K % G == 0, K <= 65536.  scratch: at least M * (2 * K + 8 * K / 32) bytes */
void lmf_int4_gemv(const float *x, int count, const uint8_t *const *w, const uint16_t *const *scale,
                   const uint8_t *const *zero, const float *const *bias, const int64_t *N, float *y, void *scratch,
                   int64_t M, int64_t K, int64_t G, int threads) {
    int64_t nb = K / BLOCK, ng = K / G, total = 0;
    int8_t *xq = (int8_t *)scratch;
    float *sx = (float *)(xq + M * K);
    float *xs = sx + M * nb;
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, xq + m * K, sx + m * nb, xs + m * nb, K);
    for (int j = 0; j < count; j++) total += N[j];
    /* the AVX-512 loop multiplies 128 codes at a time, whose low nibbles are codes 0-31 and 64-95 of the 128: the
       activations are reordered once to match (32-byte pieces A B C D -> A C B D) */
    int8_t *xp = NULL;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(LMF_NO_AVX512_LOOP)
    if (K % 128 == 0) {
        xp = (int8_t *)(xs + M * nb);
        for (int64_t m = 0; m < M; m++)
            for (int64_t p = 0; p < K / 128; p++) {
                const int8_t *src = xq + m * K + 128 * p;
                int8_t *dst = xp + m * K + 128 * p;
                memcpy(dst, src, 32);
                memcpy(dst + 32, src + 64, 32);
                memcpy(dst + 64, src + 32, 32);
                memcpy(dst + 96, src + 96, 32);
            }
    }
#endif
#pragma omp parallel num_threads(threads)
    {
        float cb[65536 / BLOCK];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < total; i++) {
            int64_t first, col;
            int j = which(i, count, N, &first, &col, N);
            int64_t n = i - first;
            for (int64_t m = 0; m < M; m++)
                y[m * total + col + n] = int4_row(xq + m * K, xp ? xp + m * K : NULL, sx + m * nb, xs + m * nb,
                                                  w[j] + n * (K / 2),
                                                  scale[j] + n * ng, zero[j] + n * ng, K, G, cb) +
                                         (bias[j] ? bias[j][n] : 0.f);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* attention of one new token per sequence against its cache                                                  */
/* ---------------------------------------------------------------------------------------------------------- */

static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.f;
#if defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    s = hsum(acc);
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* A decode step's attention, for B sequences that have each written slots 0..L-1 of their caches:
 *   1. the new key and value of each sequence go to slot L of kc, vc (B, nkv, T, hd);
 *   2. each query head h (nh of them, sharing key/value head h / (nh / nkv)) attends to slots 0..L:
 *        y[b, h] = sum_t softmax_t(q[b, h] . K[t] * scale) V[t]
 * q (B, nh, hd), knew / vnew (B, nkv, hd): each sequence's row starts sq / sk / sv floats after the previous one.
 * y (B, nh, hd) contiguous. scratch: threads * (L + 1) floats for the scores. Heads are shared among threads.
 * This is what PyTorch's scaled_dot_product_attention computes for one query with no mask, in one call instead of
 * the dozen small tensor operations (cache writes, slices, the attention) a decode step spends per layer. */
void lmf_attend_one(const float *q, int64_t sq, const float *knew, int64_t sk, const float *vnew, int64_t sv,
                    float *kc, float *vc, float *y, int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t T,
                    int64_t L, float scale, float *scratch, int threads) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < nkv; g++) {
            memcpy(kc + ((b * nkv + g) * T + L) * hd, knew + b * sk + g * hd, hd * sizeof(float));
            memcpy(vc + ((b * nkv + g) * T + L) * hd, vnew + b * sv + g * hd, hd * sizeof(float));
        }
    int64_t rep = nh / nkv, S = L + 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < B * nh; i++) {
        int64_t b = i / nh, h = i % nh, g = h / rep;
#if defined(_OPENMP)
        float *s = scratch + (int64_t)omp_get_thread_num() * S;
#else
        float *s = scratch;
#endif
        const float *qh = q + b * sq + h * hd, *K = kc + (b * nkv + g) * T * hd, *V = vc + (b * nkv + g) * T * hd;
        float m = -INFINITY, total = 0.f;
        for (int64_t t = 0; t < S; t++) {
            s[t] = dot(qh, K + t * hd, hd) * scale;
            m = fmaxf(m, s[t]);
        }
        for (int64_t t = 0; t < S; t++) {
            s[t] = expf(s[t] - m); /* minus the largest score: no overflow */
            total += s[t];
        }
        float *out = y + (b * nh + h) * hd, inv = 1.f / total;
        for (int64_t d = 0; d < hd; d++) out[d] = 0.f;
        for (int64_t t = 0; t < S; t++) {
            float p = s[t] * inv;
            const float *vt = V + t * hd;
            for (int64_t d = 0; d < hd; d++) out[d] += p * vt[d]; /* (vectorized by the compiler) */
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* fp32 weights                                                                                                 */
/* ---------------------------------------------------------------------------------------------------------- */
#ifndef PREFETCH32
#define PREFETCH32 2048 /* floats of weights requested ahead of the fp32 loop */
#endif

/* out[r] = x . w_r for R consecutive rows of w (N, K). One row at a time, front to back: each thread's weights are
   one sequential stream (measured: 24-28 GB/s here for four rows read side by side, 29-33 GB/s for this order, the
   rate of the machine's plain 1 GiB sum), four accumulators to keep the FMA units busy. */
static void f32_rows(const float *x, const float *w, int64_t K, int R, float *out) {
    for (int r = 0; r < R; r++) {
        const float *wr = w + r * K;
        int64_t k = 0;
        float s = 0.f;
#if defined(__AVX512F__) && !defined(LMF_NO_AVX512_LOOP)
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 64 <= K; k += 64) {
            _mm_prefetch((const char *)(wr + k + PREFETCH32), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + k + PREFETCH32 + 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + k + PREFETCH32 + 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + k + PREFETCH32 + 48), _MM_HINT_T0);
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + 16), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + 32), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(wr + k + 48), _mm512_loadu_ps(x + k + 48), a3);
        }
        s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__)
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 32 <= K; k += 32) {
            _mm_prefetch((const char *)(wr + k + PREFETCH32), _MM_HINT_T0);
            _mm_prefetch((const char *)(wr + k + PREFETCH32 + 16), _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
        for (; k < K; k++) s += x[k] * wr[k];
        out[r] = s;
    }
}

/* y (M, sum N) = x (M, K) @ [w_0; w_1; ...].T + biases: `count` fp32 matrices w_j (N[j], K), row-major (nn.Linear's
   own layout), that read the same input; bias_j may be NULL. Rows are shared among threads, four at a time: each
   thread streams its own stretch of the weights, and the four rows stay in cache while every activation row uses
   them. */
void lmf_f32_gemv(const float *x, int count, const float *const *w, const float *const *bias, const int64_t *N,
                  float *y, int64_t M, int64_t K, int threads) {
    int64_t units[MAX_GROUP], width;
    int64_t total = row_units(count, N, units, &width);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < total; i++) {
        int j;
        int64_t n, col;
        int R = unit_rows(i, count, units, N, &j, &n, &col);
        float out[ROWS];
        for (int64_t m = 0; m < M; m++) {
            f32_rows(x + m * K, w[j] + n * K, K, R, out);
            for (int r = 0; r < R; r++) y[m * width + col + n + r] = out[r] + (bias[j] ? bias[j][n + r] : 0.f);
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------- */
/* a whole decode step: every block, the final norm and the output layer in one call                          */
/* ---------------------------------------------------------------------------------------------------------- */
/* A decode step in Python is about ten small calls per block (norms, products, attention, the activation, the
 * residual adds), each a few microseconds of interpreter and dispatcher work around a little arithmetic. For a
 * 124M model at 2 threads the products themselves take 4 (int4) to 15 (fp32) ms per token and that bookkeeping
 * adds 1.5-4 ms more. `lmf_decode_step` runs the same step (generation/decode.py's `decode_step`, for rows that
 * have all written the same number of slots) as one call: the products above, `lmf_attend_one`, and the few
 * element-wise loops below. The Python step stays the readable definition; this one is tested against it. */

/* e^x to a few ulp (Cephes' expf): x = n ln2 + r, e^r by a polynomial, 2^n from the exponent bits. Plain C that
   the compiler vectorizes inside the loops below (libm's expf is a call per element). */
static inline float exp_approx(float x) {
    x = fminf(fmaxf(x, -87.f), 88.f);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } e;
    e.i = ((int32_t)n + 127) << 23;
    return p * e.f;
}

/* y = gelu(x) with the tanh approximation (GPT-2's), in place: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) */
static void gelu_tanh(float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float v = x[i], u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        float t = 1.f - 2.f / (exp_approx(2.f * u) + 1.f); /* tanh(u) */
        x[i] = 0.5f * v * (1.f + t);
    }
}

/* out (H,) = silu(gate) * up, from one row [gate | up] (2H,) */
static void silu_mul(const float *gu, float *out, int64_t H) {
#pragma omp simd
    for (int64_t i = 0; i < H; i++) {
        float g = gu[i];
        out[i] = g / (1.f + exp_approx(-g)) * gu[H + i];
    }
}

/* LayerNorm (b != NULL) or RMSNorm (b == NULL) of one row of C */
static void norm_row(const float *x, float *y, const float *w, const float *b, int64_t C, float eps) {
    float mean = 0.f, var = 0.f;
    if (b) {
#pragma omp simd reduction(+ : mean)
        for (int64_t i = 0; i < C; i++) mean += x[i];
        mean /= (float)C;
    }
#pragma omp simd reduction(+ : var)
    for (int64_t i = 0; i < C; i++) var += (x[i] - mean) * (x[i] - mean);
    float r = 1.f / sqrtf(var / (float)C + eps);
    if (b) {
#pragma omp simd
        for (int64_t i = 0; i < C; i++) y[i] = (x[i] - mean) * r * w[i] + b[i];
    } else {
#pragma omp simd
        for (int64_t i = 0; i < C; i++) y[i] = w[i] * (x[i] * r);
    }
}

/* one projection group: `count` matrices (q|k|v, gate|up, or one) of one kind that read the same input */
typedef struct {
    int32_t kind, count;  /* kind: 0 fp32 (N, K), 1 int8 (N, K) + fp32 scale per row, 2 int4 (64-code layout) */
    int64_t K, G;         /* input width; int4 group size */
    const void *const *w; /* count pointers each: weights, scales (int8: fp32 (N,); int4: fp16 (N, K/G)), */
    const void *const *scale; /* int4 zeros (uint8 (N, K/G)), fp32 biases (or NULL) */
    const void *const *zero;
    const float *const *bias;
    const int64_t *N;
} lmf_proj;

typedef struct {
    const float *n1w, *n1b, *n2w, *n2b; /* norms before attention and MLP; b NULL: RMSNorm */
    lmf_proj qkv, o, in, down;          /* in: (up) or (gate, up) */
} lmf_block;

typedef struct {
    int32_t n_layer, swiglu, rope, pad;
    int64_t C, nh, nkv, hd, H;
    float eps, scale;                   /* norm epsilon; attention scale 1 / sqrt(hd) */
    const lmf_block *blocks;
    const float *nfw, *nfb;             /* final norm */
    lmf_proj head;                      /* output layer (N = vocabulary) */
} lmf_model;

static void project(const lmf_proj *p, const float *x, float *y, int64_t M, void *qscratch, int threads) {
    if (p->kind == 0)
        lmf_f32_gemv(x, p->count, (const float *const *)p->w, p->bias, p->N, y, M, p->K, threads);
    else if (p->kind == 1)
        lmf_int8_gemv(x, p->count, (const int8_t *const *)p->w, (const float *const *)p->scale, p->bias, p->N, y,
                      qscratch, M, p->K, threads);
    else
        lmf_int4_gemv(x, p->count, (const uint8_t *const *)p->w, (const uint16_t *const *)p->scale,
                      (const uint8_t *const *)p->zero, p->bias, p->N, y, qscratch, M, p->K, p->G, threads);
}

/* x (M, C): the new tokens' embeddings (+ positions), consumed as the residual stream. Every row writes slot L of
 * its caches k_all, v_all (n_layer, M, nkv, T, hd) and attends to slots 0..L. cos, sin (hd,): the rotary angles of
 * position L (sin with rotate-half's sign folded in, as models/decoder.py keeps it), NULL without rope.
 * logits (M, V). scratch: lmf_decode_scratch(...) bytes. */
int64_t lmf_decode_scratch(const lmf_model *m, int64_t M, int64_t T, int threads) {
    int64_t nq = m->nh * m->hd, nk = m->nkv * m->hd, Kmax = m->C > m->H ? m->C : m->H;
    int64_t floats = M * m->C + M * (nq + 2 * nk) + M * nq + M * 2 * m->H + (int64_t)threads * T + 64;
    return floats * 4 + M * (2 * Kmax + Kmax / 4) + 256;
}

void lmf_decode_step(const lmf_model *m, float *x, int64_t M, float *k_all, float *v_all, int64_t T, int64_t L,
                     const float *cos, const float *sin, float *logits, void *scratch, int threads) {
    int64_t C = m->C, nh = m->nh, nkv = m->nkv, hd = m->hd, H = m->H;
    int64_t nq = nh * hd, nk = nkv * hd, width = nq + 2 * nk, layer = M * nkv * T * hd;
    float *h = (float *)scratch, *qkv = h + M * C, *att = qkv + M * width, *mid = att + M * nq;
    float *ascratch = mid + M * 2 * H;
    void *qs = (void *)(((uintptr_t)(ascratch + (int64_t)threads * T) + 63) & ~(uintptr_t)63);
    for (int l = 0; l < m->n_layer; l++) {
        const lmf_block *b = m->blocks + l;
        for (int64_t r = 0; r < M; r++) norm_row(x + r * C, h + r * C, b->n1w, b->n1b, C, m->eps);
        project(&b->qkv, h, qkv, M, qs, threads);
        if (m->rope) /* q and k heads: out[i] = x[i] cos[i] + x[(i + hd/2) % hd] sin[i] */
            for (int64_t r = 0; r < M; r++)
                for (int64_t g = 0; g < nh + nkv; g++) {
                    float *v = qkv + r * width + g * hd, t[1024];
                    memcpy(t, v, hd * sizeof(float));
                    for (int64_t i = 0; i < hd; i++) v[i] = t[i] * cos[i] + t[(i + hd / 2) % hd] * sin[i];
                }
        lmf_attend_one(qkv, width, qkv + nq, width, qkv + nq + nk, width, k_all + l * layer, v_all + l * layer,
                       att, M, nh, nkv, hd, T, L, m->scale, ascratch, threads);
        project(&b->o, att, h, M, qs, threads);
        for (int64_t i = 0; i < M * C; i++) x[i] += h[i];
        for (int64_t r = 0; r < M; r++) norm_row(x + r * C, h + r * C, b->n2w, b->n2b, C, m->eps);
        project(&b->in, h, mid, M, qs, threads);
        if (m->swiglu)
            for (int64_t r = 0; r < M; r++) silu_mul(mid + r * 2 * H, mid + r * H, H); /* (M, H) in place */
        else
            gelu_tanh(mid, M * H);
        project(&b->down, mid, h, M, qs, threads);
        for (int64_t i = 0; i < M * C; i++) x[i] += h[i];
    }
    for (int64_t r = 0; r < M; r++) norm_row(x + r * C, h + r * C, m->nfw, m->nfb, C, m->eps);
    project(&m->head, h, logits, M, qs, threads);
}

/* which loop this build took: 2 = VNNI, 1 = AVX2, 0 = plain C */
int lmf_simd_level(void) {
#if defined(__AVX2__) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}
