/*
 * quipsharp native CPU kernels: E8P12-family decode, fused decode-matmul, and the fast Hadamard
 * transform on activations (QuIP# paper §3 and §4.2; DESIGN.md §1, §7).
 *
 * Plain C on raw buffers: no Python or PyTorch API is used by the kernels (the tiny module init at
 * the end only makes the file importable). Python calls them through ctypes and wraps them as
 * torch.library custom ops (quipsharp/kernels.py).
 *
 * Code layout (the on-disk layout of QuantizedLinear.codes, used as is, no repack):
 *   codes  uint8 [m, n/8 * CB]   row i, codeword k at bytes [k*CB, k*CB + CB), little-endian
 *   CB = 2  E8P12       (2 bits/weight): c1 = 16-bit E8P12 code
 *   CB = 3  E8P12RVQ3B  (3 bits/weight): c1 (16 bits) | c2 << 16, c2 an 8-bit index into tab2
 *   CB = 4  E8P12RVQ4B  (4 bits/weight): c1 (16 bits) | c2 << 16, c2 a 16-bit E8P12 code
 * E8P12 code c: idx = c & 0xFF, signs = c >> 8. If popcount(signs) is odd, bit 7 of signs is
 * toggled and the shift is -1/4, else +1/4. codeword[j] = (signs bit j ? -src[idx][j] : src[idx][j])
 * + shift. A residual codeword is stage1 + stage2 / resid_scale.
 *
 * Every entry point returns QS_OK or a negative QS_E* error instead of touching memory it was not
 * given: the Python side checks dtypes, shapes and contiguity first, and the C side re-checks the
 * scalar arguments.
 *
 * ISA paths (runtime dispatch, chosen by qs_select_level): a portable scalar path, AVX2+FMA and
 * AVX-512 (F+VL+BW+DQ), all float32 and equal to the reference up to summation order; and the
 * int8 path (AVX-512 VNNI+VBMI+BITALG), which quantizes each activation vector to int8 (one scale
 * per vector: after the Hadamard transform activations have no outlier channels) and multiplies it
 * with int8 codeword values (4 × E8P12 values are odd integers in [-11, 11]) by VNNI dot products.
 * Its integer sums are bitwise equal to the portable int8 reference (qs_matmul_int8_ref).
 */
#ifndef QS_STANDALONE /* the C test driver (tests/native) builds this file without Python */
#include <Python.h>
#endif
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QS_X86 1
#include <immintrin.h>
#else
#define QS_X86 0
#endif

#if defined(__aarch64__) && defined(__GNUC__) && defined(__linux__)
#define QS_ARM 1
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
/* sdot (Armv8.2 dot product) only in the functions of the neon_dotprod level, chosen at run time */
#define QS_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#else
#define QS_ARM 0
#endif

#define QS_API __attribute__((visibility("default")))

enum { QS_OK = 0, QS_EBADARG = -1, QS_EBADKIND = -2, QS_ENOMEM = -3, QS_EBADLEVEL = -4 };
enum { QS_KIND_E8P = 0, QS_KIND_RVQ3 = 1, QS_KIND_RVQ4 = 2, QS_NUM_KINDS = 3 };
enum { QS_LEVEL_SCALAR = 0, QS_LEVEL_AVX2 = 1, QS_LEVEL_AVX512 = 2, QS_LEVEL_VNNI = 3, QS_LEVEL_NEON = 4,
       QS_LEVEL_NEON_DOT = 5, QS_NUM_LEVELS = 6 };

#define DIM 8                 /* E8: weights per codeword */
#define NSRC 256              /* E8P12 source patterns */
#define SRC_MASK 0xFFu
#define SIGN_SHIFT 8
#define PARITY_BIT 0x80u      /* sign bit toggled when the sign byte has odd popcount */
#define E8P_SHIFT 0.25f
#define ROWS_PER_TASK 16      /* rows handed to a thread at a time */
#define MAX_FUSED_BATCH 8     /* batch vectors kept in registers by the fused kernels */
#define MIX_LANES 16          /* Hadamard K x K mixing: float32 lanes of one AVX-512 register */
#define PARALLEL_MIN_CODEWORDS (64 * 1024) /* below this a call stays on one thread (wake-up costs more) */
#define PARALLEL_MIN_ELEMENTS (2 * 1024 * 1024) /* activation passes (quantization, Hadamard rows) */

static const int CODE_BYTES[QS_NUM_KINDS] = {2, 3, 4};

/* ------------------------------------------------------------------------------ CPU features */
/*
 * There is no selected level in this library: every entry point takes the level to run as an
 * argument and refuses (QS_EBADLEVEL) a level this CPU or build cannot run, so a caller can never
 * reach an illegal instruction. Only the CPU's feature bits are cached (they do not change).
 */
static int detect_levels(void) {
    int mask = 1 << QS_LEVEL_SCALAR;
#if QS_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    int vnni = avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
               __builtin_cpu_supports("avx512bitalg") && __builtin_cpu_supports("bmi2");
    if (avx2) mask |= 1 << QS_LEVEL_AVX2;
    if (avx512) mask |= 1 << QS_LEVEL_AVX512;
    if (vnni) mask |= 1 << QS_LEVEL_VNNI;
#endif
#if QS_ARM
    unsigned long hw = getauxval(AT_HWCAP);
    if (hw & HWCAP_ASIMD) mask |= 1 << QS_LEVEL_NEON;
    if ((hw & HWCAP_ASIMD) && (hw & HWCAP_ASIMDDP)) mask |= 1 << QS_LEVEL_NEON_DOT;
#endif
    return mask;
}

static int g_cpu_levels = 0; /* cached detect_levels(); 0 = not yet detected (accessed atomically) */

/* Bit L set: this CPU and build can run level L (QS_LEVEL_*). */
QS_API int qs_supported_levels(void) {
    int mask = __atomic_load_n(&g_cpu_levels, __ATOMIC_RELAXED);
    if (!mask) {
        mask = detect_levels();
        __atomic_store_n(&g_cpu_levels, mask, __ATOMIC_RELAXED);
    }
    return mask;
}

/* x86 levels with AVX-512 F/VL/BW/DQ. */
static inline int is_avx512(int level) { return QS_X86 && (level == QS_LEVEL_AVX512 || level == QS_LEVEL_VNNI); }

static int level_ok(int level) {
    return level >= 0 && level < QS_NUM_LEVELS && ((qs_supported_levels() >> level) & 1);
}

QS_API int qs_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Threads worth using for `work` codewords: small problems stay on the calling thread. */
static int threads_for(int64_t work, int nthreads) { return work >= PARALLEL_MIN_CODEWORDS ? nthreads : 1; }

static int code_bytes(int kind) { return (kind >= 0 && kind < QS_NUM_KINDS) ? CODE_BYTES[kind] : 0; }

/* ----------------------------------------------------------------------- codeword reading */
static inline uint32_t read_code(const uint8_t *p, int cb) {
    uint32_t c = (uint32_t)p[0] | ((uint32_t)p[1] << 8);
    if (cb >= 3) c |= (uint32_t)p[2] << 16;
    if (cb >= 4) c |= (uint32_t)p[3] << 24;
    return c;
}

/* Parity-fixed sign byte and shift sign of an E8P12 code (see header). */
static inline uint32_t e8p_signs(uint32_t c, int *odd) {
    uint32_t sg = (c >> SIGN_SHIFT) & SRC_MASK;
    *odd = __builtin_parity(sg);
    return *odd ? (sg ^ PARITY_BIT) : sg;
}

/* Exact scalar decode of one E8P12 code from table src [256*8]: mirrors the Python rule. */
static inline void e8p_decode_scalar(uint32_t c, const float *src, float out[DIM]) {
    int odd;
    uint32_t sg = e8p_signs(c, &odd);
    const float *s = src + (size_t)(c & SRC_MASK) * DIM;
    float sh = odd ? -E8P_SHIFT : E8P_SHIFT;
    for (int j = 0; j < DIM; j++) out[j] = (((sg >> j) & 1u) ? -s[j] : s[j]) + sh;
}

/* Exact decode of one codeword of any kind (the reference definition). */
static inline void decode_scalar(uint32_t c, int kind, const float *src1, const float *tab2, float resid_scale,
                                 float out[DIM]) {
    e8p_decode_scalar(c & 0xFFFFu, src1, out);
    if (kind == QS_KIND_E8P) return;
    float second[DIM];
    if (kind == QS_KIND_RVQ3) {
        const float *t = tab2 + (size_t)((c >> 16) & SRC_MASK) * DIM;
        for (int j = 0; j < DIM; j++) second[j] = t[j];
    } else {
        e8p_decode_scalar(c >> 16, tab2, second);
    }
    for (int j = 0; j < DIM; j++) out[j] = out[j] + second[j] / resid_scale;
}

/* --------------------------------------------------------------------------------- decode */
/* ------------------------------------------------------------------ fused decode-matmul */
/*
 * out[b, i] = sum_k < decode(codes[i, k]), x[b, 8k : 8k+8] >   for b < B, i < m
 *   codes [m, n/8*CB] uint8, x [B, n] float32, out [B, m] float32.
 * Stage-2 values use tab2 / resid_scale precomputed (tolerance-level, not bitwise, equal to the
 * reference decode followed by a dot product).
 */
/* A codebook's tables, built once (qs_codebook_new) and shared by every call. */
typedef struct qs_codebook {
    int kind, cb;
    float resid_scale;
    float src1[NSRC * DIM];  /* stage-1 stored sources */
    float tab2[NSRC * DIM];  /* stage-2 table as given (E81B points / E8P12 sources) */
    float tab2s[NSRC * DIM]; /* stage-2 table divided by resid_scale */
    float shift2;            /* E8P shift of stage 2 (RVQ4) divided by resid_scale */
    int int8_ok;             /* tables lie on the integer grid of the int8 path */
    int pat_ok;              /* sources fit the 16-bit pattern encoding (gather-free int8 path) */
    uint16_t pat[NSRC];      /* |source| as 2-bit fields: field j = (2|src_j| - 1) / 2 in {0, 1, 2} */
    int8_t tab1q[NSRC * DIM]; /* 4 × stage-1 sources */
    int8_t tab2q[NSRC * DIM]; /* stage 2: 4 × E8P12 sources (RVQ4) or 16 + 2 × E81B points (RVQ3) */
    float unit2;              /* value of one stage-2 integer unit: 1/(4 s) or 1/(2 s) */
    /* E8P12 sign byte sg -> 8 signed bytes (±1 per the parity-fixed signs) × (INT8_OFFSET ± 1, the
       shift of an even / odd code): with T the 4 × source row, sign(T, G) + |G| is the unsigned
       operand of the int8 path (see e8p_dot_int8), with no branch or bit test per codeword. */
    int8_t sgnq[NSRC * DIM];
} qs_codebook;

typedef struct {
    const uint8_t *codes;
    int64_t m, n, nblk, row_bytes;
    int kind, cb;
    const qs_codebook *t;
    const float *x;
    int64_t B;
    float *out;
    /* int8 path */
    const int8_t *xq;          /* [B, n] activations quantized to int8 */
    const float *xscale;       /* [B] their scales */
    const int32_t *xsum;       /* [B] sums of xq */
    const int16_t *xbs;        /* [B, nblk] sums of xq over each codeword's 8 activations */
} mm_args;

static void mm_rows_scalar(const mm_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t nb) {
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *rc = a->codes + i * a->row_bytes;
        double acc[MAX_FUSED_BATCH] = {0};
        for (int64_t k = 0; k < a->nblk; k++) {
            uint32_t c = read_code(rc + k * a->cb, a->cb);
            float v[DIM];
            e8p_decode_scalar(c & 0xFFFFu, a->t->src1, v);
            if (a->kind == QS_KIND_RVQ3) {
                const float *t = a->t->tab2s + (size_t)((c >> 16) & SRC_MASK) * DIM;
                for (int j = 0; j < DIM; j++) v[j] += t[j];
            } else if (a->kind == QS_KIND_RVQ4) {
                int odd;
                uint32_t sg = e8p_signs(c >> 16, &odd);
                const float *t = a->t->tab2s + (size_t)((c >> 16) & SRC_MASK) * DIM;
                float sh = odd ? -a->t->shift2 : a->t->shift2;
                for (int j = 0; j < DIM; j++) v[j] += (((sg >> j) & 1u) ? -t[j] : t[j]) + sh;
            }
            for (int64_t b = 0; b < nb; b++) {
                const float *xb = a->x + (b0 + b) * a->n + k * DIM;
                float s = 0.0f;
                for (int j = 0; j < DIM; j++) s += v[j] * xb[j];
                acc[b] += s;
            }
        }
        for (int64_t b = 0; b < nb; b++) a->out[(b0 + b) * a->m + i] = (float)acc[b];
    }
}

#if QS_X86
/* Row i of the float32 kernels (after any kind-specific fast path): batch 1 with four
   accumulators, else up to MAX_FUSED_BATCH rows sharing each decoded codeword. */
#define QS_FLOAT_ROW(DECODE)                                                                                         \
        if (nb == 1) { /* matvec: four independent accumulators hide the FMA latency */                              \
            const float *x = a->x + b0 * a->n;                                                                       \
            __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;                                \
            int64_t k = 0;                                                                                           \
            for (; k + 4 <= a->nblk; k += 4) {                                                                       \
                acc0 = _mm256_fmadd_ps(DECODE(a, read_code(rc + (k + 0) * a->cb, a->cb)),                            \
                                       _mm256_loadu_ps(x + (k + 0) * DIM), acc0);                                    \
                acc1 = _mm256_fmadd_ps(DECODE(a, read_code(rc + (k + 1) * a->cb, a->cb)),                            \
                                       _mm256_loadu_ps(x + (k + 1) * DIM), acc1);                                    \
                acc2 = _mm256_fmadd_ps(DECODE(a, read_code(rc + (k + 2) * a->cb, a->cb)),                            \
                                       _mm256_loadu_ps(x + (k + 2) * DIM), acc2);                                    \
                acc3 = _mm256_fmadd_ps(DECODE(a, read_code(rc + (k + 3) * a->cb, a->cb)),                            \
                                       _mm256_loadu_ps(x + (k + 3) * DIM), acc3);                                    \
            }                                                                                                        \
            for (; k < a->nblk; k++)                                                                                 \
                acc0 = _mm256_fmadd_ps(DECODE(a, read_code(rc + k * a->cb, a->cb)),                                  \
                                       _mm256_loadu_ps(x + k * DIM), acc0);                                          \
            a->out[b0 * a->m + i] = hsum_avx2(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));  \
            continue;                                                                                                \
        }                                                                                                            \
        __m256 acc[MAX_FUSED_BATCH];                                                                                 \
        for (int64_t b = 0; b < nb; b++) acc[b] = _mm256_setzero_ps();                                               \
        for (int64_t k = 0; k < a->nblk; k++) {                                                                      \
            __m256 v = DECODE(a, read_code(rc + k * a->cb, a->cb));                                                  \
            for (int64_t b = 0; b < nb; b++)                                                                         \
                acc[b] = _mm256_fmadd_ps(v, _mm256_loadu_ps(a->x + (b0 + b) * a->n + k * DIM), acc[b]);              \
        }                                                                                                            \
        for (int64_t b = 0; b < nb; b++) a->out[(b0 + b) * a->m + i] = hsum_avx2(acc[b]);

/* ---- AVX2 + FMA: sign bytes expanded to lane masks by broadcast / and / compare ---- */
__attribute__((target("avx2,fma,popcnt"))) static inline __m256 signs_to_xor_avx2(uint32_t sg) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)sg), bits), bits);
    return _mm256_castsi256_ps(_mm256_slli_epi32(m, 31));
}

/* One E8P12 codeword from table src: src ⊙ (−1)^signs ± shift. */
__attribute__((target("avx2,fma,popcnt"))) static inline __m256 e8p_signed_avx2(uint32_t c, const float *src,
                                                                              float shift) {
    int odd;
    uint32_t sg = e8p_signs(c & 0xFFFFu, &odd);
    __m256 v = _mm256_loadu_ps(src + (size_t)(c & SRC_MASK) * DIM);
    return _mm256_add_ps(_mm256_xor_ps(v, signs_to_xor_avx2(sg)), _mm256_set1_ps(odd ? -shift : shift));
}

/* A codeword of any kind for the float32 kernels: stage 1, plus stage 2 from the pre-divided table. */
#define QS_DEFINE_DECODE(NAME, TARGET, E8P)                                                                \
    __attribute__((target(TARGET))) static inline __m256 NAME(const mm_args *a, uint32_t c) {            \
        __m256 v = E8P(c, a->t->src1, E8P_SHIFT);                                                        \
        if (a->kind == QS_KIND_RVQ3)                                                                     \
            v = _mm256_add_ps(v, _mm256_loadu_ps(a->t->tab2s + (size_t)((c >> 16) & SRC_MASK) * DIM)); \
        else if (a->kind == QS_KIND_RVQ4)                                                                \
            v = _mm256_add_ps(v, E8P(c >> 16, a->t->tab2s, a->t->shift2));                               \
        return v;                                                                                        \
    }

QS_DEFINE_DECODE(decode_avx2, "avx2,fma,popcnt", e8p_signed_avx2)

__attribute__((target("avx2,fma,popcnt"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,popcnt"))) static void mm_rows_avx2(const mm_args *a, int64_t r0, int64_t r1, int64_t b0,
                                                               int64_t nb) {
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *rc = a->codes + i * a->row_bytes;
        QS_FLOAT_ROW(decode_avx2)
    }
}

/* ---- AVX-512 (F/VL/BW/DQ): sign bytes are lane masks directly (masked negate) ---- */
#define QS_AVX512 "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt"

/* One E8P12 codeword from table src: src ⊙ (−1)^signs ± shift (exact: as e8p_decode_scalar when
   shift = 1/4). */
__attribute__((target("avx512f,avx512vl,popcnt"))) static inline __m256 e8p_signed_avx512(uint32_t c, const float *src,
                                                                                 float shift) {
    int odd;
    uint32_t sg = e8p_signs(c & 0xFFFFu, &odd);
    __m256 v = _mm256_loadu_ps(src + (size_t)(c & SRC_MASK) * DIM);
    v = _mm256_mask_sub_ps(v, (__mmask8)sg, _mm256_setzero_ps(), v);
    return _mm256_add_ps(v, _mm256_set1_ps(odd ? -shift : shift));
}

QS_DEFINE_DECODE(decode_avx512, QS_AVX512, e8p_signed_avx512)

/* Two codewords in one zmm (2-bit only): 16 weights per FMA. */
__attribute__((target(QS_AVX512))) static inline __m512 decode2_e8p_avx512(const float *src1, uint32_t c0,
                                                                           uint32_t c1) {
    int o0, o1;
    uint32_t s0 = e8p_signs(c0, &o0), s1 = e8p_signs(c1, &o1);
    __m512 v = _mm512_castps256_ps512(_mm256_loadu_ps(src1 + (size_t)(c0 & SRC_MASK) * DIM));
    v = _mm512_insertf32x8(v, _mm256_loadu_ps(src1 + (size_t)(c1 & SRC_MASK) * DIM), 1);
    v = _mm512_mask_sub_ps(v, (__mmask16)(s0 | (s1 << DIM)), _mm512_setzero_ps(), v);
    /* shift: +1/4 on the lanes of an even code, -1/4 on those of an odd code */
    __mmask16 neg = (__mmask16)((o0 ? 0x00FFu : 0u) | (o1 ? 0xFF00u : 0u));
    v = _mm512_add_ps(v, _mm512_mask_blend_ps(neg, _mm512_set1_ps(E8P_SHIFT), _mm512_set1_ps(-E8P_SHIFT)));
    return v;
}

__attribute__((target(QS_AVX512))) static void mm_rows_avx512(const mm_args *a, int64_t r0, int64_t r1, int64_t b0,
                                                                int64_t nb) {
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *rc = a->codes + i * a->row_bytes;
        if (nb == 1 && a->kind == QS_KIND_E8P) {
            const float *x = a->x + b0 * a->n;
            const uint8_t *c16 = rc; /* codeword k is bytes [2k, 2k+2), read with read_code */
            __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
            int64_t k = 0;
            for (; k + 8 <= a->nblk; k += 8) {
                acc0 = _mm512_fmadd_ps(decode2_e8p_avx512(a->t->src1, read_code(c16 + 2 * (k + 0), 2), read_code(c16 + 2 * (k + 1), 2)),
                                       _mm512_loadu_ps(x + (k + 0) * DIM), acc0);
                acc1 = _mm512_fmadd_ps(decode2_e8p_avx512(a->t->src1, read_code(c16 + 2 * (k + 2), 2), read_code(c16 + 2 * (k + 3), 2)),
                                       _mm512_loadu_ps(x + (k + 2) * DIM), acc1);
                acc2 = _mm512_fmadd_ps(decode2_e8p_avx512(a->t->src1, read_code(c16 + 2 * (k + 4), 2), read_code(c16 + 2 * (k + 5), 2)),
                                       _mm512_loadu_ps(x + (k + 4) * DIM), acc2);
                acc3 = _mm512_fmadd_ps(decode2_e8p_avx512(a->t->src1, read_code(c16 + 2 * (k + 6), 2), read_code(c16 + 2 * (k + 7), 2)),
                                       _mm512_loadu_ps(x + (k + 6) * DIM), acc3);
            }
            __m256 tail = _mm256_setzero_ps();
            for (; k < a->nblk; k++)
                tail = _mm256_fmadd_ps(decode_avx512(a, read_code(c16 + 2 * k, 2)), _mm256_loadu_ps(x + k * DIM), tail);
            __m512 s = _mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3));
            a->out[b0 * a->m + i] = _mm512_reduce_add_ps(s) + hsum_avx2(tail);
            continue;
        }
        QS_FLOAT_ROW(decode_avx512)
    }
}
#endif /* QS_X86 */


/* ------------------------------------------------------------------------------- int8 path */
/*
 * Unsigned operand of one E8P12 codeword for u8 × s8 dot products: u = 4·codeword + INT8_OFFSET,
 * i.e. (±4·src) + (odd ? -1 : +1) + 16, in [5, 27]. The offset makes it unsigned; its contribution
 * INT8_OFFSET · Σ xq is removed per output.
 */
#define INT8_OFFSET 16
#define INT8_QMAX 127.0f
#define ROUND_MAGIC 12582912.0f /* 1.5 · 2^23: v + M - M rounds v to an integer (|v| < 2^22) */
#define E8P_INT_UNIT 4 /* E8P12 values × 4 are integers */
#define E81B_INT_UNIT 2 /* E81B values × 2 are integers */
#define GROUP 8        /* codewords per SIMD step (64 int8 weights) */

static inline int32_t e8p_dot_int8(uint32_t c, const int8_t *tab, const int8_t *xq) {
    int odd;
    uint32_t sg = e8p_signs(c & 0xFFFFu, &odd);
    const int8_t *t = tab + (size_t)(c & SRC_MASK) * DIM;
    int32_t acc = 0;
    for (int j = 0; j < DIM; j++) {
        int32_t u = (((sg >> j) & 1u) ? -t[j] : t[j]) + INT8_OFFSET + (odd ? -1 : 1);
        acc += u * (int32_t)xq[j];
    }
    return acc;
}

static inline int32_t e81b_dot_int8(uint32_t idx, const int8_t *tab, const int8_t *xq) {
    const int8_t *t = tab + (size_t)idx * DIM; /* already offset */
    int32_t acc = 0;
    for (int j = 0; j < DIM; j++) acc += (int32_t)t[j] * (int32_t)xq[j];
    return acc;
}

/* Integer sums of codewords [k0, k1) of row rc for activation row xq: stage 1 in d1, stage 2 in d2. */
static inline void int8_dots_scalar(const mm_args *a, const uint8_t *rc, const int8_t *xq, int64_t k0, int64_t k1,
                                    int32_t *d1, int32_t *d2) {
    for (int64_t k = k0; k < k1; k++) {
        uint32_t c = read_code(rc + k * a->cb, a->cb);
        *d1 += e8p_dot_int8(c, a->t->tab1q, xq + k * DIM);
        if (a->kind == QS_KIND_RVQ4) *d2 += e8p_dot_int8(c >> 16, a->t->tab2q, xq + k * DIM);
        if (a->kind == QS_KIND_RVQ3) *d2 += e81b_dot_int8((c >> 16) & SRC_MASK, a->t->tab2q, xq + k * DIM);
    }
}

/* The one formula turning integer sums into an output (shared by every int8 kernel). */
static inline float int8_output(const mm_args *a, int64_t b, int32_t d1, int32_t d2) {
    int64_t off = (int64_t)INT8_OFFSET * a->xsum[b];
    float v = (float)((int64_t)d1 - off) * (1.0f / E8P_INT_UNIT);
    if (a->kind != QS_KIND_E8P) v += (float)((int64_t)d2 - off) * a->t->unit2;
    return a->xscale[b] * v;
}

static void mm_rows_int8_scalar(const mm_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t nb) {
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *rc = a->codes + i * a->row_bytes;
        for (int64_t b = b0; b < b0 + nb; b++) {
            int32_t d1 = 0, d2 = 0;
            int8_dots_scalar(a, rc, a->xq + b * a->n, 0, a->nblk, &d1, &d2);
            a->out[b * a->m + i] = int8_output(a, b, d1, d2);
        }
    }
}

/* A row kernel over a batch (shared by the SIMD levels): for each weight row, the batch's activation
 * rows in passes of up to PASS, each pass a call of ROW(a, row, first activation row, rows, KIND) with
 * a compile-time row count, so ROW keeps its accumulators in registers. ATTR: the function's target. */
#define QS_DEFINE_INT8_ROWS(NAME, ATTR, ROW, KIND, PASS)                                                      \
    ATTR static void NAME(const mm_args *a, int64_t r0, int64_t r1, int64_t b0, int64_t nb) {                 \
        for (int64_t i = r0; i < r1; i++)                                                                     \
            for (int64_t c0 = b0; c0 < b0 + nb; c0 += PASS) {                                                 \
                switch (b0 + nb - c0 < PASS ? b0 + nb - c0 : PASS) {                                          \
                case 1: ROW(a, i, c0, 1, KIND); break;                                                        \
                case 2: ROW(a, i, c0, 2, KIND); break;                                                        \
                case 3: ROW(a, i, c0, 3, KIND); break;                                                        \
                case 4: ROW(a, i, c0, 4, KIND); break;                                                        \
                case 5: ROW(a, i, c0, 5, KIND); break;                                                        \
                case 6: ROW(a, i, c0, 6, KIND); break;                                                        \
                case 7: ROW(a, i, c0, 7, KIND); break;                                                        \
                default: ROW(a, i, c0, 8, KIND); break;                                                       \
                }                                                                                             \
            }                                                                                                 \
    }

#if QS_X86
#define QS_VNNI "avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx512vbmi,avx512bitalg,avx2,fma"

/* 8 E8P12 codewords as 64 unsigned int8 operands; idx8 / sg8: low 8 bytes = indices / sign bytes. */
__attribute__((target(QS_VNNI))) static inline __m512i e8p_u8_group(__m128i idx8, __m128i sg8, const int8_t *tab) {
    __m512i v = _mm512_i64gather_epi64(_mm512_cvtepu8_epi64(idx8), (const void *)tab, DIM);
    __m128i par = _mm_and_si128(_mm_popcnt_epi8(sg8), _mm_set1_epi8(1));
    __m128i sg = _mm_xor_si128(sg8, _mm_slli_epi16(par, 7)); /* toggle bit 7 of odd bytes */
    __mmask64 neg = _cvtu64_mask64((uint64_t)_mm_cvtsi128_si64(sg));
    __mmask64 odd = _cvtu64_mask64((uint64_t)_mm_cvtsi128_si64(par) * 0xFFu);
    v = _mm512_mask_sub_epi8(v, neg, _mm512_setzero_si512(), v);
    v = _mm512_add_epi8(v, _mm512_set1_epi8(INT8_OFFSET + 1));
    return _mm512_mask_sub_epi8(v, odd, v, _mm512_set1_epi8(2));
}

/* Byte shuffle gathering, for GROUP consecutive codewords, the stage-1 index bytes, the stage-1
   sign bytes, then (RVQ) the stage-2 low and high bytes; and the load mask of GROUP codewords. */
typedef struct {
    __m256i ctrl;
    __mmask32 load_mask;
} group8_shuffle;

__attribute__((target(QS_VNNI))) static inline group8_shuffle group8_setup(int cb) {
    uint8_t ctrl_b[32];
    for (int t = 0; t < GROUP; t++) {
        ctrl_b[t] = (uint8_t)(t * cb);
        ctrl_b[GROUP + t] = (uint8_t)(t * cb + 1);
        ctrl_b[2 * GROUP + t] = (uint8_t)(cb >= 3 ? t * cb + 2 : 0);
        ctrl_b[3 * GROUP + t] = (uint8_t)(cb >= 4 ? t * cb + 3 : 0);
    }
    group8_shuffle sh;
    sh.ctrl = _mm256_loadu_si256((const __m256i *)ctrl_b);
    sh.load_mask = (__mmask32)(((uint64_t)1 << (GROUP * cb)) - 1);
    return sh;
}

/* Codewords [8g, 8g + 8) of row rc (any kind) against activations xq, with gathers. */
__attribute__((target(QS_VNNI))) static inline void vnni_group8(const mm_args *a, const group8_shuffle *sh,
                                                                const uint8_t *rc, int64_t g, const int8_t *xq,
                                                                __m512i *acc1, __m512i *acc2) {
    __m256i raw = _mm256_maskz_loadu_epi8(sh->load_mask, rc + g * GROUP * a->cb);
    __m256i s = _mm256_permutexvar_epi8(sh->ctrl, raw);
    __m128i lo = _mm256_castsi256_si128(s), hi = _mm256_extracti128_si256(s, 1);
    __m512i x = _mm512_loadu_si512((const void *)(xq + g * GROUP * DIM));
    *acc1 = _mm512_dpbusd_epi32(*acc1, e8p_u8_group(lo, _mm_srli_si128(lo, 8), a->t->tab1q), x);
    if (a->kind == QS_KIND_RVQ4) {
        *acc2 = _mm512_dpbusd_epi32(*acc2, e8p_u8_group(hi, _mm_srli_si128(hi, 8), a->t->tab2q), x);
    } else if (a->kind == QS_KIND_RVQ3) {
        __m512i v2 = _mm512_i64gather_epi64(_mm512_cvtepu8_epi64(hi), (const void *)a->t->tab2q, DIM);
        *acc2 = _mm512_dpbusd_epi32(*acc2, v2, x);
    }
}

#define QS_VNNI_PAT QS_VNNI ",bmi2"
#define BLOCK32 32 /* codewords per step of the gather-free kernel */

/* The source-pattern table in eight registers (four 64-entry halves for vpermi2w). */
typedef struct {
    __m512i p[8];
} pat_regs;

/*
 * Integer dot product of 32 E8P12 codes (words of `codes`) with 256 int8 activations xq, added to
 * acc, plus the ±1/4 shifts (±1 in integer units) times the 32 block sums bs, added to accs.
 * Sources come from the pattern registers (vpermi2w + blends) instead of a gather; each group of 8
 * codewords is expanded with a multishift and two 64-byte tables (16 + 4|src| and 16 − 4|src|,
 * the latter where the coordinate is negated: the sign bits, the parity fix of bit 7 and the stored
 * negation of coordinate 7 folded into one byte mask). The integer total equals e8p_dot_int8's.
 */
__attribute__((target(QS_VNNI_PAT))) static inline void e8p_dot_block32(__m512i codes, const pat_regs *pr,
                                                                        const int8_t *xq, const int16_t *bs,
                                                                        __m512i *acc, __m512i *accs) {
    const __m512i low8 = _mm512_set1_epi16(0xFF), one = _mm512_set1_epi16(1);
    const __m512i idx = _mm512_and_si512(codes, low8);
    const __m512i sg = _mm512_srli_epi16(codes, SIGN_SHIFT);
    __m512i q0 = _mm512_permutex2var_epi16(pr->p[0], idx, pr->p[1]);
    __m512i q1 = _mm512_permutex2var_epi16(pr->p[2], idx, pr->p[3]);
    __m512i q2 = _mm512_permutex2var_epi16(pr->p[4], idx, pr->p[5]);
    __m512i q3 = _mm512_permutex2var_epi16(pr->p[6], idx, pr->p[7]);
    __mmask32 b6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
    __mmask32 b7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
    __m512i pat = _mm512_mask_blend_epi16(b7, _mm512_mask_blend_epi16(b6, q0, q1), _mm512_mask_blend_epi16(b6, q2, q3));
    __m512i flag = _mm512_and_si512(_mm512_popcnt_epi16(_mm512_and_si512(pat, _mm512_set1_epi16(0x5555))), one);
    __m512i odd = _mm512_and_si512(_mm512_popcnt_epi16(sg), one);
    __m512i neg = _mm512_xor_si512(sg, _mm512_slli_epi16(_mm512_xor_si512(odd, flag), 7));
    /* shifts: +bs for even codes, -bs for odd ones, summed in int32 lanes */
    __m512i b16 = _mm512_loadu_si512((const void *)bs);
    b16 = _mm512_mask_sub_epi16(b16, _mm512_test_epi16_mask(odd, odd), _mm512_setzero_si512(), b16);
    *accs = _mm512_add_epi32(*accs, _mm512_madd_epi16(b16, one));
    uint64_t negq[4];
    _mm256_storeu_si256((__m256i *)negq, _mm512_cvtepi16_epi8(neg));
    const __m512i shiftctl = _mm512_set1_epi64(0x0E0C0A0806040200LL); /* byte j <- bits 2j.. of the qword */
    const __m512i lut_pos = _mm512_set1_epi32(0x101A1612);              /* field -> 16 + 4|src| (18, 22, 26) */
    const __m512i lut_neg = _mm512_set1_epi32(0x10060A0E);              /* field -> 16 - 4|src| (14, 10, 6) */
#define QS_GROUP(qi, ext)                                                                                      \
    {                                                                                                        \
        __m512i f = _mm512_multishift_epi64_epi8(shiftctl, _mm512_cvtepu16_epi64(ext));                      \
        __m512i v = _mm512_mask_permutexvar_epi8(_mm512_permutexvar_epi8(f, lut_pos), _cvtu64_mask64(negq[qi]), \
                                                 f, lut_neg);                                                \
        *acc = _mm512_dpbusd_epi32(*acc, v, _mm512_loadu_si512((const void *)(xq + (qi) * GROUP * DIM)));    \
    }
    QS_GROUP(0, _mm512_castsi512_si128(pat))
    QS_GROUP(1, _mm512_extracti32x4_epi32(pat, 1))
    QS_GROUP(2, _mm512_extracti32x4_epi32(pat, 2))
    QS_GROUP(3, _mm512_extracti32x4_epi32(pat, 3))
#undef QS_GROUP
}

/* Gather-free int8 rows for E8P12 (2-bit) and E8P12RVQ4B (4-bit: both stages are E8P12). */
__attribute__((target(QS_VNNI_PAT))) static void mm_rows_vnni_pat(const mm_args *a, int64_t r0, int64_t r1,
                                                                    int64_t b0, int64_t nb) {
    pat_regs pr;
    for (int q = 0; q < 8; q++) pr.p[q] = _mm512_loadu_si512((const void *)(a->t->pat + 32 * q));
    /* RVQ4: de-interleave 32 codewords (c1 words at even positions, c2 at odd) */
    uint16_t even_b[32], odd_b[32];
    for (int w = 0; w < 32; w++) {
        even_b[w] = (uint16_t)(2 * w);
        odd_b[w] = (uint16_t)(2 * w + 1);
    }
    const __m512i even = _mm512_loadu_si512((const void *)even_b), oddw = _mm512_loadu_si512((const void *)odd_b);
    const group8_shuffle sh = group8_setup(a->cb);
    int64_t nblock = a->nblk / BLOCK32, g8_0 = nblock * BLOCK32 / GROUP, g8_1 = a->nblk / GROUP, kt = g8_1 * GROUP;
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *rc = a->codes + i * a->row_bytes;
        for (int64_t b = b0; b < b0 + nb; b++) {
            const int8_t *xq = a->xq + b * a->n;
            const int16_t *bs = a->xbs + b * a->nblk;
            __m512i acc1 = _mm512_setzero_si512(), acc2 = acc1, accs1 = acc1, accs2 = acc1;
            for (int64_t g = 0; g < nblock; g++) {
                const int8_t *xg = xq + g * BLOCK32 * DIM;
                const int16_t *bg = bs + g * BLOCK32;
                if (a->kind == QS_KIND_E8P) {
                    __m512i c = _mm512_loadu_si512((const void *)(rc + g * BLOCK32 * 2));
                    e8p_dot_block32(c, &pr, xg, bg, &acc1, &accs1);
                } else {
                    __m512i lo = _mm512_loadu_si512((const void *)(rc + g * BLOCK32 * 4));
                    __m512i hi = _mm512_loadu_si512((const void *)(rc + g * BLOCK32 * 4 + 64));
                    e8p_dot_block32(_mm512_permutex2var_epi16(lo, even, hi), &pr, xg, bg, &acc1, &accs1);
                    e8p_dot_block32(_mm512_permutex2var_epi16(lo, oddw, hi), &pr, xg, bg, &acc2, &accs2);
                }
            }
            acc1 = _mm512_add_epi32(acc1, accs1);
            acc2 = _mm512_add_epi32(acc2, accs2);
            for (int64_t g = g8_0; g < g8_1; g++) vnni_group8(a, &sh, rc, g, xq, &acc1, &acc2);
            int32_t d1 = _mm512_reduce_add_epi32(acc1), d2 = _mm512_reduce_add_epi32(acc2);
            int8_dots_scalar(a, rc, xq, kt, a->nblk, &d1, &d2);
            a->out[b * a->m + i] = int8_output(a, b, d1, d2);
        }
    }
}

__attribute__((target(QS_VNNI))) static void mm_rows_vnni(const mm_args *a, int64_t r0, int64_t r1, int64_t b0,
                                                            int64_t nb) {
    /* byte shuffles gathering, for GROUP consecutive codewords, the stage-1 index bytes, the
       stage-1 sign bytes, then (RVQ) the stage-2 low bytes and high bytes */
    const group8_shuffle sh = group8_setup(a->cb);
    int64_t ngroups = a->nblk / GROUP, kt = ngroups * GROUP;
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t *rc = a->codes + i * a->row_bytes;
        for (int64_t b = b0; b < b0 + nb; b++) {
            const int8_t *xq = a->xq + b * a->n;
            __m512i acc1 = _mm512_setzero_si512(), acc2 = _mm512_setzero_si512();
            for (int64_t g = 0; g < ngroups; g++) vnni_group8(a, &sh, rc, g, xq, &acc1, &acc2);
            int32_t d1 = _mm512_reduce_add_epi32(acc1), d2 = _mm512_reduce_add_epi32(acc2);
            int8_dots_scalar(a, rc, xq, kt, a->nblk, &d1, &d2);
            a->out[b * a->m + i] = int8_output(a, b, d1, d2);
        }
    }
}

/*
 * ---- AVX2 int8 path (no gathers). Four codewords at a time: their 8-byte rows of the stage-1
 * table (4 × source) and of the sign table sgnq are loaded from L1 by index (two 64-bit loads per
 * 128-bit lane), combined as u = sign(T, G) + |G| — exactly the reference's unsigned operand
 * ±4·src + 16 ± 1 in [5, 27] — and multiplied with the int8 activations by vpmaddubsw (u8 × s8:
 * |pair sum| <= 2 · 27 · 127 = 6858, two of them added in int16 <= 13716, no saturation) and
 * vpmaddwd by ones into int32. The RVQ3 stage-2 operand (16 + 2 · E81B, up to 127: a pair sum up
 * to 32258) goes to int32 after every vpmaddubsw. Integer sums equal the reference's bit for bit.
 */
#define QS_AVX2 "avx2,fma,popcnt"
#define AVX2_STEP 8 /* codewords per loop iteration (two ymm of operands per stage) */

/* The 8-byte rows i0..i3 of table tab [NSRC * DIM] in one ymm (lane order i0 i1 | i2 i3). */
__attribute__((target(QS_AVX2))) static inline __m256i rows4_avx2(const int8_t *tab, uint32_t i0, uint32_t i1,
                                                                  uint32_t i2, uint32_t i3) {
    __m128i lo = _mm_loadl_epi64((const __m128i *)(tab + (size_t)i0 * DIM));
    lo = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(lo), (const double *)(tab + (size_t)i1 * DIM)));
    __m128i hi = _mm_loadl_epi64((const __m128i *)(tab + (size_t)i2 * DIM));
    hi = _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(hi), (const double *)(tab + (size_t)i3 * DIM)));
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

/* Unsigned operands of 4 E8P12 codes whose index byte is at p, p + cb, p + 2cb, p + 3cb (sign byte next). */
__attribute__((target(QS_AVX2))) static inline __m256i e8p_u4_avx2(const int8_t *tabq, const int8_t *sgnq,
                                                                   const uint8_t *p, int cb) {
    __m256i T = rows4_avx2(tabq, p[0], p[cb], p[2 * cb], p[3 * cb]);
    __m256i G = rows4_avx2(sgnq, p[1], p[cb + 1], p[2 * cb + 1], p[3 * cb + 1]);
    return _mm256_add_epi8(_mm256_sign_epi8(T, G), _mm256_abs_epi8(G));
}

__attribute__((target(QS_AVX2))) static inline int32_t hsum_epi32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* Weight row i against activation rows b0 .. b0 + NB - 1 (NB and KIND compile-time constants after
   inlining): each group of codewords is decoded once for all NB rows. */
__attribute__((target(QS_AVX2), always_inline)) static inline void int8_row_avx2(const mm_args *a, int64_t i,
                                                                                int64_t b0, const int NB,
                                                                                const int KIND) {
    const int cb = KIND == QS_KIND_E8P ? 2 : (KIND == QS_KIND_RVQ3 ? 3 : 4);
    const uint8_t *rc = a->codes + i * a->row_bytes;
    const int8_t *t1 = a->t->tab1q, *t2 = a->t->tab2q, *sg = a->t->sgnq;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc1[MAX_FUSED_BATCH], acc2[MAX_FUSED_BATCH];
    for (int b = 0; b < NB; b++) acc1[b] = acc2[b] = _mm256_setzero_si256();
    const int64_t kend = a->nblk / AVX2_STEP * AVX2_STEP;
    for (int64_t k = 0; k < kend; k += AVX2_STEP) {
        const uint8_t *p = rc + k * cb;
        __m256i ua = e8p_u4_avx2(t1, sg, p, cb), ub = e8p_u4_avx2(t1, sg, p + 4 * cb, cb);
        for (int b = 0; b < NB; b++) {
            const int8_t *x = a->xq + (b0 + b) * a->n + k * DIM;
            __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(ua, _mm256_loadu_si256((const __m256i *)x)),
                                         _mm256_maddubs_epi16(ub, _mm256_loadu_si256((const __m256i *)(x + 32))));
            acc1[b] = _mm256_add_epi32(acc1[b], _mm256_madd_epi16(s, ones));
        }
        if (KIND == QS_KIND_RVQ4) {
            ua = e8p_u4_avx2(t2, sg, p + 2, cb);
            ub = e8p_u4_avx2(t2, sg, p + 4 * cb + 2, cb);
            for (int b = 0; b < NB; b++) {
                const int8_t *x = a->xq + (b0 + b) * a->n + k * DIM;
                __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(ua, _mm256_loadu_si256((const __m256i *)x)),
                                             _mm256_maddubs_epi16(ub, _mm256_loadu_si256((const __m256i *)(x + 32))));
                acc2[b] = _mm256_add_epi32(acc2[b], _mm256_madd_epi16(s, ones));
            }
        } else if (KIND == QS_KIND_RVQ3) {
            ua = rows4_avx2(t2, p[2], p[cb + 2], p[2 * cb + 2], p[3 * cb + 2]);
            ub = rows4_avx2(t2, p[4 * cb + 2], p[5 * cb + 2], p[6 * cb + 2], p[7 * cb + 2]);
            for (int b = 0; b < NB; b++) {
                const int8_t *x = a->xq + (b0 + b) * a->n + k * DIM;
                __m256i sa = _mm256_madd_epi16(_mm256_maddubs_epi16(ua, _mm256_loadu_si256((const __m256i *)x)), ones);
                __m256i sb = _mm256_madd_epi16(_mm256_maddubs_epi16(ub, _mm256_loadu_si256((const __m256i *)(x + 32))),
                                               ones);
                acc2[b] = _mm256_add_epi32(acc2[b], _mm256_add_epi32(sa, sb));
            }
        }
    }
    for (int b = 0; b < NB; b++) {
        int32_t d1 = hsum_epi32_avx2(acc1[b]), d2 = hsum_epi32_avx2(acc2[b]);
        int8_dots_scalar(a, rc, a->xq + (b0 + b) * a->n, kend, a->nblk, &d1, &d2);
        a->out[(b0 + b) * a->m + i] = int8_output(a, b0 + b, d1, d2);
    }
}

/* Rows per pass: E8P12 keeps 8 accumulators, the residual kinds 2 × 4 (16 ymm registers in all). */
#define QS_AVX2_FN __attribute__((target(QS_AVX2)))
QS_DEFINE_INT8_ROWS(mm_rows_int8_avx2_e8p, QS_AVX2_FN, int8_row_avx2, QS_KIND_E8P, 8)
QS_DEFINE_INT8_ROWS(mm_rows_int8_avx2_rvq3, QS_AVX2_FN, int8_row_avx2, QS_KIND_RVQ3, 4)
QS_DEFINE_INT8_ROWS(mm_rows_int8_avx2_rvq4, QS_AVX2_FN, int8_row_avx2, QS_KIND_RVQ4, 4)
#endif /* QS_X86 */


#if QS_ARM
/*
 * ---- AArch64 int8 path: the AVX2 scheme on 16-byte vectors. Two codewords per vector: their
 * 8-byte rows of the stage-1 table and of the sign table (loaded by index from L1, no gathers)
 * give u = (G < 0 ? -T : T) + |G|, the reference's operand in [5, 27] (RVQ3 stage 2: the table
 * row, <= 127). Both operands fit int8, so the products are signed × signed:
 *   neon_dotprod: sdot (vdotq_s32, 4 products per int32 lane);
 *   neon:         smull (vmull_s8, |u x| <= 127 · 127 fits int16) + sadalp (vpadalq_s16) into int32.
 * Integer sums equal the reference's bit for bit.
 */
static inline int8x16_t rows2_neon(const int8_t *tab, uint32_t i0, uint32_t i1) {
    return vcombine_s8(vld1_s8(tab + (size_t)i0 * DIM), vld1_s8(tab + (size_t)i1 * DIM));
}

/* Operands of 2 E8P12 codes whose index byte is at p and p + cb (sign byte next). */
static inline int8x16_t e8p_u2_neon(const int8_t *tabq, const int8_t *sgnq, const uint8_t *p, int cb) {
    int8x16_t T = rows2_neon(tabq, p[0], p[cb]), G = rows2_neon(sgnq, p[1], p[cb + 1]);
    return vaddq_s8(vbslq_s8(vcltzq_s8(G), vnegq_s8(T), T), vabsq_s8(G));
}

QS_DOTPROD static inline int32x4_t dot_sdot(int32x4_t acc, int8x16_t u, int8x16_t x) { return vdotq_s32(acc, u, x); }

static inline int32x4_t dot_mull(int32x4_t acc, int8x16_t u, int8x16_t x) {
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(u), vget_low_s8(x)));
    return vpadalq_s16(acc, vmull_high_s8(u, x));
}

/* Weight row i against activation rows b0 .. b0 + NB - 1 (constants after inlining), two codewords a step. */
#define QS_DEFINE_INT8_ROW_NEON(NAME, ATTR, DOT)                                                               \
    ATTR __attribute__((always_inline)) static inline void NAME(const mm_args *a, int64_t i, int64_t b0,       \
                                                                const int NB, const int KIND) {                \
        const int cb = KIND == QS_KIND_E8P ? 2 : (KIND == QS_KIND_RVQ3 ? 3 : 4);                               \
        const uint8_t *rc = a->codes + i * a->row_bytes;                                                       \
        const int8_t *t1 = a->t->tab1q, *t2 = a->t->tab2q, *sg = a->t->sgnq;                                   \
        int32x4_t acc1[MAX_FUSED_BATCH], acc2[MAX_FUSED_BATCH];                                                \
        for (int b = 0; b < NB; b++) acc1[b] = acc2[b] = vdupq_n_s32(0);                                       \
        const int64_t kend = a->nblk / 2 * 2;                                                                  \
        for (int64_t k = 0; k < kend; k += 2) {                                                                \
            const uint8_t *p = rc + k * cb;                                                                    \
            int8x16_t u1 = e8p_u2_neon(t1, sg, p, cb), u2 = u1;                                                \
            if (KIND == QS_KIND_RVQ4) u2 = e8p_u2_neon(t2, sg, p + 2, cb);                                     \
            if (KIND == QS_KIND_RVQ3) u2 = rows2_neon(t2, p[2], p[cb + 2]);                                    \
            for (int b = 0; b < NB; b++) {                                                                     \
                int8x16_t x = vld1q_s8(a->xq + (b0 + b) * a->n + k * DIM);                                     \
                acc1[b] = DOT(acc1[b], u1, x);                                                                 \
                if (KIND != QS_KIND_E8P) acc2[b] = DOT(acc2[b], u2, x);                                        \
            }                                                                                                  \
        }                                                                                                      \
        for (int b = 0; b < NB; b++) {                                                                         \
            int32_t d1 = vaddvq_s32(acc1[b]), d2 = vaddvq_s32(acc2[b]);                                        \
            int8_dots_scalar(a, rc, a->xq + (b0 + b) * a->n, kend, a->nblk, &d1, &d2);                         \
            a->out[(b0 + b) * a->m + i] = int8_output(a, b0 + b, d1, d2);                                      \
        }                                                                                                      \
    }

QS_DEFINE_INT8_ROW_NEON(int8_row_neon, , dot_mull)
QS_DEFINE_INT8_ROW_NEON(int8_row_sdot, QS_DOTPROD, dot_sdot)

/* Row kernels over a batch: passes of up to 8 (E8P12) / 4 (RVQ) activation rows. */
QS_DEFINE_INT8_ROWS(mm_rows_neon_e8p, , int8_row_neon, QS_KIND_E8P, 8)
QS_DEFINE_INT8_ROWS(mm_rows_neon_rvq3, , int8_row_neon, QS_KIND_RVQ3, 4)
QS_DEFINE_INT8_ROWS(mm_rows_neon_rvq4, , int8_row_neon, QS_KIND_RVQ4, 4)
QS_DEFINE_INT8_ROWS(mm_rows_sdot_e8p, QS_DOTPROD, int8_row_sdot, QS_KIND_E8P, 8)
QS_DEFINE_INT8_ROWS(mm_rows_sdot_rvq3, QS_DOTPROD, int8_row_sdot, QS_KIND_RVQ3, 4)
QS_DEFINE_INT8_ROWS(mm_rows_sdot_rvq4, QS_DOTPROD, int8_row_sdot, QS_KIND_RVQ4, 4)
#endif /* QS_ARM */

/* ------------------------------------------------------------------- int8 prefill (GEMM tiles) */
/*
 * Batches above MAX_FUSED_BATCH: the weight is never materialised in float32. A tile of
 * GEMM_ROWS weight rows × GEMM_K columns is decoded once to the int8 path's unsigned operands u
 * (exactly the values the row kernels use: u1 for stage 1, u2 for stage 2) and multiplied with
 * every activation row by an int8 GEMM micro-kernel of the level, accumulating int32 sums per
 * (activation row, weight row). Activations are copied with their rows padded by zeros to a
 * multiple of GEMM_ALIGN and decoded tiles are zero-padded the same way, so the micro-kernels only
 * see whole vectors. Integer sums, hence outputs, equal the reference's bit for bit.
 */
#define GEMM_ROWS 16   /* weight rows per tile (a multiple of the micro-kernels' 4) */
#define GEMM_K 2048    /* columns (bytes of u) per tile: 4 rows of a tile stay in L1 */
#define GEMM_ALIGN 64  /* activation rows padded to this many bytes */

/* acc [B, GEMM_ROWS] += u [GEMM_ROWS, kc] (row stride ldu) · x [B, kc]ᵀ (row stride ldx); kc % GEMM_ALIGN == 0.
   narrow: every u <= 27 (stage-1 / E8P12 operands), so two vpmaddubsw results may share an int16. */
typedef void (*gemm_fn)(const uint8_t *u, int64_t ldu, const int8_t *x, int64_t ldx, int64_t B, int64_t kc,
                        int32_t *acc, int narrow);

static void gemm_scalar(const uint8_t *u, int64_t ldu, const int8_t *x, int64_t ldx, int64_t B, int64_t kc,
                        int32_t *acc, int narrow) {
    (void)narrow;
    for (int64_t b = 0; b < B; b++)
        for (int r = 0; r < GEMM_ROWS; r++) {
            const uint8_t *ur = u + r * ldu;
            const int8_t *xb = x + b * ldx;
            int32_t s = 0;
            for (int64_t j = 0; j < kc; j++) s += (int32_t)ur[j] * (int32_t)xb[j];
            acc[b * GEMM_ROWS + r] += s;
        }
}

/* Unsigned operands of codewords [k0, k1) of code row rc into u1 (and u2 for the residual kinds). */
static void decode_u_scalar(const qs_codebook *t, const uint8_t *rc, int64_t k0, int64_t k1, uint8_t *u1,
                            uint8_t *u2) {
    for (int64_t k = k0; k < k1; k++) {
        uint32_t c = read_code(rc + k * t->cb, t->cb);
        const int8_t *T = t->tab1q + (size_t)(c & SRC_MASK) * DIM, *G = t->sgnq + (size_t)((c >> 8) & SRC_MASK) * DIM;
        uint8_t *o = u1 + (k - k0) * DIM;
        for (int j = 0; j < DIM; j++) o[j] = (uint8_t)((G[j] < 0 ? -T[j] : T[j]) + abs(G[j]));
        if (t->kind == QS_KIND_E8P) continue;
        o = u2 + (k - k0) * DIM;
        if (t->kind == QS_KIND_RVQ3) {
            const int8_t *T2 = t->tab2q + (size_t)((c >> 16) & SRC_MASK) * DIM;
            for (int j = 0; j < DIM; j++) o[j] = (uint8_t)T2[j];
        } else {
            const int8_t *T2 = t->tab2q + (size_t)((c >> 16) & SRC_MASK) * DIM;
            const int8_t *G2 = t->sgnq + (size_t)(c >> 24) * DIM;
            for (int j = 0; j < DIM; j++) o[j] = (uint8_t)((G2[j] < 0 ? -T2[j] : T2[j]) + abs(G2[j]));
        }
    }
}

typedef void (*decode_u_fn)(const qs_codebook *, const uint8_t *, int64_t, int64_t, uint8_t *, uint8_t *);

#if QS_X86
__attribute__((target(QS_AVX2))) static void decode_u_avx2(const qs_codebook *t, const uint8_t *rc, int64_t k0,
                                                           int64_t k1, uint8_t *u1, uint8_t *u2) {
    const int cb = t->cb;
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
        const uint8_t *p = rc + k * cb;
        _mm256_storeu_si256((__m256i *)(u1 + (k - k0) * DIM), e8p_u4_avx2(t->tab1q, t->sgnq, p, cb));
        if (t->kind == QS_KIND_RVQ4)
            _mm256_storeu_si256((__m256i *)(u2 + (k - k0) * DIM), e8p_u4_avx2(t->tab2q, t->sgnq, p + 2, cb));
        else if (t->kind == QS_KIND_RVQ3)
            _mm256_storeu_si256((__m256i *)(u2 + (k - k0) * DIM),
                                rows4_avx2(t->tab2q, p[2], p[cb + 2], p[2 * cb + 2], p[3 * cb + 2]));
    }
    decode_u_scalar(t, rc, k, k1, u1 + (k - k0) * DIM, u2 ? u2 + (k - k0) * DIM : NULL);
}

/* AVX2 micro-kernel: blocks of 4 weight rows × 2 activation rows (8 int32 accumulators). */
__attribute__((target(QS_AVX2))) static void gemm_avx2(const uint8_t *u, int64_t ldu, const int8_t *x, int64_t ldx,
                                                       int64_t B, int64_t kc, int32_t *acc, int narrow) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < GEMM_ROWS; r += 4) {
        const uint8_t *u0 = u + r * ldu, *u1 = u0 + ldu, *u2 = u1 + ldu, *u3 = u2 + ldu;
        /* pairs of activation rows; an odd last row runs against itself and its second half is dropped */
        for (int64_t b = 0; b < B; b += 2) {
            const int8_t *xa = x + b * ldx, *xb = b + 1 < B ? xa + ldx : xa;
            __m256i c[8];
            for (int q = 0; q < 8; q++) c[q] = _mm256_setzero_si256();
#define QS_MAC(UR, CA, CB)                                                                                  \
    {                                                                                                     \
        __m256i w = _mm256_loadu_si256((const __m256i *)(UR + j));                                        \
        __m256i w2 = _mm256_loadu_si256((const __m256i *)(UR + j + 32));                                  \
        if (narrow) {                                                                                     \
            CA = _mm256_add_epi32(CA, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w, x0),     \
                                                                         _mm256_maddubs_epi16(w2, x1)),   \
                                                        ones));                                           \
            CB = _mm256_add_epi32(CB, _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w, y0),     \
                                                                         _mm256_maddubs_epi16(w2, y1)),   \
                                                        ones));                                           \
        } else {                                                                                          \
            CA = _mm256_add_epi32(CA, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x0), ones), \
                                                       _mm256_madd_epi16(_mm256_maddubs_epi16(w2, x1), ones))); \
            CB = _mm256_add_epi32(CB, _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(w, y0), ones), \
                                                       _mm256_madd_epi16(_mm256_maddubs_epi16(w2, y1), ones))); \
        }                                                                                                 \
    }
            for (int64_t j = 0; j < kc; j += 64) {
                __m256i x0 = _mm256_loadu_si256((const __m256i *)(xa + j));
                __m256i x1 = _mm256_loadu_si256((const __m256i *)(xa + j + 32));
                __m256i y0 = _mm256_loadu_si256((const __m256i *)(xb + j));
                __m256i y1 = _mm256_loadu_si256((const __m256i *)(xb + j + 32));
                QS_MAC(u0, c[0], c[4])
                QS_MAC(u1, c[1], c[5])
                QS_MAC(u2, c[2], c[6])
                QS_MAC(u3, c[3], c[7])
            }
            for (int q = 0; q < 4; q++) {
                acc[b * GEMM_ROWS + r + q] += hsum_epi32_avx2(c[q]);
                if (b + 1 < B) acc[(b + 1) * GEMM_ROWS + r + q] += hsum_epi32_avx2(c[4 + q]);
            }
        }
#undef QS_MAC
    }
}

/* The four sums of the int32 lanes of a, b, c, d (a transpose-and-add tree: about 12 instructions
   for the four, against about 8 for each _mm512_reduce_add_epi32). */
__attribute__((target(QS_VNNI))) static inline __m128i reduce4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
    /* per 128-bit lane: [a, b, c, d] partial sums */
    __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* AVX-512 VNNI micro-kernel: blocks of 4 weight rows × 4 activation rows, 64 bytes per vpdpbusd. */
__attribute__((target(QS_VNNI))) static void gemm_vnni(const uint8_t *u, int64_t ldu, const int8_t *x, int64_t ldx,
                                                       int64_t B, int64_t kc, int32_t *acc, int narrow) {
    (void)narrow;
    for (int r = 0; r < GEMM_ROWS; r += 4) {
        const uint8_t *ur = u + r * ldu;
        for (int64_t b = 0; b < B; b += 4) {
            int nbk = B - b < 4 ? (int)(B - b) : 4;
            const int8_t *xr[4];
            for (int q = 0; q < 4; q++) xr[q] = x + (b + (q < nbk ? q : 0)) * ldx; /* short block: repeat row b */
            __m512i c[16];
            for (int q = 0; q < 16; q++) c[q] = _mm512_setzero_si512();
            for (int64_t j = 0; j < kc; j += 64) {
                __m512i w0 = _mm512_loadu_si512((const void *)(ur + j));
                __m512i w1 = _mm512_loadu_si512((const void *)(ur + ldu + j));
                __m512i w2 = _mm512_loadu_si512((const void *)(ur + 2 * ldu + j));
                __m512i w3 = _mm512_loadu_si512((const void *)(ur + 3 * ldu + j));
                for (int q = 0; q < 4; q++) {
                    __m512i xv = _mm512_loadu_si512((const void *)(xr[q] + j));
                    c[4 * q + 0] = _mm512_dpbusd_epi32(c[4 * q + 0], w0, xv);
                    c[4 * q + 1] = _mm512_dpbusd_epi32(c[4 * q + 1], w1, xv);
                    c[4 * q + 2] = _mm512_dpbusd_epi32(c[4 * q + 2], w2, xv);
                    c[4 * q + 3] = _mm512_dpbusd_epi32(c[4 * q + 3], w3, xv);
                }
            }
            for (int q = 0; q < nbk; q++) {
                int32_t sums[4];
                _mm_storeu_si128((__m128i *)sums, reduce4_epi32(c[4 * q], c[4 * q + 1], c[4 * q + 2], c[4 * q + 3]));
                for (int rr = 0; rr < 4; rr++) acc[(b + q) * GEMM_ROWS + r + rr] += sums[rr];
            }
        }
    }
}
#endif

#if QS_ARM
/* NEON micro-kernels: blocks of 4 weight rows × 4 activation rows (16 int32x4 accumulators), 16 bytes a step. */
#define QS_DEFINE_GEMM_NEON(NAME, ATTR, DOT)                                                                   \
    ATTR static void NAME(const uint8_t *u, int64_t ldu, const int8_t *x, int64_t ldx, int64_t B, int64_t kc,  \
                          int32_t *acc, int narrow) {                                                          \
        (void)narrow;                                                                                          \
        for (int r = 0; r < GEMM_ROWS; r += 4) {                                                               \
            const int8_t *ur = (const int8_t *)u + r * ldu; /* operands <= 127: the same bytes as int8 */     \
            for (int64_t b = 0; b < B; b += 4) {                                                               \
                int nbk = B - b < 4 ? (int)(B - b) : 4;                                                        \
                const int8_t *xr[4];                                                                           \
                for (int q = 0; q < 4; q++) xr[q] = x + (b + (q < nbk ? q : 0)) * ldx;                         \
                int32x4_t c[16];                                                                               \
                for (int q = 0; q < 16; q++) c[q] = vdupq_n_s32(0);                                            \
                for (int64_t j = 0; j < kc; j += 16) {                                                         \
                    int8x16_t w0 = vld1q_s8(ur + j), w1 = vld1q_s8(ur + ldu + j);                              \
                    int8x16_t w2 = vld1q_s8(ur + 2 * ldu + j), w3 = vld1q_s8(ur + 3 * ldu + j);                \
                    for (int q = 0; q < 4; q++) {                                                              \
                        int8x16_t xv = vld1q_s8(xr[q] + j);                                                    \
                        c[4 * q + 0] = DOT(c[4 * q + 0], w0, xv);                                              \
                        c[4 * q + 1] = DOT(c[4 * q + 1], w1, xv);                                              \
                        c[4 * q + 2] = DOT(c[4 * q + 2], w2, xv);                                              \
                        c[4 * q + 3] = DOT(c[4 * q + 3], w3, xv);                                              \
                    }                                                                                          \
                }                                                                                              \
                for (int q = 0; q < nbk; q++)                                                                  \
                    for (int rr = 0; rr < 4; rr++) acc[(b + q) * GEMM_ROWS + r + rr] += vaddvq_s32(c[4 * q + rr]); \
            }                                                                                                  \
        }                                                                                                      \
    }

QS_DEFINE_GEMM_NEON(gemm_neon, , dot_mull)
QS_DEFINE_GEMM_NEON(gemm_sdot, QS_DOTPROD, dot_sdot)
#endif

static void gemm_kernels(int level, gemm_fn *gemm, decode_u_fn *dec) {
    *gemm = gemm_scalar;
    *dec = decode_u_scalar;
#if QS_X86
    if (level == QS_LEVEL_VNNI) {
        *gemm = gemm_vnni;
        *dec = decode_u_avx2;
    } else if (level == QS_LEVEL_AVX2 || level == QS_LEVEL_AVX512) {
        *gemm = gemm_avx2;
        *dec = decode_u_avx2;
    }
#endif
#if QS_ARM
    if (level == QS_LEVEL_NEON) *gemm = gemm_neon;
    if (level == QS_LEVEL_NEON_DOT) *gemm = gemm_sdot;
#endif
    (void)level;
}

/* out [B, m] for B > MAX_FUSED_BATCH on the int8 path (a->xq, xscale, xsum filled). */
static int int8_gemm(const mm_args *a, int level, int nthreads) {
    gemm_fn gemm;
    decode_u_fn dec;
    gemm_kernels(level, &gemm, &dec);
    const int64_t n = a->n, m = a->m, B = a->B, npad = (n + GEMM_ALIGN - 1) / GEMM_ALIGN * GEMM_ALIGN;
    const int rvq = a->kind != QS_KIND_E8P;
    int8_t *xp = (int8_t *)aligned_alloc(GEMM_ALIGN, (size_t)(B * npad));
    if (!xp) return QS_ENOMEM;
    for (int64_t b = 0; b < B; b++) {
        memcpy(xp + b * npad, a->xq + b * n, (size_t)n);
        memset(xp + b * npad + n, 0, (size_t)(npad - n));
    }
    int64_t ntiles = (m + GEMM_ROWS - 1) / GEMM_ROWS;
    int nt = threads_for(m * a->nblk * MAX_FUSED_BATCH, nthreads);
    if (nt > ntiles) nt = (int)(ntiles > 0 ? ntiles : 1);
    int rc = QS_OK;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        size_t tile = (size_t)GEMM_ROWS * GEMM_K;
        uint8_t *u1 = (uint8_t *)aligned_alloc(GEMM_ALIGN, tile * (rvq ? 2 : 1));
        uint8_t *u2 = u1 && rvq ? u1 + tile : NULL;
        int32_t *acc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B * GEMM_ROWS) * 2);
        int ok = u1 && acc;
        if (!ok) {
#pragma omp atomic write
            rc = QS_ENOMEM;
        }
#pragma omp for schedule(static)
        for (int64_t tl = 0; tl < ntiles; tl++) {
            if (!ok) continue;
            int64_t r0 = tl * GEMM_ROWS, rows = m - r0 < GEMM_ROWS ? m - r0 : GEMM_ROWS;
            int32_t *acc1 = acc, *acc2 = acc + B * GEMM_ROWS;
            memset(acc, 0, sizeof(int32_t) * (size_t)(B * GEMM_ROWS) * 2);
            for (int64_t k0 = 0; k0 < npad; k0 += GEMM_K) {
                int64_t kc = npad - k0 < GEMM_K ? npad - k0 : GEMM_K;       /* a multiple of GEMM_ALIGN */
                int64_t c0 = k0 / DIM, c1 = (k0 + kc < n ? k0 + kc : n) / DIM; /* codewords in this tile */
                int64_t used = (c1 - c0) * DIM;
                for (int64_t r = 0; r < GEMM_ROWS; r++) {
                    uint8_t *d1 = u1 + r * GEMM_K, *d2 = rvq ? u2 + r * GEMM_K : NULL;
                    if (r < rows) {
                        dec(a->t, a->codes + (r0 + r) * a->row_bytes, c0, c1, d1, d2);
                        memset(d1 + used, 0, (size_t)(kc - used));
                        if (rvq) memset(d2 + used, 0, (size_t)(kc - used));
                    } else {
                        memset(d1, 0, (size_t)kc);
                        if (rvq) memset(d2, 0, (size_t)kc);
                    }
                }
                gemm(u1, GEMM_K, xp + k0, npad, B, kc, acc1, 1);
                if (rvq) gemm(u2, GEMM_K, xp + k0, npad, B, kc, acc2, a->kind == QS_KIND_RVQ4);
            }
            for (int64_t b = 0; b < B; b++)
                for (int64_t r = 0; r < rows; r++)
                    a->out[b * m + r0 + r] = int8_output(a, b, acc1[b * GEMM_ROWS + r], acc2[b * GEMM_ROWS + r]);
        }
        free(u1);
        free(acc);
    }
    free(xp);
    return rc;
}

/* One activation vector x [n] to int8 with one scale (max |x| / 127): xq [n], *scale, *sum (of xq).
   NaN/Inf in x: xq zeros and scale NaN, so every output of the vector is NaN (never a finite wrong answer). */
static void quantize_row(const float *x, int64_t n, int8_t *xq, float *scale_out, int32_t *sum_out) {
    float amax = 0.0f;
    int finite = 1;
    for (int64_t j = 0; j < n; j++) {
        float v = fabsf(x[j]);
        amax = v > amax ? v : amax; /* NaN: caught by the finiteness check */
        finite &= isfinite(x[j]) != 0;
    }
    if (!finite) { /* NaN/Inf in, NaN out (as the float paths) */
        memset(xq, 0, (size_t)n);
        *scale_out = NAN;
        *sum_out = 0;
        return;
    }
    float scale = amax / INT8_QMAX;
    if (!(scale >= FLT_MIN)) scale = 1.0f; /* all zeros, or so small that they quantize to zero */
    float inv = 1.0f / scale;
    int32_t sum = 0;
    for (int64_t j = 0; j < n; j++) {
        /* round half to even (= nearbyintf in the default rounding mode, |x · inv| <= ~127 here)
           by the 1.5 · 2^23 trick: no libm call per element, and the loop vectorises */
        float q = (x[j] * inv + ROUND_MAGIC) - ROUND_MAGIC;
        q = q > INT8_QMAX ? INT8_QMAX : (q < -INT8_QMAX ? -INT8_QMAX : q);
        xq[j] = (int8_t)q;
        sum += (int32_t)q;
    }
    *scale_out = scale;
    *sum_out = sum;
}

/* Sums of xq over each codeword's 8 activations: xbs [nblk] (|sum| <= 8 * 127). */
static void block_sums(const int8_t *xq, int64_t nblk, int16_t *xbs) {
    for (int64_t k = 0; k < nblk; k++) {
        int32_t sum = 0;
        for (int j = 0; j < DIM; j++) sum += xq[k * DIM + j];
        xbs[k] = (int16_t)sum;
    }
}

/* Quantize activations x [B, n] to int8 with one scale per vector (quantize_row). */
static int quantize_activations(const mm_args *a, int8_t **xq, float **xscale, int32_t **xsum, int nthreads) {
    *xq = (int8_t *)malloc((size_t)(a->B * a->n) + 1);
    *xscale = (float *)malloc(sizeof(float) * (size_t)(a->B + 1));
    *xsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(a->B + 1));
    if (!*xq || !*xscale || !*xsum) return QS_ENOMEM;
    int nt = a->B * a->n >= PARALLEL_MIN_ELEMENTS ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < a->B; b++) quantize_row(a->x + b * a->n, a->n, *xq + b * a->n, *xscale + b, *xsum + b);
    return QS_OK;
}

/* Integer tables of the int8 path; 0 if a table value is not on the integer grid. */
static int int8_tables(qs_codebook *t) {
    for (int i = 0; i < NSRC * DIM; i++) {
        float v1 = t->src1[i] * E8P_INT_UNIT;
        /* the SIMD operand is built with wrapping int8 arithmetic: ±v ± 1 + 16 must stay in [0, 127] */
        if (v1 != nearbyintf(v1) || fabsf(v1) > INT8_OFFSET - 1) return 0;
        t->tab1q[i] = (int8_t)v1;
        t->tab2q[i] = 0;
        if (t->kind == QS_KIND_E8P) continue;
        int unit = t->kind == QS_KIND_RVQ4 ? E8P_INT_UNIT : E81B_INT_UNIT;
        float v2 = t->tab2[i] * unit;
        if (v2 != nearbyintf(v2)) return 0;
        if (t->kind == QS_KIND_RVQ4 ? fabsf(v2) > INT8_OFFSET - 1 : (v2 < -INT8_OFFSET || v2 > INT8_QMAX - INT8_OFFSET))
            return 0;
        t->tab2q[i] = (int8_t)(t->kind == QS_KIND_RVQ3 ? v2 + INT8_OFFSET : v2);
    }
    t->unit2 = 1.0f / ((t->kind == QS_KIND_RVQ3 ? E81B_INT_UNIT : E8P_INT_UNIT) * t->resid_scale);
    return 1;
}

/*
 * 16-bit pattern of every E8P12 source for the gather-free int8 kernel. It relies on the E8P12
 * structure: |src_j| in {1/2, 3/2, 5/2}, and only coordinate 7 stored negated, exactly when
 * sum |src| is odd (= the parity of the number of 3/2 entries, computed in the kernel with a
 * popcount). Returns 0 if the table does not have that structure.
 */
static int pattern_table(qs_codebook *t) {
    for (int i = 0; i < NSRC; i++) {
        uint32_t word = 0, ones = 0;
        for (int j = 0; j < DIM; j++) {
            float v = t->src1[i * DIM + j];
            int field = (int)(fabsf(v) * 2.0f - 1.0f) / 2; /* 1/2 -> 0, 3/2 -> 1, 5/2 -> 2 */
            if (fabsf(v) != 0.5f + (float)field || field > 2) return 0;
            if (v < 0.0f && j != DIM - 1) return 0;
            word |= (uint32_t)field << (2 * j);
            ones += field == 1;
        }
        if ((t->src1[i * DIM + DIM - 1] < 0.0f) != (int)(ones & 1u)) return 0;
        t->pat[i] = (uint16_t)word;
    }
    return 1;
}

/*
 * Build a codebook handle: src1 [256*8] stored E8P12 sources; tab2 [256*8] the stage-2 table
 * (E81B points for RVQ3, E8P12 sources for RVQ4; ignored for E8P12); resid_scale the stage-2
 * divisor. Returns NULL on bad arguments or no memory. Free with qs_codebook_free.
 */
QS_API qs_codebook *qs_codebook_new(int kind, const float *src1, const float *tab2, float resid_scale) {
    int cb = code_bytes(kind);
    if (!cb || !src1 || (kind != QS_KIND_E8P && (!tab2 || !(resid_scale > 0.0f)))) return NULL;
    qs_codebook *t = (qs_codebook *)calloc(1, sizeof(qs_codebook));
    if (!t) return NULL;
    t->kind = kind;
    t->cb = cb;
    t->resid_scale = kind == QS_KIND_E8P ? 1.0f : resid_scale;
    memcpy(t->src1, src1, sizeof(t->src1));
    if (kind != QS_KIND_E8P) memcpy(t->tab2, tab2, sizeof(t->tab2));
    for (int i = 0; i < NSRC * DIM; i++) t->tab2s[i] = t->tab2[i] / t->resid_scale;
    t->shift2 = E8P_SHIFT / t->resid_scale;
    t->int8_ok = int8_tables(t);
    for (int sg = 0; sg < NSRC; sg++) {
        int odd;
        uint32_t fixed = e8p_signs((uint32_t)sg << SIGN_SHIFT, &odd);
        for (int j = 0; j < DIM; j++) {
            int mag = INT8_OFFSET + (odd ? -1 : 1);
            t->sgnq[sg * DIM + j] = (int8_t)(((fixed >> j) & 1u) ? -mag : mag);
        }
    }
    t->pat_ok = t->int8_ok && pattern_table(t) &&
                (kind == QS_KIND_E8P || (kind == QS_KIND_RVQ4 && memcmp(t->tab2, t->src1, sizeof(t->src1)) == 0));
    return t;
}

QS_API void qs_codebook_free(qs_codebook *t) { free(t); }

/* Whether all n values of x are finite. */
static int row_finite(const float *x, int64_t n) {
    int finite = 1;
    for (int64_t j = 0; j < n; j++) finite &= isfinite(x[j]) != 0;
    return finite;
}


#if QS_X86
/* A row of decode_scalar with AVX-512: same operations in the same order, so bitwise equal. */
__attribute__((target("avx512f,avx512vl,popcnt"))) static void decode_row_avx512(const uint8_t *rc, int64_t nblk,
                                                                          const qs_codebook *t, float *ro) {
    const __m256 resid = _mm256_set1_ps(t->resid_scale);
    for (int64_t k = 0; k < nblk; k++) {
        uint32_t c = read_code(rc + k * t->cb, t->cb);
        __m256 v = e8p_signed_avx512(c, t->src1, E8P_SHIFT);
        if (t->kind == QS_KIND_RVQ3)
            v = _mm256_add_ps(v, _mm256_div_ps(_mm256_loadu_ps(t->tab2 + (size_t)((c >> 16) & SRC_MASK) * DIM), resid));
        else if (t->kind == QS_KIND_RVQ4)
            v = _mm256_add_ps(v, _mm256_div_ps(e8p_signed_avx512(c >> 16, t->tab2, E8P_SHIFT), resid));
        _mm256_storeu_ps(ro + k * DIM, v);
    }
}
#endif

/* out [m, n] float32 = decode(codes [m, n/8*CB]); bitwise equal to the Python decode. */
QS_API int qs_decode(const uint8_t *codes, int64_t m, int64_t n, const qs_codebook *t, float *out, int nthreads,
                     int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!t) return QS_EBADKIND;
    if (!codes || !out || m < 0 || n < 0 || n % DIM || nthreads < 1) return QS_EBADARG;
    int cb = t->cb, kind = t->kind;
    int64_t nblk = n / DIM, row_bytes = nblk * cb;
    int nt = threads_for(m * nblk, nthreads);
#if QS_X86
    int simd = is_avx512(level);
#endif
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t i = 0; i < m; i++) {
        const uint8_t *rc = codes + i * row_bytes;
        float *ro = out + i * n;
#if QS_X86
        if (simd) {
            decode_row_avx512(rc, nblk, t, ro);
            continue;
        }
#endif
        for (int64_t k = 0; k < nblk; k++)
            decode_scalar(read_code(rc + k * cb, cb), kind, t->src1, t->tab2, t->resid_scale, ro + k * DIM);
    }
    return QS_OK;
}

typedef void (*mm_rows_fn)(const mm_args *, int64_t, int64_t, int64_t, int64_t);

/* The float32 row kernel of a level. */
static mm_rows_fn float_kernel(int level) {
#if QS_X86
    if (is_avx512(level)) return mm_rows_avx512;
    if (level == QS_LEVEL_AVX2) return mm_rows_avx2;
#endif
    (void)level;
    return mm_rows_scalar;
}

/* The int8 row kernel of a level (every level has one; integer sums equal mm_rows_int8_scalar's). */
static mm_rows_fn int8_kernel(int level, const qs_codebook *t) {
#if QS_X86
    /* VNNI: gather-free kernel for E8P12 / RVQ4; RVQ3 (its E81B stage is not a pattern table) runs
       faster on the gather-free AVX2 kernel than on the gathering VNNI one (measured, 1 thread) */
    if (level == QS_LEVEL_VNNI)
        return t->pat_ok ? mm_rows_vnni_pat : (t->kind == QS_KIND_RVQ3 ? mm_rows_int8_avx2_rvq3 : mm_rows_vnni);
    if (level == QS_LEVEL_AVX2 || level == QS_LEVEL_AVX512) /* AVX-512 without VNNI: the AVX2 kernel */
        return t->kind == QS_KIND_E8P ? mm_rows_int8_avx2_e8p
                                      : (t->kind == QS_KIND_RVQ3 ? mm_rows_int8_avx2_rvq3 : mm_rows_int8_avx2_rvq4);
#endif
#if QS_ARM
    if (level == QS_LEVEL_NEON)
        return t->kind == QS_KIND_E8P ? mm_rows_neon_e8p
                                      : (t->kind == QS_KIND_RVQ3 ? mm_rows_neon_rvq3 : mm_rows_neon_rvq4);
    if (level == QS_LEVEL_NEON_DOT)
        return t->kind == QS_KIND_E8P ? mm_rows_sdot_e8p
                                      : (t->kind == QS_KIND_RVQ3 ? mm_rows_sdot_rvq3 : mm_rows_sdot_rvq4);
#endif
    (void)level;
    return mm_rows_int8_scalar;
}

/*
 * out [B, m] = x [B, n] @ decode(codes)ᵀ   (fused; no decoded weight is stored).
 * fn: the row kernel; int8 = 1 quantizes the activations first (int8 row kernels). gemm_level >= 0:
 * batches above MAX_FUSED_BATCH on the int8 path go to that level's GEMM tiles (int8_gemm) instead.
 */
static int matmul_impl(const uint8_t *codes, int64_t m, int64_t n, const qs_codebook *t, const float *x, int64_t B,
                       float *out, int nthreads, mm_rows_fn fn, int int8, int gemm_level) {
    if (!t) return QS_EBADKIND;
    if (!codes || !x || !out || m < 0 || n < 0 || n % DIM || B < 0 || nthreads < 1) return QS_EBADARG;
    if (int8 && !t->int8_ok) return QS_EBADARG;
    mm_args a;
    memset(&a, 0, sizeof(a));
    a.codes = codes;
    a.m = m;
    a.n = n;
    a.nblk = n / DIM;
    a.cb = t->cb;
    a.row_bytes = a.nblk * t->cb;
    a.kind = t->kind;
    a.t = t;
    a.x = x;
    a.B = B;
    a.out = out;
    int8_t *xq = NULL;
    float *xscale = NULL;
    int32_t *xsum = NULL;
    int rc = QS_OK;
    int16_t *xbs = NULL;
    if (int8) {
        rc = quantize_activations(&a, &xq, &xscale, &xsum, nthreads);
        a.xq = xq;
        a.xscale = xscale;
        a.xsum = xsum;
        if (rc == QS_OK && gemm_level >= 0 && B > MAX_FUSED_BATCH) {
            rc = int8_gemm(&a, gemm_level, nthreads);
            goto done;
        }
        xbs = (int16_t *)malloc(sizeof(int16_t) * (size_t)(B * a.nblk + 1));
        if (rc == QS_OK && !xbs) rc = QS_ENOMEM;
        if (rc == QS_OK)
            block_sums(xq, B * a.nblk, xbs);
        a.xbs = xbs;
    }
    if (rc == QS_OK) {
        int64_t ntasks = (m + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
        int nt = threads_for(m * a.nblk * (B < MAX_FUSED_BATCH ? B : MAX_FUSED_BATCH), nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
        for (int64_t task = 0; task < ntasks; task++) {
            int64_t r0 = task * ROWS_PER_TASK, r1 = r0 + ROWS_PER_TASK < m ? r0 + ROWS_PER_TASK : m;
            for (int64_t b0 = 0; b0 < B; b0 += MAX_FUSED_BATCH) {
                int64_t nb = B - b0 < MAX_FUSED_BATCH ? B - b0 : MAX_FUSED_BATCH;
                fn(&a, r0, r1, b0, nb);
            }
        }
    }
    if (rc == QS_OK && !int8) /* NaN/Inf in, NaN out on every path (as the int8 ones): a lone ±Inf
                                  activation must not come out as a plausible ±Inf sum */
        for (int64_t b = 0; b < B; b++)
            if (!row_finite(x + b * n, n))
                for (int64_t i = 0; i < m; i++) out[b * m + i] = NAN;
done:
    free(xq);
    free(xscale);
    free(xsum);
    free(xbs);
    return rc;
}

/*
 * allow_int8: the caller accepts int8-quantized activations (set when the activations went
 * through the Hadamard transform, which leaves no outlier channels for one scale to be crushed by).
 */
QS_API int qs_matmul(const uint8_t *codes, int64_t m, int64_t n, const qs_codebook *t, const float *x, int64_t B,
                     float *out, int nthreads, int level, int allow_int8) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!t) return QS_EBADKIND;
    int int8 = allow_int8 && t->int8_ok;
    return matmul_impl(codes, m, n, t, x, B, out, nthreads, int8 ? int8_kernel(level, t) : float_kernel(level), int8,
                       level);
}

/* The portable int8 reference: same activation quantization and integer sums as the VNNI path. */
QS_API int qs_matmul_int8_ref(const uint8_t *codes, int64_t m, int64_t n, const qs_codebook *t, const float *x,
                              int64_t B, float *out, int nthreads) {
    return matmul_impl(codes, m, n, t, x, B, out, nthreads, mm_rows_int8_scalar, 1, -1);
}

/* ----------------------------------------------------------------------- Hadamard transform */
/* out [K, P] = M [K, K] @ v [K, P] (the K x K factor of the Hadamard transform), portable. */
static void mix_rows_scalar(const float *v, int64_t K, int64_t P, const float *M, float *out) {
    for (int64_t r = 0; r < K; r++) {
        float *restrict t = out + r * P;
        for (int64_t j = 0; j < P; j++) t[j] = 0.0f;
        for (int64_t c = 0; c < K; c++) {
            const float w = M[r * K + c];
            const float *restrict z = v + c * P;
            for (int64_t j = 0; j < P; j++) t[j] += w * z[j];
        }
    }
}

#if QS_X86
/* The same with SIMD, for P a multiple of the LANES of VEC: each LANES-column slice of a row is
   accumulated over c in four independent registers (c mod 4), so the loop is not bound by FMA
   latency. Instantiated for AVX-512 (16 lanes) and AVX2 (8 lanes). */
#define QS_DEFINE_MIX_ROWS(NAME, TARGET, LANES, VEC, SETZERO, SET1, LOADU, FMADD, ADD, STOREU)                   \
    __attribute__((target(TARGET))) static void NAME(const float *v, int64_t K, int64_t P, const float *M,     \
                                                     float *out) {                                            \
        for (int64_t r = 0; r < K; r++) {                                                                      \
            const float *mr = M + r * K;                                                                       \
            for (int64_t j0 = 0; j0 < P; j0 += (LANES)) {                                                      \
                VEC a0 = SETZERO(), a1 = a0, a2 = a0, a3 = a0;                                                 \
                const float *z = v + j0;                                                                       \
                int64_t c = 0;                                                                                 \
                for (; c + 4 <= K; c += 4) {                                                                   \
                    a0 = FMADD(SET1(mr[c]), LOADU(z + c * P), a0);                                             \
                    a1 = FMADD(SET1(mr[c + 1]), LOADU(z + (c + 1) * P), a1);                                   \
                    a2 = FMADD(SET1(mr[c + 2]), LOADU(z + (c + 2) * P), a2);                                   \
                    a3 = FMADD(SET1(mr[c + 3]), LOADU(z + (c + 3) * P), a3);                                   \
                }                                                                                              \
                for (; c < K; c++) a0 = FMADD(SET1(mr[c]), LOADU(z + c * P), a0);                              \
                STOREU(out + r * P + j0, ADD(ADD(a0, a1), ADD(a2, a3)));                                       \
            }                                                                                                  \
        }                                                                                                      \
    }
QS_DEFINE_MIX_ROWS(mix_rows_avx512, "avx512f", MIX_LANES, __m512, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps,
                   _mm512_fmadd_ps, _mm512_add_ps, _mm512_storeu_ps)
QS_DEFINE_MIX_ROWS(mix_rows_avx2, "avx2,fma", MIX_LANES / 2, __m256, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps,
                   _mm256_fmadd_ps, _mm256_add_ps, _mm256_storeu_ps)
#endif

static void mix_rows(const float *v, int64_t K, int64_t P, const float *M, float *out, int level) {
    (void)level;
#if QS_X86
    if (P % MIX_LANES == 0 && is_avx512(level)) {
        mix_rows_avx512(v, K, P, M, out);
        return;
    }
    if (P % (MIX_LANES / 2) == 0 && level == QS_LEVEL_AVX2) {
        mix_rows_avx2(v, K, P, M, out);
        return;
    }
#endif
    mix_rows_scalar(v, K, P, M, out);
}

/*
 * One vector v [K*P] in place: v <- post ⊙ (norm · (M ⊗ H_P)(pre ⊙ v)); tmp [K*P] scratch (K > 1).
 * FWHT of each row of the [K, P] view (unnormalised, Sylvester order), then rows mixed by M [K, K]
 * (row-major: y[a] = sum_c M[a, c] z[c]). Compiled once per ISA (the same C, vectorised by the
 * compiler for that target) and chosen by the caller's level, never by the CPU behind its back.
 */
/* The first three butterfly stages (h = 1, 2, 4) of a Sylvester FWHT on 8 consecutive values, in
   registers: the operations of the staged loop in the same order, so bitwise equal to it. */
static inline void fwht8(float *w) {
    float a0 = w[0] + w[1], a1 = w[0] - w[1], a2 = w[2] + w[3], a3 = w[2] - w[3];
    float a4 = w[4] + w[5], a5 = w[4] - w[5], a6 = w[6] + w[7], a7 = w[6] - w[7];
    float b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
    float b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
    w[0] = b0 + b4, w[4] = b0 - b4, w[1] = b1 + b5, w[5] = b1 - b5;
    w[2] = b2 + b6, w[6] = b2 - b6, w[3] = b3 + b7, w[7] = b3 - b7;
}

#define QS_DEFINE_HADAMARD_VEC(NAME, ATTR)                                                                     \
    ATTR static void NAME(float *v, int64_t K, int64_t P, const float *M, const float *pre, const float *post, \
                          float norm, float *tmp, int level) {                                                 \
        int64_t n = K * P;                                                                                     \
        if (pre)                                                                                               \
            for (int64_t j = 0; j < n; j++) v[j] *= pre[j];                                                    \
        for (int64_t r = 0; r < K; r++) {                                                                      \
            float *w = v + r * P;                                                                              \
            int64_t h0 = 1;                                                                                    \
            if (P >= 8) { /* stages h = 1, 2, 4 fused per block of 8 (same operations, same order) */        \
                for (int64_t i = 0; i < P; i += 8) fwht8(w + i);                                               \
                h0 = 8;                                                                                        \
            }                                                                                                  \
            for (int64_t h = h0; h < P; h <<= 1)                                                               \
                for (int64_t i = 0; i < P; i += h << 1)                                                        \
                    for (int64_t j = i; j < i + h; j++) {                                                      \
                        float lo = w[j], hi = w[j + h];                                                        \
                        w[j] = lo + hi;                                                                        \
                        w[j + h] = lo - hi;                                                                    \
                    }                                                                                          \
        }                                                                                                      \
        if (K > 1) {                                                                                           \
            mix_rows(v, K, P, M, tmp, level);                                                                  \
            memcpy(v, tmp, sizeof(float) * (size_t)n);                                                         \
        }                                                                                                      \
        if (post)                                                                                              \
            for (int64_t j = 0; j < n; j++) v[j] *= norm * post[j];                                            \
        else                                                                                                   \
            for (int64_t j = 0; j < n; j++) v[j] *= norm;                                                      \
    }

QS_DEFINE_HADAMARD_VEC(hadamard_vec_base, )
#if QS_X86
QS_DEFINE_HADAMARD_VEC(hadamard_vec_avx2, __attribute__((target("avx2,fma"))))
QS_DEFINE_HADAMARD_VEC(hadamard_vec_avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
#endif

static void hadamard_vec(float *v, int64_t K, int64_t P, const float *M, const float *pre, const float *post,
                         float norm, float *tmp, int level) {
#if QS_X86
    if (is_avx512(level)) {
        hadamard_vec_avx512(v, K, P, M, pre, post, norm, tmp, level);
        return;
    }
    if (level == QS_LEVEL_AVX2) {
        hadamard_vec_avx2(v, K, P, M, pre, post, norm, tmp, level);
        return;
    }
#endif
    hadamard_vec_base(v, K, P, M, pre, post, norm, tmp, level);
}

static int hadamard_args_ok(int64_t K, int64_t P, const float *M) {
    return K >= 1 && P >= 1 && !(P & (P - 1)) && (K == 1 || M);
}

/*
 * x [B, n] in place, n = K * P (P a power of two):
 *   x <- post ⊙ (alpha · U (pre ⊙ x)),   U = M ⊗ H_P / sqrt(P)
 * pre, post: [n] or NULL; M [K, K] ignored when K = 1. Matches
 * quipsharp.hadamard.hadamard_transform (pass Mᵀ for transpose=True).
 */
QS_API int qs_hadamard(float *x, int64_t B, int64_t K, int64_t P, const float *M, const float *pre, const float *post,
                       float alpha, int nthreads, int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!x || B < 0 || !hadamard_args_ok(K, P, M) || nthreads < 1) return QS_EBADARG;
    int64_t n = K * P;
    float norm = alpha / sqrtf((float)P);
    int nt = threads_for(B * n / DIM, nthreads);
    /* scratch for every thread, allocated before x is touched: a failure leaves x unchanged */
    float *scratch = K > 1 ? (float *)malloc(sizeof(float) * (size_t)(n * nt)) : NULL;
    if (K > 1 && !scratch) return QS_ENOMEM;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        float *tmp = scratch ? scratch + (size_t)omp_get_thread_num() * (size_t)n : NULL;
#else
        float *tmp = scratch;
#endif
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) hadamard_vec(x + b * n, K, P, M, pre, post, norm, tmp, level);
    }
    free(scratch);
    return QS_OK;
}

/*
 * A whole quantized linear layer (DESIGN.md §1, step 4), any batch (above MAX_FUSED_BATCH the int8
 * path runs GEMM tiles; the float path of layers without the transform is meant for small batches):
 *   out [B, m] = sv ⊙ (wscale · Vᵀ (decode(codes) · U (su ⊙ x))) + bias
 * x [B, n]; codes [m, n/8*CB]; su [n]; sv [m]; bias [m] or NULL; U = M_in ⊗ H_Pin / sqrt(Pin),
 * Vᵀ = M_out_t ⊗ H_Pout / sqrt(Pout) (M_out_t the transposed factor). use_hadamard = 0 skips U, V.
 * One call per layer: x is copied (not modified).
 */
/* A linear's input side: h [B, n] <- U (su ⊙ x) (or su ⊙ x without the transform), rows on nt threads, each
   with a scratch row of kmax floats after h. */
static void linear_input(float *h, const float *x, int64_t B, int64_t n, int64_t kmax, const float *su,
                         int use_hadamard, int64_t k_in, const float *m_in, int nt, int level) {
    memcpy(h, x, sizeof(float) * (size_t)(B * n));
    /* rows are independent: a prefill batch transforms them in parallel (tmp: one scratch row per thread) */
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < B; b++) {
#ifdef _OPENMP
        float *tmp = h + B * n + (size_t)omp_get_thread_num() * (size_t)kmax;
#else
        float *tmp = h + B * n;
#endif
        if (use_hadamard)
            hadamard_vec(h + b * n, k_in, n / k_in, m_in, su, NULL, 1.0f / sqrtf((float)(n / k_in)), tmp, level);
        else
            for (int64_t j = 0; j < n; j++) h[b * n + j] *= su[j];
    }
}

/* A linear's output side, in place on out [B, m]: sv ⊙ (wscale · Vᵀ y) + bias; scratch rows after h [B, n]. */
static void linear_output(float *out, int64_t B, int64_t m, float *h, int64_t n, int64_t kmax, const float *sv,
                          float wscale, const float *bias, int use_hadamard, int64_t k_out, const float *m_out_t,
                          int nt, int level) {
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t b = 0; b < B; b++) {
#ifdef _OPENMP
        float *tmp = h + B * n + (size_t)omp_get_thread_num() * (size_t)kmax;
#else
        float *tmp = h + B * n;
#endif
        float *y = out + b * m;
        if (use_hadamard)
            hadamard_vec(y, k_out, m / k_out, m_out_t, NULL, sv, wscale / sqrtf((float)(m / k_out)), tmp, level);
        else
            for (int64_t i = 0; i < m; i++) y[i] *= wscale * sv[i];
        if (bias)
            for (int64_t i = 0; i < m; i++) y[i] += bias[i];
    }
}

/* The checks both whole-layer calls share. */
static int linear_args_ok(const float *x, const float *out, const float *su, const float *sv, int64_t B, int64_t n,
                          int64_t m, int use_hadamard, int64_t k_in, const float *m_in, int64_t k_out,
                          const float *m_out_t) {
    if (!x || !out || !su || !sv || B < 0 || n <= 0 || m <= 0) return 0;
    return !use_hadamard || (k_in >= 1 && k_out >= 1 && n % k_in == 0 && m % k_out == 0 &&
                             hadamard_args_ok(k_in, n / k_in, m_in) && hadamard_args_ok(k_out, m / k_out, m_out_t));
}

/* a decoding step and a typical prompt stay on one thread in the passes around the matmul: they are cheap
   next to it, and every extra parallel region is a barrier that costs milliseconds on busy cores */
static int linear_threads(int64_t B, int64_t kmax, int nthreads) {
    return B * kmax >= PARALLEL_MIN_ELEMENTS ? nthreads : 1;
}

QS_API int qs_linear(const float *x, int64_t B, int64_t n, int64_t m, const uint8_t *codes, const qs_codebook *t,
                     const float *su, const float *sv, float wscale, const float *bias, int use_hadamard,
                     int64_t k_in, const float *m_in, int64_t k_out, const float *m_out_t, float *out, int nthreads,
                     int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!linear_args_ok(x, out, su, sv, B, n, m, use_hadamard, k_in, m_in, k_out, m_out_t) || n % DIM)
        return QS_EBADARG;
    int64_t kmax = n > m ? n : m;
    int nt = linear_threads(B, kmax, nthreads);
    float *h = (float *)malloc(sizeof(float) * (size_t)(B * n + kmax * nt));
    if (!h) return QS_ENOMEM;
    linear_input(h, x, B, n, kmax, su, use_hadamard, k_in, m_in, nt, level);
    int rc = qs_matmul(codes, m, n, t, h, B, out, nthreads, level, use_hadamard);
    if (rc == QS_OK) linear_output(out, B, m, h, n, kmax, sv, wscale, bias, use_hadamard, k_out, m_out_t, nt, level);
    free(h);
    return rc;
}

/* ------------------------------------------------------------------ int8 rows · int8 vector */
/*
 * out[v] = Σ_j W[v, j] · xq[j]  (int32, exact: |W|, |xq| <= 127) for rows v of a row-major int8 W [V, n]:
 * the lean loop's int8 LM head (per-row absmax int8 weights, rotated by the Hadamard transform so
 * that one int8 scale fits the activation vector). Every level's sums equal the scalar ones bit for bit.
 * x86 multiplies |W| (u8) by sign(xq, W) (s8): pair sums <= 2 · 127 · 127 fit vpmaddubsw's int16.
 */
typedef void (*dot_rows_fn)(const int8_t *W, int64_t n, const int8_t *xq, int64_t r0, int64_t r1, int32_t *out);

static void dot_rows_scalar(const int8_t *W, int64_t n, const int8_t *xq, int64_t r0, int64_t r1, int32_t *out) {
    for (int64_t v = r0; v < r1; v++) {
        const int8_t *w = W + v * n;
        int32_t s = 0;
        for (int64_t j = 0; j < n; j++) s += (int32_t)w[j] * xq[j];
        out[v] = s;
    }
}

#if QS_X86
__attribute__((target(QS_AVX2))) static void dot_rows_avx2(const int8_t *W, int64_t n, const int8_t *xq, int64_t r0,
                                                           int64_t r1, int32_t *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t nv = n / 32 * 32;
    for (int64_t v = r0; v < r1; v++) {
        const int8_t *w = W + v * n;
        __m256i acc = _mm256_setzero_si256();
        for (int64_t j = 0; j < nv; j += 32) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(w + j)), b = _mm256_loadu_si256((const __m256i *)(xq + j));
            __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(b, a));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
        }
        int32_t s = hsum_epi32_avx2(acc);
        for (int64_t j = nv; j < n; j++) s += (int32_t)w[j] * xq[j];
        out[v] = s;
    }
}

__attribute__((target(QS_VNNI))) static void dot_rows_vnni(const int8_t *W, int64_t n, const int8_t *xq, int64_t r0,
                                                           int64_t r1, int32_t *out) {
    int64_t nv = n / 64 * 64;
    __mmask64 tail = n > nv ? (__mmask64)(~0ULL >> (64 - (n - nv))) : 0;
    for (int64_t v = r0; v < r1; v++) {
        const int8_t *w = W + v * n;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t j = 0; j <= nv; j += 64) {
            __mmask64 k = j < nv ? ~(__mmask64)0 : tail;
            if (!k) break;
            __m512i a = _mm512_maskz_loadu_epi8(k, w + j), b = _mm512_maskz_loadu_epi8(k, xq + j);
            __m512i s = _mm512_mask_sub_epi8(b, _mm512_movepi8_mask(a), _mm512_setzero_si512(), b);
            acc = _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(a), s);
        }
        out[v] = _mm512_reduce_add_epi32(acc);
    }
}
#endif

#if QS_ARM
#define QS_DEFINE_DOT_ROWS_NEON(NAME, ATTR, DOT)                                                               \
    ATTR static void NAME(const int8_t *W, int64_t n, const int8_t *xq, int64_t r0, int64_t r1, int32_t *out) { \
        int64_t nv = n / 16 * 16;                                                                              \
        for (int64_t v = r0; v < r1; v++) {                                                                    \
            const int8_t *w = W + v * n;                                                                       \
            int32x4_t acc = vdupq_n_s32(0);                                                                    \
            for (int64_t j = 0; j < nv; j += 16) acc = DOT(acc, vld1q_s8(w + j), vld1q_s8(xq + j));            \
            int32_t s = vaddvq_s32(acc);                                                                       \
            for (int64_t j = nv; j < n; j++) s += (int32_t)w[j] * xq[j];                                       \
            out[v] = s;                                                                                        \
        }                                                                                                      \
    }
QS_DEFINE_DOT_ROWS_NEON(dot_rows_neon, , dot_mull)
QS_DEFINE_DOT_ROWS_NEON(dot_rows_sdot, QS_DOTPROD, dot_sdot)
#endif

static dot_rows_fn dot_rows_kernel(int level) {
#if QS_X86
    if (level == QS_LEVEL_VNNI) return dot_rows_vnni;
    if (level == QS_LEVEL_AVX2 || level == QS_LEVEL_AVX512) return dot_rows_avx2;
#endif
#if QS_ARM
    if (level == QS_LEVEL_NEON) return dot_rows_neon;
    if (level == QS_LEVEL_NEON_DOT) return dot_rows_sdot;
#endif
    (void)level;
    return dot_rows_scalar;
}

#define DOT_ROWS_PER_TASK 64

/* out [V] = W [V, n] · xq [n] as int32 (the test entry of the dot_rows kernels). */
QS_API int qs_dot_rows_int8(const int8_t *W, int64_t V, int64_t n, const int8_t *xq, int32_t *out, int nthreads,
                            int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!W || !xq || !out || V < 0 || n < 0 || nthreads < 1) return QS_EBADARG;
    dot_rows_fn fn = dot_rows_kernel(level);
    int64_t ntasks = (V + DOT_ROWS_PER_TASK - 1) / DOT_ROWS_PER_TASK;
    int nt = V * n >= PARALLEL_MIN_CODEWORDS * DIM ? nthreads : 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t task = 0; task < ntasks; task++) {
        int64_t r0 = task * DOT_ROWS_PER_TASK, r1 = r0 + DOT_ROWS_PER_TASK < V ? r0 + DOT_ROWS_PER_TASK : V;
        fn(W, n, xq, r0, r1, out);
    }
    return QS_OK;
}

/* ------------------------------------------------------------------ trellis quantization (Viterbi) */
/*
 * Bitshift-trellis quantization (QTIP, Tseng et al. 2024, §3): a sequence of N steps of V weights is
 * coded by a path of L-bit states, each the previous one shifted left by kv = k·V bits with kv new
 * bits at the bottom: s_t = ((s_{t-1} << kv) | b_t) mod 2^L. The predecessors of s are
 * j·P + (s >> kv), j < J = 2^kv, P = 2^(L - kv). Viterbi finds the path minimising Σ_t ‖code[s_t] − x_t‖²
 * (code [2^L, V] float32, one V-vector per state).
 *
 * Only the prefix minima are kept: with cost_t(s) = best_{t-1}[s >> kv] + ‖code[s] − x_t‖², a step is
 *   best_t[p] = min_j cost_t(j·P + p),   bp_t[p] = its j (one byte, kv <= 8),
 * so a step reads the previous P minima and the 2^L codes and writes P minima and P backpointers (one
 * step at L = 16, kv = 2: 64 KiB of minima in and out, 256 KiB of codes).
 *
 * The minimum and its argument are one operation: a cost is a non-negative float32, so its bits order
 * as an unsigned integer does; the step replaces the kv low mantissa bits of cost_t(j·P + p) with j
 * and takes the unsigned minimum of these keys over j. The key of best_t[p] is both the minimum (to
 * 2^kv ulps: each step may lower a cost by less than 2^-(23-kv) of itself, the same for every path)
 * and its j, ties between equal costs going to the smallest j. A state's cost is
 * fma(e_{V-1}, e_{V-1}, … fma(e_0, e_0, best_{t-1}) …) with e_v = code[s][v] − x_t[v]. Per 16 states
 * the AVX-512 step spends a subtraction, an FMA, a ternary-logic merge and a minimum (it used to spend
 * six operations: the minimum and the backpointer's compare and move apart). Unreachable states
 * (outside a tail-biting constraint) start at +inf, whose keys (NaN bit patterns) stay above every
 * finite key. Step 0 starts from best_{-1} = 0; the path ends in the state of the smallest key (ties:
 * the smallest state). With tail-biting constraint o >= 0 (QTIP's second pass), start states must
 * have s >> kv == o and end states s mod P == o, so the path closes into a cycle: exactly k bits per
 * weight stored. Every level does these same float and integer operations, so every level returns
 * the same paths and costs.
 */
#define VITERBI_MAX_KV 8
/* Tail-biting's first pass only has to find the state at step 0: it runs over the cyclic window of
   VITERBI_TB_CONTEXT steps before and after step 0 (the whole rotated sequence when N <= 2·context),
   which the later steps of a 256-step sequence do not change in practice (BENCHMARKS.md: the same
   Gaussian MSE) and saves a quarter of the work at N = 256. (Keeping the rotated pass's open path and
   solving again only the steps around its seam costs more MSE for the same work: 0.0704 against
   0.0696 at k = 2 with 32 steps on each side, 0.0697 with 64.) */
#define VITERBI_TB_CONTEXT 64
/* The x86 steps read the minima 16 keys at a time from any offset below P: the arrays carry a tail. */
#define VITERBI_PAD 16
#define VITERBI_UNREACHABLE 0x7f800000u /* +inf: the key of a state no legal path reaches */

/* A state's key: its cost's bits with the kv low bits replaced by its predecessor's j. */
static inline uint32_t viterbi_key(float cost, uint32_t j, uint32_t low) {
    uint32_t u;
    memcpy(&u, &cost, sizeof u);
    return (u & ~low) | j;
}

static inline float viterbi_cost(const uint32_t *prev, int64_t q) {
    float f;
    memcpy(&f, prev + q, sizeof f);
    return f;
}

/* The sequences a step advances together (VITERBI_LOCKSTEP at most): the vector steps read each code once
   for all of them, halving the code traffic (a step's 2^L codes do not fit in L1). */
#define VITERBI_LOCKSTEP 2
typedef struct {
    int n;                                  /* sequences, 1..VITERBI_LOCKSTEP */
    const uint32_t *prev[VITERBI_LOCKSTEP]; /* best_{t-1} keys, P + VITERBI_PAD each */
    const float *x[VITERBI_LOCKSTEP];       /* x_t, V floats each */
    uint32_t *best[VITERBI_LOCKSTEP];       /* best_t keys out */
    uint8_t *bp[VITERBI_LOCKSTEP];          /* bp_t out, P bytes each */
} viterbi_batch;

/* One step on the codes in their natural layout code[s·V + v], state by state: trellises with fewer
   than VITERBI_BASE_LANES prefixes (tests with small L). */
static void viterbi_step_natural(const viterbi_batch *q, const float *code, int64_t P, int kv, int V) {
    const int64_t J = (int64_t)1 << kv;
    const uint32_t low = (uint32_t)J - 1;
    for (int i = 0; i < q->n; i++)
        for (int64_t p = 0; p < P; p++) {
            uint32_t b = UINT32_MAX;
            for (int64_t j = 0; j < J; j++) {
                int64_t s = j * P + p;
                float c = viterbi_cost(q->prev[i], s >> kv);
                for (int v = 0; v < V; v++) {
                    float e = code[s * V + v] - q->x[i][v];
                    c = fmaf(e, e, c);
                }
                uint32_t key = viterbi_key(c, (uint32_t)j, low);
                b = key < b ? key : b;
            }
            q->best[i][p] = b;
            q->bp[i][p] = (uint8_t)(b & low);
        }
}

/* One step, portable (NEON machines, or no SIMD level): the vector steps' algorithm on VITERBI_BASE_LANES
   lanes in plain C loops the compiler can vectorise, on the same blocked code layout. */
#define VITERBI_BASE_LANES 8
static int viterbi_lane_prefix(int i, int kv, int W);
static void viterbi_step_base(const viterbi_batch *q, const float *cb, int64_t P, int kv, int V) {
    enum { W = VITERBI_BASE_LANES };
    const int64_t J = (int64_t)1 << kv;
    const uint32_t low = (uint32_t)J - 1;
    const int G = (W >> kv) > 1 ? (W >> kv) : 1;
    int prefix[W];
    for (int i = 0; i < W; i++) prefix[i] = viterbi_lane_prefix(i, kv, W);
    for (int n = 0; n < q->n; n++) {
        const float *c = cb, *x = q->x[n];
        for (int64_t g = 0; g < P; g += W) {
            uint32_t b[W];
            float cost[W];
            for (int i = 0; i < W; i++) b[i] = UINT32_MAX;
            for (int64_t j = 0; j < J; j++, c += W * V) {
                const int64_t m = (j * P + g) >> kv;
                for (int i = 0; i < W; i++) cost[i] = viterbi_cost(q->prev[n], m + i % G);
                for (int v = 0; v < V; v++)
                    for (int i = 0; i < W; i++) {
                        float e = c[v * W + i] - x[v];
                        cost[i] = fmaf(e, e, cost[i]);
                    }
                for (int i = 0; i < W; i++) {
                    uint32_t key = viterbi_key(cost[i], (uint32_t)j, low);
                    b[i] = key < b[i] ? key : b[i];
                }
            }
            for (int i = 0; i < W; i++) {
                q->best[n][g + prefix[i]] = b[i];
                q->bp[n][g + prefix[i]] = (uint8_t)(b[i] & low);
            }
        }
    }
}

/* The vector steps read the codes in a blocked layout of W-lane groups, lanes ordered so that the minima a
   vector needs are one broadcast block. With G = max(W >> kv, 1) distinct minima per vector, lane i of
   group g holds prefix g + J·(i mod G) + i / G, whose predecessor minimum is
   best[((j·P + g) >> kv) + i mod G]: the G keys at (j·P + g) >> kv, repeated W / G times. A group's J·V
   vectors (for each j and v, the W lanes' code[(j·P + prefix)·V + v]) are one sequential stream.
   P % W == 0. viterbi_lane_prefix: lane i's prefix offset within its group. */
static int viterbi_lane_prefix(int i, int kv, int W) {
    int J = 1 << kv, G = W >> kv;
    return G <= 1 ? i : J * (i % G) + i / G;
}

static void viterbi_block_codes(const void *code, size_t size, int64_t P, int kv, int V, int W, void *out) {
    const int64_t J = (int64_t)1 << kv;
    const char *in = (const char *)code;
    char *o = (char *)out;
    for (int64_t g = 0; g < P; g += W)
        for (int64_t j = 0; j < J; j++)
            for (int v = 0; v < V; v++)
                for (int i = 0; i < W; i++, o += size)
                    memcpy(o, in + size * (size_t)((j * P + g + viterbi_lane_prefix(i, kv, W)) * V + v), size);
}

#if QS_X86
/* A Viterbi step's worker FN specialised for each kv, V and sequence count (constant loop bounds and
   broadcast widths); the dispatchers below expand this with their q, cb, P, kv and V. */
#define QS_VITERBI_CASE(FN, KV)                                                                                \
    case KV:                                                                                                   \
        if (V == 1 && q->n == 2)                                                                               \
            FN(q, cb, P, KV, 1, 2);                                                                            \
        else if (V == 1)                                                                                       \
            FN(q, cb, P, KV, 1, 1);                                                                            \
        else if (q->n == 2)                                                                                    \
            FN(q, cb, P, KV, 2, 2);                                                                            \
        else                                                                                                   \
            FN(q, cb, P, KV, 2, 1);                                                                            \
        return;
#define QS_VITERBI_DISPATCH(FN)                                                                                \
    switch (kv) {                                                                                              \
        QS_VITERBI_CASE(FN, 1) QS_VITERBI_CASE(FN, 2) QS_VITERBI_CASE(FN, 3) QS_VITERBI_CASE(FN, 4)            \
        QS_VITERBI_CASE(FN, 5) QS_VITERBI_CASE(FN, 6) QS_VITERBI_CASE(FN, 7) QS_VITERBI_CASE(FN, 8)            \
    }

/* (a & b) | c, as vpternlogd's truth table */
#define QS_TERNLOG_AND_OR 0xEA
/* 16 lanes (V = 1 or 2), NQ sequences: the G = 16 >> kv minima of a vector come from one broadcast load
   (16, 8, 4, 2 or 1 keys); the group's keys go back to prefix order with one permute. */
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) static inline __attribute__((always_inline)) void
viterbi_step16(const viterbi_batch *q, const float *cb, int64_t P, const int kv, const int V, const int NQ) {
    const int64_t J = (int64_t)1 << kv;
    int32_t lanes[16];
    for (int i = 0; i < 16; i++) lanes[viterbi_lane_prefix(i, kv, 16)] = i;
    const __m512i order = _mm512_loadu_si512((const void *)lanes); /* prefix n is lane order[n] */
    const __m512i low = _mm512_set1_epi32((int)(J - 1)), high = _mm512_set1_epi32((int)~(uint32_t)(J - 1));
    __m512 x0[VITERBI_LOCKSTEP], x1[VITERBI_LOCKSTEP];
    for (int n = 0; n < NQ; n++) {
        x0[n] = _mm512_set1_ps(q->x[n][0]);
        x1[n] = _mm512_set1_ps(V == 2 ? q->x[n][1] : 0.0f);
    }
    const viterbi_batch s = *q; /* a local copy: the stores below cannot alias it, so nothing is reloaded */
    const float *c = cb;
    for (int64_t g = 0; g < P; g += 16) {
        __m512i b[VITERBI_LOCKSTEP];
        for (int n = 0; n < NQ; n++) b[n] = _mm512_set1_epi32(-1);
        for (int64_t j = 0; j < J; j++, c += 16 * V) {
            const int64_t off = (j * P + g) >> kv;
            const __m512 c0 = _mm512_loadu_ps(c), c1 = V == 2 ? _mm512_loadu_ps(c + 16) : c0;
            const __m512i jv = _mm512_set1_epi32((int)j);
            for (int n = 0; n < NQ; n++) {
                const float *m = (const float *)s.prev[n] + off;
                __m512 cost;
                switch (kv) {
                case 1: cost = _mm512_broadcast_f32x8(_mm256_loadu_ps(m)); break;
                case 2: cost = _mm512_broadcast_f32x4(_mm_loadu_ps(m)); break;
                case 3: cost = _mm512_castpd_ps(_mm512_set1_pd(*(const double *)m)); break;
                default: cost = _mm512_set1_ps(*m);
                }
                __m512 e = _mm512_sub_ps(c0, x0[n]);
                cost = _mm512_fmadd_ps(e, e, cost);
                if (V == 2) {
                    __m512 e1 = _mm512_sub_ps(c1, x1[n]);
                    cost = _mm512_fmadd_ps(e1, e1, cost);
                }
                __m512i key = _mm512_ternarylogic_epi32(_mm512_castps_si512(cost), high, jv, QS_TERNLOG_AND_OR);
                b[n] = _mm512_min_epu32(b[n], key);
            }
        }
        for (int n = 0; n < NQ; n++) {
            __m512i out = kv < 4 ? _mm512_permutexvar_epi32(order, b[n]) : b[n];
            _mm512_storeu_si512((void *)(s.best[n] + g), out);
            _mm_storeu_si128((__m128i *)(s.bp[n] + g), _mm512_cvtepi32_epi8(_mm512_and_si512(out, low)));
        }
    }
}

/* The worker specialised for each kv, V and sequence count (constant loop bounds and broadcast widths). */
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) static void
viterbi_step_avx512(const viterbi_batch *q, const float *cb, int64_t P, int kv, int V) {
    QS_VITERBI_DISPATCH(viterbi_step16);
}

/* 8 lanes; the same operations (G = 8 >> kv minima per vector: 4, 2 or 1), the merge as an AND and an OR. */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
viterbi_step8(const viterbi_batch *q, const float *cb, int64_t P, const int kv, const int V, const int NQ) {
    const int64_t J = (int64_t)1 << kv;
    int32_t lanes[8];
    for (int i = 0; i < 8; i++) lanes[viterbi_lane_prefix(i, kv, 8)] = i;
    const __m256i order = _mm256_loadu_si256((const __m256i *)lanes);
    /* the low byte of each 32-bit lane, gathered into the low 8 bytes */
    const __m256i bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                                           -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i halves = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
    const __m256i low = _mm256_set1_epi32((int)(J - 1)), high = _mm256_set1_epi32((int)~(uint32_t)(J - 1));
    __m256 x0[VITERBI_LOCKSTEP], x1[VITERBI_LOCKSTEP];
    for (int n = 0; n < NQ; n++) {
        x0[n] = _mm256_set1_ps(q->x[n][0]);
        x1[n] = _mm256_set1_ps(V == 2 ? q->x[n][1] : 0.0f);
    }
    const viterbi_batch s = *q; /* as the 16-lane step */
    const float *c = cb;
    for (int64_t g = 0; g < P; g += 8) {
        __m256i b[VITERBI_LOCKSTEP];
        for (int n = 0; n < NQ; n++) b[n] = _mm256_set1_epi32(-1);
        for (int64_t j = 0; j < J; j++, c += 8 * V) {
            const int64_t off = (j * P + g) >> kv;
            const __m256 c0 = _mm256_loadu_ps(c), c1 = V == 2 ? _mm256_loadu_ps(c + 8) : c0;
            const __m256i jv = _mm256_set1_epi32((int)j);
            for (int n = 0; n < NQ; n++) {
                const float *m = (const float *)s.prev[n] + off;
                __m256 cost = kv == 1   ? _mm256_broadcast_ps((const __m128 *)m)
                              : kv == 2 ? _mm256_castpd_ps(_mm256_broadcast_sd((const double *)m))
                                        : _mm256_broadcast_ss(m);
                __m256 e = _mm256_sub_ps(c0, x0[n]);
                cost = _mm256_fmadd_ps(e, e, cost);
                if (V == 2) {
                    __m256 e1 = _mm256_sub_ps(c1, x1[n]);
                    cost = _mm256_fmadd_ps(e1, e1, cost);
                }
                __m256i key = _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(cost), high), jv);
                b[n] = _mm256_min_epu32(b[n], key);
            }
        }
        for (int n = 0; n < NQ; n++) {
            __m256i out = kv < 3 ? _mm256_permutevar8x32_epi32(b[n], order) : b[n];
            _mm256_storeu_si256((__m256i *)(s.best[n] + g), out);
            __m256i a = _mm256_and_si256(out, low);
            __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a, bytes), halves);
            _mm_storel_epi64((__m128i *)(s.bp[n] + g), _mm256_castsi256_si128(packed));
        }
    }
}

__attribute__((target("avx2,fma"))) static void viterbi_step_avx2(const viterbi_batch *q, const float *cb, int64_t P,
                                                                  int kv, int V) {
    QS_VITERBI_DISPATCH(viterbi_step8);
}
#endif

typedef void (*viterbi_step_fn)(const viterbi_batch *, const float *, int64_t, int, int);

/* The step of a level and its code layout (W lanes per group; 0: natural). Every level gives the same
   paths. The vector steps need P % W == 0 and V <= 2. */
static viterbi_step_fn viterbi_kernel(int level, int64_t P, int V, int *W) {
    *W = 0;
#if QS_X86
    if (V <= 2 && is_avx512(level) && P % 16 == 0) {
        *W = 16;
        return viterbi_step_avx512;
    }
    if (V <= 2 && (level == QS_LEVEL_AVX2 || level == QS_LEVEL_AVX512) && P % 8 == 0) {
        *W = 8;
        return viterbi_step_avx2;
    }
#else
    (void)level;
    (void)V;
#endif
    if (P % VITERBI_BASE_LANES == 0) {
        *W = VITERBI_BASE_LANES;
        return viterbi_step_base;
    }
    return viterbi_step_natural;
}

/* ------------------------------------------------------------------ Viterbi with 16-bit costs */
/*
 * The same search with 16-bit integer costs (qs_viterbi's metric QS_VITERBI_INT16): twice the lanes of
 * float32 per vector, and no backpointers in the forward pass.
 * - x_t and the codes are int16 in units of 2^-VITERBI16_FRAC = 2^-13 (|value| <= 32767 units, just
 *   under 4; the unit-RMS codes stay below 3.3).
 * - e = sat16(code − x), its square (e·e + 2^14) >> 15 in units of 2^-11 (at most 32768: codes 4 or
 *   more away from x all cost 16), and a state's cost min(best_{t-1}[s >> kv] + Σ_v e_v², 65535).
 * - best_t[p] = min_j cost_t(j·P + p) − r_{t-1}, with r_{t-1} = min_p best_{t-1}[p]: every step moves
 *   the survivors' minimum back to [0, that step's rise], so the 16 bits (32 in cost units) hold the
 *   survivors that matter; worse ones saturate and can only tie.
 * - Every best_t is kept, (N + 1)·P words, and the traceback recomputes a step's J costs for the one
 *   prefix it needs, the forward pass's own integer operations, to find j (ties: the smallest).
 * A sequence that does not fit is solved by the float32 pass in the same call: an input of 4 or more
 * (2^15 units), a step whose minimum rises by more than VITERBI16_RISE_MAX (8, where costs would start to
 * saturate), or a tail-biting pass whose path leaves its constraint (the unreachable starts, 65535, lose
 * each step's renormalisation and could in principle be chosen). Every level does the same integer
 * operations, so every level returns the same paths. BENCHMARKS.md has the paths' MSE against the
 * float32 pass's.
 */
#define VITERBI16_FRAC 13
#define VITERBI16_INPUT_MAX 32767.0f /* |x|·2^13 above this: the sequence takes the float32 pass */
#define VITERBI16_SAT 65535u
#define VITERBI16_RISE_MAX 16384u /* 8 in cost units */
#define VITERBI16_BASE_LANES 16

/* e² in units of 2^-11 for a code and input in units of 2^-13, e saturated to int16 */
static inline uint32_t viterbi16_square(int32_t code, int32_t x) {
    int32_t e = code - x;
    e = e > INT16_MAX ? INT16_MAX : (e < INT16_MIN ? INT16_MIN : e);
    return (uint32_t)((e * e + (1 << 14)) >> 15);
}

static inline uint32_t viterbi16_add(uint32_t a, uint32_t b) {
    uint32_t s = a + b;
    return s > VITERBI16_SAT ? VITERBI16_SAT : s;
}

/* cost_t(s) from best_{t-1} (prev), the codes in natural layout [2^L, V] and x_t [V] */
static inline uint32_t viterbi16_cost(const uint16_t *prev, const int16_t *code, const int16_t *x, int64_t s, int kv,
                                      int V) {
    uint32_t c = prev[s >> kv];
    for (int v = 0; v < V; v++) c = viterbi16_add(c, viterbi16_square(code[s * V + v], x[v]));
    return c;
}

/* The state j·P + p of step t whose cost is best_t[p] (before renormalisation): the smallest such j. */
static int64_t viterbi16_state(const uint16_t *prev, const int16_t *code, const int16_t *x, int64_t p, int L, int kv,
                               int V) {
    const int64_t P = (int64_t)1 << (L - kv), J = (int64_t)1 << kv;
    int64_t best = p;
    uint32_t low = viterbi16_cost(prev, code, x, p, kv, V);
    for (int64_t j = 1; j < J; j++) {
        uint32_t c = viterbi16_cost(prev, code, x, j * P + p, kv, V);
        if (c < low) {
            low = c;
            best = j * P + p;
        }
    }
    return best;
}

typedef struct {
    int n;                                  /* sequences, 1..VITERBI_LOCKSTEP */
    const uint16_t *prev[VITERBI_LOCKSTEP]; /* best_{t-1}, P + VITERBI_PAD each */
    const int16_t *x[VITERBI_LOCKSTEP];     /* x_t, V values each */
    uint16_t *best[VITERBI_LOCKSTEP];       /* best_t out */
    uint16_t norm[VITERBI_LOCKSTEP];        /* r_{t-1}, subtracted from every best_t */
    uint16_t low[VITERBI_LOCKSTEP];         /* out: min_p best_t[p] */
} viterbi16_batch;

/* One step, state by state on the natural layout (small L). */
static void viterbi16_step_natural(viterbi16_batch *q, const int16_t *code, int64_t P, int kv, int V) {
    const int64_t J = (int64_t)1 << kv;
    for (int i = 0; i < q->n; i++) {
        uint32_t low = VITERBI16_SAT;
        for (int64_t p = 0; p < P; p++) {
            uint32_t b = VITERBI16_SAT;
            for (int64_t j = 0; j < J; j++) {
                uint32_t c = viterbi16_cost(q->prev[i], code, q->x[i], j * P + p, kv, V);
                b = c < b ? c : b;
            }
            b = b > q->norm[i] ? b - q->norm[i] : 0;
            q->best[i][p] = (uint16_t)b;
            low = b < low ? b : low;
        }
        q->low[i] = (uint16_t)low;
    }
}

/* One step, portable (NEON, or no SIMD level): the vector steps' algorithm on VITERBI16_BASE_LANES lanes in
   plain C loops the compiler can vectorise, on the blocked code layout. */
static void viterbi16_step_base(viterbi16_batch *q, const int16_t *cb, int64_t P, int kv, int V) {
    enum { W = VITERBI16_BASE_LANES };
    const int64_t J = (int64_t)1 << kv;
    const int G = (W >> kv) > 1 ? (W >> kv) : 1;
    int prefix[W];
    for (int i = 0; i < W; i++) prefix[i] = viterbi_lane_prefix(i, kv, W);
    for (int n = 0; n < q->n; n++) {
        const int16_t *c = cb;
        uint32_t low = VITERBI16_SAT;
        for (int64_t g = 0; g < P; g += W) {
            uint32_t b[W];
            for (int i = 0; i < W; i++) b[i] = VITERBI16_SAT;
            for (int64_t j = 0; j < J; j++, c += W * V) {
                const int64_t m = (j * P + g) >> kv;
                uint32_t cost[W];
                for (int i = 0; i < W; i++) cost[i] = q->prev[n][m + i % G];
                for (int v = 0; v < V; v++)
                    for (int i = 0; i < W; i++) cost[i] = viterbi16_add(cost[i], viterbi16_square(c[v * W + i], q->x[n][v]));
                for (int i = 0; i < W; i++) b[i] = cost[i] < b[i] ? cost[i] : b[i];
            }
            for (int i = 0; i < W; i++) {
                uint32_t out = b[i] > q->norm[n] ? b[i] - q->norm[n] : 0;
                q->best[n][g + prefix[i]] = (uint16_t)out;
                low = out < low ? out : low;
            }
        }
        q->low[n] = (uint16_t)low;
    }
}

#if QS_X86
/* 32 lanes (V = 1 or 2), NQ sequences: the G = 32 >> kv minima of a vector are one broadcast load, the
   group's results go back to prefix order with one permute (kv < 5). */
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) static inline __attribute__((always_inline)) void
viterbi16_step32(viterbi16_batch *q, const int16_t *cb, int64_t P, const int kv, const int V, const int NQ) {
    const int64_t J = (int64_t)1 << kv;
    int16_t lanes[32];
    for (int i = 0; i < 32; i++) lanes[viterbi_lane_prefix(i, kv, 32)] = (int16_t)i;
    const __m512i order = _mm512_loadu_si512((const void *)lanes);
    __m512i x0[VITERBI_LOCKSTEP], x1[VITERBI_LOCKSTEP], norm[VITERBI_LOCKSTEP], low[VITERBI_LOCKSTEP];
    for (int n = 0; n < NQ; n++) {
        x0[n] = _mm512_set1_epi16(q->x[n][0]);
        x1[n] = _mm512_set1_epi16(V == 2 ? q->x[n][1] : 0);
        norm[n] = _mm512_set1_epi16((short)q->norm[n]);
        low[n] = _mm512_set1_epi16(-1);
    }
    const viterbi16_batch s = *q; /* a local copy: the stores below cannot alias it */
    const int16_t *c = cb;
    for (int64_t g = 0; g < P; g += 32) {
        __m512i b[VITERBI_LOCKSTEP];
        for (int n = 0; n < NQ; n++) b[n] = _mm512_set1_epi16(-1);
        for (int64_t j = 0; j < J; j++, c += 32 * V) {
            const int64_t off = (j * P + g) >> kv;
            const __m512i c0 = _mm512_loadu_si512((const void *)c);
            const __m512i c1 = V == 2 ? _mm512_loadu_si512((const void *)(c + 32)) : c0;
            for (int n = 0; n < NQ; n++) {
                const uint16_t *m = s.prev[n] + off;
                __m512i cost;
                switch (kv) {
                case 1: cost = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)m)); break;
                case 2: cost = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)m)); break;
                case 3: {
                    long long v;
                    memcpy(&v, m, sizeof v);
                    cost = _mm512_set1_epi64(v);
                    break;
                }
                case 4: {
                    int v;
                    memcpy(&v, m, sizeof v);
                    cost = _mm512_set1_epi32(v);
                    break;
                }
                default: cost = _mm512_set1_epi16((short)*m);
                }
                __m512i e = _mm512_subs_epi16(c0, x0[n]);
                cost = _mm512_adds_epu16(cost, _mm512_mulhrs_epi16(e, e));
                if (V == 2) {
                    __m512i e1 = _mm512_subs_epi16(c1, x1[n]);
                    cost = _mm512_adds_epu16(cost, _mm512_mulhrs_epi16(e1, e1));
                }
                b[n] = _mm512_min_epu16(b[n], cost);
            }
        }
        for (int n = 0; n < NQ; n++) {
            __m512i out = kv < 5 ? _mm512_permutexvar_epi16(order, b[n]) : b[n];
            out = _mm512_subs_epu16(out, norm[n]);
            low[n] = _mm512_min_epu16(low[n], out);
            _mm512_storeu_si512((void *)(s.best[n] + g), out);
        }
    }
    for (int n = 0; n < NQ; n++) {
        uint16_t v[32], m = UINT16_MAX;
        _mm512_storeu_si512((void *)v, low[n]);
        for (int i = 0; i < 32; i++) m = v[i] < m ? v[i] : m;
        q->low[n] = m;
    }
}

__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))) static void
viterbi16_step_avx512(viterbi16_batch *q, const int16_t *cb, int64_t P, int kv, int V) {
    QS_VITERBI_DISPATCH(viterbi16_step32);
}

/* 16 lanes: the same operations; the permute back to prefix order (kv < 4) moves 16-bit lanes within
   each 128-bit half (vpshufb) and across them (the halves swapped, then vpshufb), merged by an OR. */
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
viterbi16_step16(viterbi16_batch *q, const int16_t *cb, int64_t P, const int kv, const int V, const int NQ) {
    const int64_t J = (int64_t)1 << kv;
    int lanes[16];
    for (int i = 0; i < 16; i++) lanes[viterbi_lane_prefix(i, kv, 16)] = i;
    /* out[p] = b[lanes[p]]: bytes from the same half, and from the other half of the swapped vector */
    int8_t same[32], cross[32];
    for (int p = 0; p < 16; p++) {
        int src = lanes[p], inside = (src >> 3) == (p >> 3);
        for (int h = 0; h < 2; h++) {
            int8_t byte = (int8_t)(2 * (src & 7) + h);
            same[2 * p + h] = inside ? byte : (int8_t)-128;
            cross[2 * p + h] = inside ? (int8_t)-128 : byte;
        }
    }
    const __m256i same_v = _mm256_loadu_si256((const __m256i *)same), cross_v = _mm256_loadu_si256((const __m256i *)cross);
    __m256i x0[VITERBI_LOCKSTEP], x1[VITERBI_LOCKSTEP], norm[VITERBI_LOCKSTEP], low[VITERBI_LOCKSTEP];
    for (int n = 0; n < NQ; n++) {
        x0[n] = _mm256_set1_epi16(q->x[n][0]);
        x1[n] = _mm256_set1_epi16(V == 2 ? q->x[n][1] : 0);
        norm[n] = _mm256_set1_epi16((short)q->norm[n]);
        low[n] = _mm256_set1_epi16(-1);
    }
    const viterbi16_batch s = *q;
    const int16_t *c = cb;
    for (int64_t g = 0; g < P; g += 16) {
        __m256i b[VITERBI_LOCKSTEP];
        for (int n = 0; n < NQ; n++) b[n] = _mm256_set1_epi16(-1);
        for (int64_t j = 0; j < J; j++, c += 16 * V) {
            const int64_t off = (j * P + g) >> kv;
            const __m256i c0 = _mm256_loadu_si256((const __m256i *)c);
            const __m256i c1 = V == 2 ? _mm256_loadu_si256((const __m256i *)(c + 16)) : c0;
            for (int n = 0; n < NQ; n++) {
                const uint16_t *m = s.prev[n] + off;
                __m256i cost;
                switch (kv) {
                case 1: cost = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)m)); break;
                case 2: {
                    long long v;
                    memcpy(&v, m, sizeof v);
                    cost = _mm256_set1_epi64x(v);
                    break;
                }
                case 3: {
                    int v;
                    memcpy(&v, m, sizeof v);
                    cost = _mm256_set1_epi32(v);
                    break;
                }
                default: cost = _mm256_set1_epi16((short)*m);
                }
                __m256i e = _mm256_subs_epi16(c0, x0[n]);
                cost = _mm256_adds_epu16(cost, _mm256_mulhrs_epi16(e, e));
                if (V == 2) {
                    __m256i e1 = _mm256_subs_epi16(c1, x1[n]);
                    cost = _mm256_adds_epu16(cost, _mm256_mulhrs_epi16(e1, e1));
                }
                b[n] = _mm256_min_epu16(b[n], cost);
            }
        }
        for (int n = 0; n < NQ; n++) {
            __m256i out = b[n];
            if (kv < 4) {
                __m256i swapped = _mm256_permute4x64_epi64(out, 0x4E);
                out = _mm256_or_si256(_mm256_shuffle_epi8(out, same_v), _mm256_shuffle_epi8(swapped, cross_v));
            }
            out = _mm256_subs_epu16(out, norm[n]);
            low[n] = _mm256_min_epu16(low[n], out);
            _mm256_storeu_si256((__m256i *)(s.best[n] + g), out);
        }
    }
    for (int n = 0; n < NQ; n++) {
        uint16_t v[16], m = UINT16_MAX;
        _mm256_storeu_si256((__m256i *)v, low[n]);
        for (int i = 0; i < 16; i++) m = v[i] < m ? v[i] : m;
        q->low[n] = m;
    }
}

__attribute__((target("avx2,fma"))) static void viterbi16_step_avx2(viterbi16_batch *q, const int16_t *cb, int64_t P,
                                                                   int kv, int V) {
    QS_VITERBI_DISPATCH(viterbi16_step16);
}
#endif

typedef void (*viterbi16_step_fn)(viterbi16_batch *, const int16_t *, int64_t, int, int);

/* As viterbi_kernel, for the 16-bit steps (W: 32, 16 or 0 for the natural layout). */
static viterbi16_step_fn viterbi16_kernel(int level, int64_t P, int V, int *W) {
    *W = 0;
#if QS_X86
    if (V <= 2 && is_avx512(level) && P % 32 == 0) {
        *W = 32;
        return viterbi16_step_avx512;
    }
    if (V <= 2 && (level == QS_LEVEL_AVX2 || level == QS_LEVEL_AVX512) && P % 16 == 0) {
        *W = 16;
        return viterbi16_step_avx2;
    }
#else
    (void)level;
    (void)V;
#endif
    if (P % VITERBI16_BASE_LANES == 0) {
        *W = VITERBI16_BASE_LANES;
        return viterbi16_step_base;
    }
    return viterbi16_step_natural;
}

/* One 16-bit pass over n sequences x[i] [N, V] (int16) in lockstep, as viterbi_pass; hist[i]: (N + 1)
   arrays of P + VITERBI_PAD words. ok[i] is cleared if the sequence does not fit (see above); its states
   are then not written. code: natural layout (the traceback); table: the step's layout. */
static void viterbi16_pass(viterbi16_step_fn step, int n, const int16_t *const *x, int64_t N, const int16_t *table,
                           const int16_t *code, int L, int kv, int V, const int64_t *o, uint16_t *const *hist,
                           int32_t *const *states, int *ok) {
    const int64_t P = (int64_t)1 << (L - kv), stride = P + VITERBI_PAD;
    viterbi16_batch q = {.n = n};
    for (int i = 0; i < n; i++) {
        for (int64_t p = 0; p < stride; p++) hist[i][p] = (o[i] < 0 || p == o[i]) ? 0 : (uint16_t)VITERBI16_SAT;
        q.norm[i] = 0;
    }
    for (int64_t t = 0; t < N; t++) {
        for (int i = 0; i < n; i++) {
            q.prev[i] = hist[i] + t * stride;
            q.best[i] = hist[i] + (t + 1) * stride;
            q.x[i] = x[i] + t * V;
        }
        step(&q, table, P, kv, V);
        for (int i = 0; i < n; i++) {
            if (q.low[i] > VITERBI16_RISE_MAX) ok[i] = 0;
            q.norm[i] = q.low[i];
        }
    }
    for (int i = 0; i < n; i++) {
        if (!ok[i]) continue;
        /* the end state of the smallest best_{N-1} (ties: the smallest state); step t reads best_{t-1} = hist t */
        const uint16_t *last = hist[i] + N * stride;
        int64_t end = -1;
        for (int64_t p = 0; p < P; p++) {
            if (o[i] >= 0 && p != o[i]) continue;
            if (end >= 0 && last[p] > last[end & (P - 1)]) continue;
            int64_t s = viterbi16_state(hist[i] + (N - 1) * stride, code, x[i] + (N - 1) * V, p, L, kv, V);
            if (end < 0 || last[p] < last[end & (P - 1)] || s < end) end = s;
        }
        int64_t s = end;
        states[i][N - 1] = (int32_t)s;
        for (int64_t t = N - 1; t >= 1; t--) {
            s = viterbi16_state(hist[i] + (t - 1) * stride, code, x[i] + (t - 1) * V, s >> kv, L, kv, V);
            states[i][t - 1] = (int32_t)s;
        }
        if (o[i] >= 0 && (s >> kv) != o[i]) ok[i] = 0;
    }
}

/* A pass's buffers for one sequence of a lockstep batch: the two key arrays (P + VITERBI_PAD each) and the
   backpointers (N steps of P bytes). */
typedef struct {
    uint32_t *keys[2];
    uint8_t *bp;
} viterbi_work;

/* One Viterbi pass over n <= VITERBI_LOCKSTEP sequences x[i] [N, V] in lockstep; states[i] out [N].
   o[i] >= 0: the tail-biting constraint (start states s >> kv == o, end states s mod P == o); -1: free.
   code: in the layout of the step (see viterbi_kernel). */
static void viterbi_pass(viterbi_step_fn step, int n, const float *const *x, int64_t N, const float *code, int L,
                         int kv, int V, const int64_t *o, viterbi_work *w,
                         int32_t *const *states) {
    const int64_t P = (int64_t)1 << (L - kv);
    const uint32_t low = ((uint32_t)1 << kv) - 1;
    viterbi_batch q = {.n = n};
    for (int i = 0; i < n; i++)
        for (int64_t p = 0; p < P + VITERBI_PAD; p++)
            w[i].keys[0][p] = (o[i] < 0 || p == o[i]) ? 0u : VITERBI_UNREACHABLE;
    for (int64_t t = 0; t < N; t++) {
        for (int i = 0; i < n; i++) {
            q.prev[i] = w[i].keys[t & 1];
            q.best[i] = w[i].keys[(t + 1) & 1];
            q.x[i] = x[i] + t * V;
            q.bp[i] = w[i].bp + t * P;
        }
        step(&q, code, P, kv, V);
    }
    for (int i = 0; i < n; i++) {
        /* best_{N-1}: the end state j·P + p of the smallest key, the smallest such state on ties */
        const uint32_t *keys = w[i].keys[N & 1];
        int64_t end = -1;
        uint32_t total = UINT32_MAX;
        for (int64_t p = 0; p < P; p++) {
            if (o[i] >= 0 && p != o[i]) continue;
            int64_t s = ((int64_t)(keys[p] & low) << (L - kv)) | p;
            if (end < 0 || keys[p] < total || (keys[p] == total && s < end)) {
                end = s;
                total = keys[p];
            }
        }
        int64_t s = end;
        states[i][N - 1] = (int32_t)s;
        for (int64_t t = N - 1; t >= 1; t--) {
            int64_t p = s >> kv;
            s = p | ((int64_t)w[i].bp[(t - 1) * P + p] << (L - kv));
            states[i][t - 1] = (int32_t)s;
        }
    }
}

/* Σ_t ‖code[states_t] − x_t‖² of a path, in float32, step by step (the same on every level). */
static float viterbi_path_cost(const float *x, const int32_t *states, int64_t N, const float *code, int V) {
    float total = 0.0f;
    for (int64_t t = 0; t < N; t++)
        for (int v = 0; v < V; v++) {
            float e = code[(int64_t)states[t] * V + v] - x[t * V + v];
            total += e * e;
        }
    return total;
}

/* Tail-biting's first pass runs over `steps` steps of the cyclic window whose step `before` is original
   step 0: window step r holds original step (r + N − before) mod N. Copies that window of x [N, V]
   (elements of `size` bytes) into out [steps, V]. */
static void viterbi_window(const void *x, size_t size, int64_t N, int V, void *out, int64_t *steps,
                           int64_t *before) {
    *steps = N <= 2 * VITERBI_TB_CONTEXT ? N : 2 * VITERBI_TB_CONTEXT;
    *before = *steps == N ? N - N / 2 : VITERBI_TB_CONTEXT;
    const size_t step = size * (size_t)V;
    for (int64_t r = 0; r < *steps; r++)
        memcpy((char *)out + r * step, (const char *)x + ((r + N - *before) % N) * step, step);
}

/* A sequence's buffers for one lockstep slot: the float32 pass's (viterbi_work), the 16-bit pass's
   history, the int16 input, the rotated windows and their states. */
typedef struct {
    viterbi_work w;
    float *rot;
    uint16_t *hist;
    int16_t *x16, *rot16;
    int32_t *rot_states;
} viterbi_slot;

/* Solve n sequences with float32 costs (tail-biting: the windowed first pass, then the constrained one). */
static void viterbi_solve(viterbi_step_fn step, int n, const float *const *xs, int64_t N, const float *table, int L,
                          int kv, int V, int tail_biting, viterbi_slot *const *slot, int32_t *const *out) {
    int64_t o[VITERBI_LOCKSTEP];
    viterbi_work w[VITERBI_LOCKSTEP];
    const float *rot[VITERBI_LOCKSTEP];
    int32_t *rot_states[VITERBI_LOCKSTEP];
    for (int i = 0; i < n; i++) {
        o[i] = -1;
        w[i] = slot[i]->w;
        rot[i] = slot[i]->rot;
        rot_states[i] = slot[i]->rot_states;
    }
    if (tail_biting) {
        int64_t steps = 0, before = 0;
        for (int i = 0; i < n; i++) viterbi_window(xs[i], sizeof(float), N, V, slot[i]->rot, &steps, &before);
        viterbi_pass(step, n, rot, steps, table, L, kv, V, o, w, rot_states);
        for (int i = 0; i < n; i++) o[i] = rot_states[i][before % steps] >> kv;
    }
    viterbi_pass(step, n, xs, N, table, L, kv, V, o, w, out);
}

/* The same with 16-bit costs, for sequences already in slot->x16; ok[i] cleared where one does not fit. */
static void viterbi16_solve(viterbi16_step_fn step, int n, int64_t N, const int16_t *table, const int16_t *code,
                            int L, int kv, int V, int tail_biting, viterbi_slot *const *slot, int32_t *const *out,
                            int *ok) {
    int64_t o[VITERBI_LOCKSTEP];
    const int16_t *x[VITERBI_LOCKSTEP], *rot[VITERBI_LOCKSTEP];
    uint16_t *hist[VITERBI_LOCKSTEP];
    int32_t *rot_states[VITERBI_LOCKSTEP];
    for (int i = 0; i < n; i++) {
        o[i] = -1;
        x[i] = slot[i]->x16;
        rot[i] = slot[i]->rot16;
        hist[i] = slot[i]->hist;
        rot_states[i] = slot[i]->rot_states;
    }
    if (tail_biting) {
        int64_t steps = 0, before = 0;
        for (int i = 0; i < n; i++) viterbi_window(x[i], sizeof(int16_t), N, V, slot[i]->rot16, &steps, &before);
        viterbi16_pass(step, n, rot, steps, table, code, L, kv, V, o, hist, rot_states, ok);
        for (int i = 0; i < n; i++) o[i] = ok[i] ? rot_states[i][before % steps] >> kv : 0;
    }
    viterbi16_pass(step, n, x, N, table, code, L, kv, V, o, hist, out, ok);
}

/* values·2^13 rounded to int16 in out, if every |value|·2^13 <= 32767 (else 0; NaN never fits) */
static int viterbi16_fits(const float *v, int64_t count, int16_t *out) {
    for (int64_t i = 0; i < count; i++) {
        float f = v[i] * (float)(1 << VITERBI16_FRAC);
        if (!(fabsf(f) <= VITERBI16_INPUT_MAX)) return 0;
        out[i] = (int16_t)lrintf(f);
    }
    return 1;
}

enum { QS_VITERBI_FLOAT32 = 0, QS_VITERBI_INT16 = 1 };

/* The Viterbi's workspace (tens of MB at L = 16) is kept from one call to the next: BlockLDLQ calls once per
   16-column block, and fresh pages for every call cost more than a small call's search. One caller at a time
   uses the kept block; a concurrent caller allocates its own. qs_release_workspace frees it. */
static pthread_mutex_t viterbi_kept_lock = PTHREAD_MUTEX_INITIALIZER;
static char *viterbi_kept;
static size_t viterbi_kept_size;

static char *viterbi_workspace(size_t size, int *kept) {
    if (pthread_mutex_trylock(&viterbi_kept_lock) == 0) {
        if (viterbi_kept_size < size) {
            free(viterbi_kept);
            viterbi_kept = (char *)malloc(size);
            viterbi_kept_size = viterbi_kept ? size : 0;
        }
        if (viterbi_kept) {
            *kept = 1;
            return viterbi_kept;
        }
        pthread_mutex_unlock(&viterbi_kept_lock);
    }
    *kept = 0;
    return (char *)malloc(size);
}

static void viterbi_workspace_done(char *work, int kept) {
    if (kept)
        pthread_mutex_unlock(&viterbi_kept_lock);
    else
        free(work);
}

/* Frees the Viterbi's kept workspace (a later call allocates it again). */
QS_API void qs_release_workspace(void) {
    pthread_mutex_lock(&viterbi_kept_lock);
    free(viterbi_kept);
    viterbi_kept = NULL;
    viterbi_kept_size = 0;
    pthread_mutex_unlock(&viterbi_kept_lock);
}

/*
 * x [B, N·V] float32 -> states int32 [B, N], costs float32 [B] (NULL allowed: Σ_t ‖code[s_t] − x_t‖²).
 * tail_biting = 0: one unconstrained pass. 1: QTIP's approximate tail-biting (two passes): an
 * unconstrained pass over the sequence rotated by N/2 steps (for N > 2·VITERBI_TB_CONTEXT: over the
 * cyclic window of that many steps on each side of step 0) fixes o, the top L - kv bits of the
 * state at the original step 0; a second pass is constrained by o (a legal cycle).
 * code [2^L, V]; 2 <= L <= 24, 1 <= kv <= min(8, L - 1), N >= 1 (tail-biting: N·kv >= L). level: a
 * QS_LEVEL_* this CPU has; every level returns the same paths. metric: QS_VITERBI_FLOAT32, or
 * QS_VITERBI_INT16 (16-bit costs; a sequence that does not fit them, or every one if a code is 4 or more,
 * takes the float32 pass). Each thread advances VITERBI_LOCKSTEP sequences together.
 */
QS_API int qs_viterbi(const float *x, int64_t B, int64_t N, const float *code, int L, int kv, int V, int tail_biting,
                      int32_t *states, float *costs, int nthreads, int level, int metric) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!x || !code || !states || B < 0 || N < 1 || L < 2 || L > 24 || kv < 1 || kv > VITERBI_MAX_KV || kv >= L ||
        V < 1 || nthreads < 1 || (tail_biting && N * kv < L) ||
        (metric != QS_VITERBI_FLOAT32 && metric != QS_VITERBI_INT16))
        return QS_EBADARG;
    const int64_t S = (int64_t)1 << L, P = (int64_t)1 << (L - kv);
    int W, W16 = 0;
    viterbi_step_fn step = viterbi_kernel(level, P, V, &W);
    viterbi16_step_fn step16 = viterbi16_kernel(level, P, V, &W16);
    float *blocked = NULL;
    int16_t *code16 = NULL, *table16 = NULL;
    if (W) {
        blocked = (float *)malloc(sizeof(float) * (size_t)(S * V));
        if (!blocked) return QS_ENOMEM;
        viterbi_block_codes(code, sizeof(float), P, kv, V, W, blocked);
    }
    int fixed = 0;
    if (metric == QS_VITERBI_INT16) {
        code16 = (int16_t *)malloc(sizeof(int16_t) * (size_t)(S * V) * 2);
        if (!code16) {
            free(blocked);
            return QS_ENOMEM;
        }
        fixed = viterbi16_fits(code, S * V, code16);
        table16 = code16;
        if (fixed && W16) {
            table16 = code16 + S * V;
            viterbi_block_codes(code16, sizeof(int16_t), P, kv, V, W16, table16);
        }
    }
    const float *table = W ? blocked : code;
    /* work items: lockstep batches of VITERBI_LOCKSTEP sequences (the last may be shorter) */
    const int64_t items = (B + VITERBI_LOCKSTEP - 1) / VITERBI_LOCKSTEP;
    int nt = nthreads < items ? nthreads : (items > 0 ? (int)items : 1);
    /* per sequence: the float32 pass's two key arrays and backpointers, the rotated window and its states;
       with 16-bit costs also their history and the int16 input and window (pages only touched when used) */
    const size_t keys = sizeof(uint32_t) * (size_t)(P + VITERBI_PAD);
    const size_t hist = fixed ? sizeof(uint16_t) * (size_t)((N + 1) * (P + VITERBI_PAD)) : 0;
    const size_t x16 = fixed ? (sizeof(int16_t) * (size_t)(N * V) + 7) & ~(size_t)7 : 0;
    const size_t per_seq = 2 * keys + hist + 2 * x16 + sizeof(float) * (size_t)(N * V) +
                           sizeof(int32_t) * (size_t)N + (size_t)(N * P) + 64;
    const size_t per = VITERBI_LOCKSTEP * per_seq + 64;
    int kept;
    char *work = viterbi_workspace(per * (size_t)nt + 64, &kept);
    if (!work) {
        free(blocked);
        free(code16);
        return QS_ENOMEM;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1)
    for (int64_t item = 0; item < items; item++) {
#ifdef _OPENMP
        char *base = work + per * (size_t)omp_get_thread_num();
#else
        char *base = work;
#endif
        const int64_t b0 = item * VITERBI_LOCKSTEP;
        const int n = (int)(B - b0 < VITERBI_LOCKSTEP ? B - b0 : VITERBI_LOCKSTEP);
        viterbi_slot slots[VITERBI_LOCKSTEP];
        for (int i = 0; i < n; i++) {
            char *p = base + per_seq * (size_t)i;
            viterbi_slot *sl = &slots[i];
            sl->w.keys[0] = (uint32_t *)p;
            sl->w.keys[1] = (uint32_t *)(p + keys);
            sl->hist = (uint16_t *)(p + 2 * keys);
            sl->x16 = (int16_t *)(p + 2 * keys + hist);
            sl->rot16 = sl->x16 + (fixed ? N * V : 0);
            sl->rot = (float *)(p + 2 * keys + hist + 2 * x16);
            sl->rot_states = (int32_t *)(sl->rot + N * V);
            sl->w.bp = (uint8_t *)(sl->rot_states + N);
        }
        /* the sequences that fit 16-bit costs, then the rest (and those that did not fit after all) */
        viterbi_slot *in16[VITERBI_LOCKSTEP], *in32[VITERBI_LOCKSTEP];
        const float *x32[VITERBI_LOCKSTEP];
        int32_t *out16[VITERBI_LOCKSTEP], *out32[VITERBI_LOCKSTEP];
        int ok[VITERBI_LOCKSTEP], n16 = 0, n32 = 0, idx16[VITERBI_LOCKSTEP];
        for (int i = 0; i < n; i++) {
            const float *xi = x + (b0 + i) * N * V;
            if (fixed && viterbi16_fits(xi, N * V, slots[i].x16)) {
                idx16[n16] = i;
                in16[n16] = &slots[i];
                out16[n16] = states + (b0 + i) * N;
                ok[n16++] = 1;
            } else {
                in32[n32] = &slots[i];
                x32[n32] = xi;
                out32[n32++] = states + (b0 + i) * N;
            }
        }
        if (n16) viterbi16_solve(step16, n16, N, table16, code16, L, kv, V, tail_biting, in16, out16, ok);
        for (int i = 0; i < n16; i++)
            if (!ok[i]) {
                in32[n32] = in16[i];
                x32[n32] = x + (b0 + idx16[i]) * N * V;
                out32[n32++] = out16[i];
            }
        if (n32) viterbi_solve(step, n32, x32, N, table, L, kv, V, tail_biting, in32, out32);
        if (costs)
            for (int i = 0; i < n; i++)
                costs[b0 + i] = viterbi_path_cost(x + (b0 + i) * N * V, states + (b0 + i) * N, N, code, V);
    }
    viterbi_workspace_done(work, kept);
    free(blocked);
    free(code16);
    return QS_OK;
}

/*
 * Trellis decode-matvec (QTIP's bitshift trellis with the 1MAD code, L = 16, V = 1; the layout of
 * quipsharp.codebooks.trellis.TrellisCodebook). codes int16 [m/16, (n/16)·16k]: row i holds the n/16
 * tiles of output rows 16i..16i+15, each 16k words (MSB first) of a cyclic 256k-bit stream; weight
 * p = 16c + r of a tile (row r, column c: column-major) is the code of the 16-bit window at bit p·k.
 * The code is the raw 1MAD value: the byte sum of 34038481·s + 76625530 (mod 2^32) minus 510, an
 * integer in [-510, 510]; the caller multiplies by its normalisation (1 / (147.8·std)).
 *
 * The 16 states of a column are 16 rows: lane r reads the 32-bit pair (word t << 16 | word t+1) at
 * t = c·k + ((r·k) >> 4) and shifts it right by 16 - ((r·k) & 15). A tile's pairs are built once
 * (the last word pairs with the first: tail-biting), so a column costs a load, a permute, a shift,
 * a mask, a multiply-add and the byte sum, then one FMA per batch row into 16 row accumulators.
 * Every level does the same float operations in the same order (fmaf in the portable code), so
 * every level returns the same bits.
 */
#define TRELLIS_TILE 16
#define TRELLIS_MAX_K 4
#define TRELLIS_1MAD_A 34038481u
#define TRELLIS_1MAD_C 76625530u
#define TRELLIS_1MAD_MEAN 510

#if QS_X86
/* Lane r of a column reads pair t = c·k + idx[r] and shifts it right by shift[r]. halves = 1: AVX2's two
   8-lane halves, each relative to its own first pair (the second half starts (8k >> 4) pairs later). */
static void trellis_lane_tables(int k, int halves, int32_t idx[16], int32_t shift[16]) {
    for (int r = 0; r < 16; r++) {
        idx[r] = ((r * k) >> 4) - (halves ? (((r & 8) * k) >> 4) : 0);
        shift[r] = 16 - ((r * k) & 15);
    }
}
#endif

/* The pairs of every tile of a slab row, written before any is read (a vector load of pairs just
   stored by scalar stores would stall on store forwarding), plus zeroed room for the last 16-lane load.
   The AVX2 level's copy builds them 8 at a time (11% of its int8 decoding step at k = 2). */
#define QS_TRELLIS_SLAB_PAIRS(ATTR, NAME)                                                                      \
    ATTR static void NAME(const int16_t *row, int64_t tiles, int k, uint32_t *pairs) {                         \
        const int64_t words = TRELLIS_TILE * k, total = tiles * words;                                         \
        const uint16_t *w = (const uint16_t *)row;                                                             \
        for (int64_t t = 0; t + 1 < total; t++) pairs[t] = ((uint32_t)w[t] << 16) | w[t + 1]; /* vectorised */ \
        for (int64_t j = 0; j < tiles; j++) { /* each tile's last word pairs with its first (tail-biting) */   \
            int64_t last = j * words + words - 1;                                                              \
            pairs[last] = ((uint32_t)w[last] << 16) | w[j * words];                                            \
        }                                                                                                      \
        memset(pairs + total, 0, sizeof(uint32_t) * TRELLIS_TILE);                                             \
    }
#if QS_X86
QS_TRELLIS_SLAB_PAIRS(__attribute__((target("avx2"))), trellis_slab_pairs_avx2)
#endif
QS_TRELLIS_SLAB_PAIRS(, trellis_slab_pairs)

typedef void (*trellis_pairs_fn)(const int16_t *, int64_t, int, uint32_t *);

/* The pairs builder of a level (the same pairs from each). */
static trellis_pairs_fn trellis_slab_pairs_for(int level) {
#if QS_X86
    if (level == QS_LEVEL_AVX2) return trellis_slab_pairs_avx2;
#else
    (void)level;
#endif
    return trellis_slab_pairs;
}

/* The 16-bit window (a state) at bit `bit` of a tile's stream, from its pairs. */
static inline uint32_t trellis_window(const uint32_t *pairs, int bit) {
    return (pairs[bit >> 4] >> (16 - (bit & 15))) & 0xFFFFu;
}

static inline uint32_t trellis_hash(uint32_t state) { return state * TRELLIS_1MAD_A + TRELLIS_1MAD_C; }

static inline int32_t trellis_bytesum(uint32_t h) {
    return (int32_t)((h & 0xFF) + ((h >> 8) & 0xFF) + ((h >> 16) & 0xFF) + (h >> 24));
}

static inline int trellis_1mad(uint32_t state) { return trellis_bytesum(trellis_hash(state)) - TRELLIS_1MAD_MEAN; }

/* acc [B][16] += tile (w [16c + r]) x x[b, c] for the tile's 16 columns, FMA in column order. */
static void trellis_accumulate_scalar(const float *w, const float *x, int64_t B, int64_t n, float *acc) {
    for (int64_t b = 0; b < B; b++)
        for (int c = 0; c < TRELLIS_TILE; c++) {
            float xv = x[b * n + c];
            for (int r = 0; r < TRELLIS_TILE; r++)
                acc[b * TRELLIS_TILE + r] = fmaf(w[c * TRELLIS_TILE + r], xv, acc[b * TRELLIS_TILE + r]);
        }
}

#if QS_X86
/* 16 rows of column c as int32 raw codes; AVX-512 (VNNI: the byte sum is one vpdpbusd). */
#define QS_TRELLIS_COLUMN_AVX512(ATTR, NAME, BYTESUM)                                                          \
    ATTR static inline __m512 NAME(const uint32_t *pairs, int c, int k, __m512i idx, __m512i shift) {          \
        __m512i v = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512((const void *)(pairs + c * k)));          \
        __m512i state = _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi32(0xFFFF));              \
        __m512i h = _mm512_add_epi32(_mm512_mullo_epi32(state, _mm512_set1_epi32((int)TRELLIS_1MAD_A)),        \
                                     _mm512_set1_epi32((int)TRELLIS_1MAD_C));                                  \
        return _mm512_cvtepi32_ps(BYTESUM);                                                                    \
    }
QS_TRELLIS_COLUMN_AVX512(__attribute__((target("avx512f,avx512bw"))), trellis_column_avx512,
                         _mm512_sub_epi32(_mm512_madd_epi16(_mm512_maddubs_epi16(h, _mm512_set1_epi8(1)),
                                                            _mm512_set1_epi16(1)),
                                          _mm512_set1_epi32(TRELLIS_1MAD_MEAN)))
QS_TRELLIS_COLUMN_AVX512(__attribute__((target("avx512f,avx512bw,avx512vnni"))), trellis_column_vnni,
                         _mm512_dpbusd_epi32(_mm512_set1_epi32(-TRELLIS_1MAD_MEAN), h, _mm512_set1_epi8(1)))

#define QS_TRELLIS_SLAB_AVX512(ATTR, NAME, COLUMN)                                                             \
    ATTR static void NAME(const uint32_t *row_pairs, int64_t tiles, int k, const float *x, int64_t B, int64_t n, \
                          float *acc, float *w) {                                                              \
        int32_t lane_idx[16], lane_shift[16];                                                                  \
        trellis_lane_tables(k, 0, lane_idx, lane_shift);                                                       \
        const __m512i idx = _mm512_loadu_si512((const void *)lane_idx);                                        \
        const __m512i shift = _mm512_loadu_si512((const void *)lane_shift);                                    \
        __m512 a0 = _mm512_loadu_ps(acc);                                                                      \
        for (int64_t j = 0; j < tiles; j++) {                                                                  \
            const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;                                          \
            const float *xj = x + j * TRELLIS_TILE;                                                            \
            if (B == 1) { /* a decoding step: straight from the code into the accumulator */                   \
                for (int c = 0; c < TRELLIS_TILE; c++)                                                         \
                    a0 = _mm512_fmadd_ps(COLUMN(pairs, c, k, idx, shift), _mm512_set1_ps(xj[c]), a0);          \
                continue;                                                                                      \
            }                                                                                                  \
            for (int c = 0; c < TRELLIS_TILE; c++) _mm512_storeu_ps(w + 16 * c, COLUMN(pairs, c, k, idx, shift)); \
            for (int64_t b = 0; b < B; b++) {                                                                  \
                __m512 a = _mm512_loadu_ps(acc + 16 * b);                                                      \
                for (int c = 0; c < TRELLIS_TILE; c++)                                                         \
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * c), _mm512_set1_ps(xj[b * n + c]), a);        \
                _mm512_storeu_ps(acc + 16 * b, a);                                                             \
            }                                                                                                  \
        }                                                                                                      \
        if (B == 1) _mm512_storeu_ps(acc, a0);                                                                 \
    }
QS_TRELLIS_SLAB_AVX512(__attribute__((target("avx512f,avx512bw,fma"))), trellis_slab_avx512, trellis_column_avx512)
QS_TRELLIS_SLAB_AVX512(__attribute__((target("avx512f,avx512bw,avx512vnni,fma"))), trellis_slab_vnni,
                       trellis_column_vnni)

/* AVX2's lane tables (trellis_lane_tables with halves): half h of a column reads from pair c·k + h·off1. */
typedef struct {
    __m256i idx0, idx1, sh0, sh1;
    int64_t off1;
} trellis_lanes_avx2;

__attribute__((target("avx2"))) static inline trellis_lanes_avx2 trellis_lanes_avx2_for(int k) {
    int32_t idx[16], shift[16];
    trellis_lane_tables(k, 1, idx, shift);
    trellis_lanes_avx2 t = {_mm256_loadu_si256((const __m256i *)idx), _mm256_loadu_si256((const __m256i *)(idx + 8)),
                            _mm256_loadu_si256((const __m256i *)shift),
                            _mm256_loadu_si256((const __m256i *)(shift + 8)), (8 * k) >> 4};
    return t;
}

/* AVX2: two halves of 8 rows; half h loads 8 pairs from c·k + ((8h·k) >> 4) and permutes them. */
__attribute__((target("avx2,fma"))) static inline __m256 trellis_half_avx2(const uint32_t *pairs, int64_t at,
                                                                          __m256i idx, __m256i shift) {
    __m256i v = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(pairs + at)), idx);
    __m256i state = _mm256_and_si256(_mm256_srlv_epi32(v, shift), _mm256_set1_epi32(0xFFFF));
    __m256i h = _mm256_add_epi32(_mm256_mullo_epi32(state, _mm256_set1_epi32((int)TRELLIS_1MAD_A)),
                                 _mm256_set1_epi32((int)TRELLIS_1MAD_C));
    __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(h, _mm256_set1_epi8(1)), _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(sum, _mm256_set1_epi32(TRELLIS_1MAD_MEAN)));
}

__attribute__((target("avx2,fma"))) static void trellis_slab_avx2(const uint32_t *row_pairs, int64_t tiles, int k,
                                                                 const float *x, int64_t B, int64_t n, float *acc,
                                                                 float *w) {
    const trellis_lanes_avx2 lanes = trellis_lanes_avx2_for(k);
    const __m256i idx0 = lanes.idx0, idx1 = lanes.idx1, sh0 = lanes.sh0, sh1 = lanes.sh1;
    const int64_t off1 = lanes.off1;
    __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        const float *xj = x + j * TRELLIS_TILE;
        if (B == 1) {
            for (int c = 0; c < TRELLIS_TILE; c++) {
                __m256 xv = _mm256_set1_ps(xj[c]);
                a0 = _mm256_fmadd_ps(trellis_half_avx2(pairs, c * k, idx0, sh0), xv, a0);
                a1 = _mm256_fmadd_ps(trellis_half_avx2(pairs, c * k + off1, idx1, sh1), xv, a1);
            }
            continue;
        }
        for (int c = 0; c < TRELLIS_TILE; c++) {
            _mm256_storeu_ps(w + 16 * c, trellis_half_avx2(pairs, c * k, idx0, sh0));
            _mm256_storeu_ps(w + 16 * c + 8, trellis_half_avx2(pairs, c * k + off1, idx1, sh1));
        }
        for (int64_t b = 0; b < B; b++) {
            __m256 c0 = _mm256_loadu_ps(acc + 16 * b), c1 = _mm256_loadu_ps(acc + 16 * b + 8);
            for (int c = 0; c < TRELLIS_TILE; c++) {
                __m256 xv = _mm256_set1_ps(xj[b * n + c]);
                c0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16 * c), xv, c0);
                c1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + 16 * c + 8), xv, c1);
            }
            _mm256_storeu_ps(acc + 16 * b, c0);
            _mm256_storeu_ps(acc + 16 * b + 8, c1);
        }
    }
    if (B == 1) {
        _mm256_storeu_ps(acc, a0);
        _mm256_storeu_ps(acc + 8, a1);
    }
}
#endif

#if QS_ARM
/* NEON: four quarters of 4 rows (a table lookup builds each lane's pair); the byte sum by pairwise adds. */
static inline float32x4_t trellis_quarter_neon(const uint32_t *pairs, int c, int k, int q) {
    uint32_t lane[4];
    int32_t neg_shift[4];
    for (int i = 0; i < 4; i++) {
        int bit = (TRELLIS_TILE * c + 4 * q + i) * k;
        lane[i] = pairs[bit >> 4];
        neg_shift[i] = -(16 - (bit & 15));
    }
    uint32x4_t state = vandq_u32(vshlq_u32(vld1q_u32(lane), vld1q_s32(neg_shift)), vdupq_n_u32(0xFFFF));
    uint32x4_t h = vmlaq_u32(vdupq_n_u32(TRELLIS_1MAD_C), state, vdupq_n_u32(TRELLIS_1MAD_A));
    uint32x4_t sum = vpaddlq_u16(vpaddlq_u8(vreinterpretq_u8_u32(h)));
    return vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(sum), vdupq_n_s32(TRELLIS_1MAD_MEAN)));
}

static void trellis_slab_neon(const uint32_t *row_pairs, int64_t tiles, int k, const float *x, int64_t B, int64_t n,
                              float *acc, float *w) {
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        for (int c = 0; c < TRELLIS_TILE; c++)
            for (int q = 0; q < 4; q++) vst1q_f32(w + 16 * c + 4 * q, trellis_quarter_neon(pairs, c, k, q));
        const float *xj = x + j * TRELLIS_TILE;
        for (int64_t b = 0; b < B; b++)
            for (int q = 0; q < 4; q++) {
                float32x4_t a = vld1q_f32(acc + 16 * b + 4 * q);
                for (int c = 0; c < TRELLIS_TILE; c++)
                    a = vfmaq_n_f32(a, vld1q_f32(w + 16 * c + 4 * q), xj[b * n + c]);
                vst1q_f32(acc + 16 * b + 4 * q, a);
            }
    }
}
#endif

static void trellis_slab_scalar(const uint32_t *row_pairs, int64_t tiles, int k, const float *x, int64_t B,
                                int64_t n, float *acc, float *w) {
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        for (int p = 0; p < TRELLIS_TILE * TRELLIS_TILE; p++) {
            int bit = p * k;
            w[p] = (float)trellis_1mad(trellis_window(pairs, bit));
        }
        trellis_accumulate_scalar(w, x + j * TRELLIS_TILE, B, n, acc);
    }
}

typedef void (*trellis_slab_fn)(const uint32_t *, int64_t, int, const float *, int64_t, int64_t, float *, float *);

static trellis_slab_fn trellis_slab(int level) {
#if QS_X86
    if (level == QS_LEVEL_VNNI) return trellis_slab_vnni;
    if (level == QS_LEVEL_AVX512) return trellis_slab_avx512;
    if (level == QS_LEVEL_AVX2) return trellis_slab_avx2;
#endif
#if QS_ARM
    if (level == QS_LEVEL_NEON || level == QS_LEVEL_NEON_DOT) return trellis_slab_neon;
#endif
    return trellis_slab_scalar;
}

/*
 * The int8 form (a decoding step behind the Hadamard transform): each row of x is quantized to int8
 * (scale max|x| / 127) and the products are exact integers. With h the 1MAD hash of a state and
 * xq the activation, raw·xq = bytesum(h)·xq − 510·xq: the byte sum and the product are one
 * instruction (vpdpbusd with xq in all four bytes of a lane) or two (vpmaddubsw by ones, vpmaddwd by
 * xq in both halves), and 510·Σ xq comes off once per row. |bytesum·xq| <= 1020·127, so int32 sums
 * are exact for n <= TRELLIS_INT8_MAX_N. Integer sums do not depend on their order: every level
 * returns the same bits as the portable code.
 */
#define TRELLIS_INT8_MAX_N 16384

static void trellis_slab_int8_scalar(const int16_t *codes_row, const uint32_t *row_pairs, int64_t tiles, int k,
                                     const int8_t *xq, const int32_t *xw, int64_t B, int64_t n, int32_t *acc) {
    (void)xw;
    (void)codes_row;
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        for (int c = 0; c < TRELLIS_TILE; c++)
            for (int r = 0; r < TRELLIS_TILE; r++) {
                int bit = (TRELLIS_TILE * c + r) * k;
                int32_t sum = trellis_bytesum(trellis_hash(trellis_window(pairs, bit)));
                for (int64_t b = 0; b < B; b++)
                    acc[b * TRELLIS_TILE + r] += sum * (int32_t)xq[b * n + j * TRELLIS_TILE + c];
            }
    }
}

#if QS_X86
#define QS_TRELLIS_HASH_AVX512(ATTR, NAME)                                                                     \
    ATTR static inline __m512i NAME(const uint32_t *pairs, int c, int k, __m512i idx, __m512i shift) {         \
        __m512i v = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512((const void *)(pairs + c * k)));          \
        __m512i state = _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi32(0xFFFF));              \
        return _mm512_add_epi32(_mm512_mullo_epi32(state, _mm512_set1_epi32((int)TRELLIS_1MAD_A)),             \
                                _mm512_set1_epi32((int)TRELLIS_1MAD_C));                                       \
    }
QS_TRELLIS_HASH_AVX512(__attribute__((target("avx512f,avx512bw"))), trellis_hash_avx512)

/* The pairs straight from the tile's words in registers (no pairs buffer): lane r of column c is
   (word t << 16) | word t+1 with t = c·k + ((r·k) >> 4), gathered by one vpermt2w over the tile's
   16k words (two registers; indices wrap cyclically: tail-biting). idx: [16 columns][32 words]. */
static void trellis_word_index(int k, uint16_t idx[TRELLIS_TILE][32]) {
    const int words = TRELLIS_TILE * k;
    for (int c = 0; c < TRELLIS_TILE; c++)
        for (int r = 0; r < 16; r++) {
            int t = c * k + ((r * k) >> 4);
            idx[c][2 * r] = (uint16_t)((t + 1) % words); /* low half of the lane */
            idx[c][2 * r + 1] = (uint16_t)t;            /* high half */
        }
}

__attribute__((target("avx512f,avx512bw"))) static inline __m512i trellis_hash_words_avx512(__m512i lo, __m512i hi,
                                                                                          const uint16_t *idx,
                                                                                          __m512i shift) {
    __m512i v = _mm512_permutex2var_epi16(lo, _mm512_loadu_si512((const void *)idx), hi);
    __m512i state = _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi32(0xFFFF));
    return _mm512_add_epi32(_mm512_mullo_epi32(state, _mm512_set1_epi32((int)TRELLIS_1MAD_A)),
                            _mm512_set1_epi32((int)TRELLIS_1MAD_C));
}

/* xw [B, n]: the activation of column c as this level's multiplier lane (VNNI: xq in 4 bytes;
   AVX-512BW: xq in both int16 halves). DOT(acc, h, xw) accumulates bytesum(h)·xq. */
#define QS_TRELLIS_INT8_AVX512(ATTR, NAME, DOT)                                                                \
    ATTR static void NAME(const int16_t *codes_row, const uint32_t *row_pairs, int64_t tiles, int k,             \
                          const int8_t *xq, const int32_t *xw, int64_t B, int64_t n, int32_t *acc) {           \
        (void)xq;                                                                                              \
        int32_t lane_idx[16], lane_shift[16];                                                                  \
        trellis_lane_tables(k, 0, lane_idx, lane_shift);                                                       \
        const __m512i idx = _mm512_loadu_si512((const void *)lane_idx);                                        \
        const __m512i shift = _mm512_loadu_si512((const void *)lane_shift);                                    \
        if (B == 1) { /* a decoding step: four accumulators (columns mod 4) hide the dot's latency */          \
            __m512i a0 = _mm512_loadu_si512((const void *)acc), a1 = _mm512_setzero_si512();                   \
            __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();                                  \
            uint16_t widx[TRELLIS_TILE][32];                                                                   \
            trellis_word_index(k, widx);                                                                       \
            const int words = TRELLIS_TILE * k;                                                                \
            const __mmask32 hi_mask = words > 32 ? (__mmask32)(((uint64_t)1 << (words - 32)) - 1) : 0;         \
            for (int64_t j = 0; j < tiles; j++) {                                                              \
                const int16_t *w = codes_row + j * words;                                                      \
                __m512i lo = words >= 32 ? _mm512_loadu_si512((const void *)w)                                 \
                                         : _mm512_maskz_loadu_epi16((__mmask32)0xFFFF, w);                     \
                __m512i hi = words > 32 ? _mm512_maskz_loadu_epi16(hi_mask, w + 32) : lo;                      \
                const int32_t *xj = xw + j * TRELLIS_TILE;                                                     \
                for (int c = 0; c < TRELLIS_TILE; c += 4) {                                                    \
                    a0 = DOT(a0, trellis_hash_words_avx512(lo, hi, widx[c], shift), _mm512_set1_epi32(xj[c])); \
                    a1 = DOT(a1, trellis_hash_words_avx512(lo, hi, widx[c + 1], shift),                        \
                             _mm512_set1_epi32(xj[c + 1]));                                                    \
                    a2 = DOT(a2, trellis_hash_words_avx512(lo, hi, widx[c + 2], shift),                        \
                             _mm512_set1_epi32(xj[c + 2]));                                                    \
                    a3 = DOT(a3, trellis_hash_words_avx512(lo, hi, widx[c + 3], shift),                        \
                             _mm512_set1_epi32(xj[c + 3]));                                                    \
                }                                                                                              \
            }                                                                                                  \
            _mm512_storeu_si512((void *)acc, _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3))); \
            return;                                                                                            \
        }                                                                                                      \
        for (int64_t j = 0; j < tiles; j++) {                                                                  \
            const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;                                          \
            __m512i h[TRELLIS_TILE];                                                                           \
            for (int c = 0; c < TRELLIS_TILE; c++) h[c] = trellis_hash_avx512(pairs, c, k, idx, shift);        \
            for (int64_t b = 0; b < B; b++) {                                                                  \
                const int32_t *xj = xw + b * n + j * TRELLIS_TILE;                                             \
                __m512i a = _mm512_loadu_si512((const void *)(acc + 16 * b));                                  \
                for (int c = 0; c < TRELLIS_TILE; c++) a = DOT(a, h[c], _mm512_set1_epi32(xj[c]));             \
                _mm512_storeu_si512((void *)(acc + 16 * b), a);                                                \
            }                                                                                                  \
        }                                                                                                      \
    }
#define QS_DOT_VNNI(a, h, x) _mm512_dpbusd_epi32((a), (h), (x))
#define QS_DOT_AVX512BW(a, h, x) \
    _mm512_add_epi32((a), _mm512_madd_epi16(_mm512_maddubs_epi16((h), _mm512_set1_epi8(1)), (x)))
QS_TRELLIS_INT8_AVX512(__attribute__((target("avx512f,avx512bw,avx512vnni"))), trellis_int8_vnni, QS_DOT_VNNI)
QS_TRELLIS_INT8_AVX512(__attribute__((target("avx512f,avx512bw"))), trellis_int8_avx512, QS_DOT_AVX512BW)

/*
 * The VNNI level's decoding step (B = 1) reads each column's 16 windows with one vpmultishiftqb (VBMI, which
 * the VNNI level requires) from one broadcast qword, where the generic form spends a vpermt2w, a shift and a
 * mask. That needs the qword's words in reverse order, so each tile's words are first copied reversed and
 * wrapped (tail-biting): R[i] = w[(W + 2 - i) mod W] for i < W + 3 (W = 16k words). The little-endian qword
 * at R + W - 1 - t then holds words t, t+1, t+2, t+3 (mod W), word t in its top 16 bits, so the window at
 * stream bit b after word t's MSB (b < 49) is qword bits 48 - b .. 63 - b: its low byte starts at bit 48 - b,
 * its high byte at 56 - b, and a zero mask clears the lane's upper two bytes. Lane r (row r) of column c
 * reads the window at bit k·r after word k·c; with k = 4 rows 12..15 reach past 48 bits and read the qword
 * one word later (bit 4r − 16). The copies of TRELLIS_RCHUNK tiles are written before any is read (a load
 * from a just-written vector stalls on store forwarding). The integer sums are those of the generic form.
 */
#define TRELLIS_RCHUNK 32
#define TRELLIS_R_STRIDE (TRELLIS_TILE * TRELLIS_MAX_K + 4)
#define TRELLIS_R_OUT ((TRELLIS_TILE * TRELLIS_MAX_K + 3 + 31) / 32) /* 32-word stores per tile, at most */

static inline int64_t trellis_load_qword(const int16_t *p) {
    int64_t q;
    memcpy(&q, p, sizeof q);
    return q;
}

__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi"))) static inline __m512i trellis_hash_vbmi(
    const int16_t *R, int at, int two, __m512i ctrl) {
    __m512i src = _mm512_set1_epi64(trellis_load_qword(R + at));
    if (two) src = _mm512_mask_blend_epi64((__mmask8)0xC0, src, _mm512_set1_epi64(trellis_load_qword(R + at - 1)));
    __m512i state = _mm512_maskz_multishift_epi64_epi8((__mmask64)0x3333333333333333ULL, ctrl, src);
    return _mm512_add_epi32(_mm512_mullo_epi32(state, _mm512_set1_epi32((int)TRELLIS_1MAD_A)),
                            _mm512_set1_epi32((int)TRELLIS_1MAD_C));
}

__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi"))) static void trellis_int8_vnni_step(
    const int16_t *codes_row, int64_t tiles, int k, const int32_t *xw, int32_t *acc) {
    const int W = TRELLIS_TILE * k, stores = (W + 3 + 31) / 32, two = 15 * k + 15 > 63;
    const __mmask32 hi_mask = W > 32 ? (__mmask32)(((uint64_t)1 << (W - 32)) - 1) : 0;
    uint16_t ridx[TRELLIS_R_OUT][32];
    for (int q = 0; q < stores; q++)
        for (int j = 0; j < 32; j++) {
            int i = 32 * q + j;
            ridx[q][j] = (uint16_t)(i < W + 3 ? (W + 2 - i) % W : 0);
        }
    uint8_t ctrl_bytes[64];
    for (int r = 0; r < 16; r++) {
        int b = k * r - (two && r >= 12 ? 16 : 0);
        ctrl_bytes[4 * r] = (uint8_t)(48 - b);
        ctrl_bytes[4 * r + 1] = (uint8_t)(56 - b);
        ctrl_bytes[4 * r + 2] = ctrl_bytes[4 * r + 3] = 0;
    }
    const __m512i ctrl = _mm512_loadu_si512((const void *)ctrl_bytes);
    __m512i a0 = _mm512_loadu_si512((const void *)acc), a1 = _mm512_setzero_si512();
    __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
    int16_t R[TRELLIS_RCHUNK * TRELLIS_R_STRIDE + 32 * TRELLIS_R_OUT];
    for (int64_t j0 = 0; j0 < tiles; j0 += TRELLIS_RCHUNK) {
        const int64_t nt = tiles - j0 < TRELLIS_RCHUNK ? tiles - j0 : TRELLIS_RCHUNK;
        for (int64_t j = 0; j < nt; j++) { /* in order: a tile's spill past W + 3 words is the next one's room */
            const int16_t *w = codes_row + (j0 + j) * W;
            __m512i lo = _mm512_loadu_si512((const void *)w);
            __m512i hi = W > 32 ? _mm512_maskz_loadu_epi16(hi_mask, w + 32) : lo;
            for (int q = 0; q < stores; q++)
                _mm512_storeu_si512((void *)(R + j * TRELLIS_R_STRIDE + 32 * q),
                                    _mm512_permutex2var_epi16(lo, _mm512_loadu_si512((const void *)ridx[q]), hi));
        }
        for (int64_t j = 0; j < nt; j++) {
            const int16_t *Rj = R + j * TRELLIS_R_STRIDE;
            const int32_t *xj = xw + (j0 + j) * TRELLIS_TILE;
            for (int c = 0; c < TRELLIS_TILE; c += 4) {
                a0 = _mm512_dpbusd_epi32(a0, trellis_hash_vbmi(Rj, W - 1 - k * c, two, ctrl), _mm512_set1_epi32(xj[c]));
                a1 = _mm512_dpbusd_epi32(a1, trellis_hash_vbmi(Rj, W - 1 - k * (c + 1), two, ctrl),
                                         _mm512_set1_epi32(xj[c + 1]));
                a2 = _mm512_dpbusd_epi32(a2, trellis_hash_vbmi(Rj, W - 1 - k * (c + 2), two, ctrl),
                                         _mm512_set1_epi32(xj[c + 2]));
                a3 = _mm512_dpbusd_epi32(a3, trellis_hash_vbmi(Rj, W - 1 - k * (c + 3), two, ctrl),
                                         _mm512_set1_epi32(xj[c + 3]));
            }
        }
    }
    _mm512_storeu_si512((void *)acc, _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

/*
 * The VNNI decoding step at k = 2, two columns per multishift. A k = 2 tile is 32 words: one register, so
 * no reversed copy is needed. Columns c and c + 1 read windows at stream bits 32c + 2r and 32c + 32 + 2r
 * (row r). Qword lane q (rows 2q, 2q + 1) needs bits 32c + 4q .. + 50, which lie inside the four words
 * from a = 2c + (q >> 2) on: a vpermw puts them in the lane reversed (word a in the top 16 bits, indices
 * mod 32: tail-biting), so the window at bit o after word a's MSB is lane bits 48 - o .. 63 - o, as in
 * the generic step. One vpmultishiftqb then writes column c's window into each dword's low half and
 * column c + 1's into its high half; a mask and a shift split them. Per two columns: a permute, a
 * multishift, a mask, a shift, then two hashes and two vpdpbusd: one multishift and no copy fewer than
 * the generic step. The integer sums are the same.
 */
#define TRELLIS2_WORDS (TRELLIS_TILE * 2) /* a k = 2 tile: one 512-bit register */
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi"))) static void trellis_int8_vnni_step2(
    const int16_t *codes_row, int64_t tiles, const int32_t *xw, int32_t *acc) {
    int16_t idx_words[TRELLIS2_WORDS];
    uint8_t ctrl_bytes[64];
    for (int q = 0; q < 8; q++) {
        const int o = 4 * (q & 3); /* the lane's first window, bits after word a's MSB */
        for (int j = 0; j < 4; j++) idx_words[4 * q + j] = (int16_t)((q >> 2) + 3 - j);
        for (int half = 0; half < 2; half++) { /* rows 2q and 2q + 1: windows two bits apart */
            const int b = o + 2 * half;
            uint8_t *d = ctrl_bytes + 8 * q + 4 * half;
            d[0] = (uint8_t)(48 - b); /* column c: low half */
            d[1] = (uint8_t)(56 - b);
            d[2] = (uint8_t)(16 - b); /* column c + 1: 32 bits later, high half */
            d[3] = (uint8_t)(24 - b);
        }
    }
    const __m512i idx0 = _mm512_loadu_si512((const void *)idx_words);
    const __m512i ctrl = _mm512_loadu_si512((const void *)ctrl_bytes);
    const __m512i mul = _mm512_set1_epi32((int)TRELLIS_1MAD_A), add = _mm512_set1_epi32((int)TRELLIS_1MAD_C);
    const __m512i low = _mm512_set1_epi32(0xFFFF);
    __m512i a0 = _mm512_loadu_si512((const void *)acc), a1 = _mm512_setzero_si512();
    __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
#define QS_TRELLIS2_PAIR(A0, A1, c)                                                                              \
    {                                                                                                          \
        __m512i v = _mm512_multishift_epi64_epi8(                                                              \
            ctrl, _mm512_permutexvar_epi16(_mm512_add_epi16(idx0, _mm512_set1_epi16(2 * (c))), tile));         \
        __m512i h0 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_and_si512(v, low), mul), add);                 \
        __m512i h1 = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(v, 16), mul), add);                 \
        A0 = _mm512_dpbusd_epi32(A0, h0, _mm512_set1_epi32(xj[c]));                                            \
        A1 = _mm512_dpbusd_epi32(A1, h1, _mm512_set1_epi32(xj[(c) + 1]));                                      \
    }
    for (int64_t j = 0; j < tiles; j++) {
        const __m512i tile = _mm512_loadu_si512((const void *)(codes_row + j * TRELLIS2_WORDS));
        const int32_t *xj = xw + j * TRELLIS_TILE;
        QS_TRELLIS2_PAIR(a0, a1, 0)
        QS_TRELLIS2_PAIR(a2, a3, 2)
        QS_TRELLIS2_PAIR(a0, a1, 4)
        QS_TRELLIS2_PAIR(a2, a3, 6)
        QS_TRELLIS2_PAIR(a0, a1, 8)
        QS_TRELLIS2_PAIR(a2, a3, 10)
        QS_TRELLIS2_PAIR(a0, a1, 12)
        QS_TRELLIS2_PAIR(a2, a3, 14)
    }
#undef QS_TRELLIS2_PAIR
    _mm512_storeu_si512((void *)acc, _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}

/* The VNNI level: its decoding steps as above, batches as the generic form. */
static void trellis_int8_vnni_level(const int16_t *codes_row, const uint32_t *row_pairs, int64_t tiles, int k,
                                    const int8_t *xq, const int32_t *xw, int64_t B, int64_t n, int32_t *acc) {
    if (B == 1 && k == 2) trellis_int8_vnni_step2(codes_row, tiles, xw, acc);
    else if (B == 1) trellis_int8_vnni_step(codes_row, tiles, k, xw, acc);
    else trellis_int8_vnni(codes_row, row_pairs, tiles, k, xq, xw, B, n, acc);
}

/* one_pair: all 8 lanes read pair `at` (k = 2): a broadcast load instead of a load and a permute. */
__attribute__((target("avx2"))) static inline __m256i trellis_hash_avx2(const uint32_t *pairs, int64_t at,
                                                                       __m256i idx, __m256i shift, int one_pair) {
    __m256i v = one_pair ? _mm256_set1_epi32((int)pairs[at])
                         : _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)(pairs + at)), idx);
    __m256i state = _mm256_and_si256(_mm256_srlv_epi32(v, shift), _mm256_set1_epi32(0xFFFF));
    return _mm256_add_epi32(_mm256_mullo_epi32(state, _mm256_set1_epi32((int)TRELLIS_1MAD_A)),
                            _mm256_set1_epi32((int)TRELLIS_1MAD_C));
}

__attribute__((target("avx2"))) static inline __m256i trellis_dot_avx2(__m256i a, __m256i h, __m256i x) {
    return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(h, _mm256_set1_epi8(1)), x));
}

__attribute__((target("avx2"))) static void trellis_int8_avx2(const int16_t *codes_row, const uint32_t *row_pairs,
                                                             int64_t tiles, int k, const int8_t *xq,
                                                             const int32_t *xw, int64_t B, int64_t n, int32_t *acc) {
    (void)xq;
    (void)codes_row;
    const trellis_lanes_avx2 lanes = trellis_lanes_avx2_for(k);
    const __m256i idx0 = lanes.idx0, idx1 = lanes.idx1, sh0 = lanes.sh0, sh1 = lanes.sh1;
    const int64_t off1 = lanes.off1;
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        __m256i h0[TRELLIS_TILE], h1[TRELLIS_TILE];
        if (B > 1)
            for (int c = 0; c < TRELLIS_TILE; c++) {
                h0[c] = trellis_hash_avx2(pairs, c * k, idx0, sh0, k == 2);
                h1[c] = trellis_hash_avx2(pairs, c * k + off1, idx1, sh1, k == 2);
            }
        for (int64_t b = 0; b < B; b++) {
            const int32_t *xj = xw + b * n + j * TRELLIS_TILE;
            __m256i a0 = _mm256_loadu_si256((const __m256i *)(acc + 16 * b));
            __m256i a1 = _mm256_loadu_si256((const __m256i *)(acc + 16 * b + 8));
            for (int c = 0; c < TRELLIS_TILE; c++) {
                __m256i xv = _mm256_set1_epi32(xj[c]);
                a0 = trellis_dot_avx2(a0, B > 1 ? h0[c] : trellis_hash_avx2(pairs, c * k, idx0, sh0, k == 2), xv);
                a1 = trellis_dot_avx2(a1, B > 1 ? h1[c] : trellis_hash_avx2(pairs, c * k + off1, idx1, sh1, k == 2),
                                      xv);
            }
            _mm256_storeu_si256((__m256i *)(acc + 16 * b), a0);
            _mm256_storeu_si256((__m256i *)(acc + 16 * b + 8), a1);
        }
    }
}

/* AVX2's decoding step (B = 1): its own loop, so the batch form's 32 spilled hash registers stay out of it;
   two accumulator pairs (even and odd columns), and k = 2 (every half reads one pair) compiled apart. */
__attribute__((target("avx2"), always_inline)) static inline void trellis_int8_avx2_step_k(
    const uint32_t *row_pairs, int64_t tiles, int k, const int32_t *xw, int32_t *acc, int one_pair) {
    const trellis_lanes_avx2 lanes = trellis_lanes_avx2_for(k);
    const __m256i idx0 = lanes.idx0, idx1 = lanes.idx1, sh0 = lanes.sh0, sh1 = lanes.sh1;
    const int64_t off1 = lanes.off1;
    __m256i a0 = _mm256_loadu_si256((const __m256i *)acc), a1 = _mm256_loadu_si256((const __m256i *)(acc + 8));
    __m256i b0 = _mm256_setzero_si256(), b1 = _mm256_setzero_si256();
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        const int32_t *xj = xw + j * TRELLIS_TILE;
        for (int c = 0; c < TRELLIS_TILE; c += 2) {
            const __m256i x0 = _mm256_set1_epi32(xj[c]), x1 = _mm256_set1_epi32(xj[c + 1]);
            a0 = trellis_dot_avx2(a0, trellis_hash_avx2(pairs, c * k, idx0, sh0, one_pair), x0);
            a1 = trellis_dot_avx2(a1, trellis_hash_avx2(pairs, c * k + off1, idx1, sh1, one_pair), x0);
            b0 = trellis_dot_avx2(b0, trellis_hash_avx2(pairs, (c + 1) * k, idx0, sh0, one_pair), x1);
            b1 = trellis_dot_avx2(b1, trellis_hash_avx2(pairs, (c + 1) * k + off1, idx1, sh1, one_pair), x1);
        }
    }
    _mm256_storeu_si256((__m256i *)acc, _mm256_add_epi32(a0, b0));
    _mm256_storeu_si256((__m256i *)(acc + 8), _mm256_add_epi32(a1, b1));
}

__attribute__((target("avx2"))) static void trellis_int8_avx2_step(const uint32_t *row_pairs, int64_t tiles, int k,
                                                                   const int32_t *xw, int32_t *acc) {
    if (k == 2) trellis_int8_avx2_step_k(row_pairs, tiles, 2, xw, acc, 1);
    else trellis_int8_avx2_step_k(row_pairs, tiles, k, xw, acc, 0);
}

/* The AVX2 level: its decoding step as above, batches as the generic form. */
static void trellis_int8_avx2_level(const int16_t *codes_row, const uint32_t *row_pairs, int64_t tiles, int k,
                                    const int8_t *xq, const int32_t *xw, int64_t B, int64_t n, int32_t *acc) {
    if (B == 1) trellis_int8_avx2_step(row_pairs, tiles, k, xw, acc);
    else trellis_int8_avx2(codes_row, row_pairs, tiles, k, xq, xw, B, n, acc);
}
#endif

#if QS_ARM
/*
 * NEON's int8 form: a column's 16 rows are four quarters of 4 lanes. Lane i of quarter q reads pair
 * t = c·k + ((4q + i)·k >> 4), which is the quarter's first pair or the next one: one 4-pair load and a
 * byte table lookup (tbl) put each lane's pair in place, then the shift, mask and multiply-add of the
 * hash as on x86.
 *   neon_dotprod: the hash's bytes as signed bytes are b − 128 after an eor with 0x80 (bytes of h ^
 *                 0x80808080), so sdot gives bytesum·xq − 512·xq in one instruction; the 512·Σ xq goes
 *                 into the row's offset (trellis_quantize_x, form TRELLIS_XW_SBYTES).
 *   neon:         the byte sum by two pairwise widening adds (uaddlp), then a multiply-accumulate by xq.
 * Integer sums, the same as the portable form's.
 */
typedef struct {
    uint8x16_t sel[4]; /* quarter q: byte i·4 + j of the result is byte sel of the 4 loaded pairs */
    int32x4_t shift[4]; /* the lanes' right shifts, negated (vshlq) */
    int first[4];       /* the quarter's first pair, after c·k */
} trellis_quarters_neon;

static trellis_quarters_neon trellis_quarters_neon_for(int k) {
    trellis_quarters_neon t;
    for (int q = 0; q < 4; q++) {
        uint8_t sel[16];
        int32_t shift[4];
        t.first[q] = (4 * q * k) >> 4;
        for (int i = 0; i < 4; i++) {
            int bit = (4 * q + i) * k, d = (bit >> 4) - t.first[q]; /* 0 or 1 */
            for (int j = 0; j < 4; j++) sel[4 * i + j] = (uint8_t)(4 * d + j);
            shift[i] = -(16 - (bit & 15));
        }
        t.sel[q] = vld1q_u8(sel);
        t.shift[q] = vld1q_s32(shift);
    }
    return t;
}

static inline uint32x4_t trellis_hash_neon(const uint32_t *pairs, int c, int k, const trellis_quarters_neon *t,
                                           int q) {
    uint8x16_t four = vreinterpretq_u8_u32(vld1q_u32(pairs + c * k + t->first[q]));
    uint32x4_t v = vreinterpretq_u32_u8(vqtbl1q_u8(four, t->sel[q]));
    uint32x4_t state = vandq_u32(vshlq_u32(v, t->shift[q]), vdupq_n_u32(0xFFFF));
    return vmlaq_u32(vdupq_n_u32(TRELLIS_1MAD_C), state, vdupq_n_u32(TRELLIS_1MAD_A));
}

/* acc += bytesum(h)·xq (neon) or (bytesum(h) − 512)·xq (sdot, with hb = h ^ 0x80808080); xw: xq in 4 bytes */
static inline int32x4_t trellis_dot_neon(int32x4_t acc, uint32x4_t h, int32_t xw) {
    uint32x4_t sum = vpaddlq_u16(vpaddlq_u8(vreinterpretq_u8_u32(h)));
    return vmlaq_n_s32(acc, vreinterpretq_s32_u32(sum), (int32_t)(int8_t)(xw & 0xFF));
}

QS_DOTPROD static inline int32x4_t trellis_dot_sdot(int32x4_t acc, uint32x4_t h, int32_t xw) {
    return vdotq_s32(acc, vreinterpretq_s8_u32(veorq_u32(h, vdupq_n_u32(0x80808080u))),
                     vreinterpretq_s8_s32(vdupq_n_s32(xw)));
}

/* The slab: for B = 1 each hash is used as it is made; for a batch, a tile's 64 hash vectors are made once. */
#define QS_TRELLIS_INT8_NEON(NAME, ATTR, DOT)                                                                  \
    ATTR static void NAME(const int16_t *codes_row, const uint32_t *row_pairs, int64_t tiles, int k,            \
                          const int8_t *xq, const int32_t *xw, int64_t B, int64_t n, int32_t *acc) {           \
        (void)codes_row;                                                                                       \
        (void)xq;                                                                                              \
        const trellis_quarters_neon t = trellis_quarters_neon_for(k);                                          \
        for (int64_t j = 0; j < tiles; j++) {                                                                  \
            const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;                                          \
            if (B == 1) {                                                                                      \
                const int32_t *xj = xw + j * TRELLIS_TILE;                                                     \
                int32x4_t a[4];                                                                                \
                for (int q = 0; q < 4; q++) a[q] = vld1q_s32(acc + 4 * q);                                     \
                for (int c = 0; c < TRELLIS_TILE; c++)                                                         \
                    for (int q = 0; q < 4; q++) a[q] = DOT(a[q], trellis_hash_neon(pairs, c, k, &t, q), xj[c]); \
                for (int q = 0; q < 4; q++) vst1q_s32(acc + 4 * q, a[q]);                                      \
                continue;                                                                                      \
            }                                                                                                  \
            uint32x4_t h[TRELLIS_TILE][4];                                                                     \
            for (int c = 0; c < TRELLIS_TILE; c++)                                                             \
                for (int q = 0; q < 4; q++) h[c][q] = trellis_hash_neon(pairs, c, k, &t, q);                   \
            for (int64_t b = 0; b < B; b++) {                                                                  \
                const int32_t *xj = xw + b * n + j * TRELLIS_TILE;                                             \
                for (int q = 0; q < 4; q++) {                                                                  \
                    int32x4_t a = vld1q_s32(acc + 16 * b + 4 * q);                                             \
                    for (int c = 0; c < TRELLIS_TILE; c++) a = DOT(a, h[c][q], xj[c]);                         \
                    vst1q_s32(acc + 16 * b + 4 * q, a);                                                        \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }
QS_TRELLIS_INT8_NEON(trellis_int8_neon, , trellis_dot_neon)
QS_TRELLIS_INT8_NEON(trellis_int8_sdot, QS_DOTPROD, trellis_dot_sdot)
#endif

typedef void (*trellis_int8_fn)(const int16_t *, const uint32_t *, int64_t, int, const int8_t *, const int32_t *,
                                int64_t, int64_t, int32_t *);

/* How a level's int8 slab wants the activations (xw) and what its sums leave for the offset to take off. */
enum {
    TRELLIS_XW_BYTES = 0,  /* xq in all 4 bytes; the sums are bytesum·xq */
    TRELLIS_XW_INT16 = 1,  /* xq in both int16 halves; the sums are bytesum·xq */
    TRELLIS_XW_SBYTES = 2, /* xq in all 4 bytes; the sums are (bytesum − TRELLIS_SDOT_BIAS)·xq (signed-byte dot) */
};
#define TRELLIS_SDOT_BIAS 512 /* 4 bytes × 128: what making the hash's bytes signed takes off its byte sum */

/* The int8 slab of a level and how it wants the activations in xw (0: as 4 bytes, 1: as 2 int16). */
static trellis_int8_fn trellis_int8(int level, int *xw_form) {
    *xw_form = TRELLIS_XW_BYTES;
#if QS_X86
    if (level == QS_LEVEL_VNNI) return trellis_int8_vnni_level;
    *xw_form = TRELLIS_XW_INT16;
    if (level == QS_LEVEL_AVX512) return trellis_int8_avx512;
    if (level == QS_LEVEL_AVX2) return trellis_int8_avx2_level;
#elif QS_ARM
    if (level == QS_LEVEL_NEON_DOT) {
        *xw_form = TRELLIS_XW_SBYTES;
        return trellis_int8_sdot;
    }
    if (level == QS_LEVEL_NEON) return trellis_int8_neon;
#else
    (void)level;
#endif
    return trellis_slab_int8_scalar;
}

/* One activation row x [n] for the int8 slabs: xq = round(x / s) in [-127, 127] with s = max|x| / 127, xw
   its lanes in the level's form (TRELLIS_XW_*), offset = 510·Σ xq (the code's mean, taken off once per
   output; minus the signed-byte dot's 512·Σ xq for TRELLIS_XW_SBYTES); a NaN or ±Inf gives scale NaN (a
   row of NaN out). */
static void trellis_quantize_x(const float *x, int64_t n, int form, int8_t *xq, int32_t *xw, float *xscale,
                               int32_t *offset) {
    float amax = 0.0f;
    int finite = 1;
    for (int64_t c = 0; c < n; c++) {
        float a = fabsf(x[c]);
        if (!(a <= FLT_MAX)) finite = 0;
        else if (a > amax) amax = a;
    }
    float s = amax / 127.0f;
    *xscale = finite ? s : NAN;
    int32_t total = 0;
    for (int64_t c = 0; c < n; c++) {
        int q = (finite && s > 0.0f) ? (int)lrintf(x[c] / s) : 0;
        q = q > 127 ? 127 : (q < -127 ? -127 : q);
        xq[c] = (int8_t)q;
        total += q;
        uint32_t u = (uint32_t)(q & (form == TRELLIS_XW_INT16 ? 0xFFFF : 0xFF));
        xw[c] = (int32_t)(form == TRELLIS_XW_INT16 ? u * 0x00010001u : u * 0x01010101u);
    }
    *offset = (TRELLIS_1MAD_MEAN - (form == TRELLIS_XW_SBYTES ? TRELLIS_SDOT_BIAS : 0)) * total;
}

/* The int8 decode-matvec of one layer at one level: its slab kernel and pairs builder, and the activations
   (B rows of n: trellis_quantize_x's xq, xw, scale and offset). */
typedef struct {
    trellis_int8_fn slab;
    trellis_pairs_fn build_pairs;
    int form, reads_words; /* xw's form; a decoding step (B = 1) reads the words, not the pairs */
    int64_t tiles, B, n;
    int k;
    const int8_t *xq;
    const int32_t *xw;
    const float *xscale;
    const int32_t *offset;
} trellis_int8_op;

static trellis_int8_op trellis_int8_op_for(int level, int64_t tiles, int k, int64_t B, int64_t n) {
    trellis_int8_op op;
    memset(&op, 0, sizeof op);
    op.slab = trellis_int8(level, &op.form);
    op.build_pairs = trellis_slab_pairs_for(level);
    op.reads_words = is_avx512(level);
    op.tiles = tiles, op.k = k, op.B = B, op.n = n;
    return op;
}

/* The 16 rows of one slab (codes_row: its words): y[b·ystride + r] for every batch row b. acc: [B][16]
   int32 scratch; pairs: room for the slab's pairs (tiles·16k + 16). */
static void trellis_int8_rows(const trellis_int8_op *op, const int16_t *codes_row, int32_t *acc, uint32_t *pairs,
                              float *y, int64_t ystride) {
    memset(acc, 0, sizeof(int32_t) * (size_t)(op->B * TRELLIS_TILE));
    if (op->B > 1 || !op->reads_words) op->build_pairs(codes_row, op->tiles, op->k, pairs);
    op->slab(codes_row, pairs, op->tiles, op->k, op->xq, op->xw, op->B, op->n, acc);
    for (int64_t b = 0; b < op->B; b++)
        for (int r = 0; r < TRELLIS_TILE; r++)
            y[b * ystride + r] = (float)(acc[b * TRELLIS_TILE + r] - op->offset[b]) * op->xscale[b];
}

/*
 * y [B, m] = x [B, n] · Cᵀ as above with x quantized to int8 per row; a row with a NaN or ±Inf gives a
 * row of NaN. n <= TRELLIS_INT8_MAX_N.
 */
QS_API int qs_trellis_matmul_int8(const int16_t *codes, int64_t m, int64_t n, int k, const float *x, int64_t B,
                                  float *y, int nthreads, int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!codes || !x || !y || m <= 0 || n <= 0 || m % TRELLIS_TILE || n % TRELLIS_TILE || n > TRELLIS_INT8_MAX_N ||
        k < 2 || k > TRELLIS_MAX_K || B < 1 || nthreads < 1)
        return QS_EBADARG;
    const int64_t slabs = m / TRELLIS_TILE, tiles = n / TRELLIS_TILE, row_words = tiles * TRELLIS_TILE * k;
    trellis_int8_op op = trellis_int8_op_for(level, tiles, k, B, n);
    /* activations: int8 xq [B, n], the level's lanes xw [B, n], per row its scale and 510·Σ xq */
    char *buf = (char *)malloc((size_t)(B * n) * (sizeof(int8_t) + sizeof(int32_t)) + (size_t)B * 16);
    if (!buf) return QS_ENOMEM;
    int32_t *xw = (int32_t *)buf;
    float *xscale = (float *)(xw + B * n);
    int32_t *offset = (int32_t *)(xscale + B);
    int8_t *xq = (int8_t *)(offset + B);
    for (int64_t b = 0; b < B; b++)
        trellis_quantize_x(x + b * n, n, op.form, xq + b * n, xw + b * n, xscale + b, offset + b);
    op.xq = xq, op.xw = xw, op.xscale = xscale, op.offset = offset;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && slabs > 1)
    {
        int32_t *acc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B * TRELLIS_TILE) +
                                         sizeof(uint32_t) * (size_t)(row_words + TRELLIS_TILE));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < slabs; i++) {
            if (!acc) continue;
            trellis_int8_rows(&op, codes + i * row_words, acc, (uint32_t *)(acc + B * TRELLIS_TILE),
                              y + i * TRELLIS_TILE, m);
        }
        free(acc);
    }
    free(buf);
    return failed ? QS_ENOMEM : QS_OK;
}

/* The 16 rows of one slab in float32 (codes_row: its words): y[b·ystride + r] for every batch row b of x
   [B, n]. acc: scratch of B·16 + 256 floats then the slab's pairs (tiles·16k + 16). */
static void trellis_float_rows(trellis_slab_fn slab, trellis_pairs_fn build_pairs, const int16_t *codes_row,
                               int64_t tiles, int k, const float *x, int64_t B, int64_t n, float *acc, float *y,
                               int64_t ystride) {
    float *w = acc + B * TRELLIS_TILE;
    uint32_t *pairs = (uint32_t *)(w + TRELLIS_TILE * TRELLIS_TILE);
    memset(acc, 0, sizeof(float) * (size_t)(B * TRELLIS_TILE));
    build_pairs(codes_row, tiles, k, pairs);
    slab(pairs, tiles, k, x, B, n, acc, w);
    for (int64_t b = 0; b < B; b++) memcpy(y + b * ystride, acc + b * TRELLIS_TILE, sizeof(float) * TRELLIS_TILE);
}

/*
 * y [B, m] = x [B, n] · Cᵀ with C [m, n] the raw 1MAD codes of a trellis matrix (bits k per weight);
 * m, n multiples of 16. Threads split the 16-row slabs.
 */
QS_API int qs_trellis_matmul(const int16_t *codes, int64_t m, int64_t n, int k, const float *x, int64_t B, float *y,
                             int nthreads, int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!codes || !x || !y || m <= 0 || n <= 0 || m % TRELLIS_TILE || n % TRELLIS_TILE || k < 2 ||
        k > TRELLIS_MAX_K || B < 1 || nthreads < 1)
        return QS_EBADARG;
    const int64_t slabs = m / TRELLIS_TILE, tiles = n / TRELLIS_TILE, row_words = tiles * TRELLIS_TILE * k;
    trellis_slab_fn slab = trellis_slab(level);
    const trellis_pairs_fn build_pairs = trellis_slab_pairs_for(level);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && slabs > 1)
    {
        /* per thread: accumulators [B][16], one decoded tile, the pairs of a slab row */
        float *acc = (float *)malloc(sizeof(float) * (size_t)(B * TRELLIS_TILE + TRELLIS_TILE * TRELLIS_TILE) +
                                     sizeof(uint32_t) * (size_t)(row_words + TRELLIS_TILE));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < slabs; i++) {
            if (!acc) continue;
            trellis_float_rows(slab, build_pairs, codes + i * row_words, tiles, k, x, B, n, acc, y + i * TRELLIS_TILE, m);
        }
        free(acc);
    }
    return failed ? QS_ENOMEM : QS_OK;
}

/*
 * A whole trellis layer in one call (a decoding step, or a batch of up to TRELLIS_SLAB_MAX_BATCH rows in
 * quipsharp/kernels/native.py; larger batches decode the weight for torch's GEMM):
 *   out [B, m] = sv ⊙ (wscale · Vᵀ (C · U (su ⊙ x))) + bias
 * with C the raw 1MAD codes (qs_trellis_matmul[_int8]: int8 = 1 for int8 activations behind the transform)
 * and wscale the layer's scale times the code's; the rest as qs_linear, whose passes it shares (the same
 * bits as those passes called one by one). x is copied (not modified).
 */
QS_API int qs_trellis_linear(const float *x, int64_t B, int64_t n, int64_t m, const int16_t *codes, int k,
                             const float *su, const float *sv, float wscale, const float *bias, int use_hadamard,
                             int64_t k_in, const float *m_in, int64_t k_out, const float *m_out_t, int int8,
                             float *out, int nthreads, int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!linear_args_ok(x, out, su, sv, B, n, m, use_hadamard, k_in, m_in, k_out, m_out_t) || !codes ||
        n % TRELLIS_TILE || m % TRELLIS_TILE || k < 2 || k > TRELLIS_MAX_K || nthreads < 1)
        return QS_EBADARG;
    if (B == 0) return QS_OK;
    int64_t kmax = n > m ? n : m;
    int nt = linear_threads(B, kmax, nthreads);
    float *h = (float *)malloc(sizeof(float) * (size_t)(B * n + kmax * nt));
    if (!h) return QS_ENOMEM;
    linear_input(h, x, B, n, kmax, su, use_hadamard, k_in, m_in, nt, level);
    int rc = int8 ? qs_trellis_matmul_int8(codes, m, n, k, h, B, out, nthreads, level)
                  : qs_trellis_matmul(codes, m, n, k, h, B, out, nthreads, level);
    if (rc == QS_OK) linear_output(out, B, m, h, n, kmax, sv, wscale, bias, use_hadamard, k_out, m_out_t, nt, level);
    free(h);
    return rc;
}

/* Tile (i, j) of a decoded matrix (w [16c + r]) into out [m, n], or into its transpose [n, m]
   (transposed = 1: each tile column is 16 consecutive floats of a row, one copy). */
static void trellis_store_tile(const float *w, float *out, int64_t i, int64_t j, int64_t m, int64_t n,
                               int transposed) {
    if (transposed) {
        for (int c = 0; c < TRELLIS_TILE; c++)
            memcpy(out + (j * TRELLIS_TILE + c) * m + i * TRELLIS_TILE, w + TRELLIS_TILE * c,
                   sizeof(float) * TRELLIS_TILE);
        return;
    }
    for (int r = 0; r < TRELLIS_TILE; r++)
        for (int c = 0; c < TRELLIS_TILE; c++)
            out[(i * TRELLIS_TILE + r) * n + j * TRELLIS_TILE + c] = w[c * TRELLIS_TILE + r];
}

/* The raw 1MAD codes of a trellis matrix as float32: out [m, n] (transposed = 0), or its transpose
   [n, m] (transposed = 1: each tile column is 16 consecutive floats of a row, one vector store; the
   weights of a prefill GEMM). The tiles are decoded by the level's slab kernel with no batch rows
   (the matmul's decode, so every level writes the same values: integers, exact in float32). Threads
   split the 16-row slabs. */
QS_API int qs_trellis_decode(const int16_t *codes, int64_t m, int64_t n, int k, float *out, int nthreads, int level,
                             int transposed) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!codes || !out || m <= 0 || n <= 0 || m % TRELLIS_TILE || n % TRELLIS_TILE || k < 2 || k > TRELLIS_MAX_K ||
        nthreads < 1)
        return QS_EBADARG;
    const int64_t slabs = m / TRELLIS_TILE, tiles = n / TRELLIS_TILE, row_words = tiles * TRELLIS_TILE * k;
    trellis_slab_fn slab = trellis_slab(level);
    const trellis_pairs_fn build_pairs = trellis_slab_pairs_for(level);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && slabs > 1)
    {
        uint32_t *pairs = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(row_words + TRELLIS_TILE));
        if (!pairs) {
#pragma omp atomic write
            failed = 1;
        }
        float w[TRELLIS_TILE * TRELLIS_TILE], unused[TRELLIS_TILE] = {0}; /* the slab's accumulators, B = 0 */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < slabs; i++) {
            if (!pairs) continue;
            build_pairs(codes + i * row_words, tiles, k, pairs);
            for (int64_t j = 0; j < tiles; j++) {
                slab(pairs + j * TRELLIS_TILE * k, 1, k, unused, 0, n, unused, w); /* w [16c + r] */
                trellis_store_tile(w, out, i, j, m, n, transposed);
            }
        }
        free(pairs);
    }
    return failed ? QS_ENOMEM : QS_OK;
}

/* ------------------------------------------------------- trellis codes decoded tile by tile: HYB, 3INST */
/*
 * The trellis codes other than 1MAD run through one path: each level decodes a whole tile into 256 floats
 * (L1), then accumulates them as the 1MAD slabs do (FMA in column order, fmaf in the portable code), so
 * every level returns the same bits; activations stay float32. code selects the decoder:
 *
 * QTIP's hybrid code (V = 2; quipsharp.codebooks.trellis, "hyb"): step t of a tile (t = 0..127) is the
 * 16-bit window s at bit t·2k of the tile's cyclic stream, and decodes to the tile's weights p = 2t and
 * 2t + 1 (column-major, as the 1MAD layout: row p mod 16, column p / 16) from the matrix's table
 * lut [512][2] float32: with h = s·(s + 1) mod 2^16, the entry is bits 6..14 of h, and bit 15 negates
 * its first value. The table is 4 KiB: L1-resident while a slab is decoded.
 *
 * The decoded values are the table's (the sign bit flipped: exact). x86 levels decode 16 (AVX-512) or 8
 * (AVX2) steps per vector and fetch each step's two values as one 64-bit gather lane.
 *
 * QTIP's 3INST code (QS_TRELLIS_3INST, V = 1, the 1MAD layout: weight p = 16c + r is the state at bit
 * p·k): x = 89226354·s + 64248484 (mod 2^32), r = (x & 0x8FFF8FFF) ^ 0x3B603B60, and the raw code is the
 * sum of r's two float16 halves in float32. Those halves are always normal numbers (biased exponents
 * 12..15), so each converts by shifting its bits into a float32 and rebasing the exponent: exact, with no
 * F16C. The caller scales the raw code to unit variance (as it does 1MAD's integers).
 *
 * NEON decodes both codes in portable C and accumulates with NEON.
 */
#define QS_TRELLIS_HYB 1
#define QS_TRELLIS_3INST 2
#define TRELLIS_3INST_A 89226354u
#define TRELLIS_3INST_C 64248484u
#define TRELLIS_3INST_MASK 0x8FFF8FFFu
#define TRELLIS_3INST_FLIP 0x3B603B60u
#define TRELLIS_HALF_MAGNITUDE 0x0FFFE000u /* a float16's exponent and mantissa, moved up 13 bits */
#define TRELLIS_HALF_REBASE ((127u - 15u) << 23) /* float16 exponent bias -> float32's */
#define TRELLIS_HYB_STEPS 128  /* steps of a 256-weight tile, two weights each */
#define TRELLIS_HYB_SHIFT 6    /* the entry: bits 6..14 of the hash (Q = 9) */
#define TRELLIS_HYB_ENTRY 511
#define TRELLIS_HYB_NEGATE 0x8000u

typedef void (*trellis_tile_fn)(const uint32_t *pairs, int k, const float *lut, float *w);
typedef void (*trellis_accumulate_fn)(const float *w, const float *x, int64_t B, int64_t n, float *acc);

static void trellis_hyb_tile_scalar(const uint32_t *pairs, int k, const float *lut, float *w) {
    const int kv = 2 * k;
    for (int t = 0; t < TRELLIS_HYB_STEPS; t++) {
        const int bit = t * kv;
        const uint32_t s = trellis_window(pairs, bit);
        const uint32_t h = (s * (s + 1u)) & 0xFFFFu;
        const float *e = lut + 2 * ((h >> TRELLIS_HYB_SHIFT) & TRELLIS_HYB_ENTRY);
        w[2 * t] = (h & TRELLIS_HYB_NEGATE) ? -e[0] : e[0];
        w[2 * t + 1] = e[1];
    }
}

/* A normal float16's bits (the low 16 of h) as a float32. */
static inline float trellis_half(uint32_t h) {
    uint32_t f = (((h & 0x7FFFu) << 13) + TRELLIS_HALF_REBASE) | ((h & 0x8000u) << 16);
    float v;
    memcpy(&v, &f, sizeof v);
    return v;
}

static void trellis_3inst_tile_scalar(const uint32_t *pairs, int k, const float *lut, float *w) {
    (void)lut;
    for (int p = 0; p < TRELLIS_TILE * TRELLIS_TILE; p++) {
        const int bit = p * k;
        const uint32_t s = trellis_window(pairs, bit);
        const uint32_t r = ((s * TRELLIS_3INST_A + TRELLIS_3INST_C) & TRELLIS_3INST_MASK) ^ TRELLIS_3INST_FLIP;
        w[p] = trellis_half(r >> 16) + trellis_half(r & 0xFFFFu);
    }
}

#if QS_X86
/*
 * x86 decoders. A vector of lanes reads window j at bit j·step (step = 2k: a HYB step; k: a 3INST weight)
 * from pair (j·step) >> 4 of the vector's first pair, shifted right by 16 - ((j·step) & 15). The lane
 * tables are built from a constant (tables stored per call would stall the vector load on store forwarding).
 * A HYB vector of 16 (8) steps is two (one) columns; a 3INST column is one AVX-512 vector or two AVX2 halves.
 */
typedef struct {
    __m512i idx, shift;
} trellis_lanes512;

__attribute__((target("avx512f"))) static inline trellis_lanes512 tile_lanes_avx512(int step) {
    const __m512i bits = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(step));
    trellis_lanes512 t = {_mm512_srli_epi32(bits, 4),
                          _mm512_sub_epi32(_mm512_set1_epi32(16), _mm512_and_si512(bits, _mm512_set1_epi32(15)))};
    return t;
}

__attribute__((target("avx512f"))) static inline __m512i trellis_windows_avx512(const uint32_t *pairs,
                                                                                trellis_lanes512 t) {
    __m512i v = _mm512_permutexvar_epi32(t.idx, _mm512_loadu_si512((const void *)pairs));
    return _mm512_and_si512(_mm512_srlv_epi32(v, t.shift), _mm512_set1_epi32(0xFFFF));
}

/* HYB: the 16 steps from pairs (2 columns) as two vectors of 16 values. */
__attribute__((target("avx512f"))) static inline void trellis_hyb_columns_avx512(const uint32_t *pairs,
                                                                                 trellis_lanes512 t, const float *lut,
                                                                                 __m512 *c0, __m512 *c1) {
    const __m512i s = trellis_windows_avx512(pairs, t);
    const __m512i h = _mm512_and_si512(_mm512_mullo_epi32(s, _mm512_add_epi32(s, _mm512_set1_epi32(1))),
                                       _mm512_set1_epi32(0xFFFF));
    const __m512i e = _mm512_and_si512(_mm512_srli_epi32(h, TRELLIS_HYB_SHIFT), _mm512_set1_epi32(TRELLIS_HYB_ENTRY));
    /* bit 31: the first value's sign, xored into the low half of each gathered 64-bit pair */
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(h, _mm512_set1_epi32((int)TRELLIS_HYB_NEGATE)), 16);
    __m512i lo = _mm512_i32gather_epi64(_mm512_castsi512_si256(e), (const void *)lut, 8);
    __m512i hi = _mm512_i32gather_epi64(_mm512_extracti64x4_epi64(e, 1), (const void *)lut, 8);
    *c0 = _mm512_castsi512_ps(_mm512_xor_si512(lo, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(sign))));
    *c1 = _mm512_castsi512_ps(_mm512_xor_si512(hi, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(sign, 1))));
}

/* 3INST: the raw values of windows s (the sum of r's float16 halves, each rebuilt as a float32). */
__attribute__((target("avx512f"))) static inline __m512 trellis_3inst_avx512(__m512i s) {
    const __m512i r = _mm512_xor_si512(
        _mm512_and_si512(_mm512_add_epi32(_mm512_mullo_epi32(s, _mm512_set1_epi32((int)TRELLIS_3INST_A)),
                                          _mm512_set1_epi32((int)TRELLIS_3INST_C)),
                         _mm512_set1_epi32((int)TRELLIS_3INST_MASK)),
        _mm512_set1_epi32((int)TRELLIS_3INST_FLIP));
    const __m512i magnitude = _mm512_set1_epi32((int)TRELLIS_HALF_MAGNITUDE);
    const __m512i rebase = _mm512_set1_epi32((int)TRELLIS_HALF_REBASE), sign = _mm512_set1_epi32((int)0x80000000u);
    __m512i hi = _mm512_or_si512(_mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(r, 3), magnitude), rebase),
                                 _mm512_and_si512(r, sign));
    __m512i lo = _mm512_or_si512(_mm512_add_epi32(_mm512_and_si512(_mm512_slli_epi32(r, 13), magnitude), rebase),
                                 _mm512_and_si512(_mm512_slli_epi32(r, 16), sign));
    return _mm512_add_ps(_mm512_castsi512_ps(hi), _mm512_castsi512_ps(lo));
}

typedef struct {
    __m256i idx, shift;
} trellis_lanes256;

/* AVX2 lanes j = first .. first + 7, relative to pair (first·step) >> 4. */
__attribute__((target("avx2"))) static inline trellis_lanes256 tile_lanes_avx2(int step, int first) {
    const __m256i bits = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0),
                                                             _mm256_set1_epi32(first)),
                                            _mm256_set1_epi32(step));
    trellis_lanes256 t = {_mm256_sub_epi32(_mm256_srli_epi32(bits, 4), _mm256_set1_epi32((first * step) >> 4)),
                          _mm256_sub_epi32(_mm256_set1_epi32(16), _mm256_and_si256(bits, _mm256_set1_epi32(15)))};
    return t;
}

__attribute__((target("avx2"))) static inline __m256i trellis_windows_avx2(const uint32_t *pairs, trellis_lanes256 t) {
    __m256i v = _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i *)pairs), t.idx);
    return _mm256_and_si256(_mm256_srlv_epi32(v, t.shift), _mm256_set1_epi32(0xFFFF));
}

/* HYB: the 8 steps from pairs (one column) as its two halves of 8 values. */
__attribute__((target("avx2"))) static inline void trellis_hyb_column_avx2(const uint32_t *pairs, trellis_lanes256 t,
                                                                          const float *lut, __m256 *h0, __m256 *h1) {
    const long long *table = (const long long *)(const void *)lut;
    const __m256i s = trellis_windows_avx2(pairs, t);
    const __m256i h = _mm256_and_si256(_mm256_mullo_epi32(s, _mm256_add_epi32(s, _mm256_set1_epi32(1))),
                                       _mm256_set1_epi32(0xFFFF));
    const __m256i e = _mm256_and_si256(_mm256_srli_epi32(h, TRELLIS_HYB_SHIFT), _mm256_set1_epi32(TRELLIS_HYB_ENTRY));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(h, _mm256_set1_epi32((int)TRELLIS_HYB_NEGATE)), 16);
    __m256i lo = _mm256_i32gather_epi64(table, _mm256_castsi256_si128(e), 8);
    __m256i hi = _mm256_i32gather_epi64(table, _mm256_extracti128_si256(e, 1), 8);
    *h0 = _mm256_castsi256_ps(_mm256_xor_si256(lo, _mm256_cvtepu32_epi64(_mm256_castsi256_si128(sign))));
    *h1 = _mm256_castsi256_ps(_mm256_xor_si256(hi, _mm256_cvtepu32_epi64(_mm256_extracti128_si256(sign, 1))));
}

__attribute__((target("avx2"))) static inline __m256 trellis_3inst_avx2(__m256i s) {
    const __m256i r = _mm256_xor_si256(
        _mm256_and_si256(_mm256_add_epi32(_mm256_mullo_epi32(s, _mm256_set1_epi32((int)TRELLIS_3INST_A)),
                                          _mm256_set1_epi32((int)TRELLIS_3INST_C)),
                         _mm256_set1_epi32((int)TRELLIS_3INST_MASK)),
        _mm256_set1_epi32((int)TRELLIS_3INST_FLIP));
    const __m256i magnitude = _mm256_set1_epi32((int)TRELLIS_HALF_MAGNITUDE);
    const __m256i rebase = _mm256_set1_epi32((int)TRELLIS_HALF_REBASE), sign = _mm256_set1_epi32((int)0x80000000u);
    __m256i hi = _mm256_or_si256(_mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(r, 3), magnitude), rebase),
                                 _mm256_and_si256(r, sign));
    __m256i lo = _mm256_or_si256(_mm256_add_epi32(_mm256_and_si256(_mm256_slli_epi32(r, 13), magnitude), rebase),
                                 _mm256_and_si256(_mm256_slli_epi32(r, 16), sign));
    return _mm256_add_ps(_mm256_castsi256_ps(hi), _mm256_castsi256_ps(lo));
}

/* Tile decoders (w [16c + r]). */
__attribute__((target("avx512f"))) static void trellis_hyb_tile_avx512(const uint32_t *pairs, int k, const float *lut,
                                                                       float *w) {
    const trellis_lanes512 t = tile_lanes_avx512(2 * k);
    for (int i = 0; i < TRELLIS_HYB_STEPS / 16; i++) {
        __m512 c0, c1;
        trellis_hyb_columns_avx512(pairs + i * 2 * k, t, lut, &c0, &c1);
        _mm512_storeu_ps(w + 32 * i, c0);
        _mm512_storeu_ps(w + 32 * i + 16, c1);
    }
}

__attribute__((target("avx512f"))) static void trellis_3inst_tile_avx512(const uint32_t *pairs, int k, const float *lut,
                                                                         float *w) {
    (void)lut;
    const trellis_lanes512 t = tile_lanes_avx512(k);
    for (int c = 0; c < TRELLIS_TILE; c++)
        _mm512_storeu_ps(w + TRELLIS_TILE * c, trellis_3inst_avx512(trellis_windows_avx512(pairs + c * k, t)));
}

__attribute__((target("avx2"))) static void trellis_hyb_tile_avx2(const uint32_t *pairs, int k, const float *lut,
                                                                  float *w) {
    const trellis_lanes256 t = tile_lanes_avx2(2 * k, 0);
    for (int c = 0; c < TRELLIS_TILE; c++) {
        __m256 h0, h1;
        trellis_hyb_column_avx2(pairs + c * k, t, lut, &h0, &h1);
        _mm256_storeu_ps(w + TRELLIS_TILE * c, h0);
        _mm256_storeu_ps(w + TRELLIS_TILE * c + 8, h1);
    }
}

__attribute__((target("avx2"))) static void trellis_3inst_tile_avx2(const uint32_t *pairs, int k, const float *lut,
                                                                   float *w) {
    (void)lut;
    const trellis_lanes256 t0 = tile_lanes_avx2(k, 0), t1 = tile_lanes_avx2(k, 8);
    const int off1 = (8 * k) >> 4;
    for (int c = 0; c < TRELLIS_TILE; c++) {
        _mm256_storeu_ps(w + TRELLIS_TILE * c, trellis_3inst_avx2(trellis_windows_avx2(pairs + c * k, t0)));
        _mm256_storeu_ps(w + TRELLIS_TILE * c + 8, trellis_3inst_avx2(trellis_windows_avx2(pairs + c * k + off1, t1)));
    }
}

/* acc [B][16] += tile x x[b, :16], FMA in column order (as trellis_accumulate_scalar). */
__attribute__((target("avx512f"))) static void trellis_accumulate_avx512(const float *w, const float *x, int64_t B,
                                                                         int64_t n, float *acc) {
    for (int64_t b = 0; b < B; b++) {
        __m512 a = _mm512_loadu_ps(acc + TRELLIS_TILE * b);
        for (int c = 0; c < TRELLIS_TILE; c++)
            a = _mm512_fmadd_ps(_mm512_loadu_ps(w + TRELLIS_TILE * c), _mm512_set1_ps(x[b * n + c]), a);
        _mm512_storeu_ps(acc + TRELLIS_TILE * b, a);
    }
}

__attribute__((target("avx2,fma"))) static void trellis_accumulate_avx2(const float *w, const float *x, int64_t B,
                                                                       int64_t n, float *acc) {
    for (int64_t b = 0; b < B; b++) {
        __m256 a0 = _mm256_loadu_ps(acc + TRELLIS_TILE * b), a1 = _mm256_loadu_ps(acc + TRELLIS_TILE * b + 8);
        for (int c = 0; c < TRELLIS_TILE; c++) {
            __m256 xv = _mm256_set1_ps(x[b * n + c]);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + TRELLIS_TILE * c), xv, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + TRELLIS_TILE * c + 8), xv, a1);
        }
        _mm256_storeu_ps(acc + TRELLIS_TILE * b, a0);
        _mm256_storeu_ps(acc + TRELLIS_TILE * b + 8, a1);
    }
}
#endif

#if QS_ARM
static void trellis_accumulate_neon(const float *w, const float *x, int64_t B, int64_t n, float *acc) {
    for (int64_t b = 0; b < B; b++)
        for (int q = 0; q < 4; q++) {
            float32x4_t a = vld1q_f32(acc + TRELLIS_TILE * b + 4 * q);
            for (int c = 0; c < TRELLIS_TILE; c++) a = vfmaq_n_f32(a, vld1q_f32(w + TRELLIS_TILE * c + 4 * q), x[b * n + c]);
            vst1q_f32(acc + TRELLIS_TILE * b + 4 * q, a);
        }
}
#endif

/* The tile decoder of a code (QS_TRELLIS_HYB or QS_TRELLIS_3INST) at a level. */
static trellis_tile_fn trellis_tile(int level, int code) {
    const int hyb = code == QS_TRELLIS_HYB;
#if QS_X86
    if (level == QS_LEVEL_VNNI || level == QS_LEVEL_AVX512) return hyb ? trellis_hyb_tile_avx512 : trellis_3inst_tile_avx512;
    if (level == QS_LEVEL_AVX2) return hyb ? trellis_hyb_tile_avx2 : trellis_3inst_tile_avx2;
#else
    (void)level;
#endif
    return hyb ? trellis_hyb_tile_scalar : trellis_3inst_tile_scalar;
}

#if QS_X86
/*
 * A decoding step (B = 1) on the x86 levels: each column's 16 values go from the decoder straight into the
 * 16 row accumulators (no tile written and read back), FMA in column order: the bits of decoding the tile
 * and accumulating it. acc [16] in and out.
 */
typedef void (*trellis_tile_step_fn)(const uint32_t *row_pairs, int64_t tiles, int k, const float *lut,
                                     const float *x, float *acc);

__attribute__((target("avx512f"))) static void trellis_hyb_step_avx512(const uint32_t *row_pairs, int64_t tiles,
                                                                       int k, const float *lut, const float *x,
                                                                       float *acc) {
    const trellis_lanes512 t = tile_lanes_avx512(2 * k);
    __m512 a = _mm512_loadu_ps(acc);
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        const float *xj = x + j * TRELLIS_TILE;
        for (int i = 0; i < TRELLIS_HYB_STEPS / 16; i++) { /* columns 2i and 2i + 1 */
            __m512 c0, c1;
            trellis_hyb_columns_avx512(pairs + i * 2 * k, t, lut, &c0, &c1);
            a = _mm512_fmadd_ps(c0, _mm512_set1_ps(xj[2 * i]), a);
            a = _mm512_fmadd_ps(c1, _mm512_set1_ps(xj[2 * i + 1]), a);
        }
    }
    _mm512_storeu_ps(acc, a);
}

__attribute__((target("avx512f"))) static void trellis_3inst_step_avx512(const uint32_t *row_pairs, int64_t tiles,
                                                                         int k, const float *lut, const float *x,
                                                                         float *acc) {
    (void)lut;
    const trellis_lanes512 t = tile_lanes_avx512(k);
    __m512 a = _mm512_loadu_ps(acc);
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        const float *xj = x + j * TRELLIS_TILE;
        for (int c = 0; c < TRELLIS_TILE; c++)
            a = _mm512_fmadd_ps(trellis_3inst_avx512(trellis_windows_avx512(pairs + c * k, t)), _mm512_set1_ps(xj[c]), a);
    }
    _mm512_storeu_ps(acc, a);
}

__attribute__((target("avx2,fma"))) static void trellis_hyb_step_avx2(const uint32_t *row_pairs, int64_t tiles, int k,
                                                                     const float *lut, const float *x, float *acc) {
    const trellis_lanes256 t = tile_lanes_avx2(2 * k, 0);
    __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        const float *xj = x + j * TRELLIS_TILE;
        for (int c = 0; c < TRELLIS_TILE; c++) {
            __m256 h0, h1;
            trellis_hyb_column_avx2(pairs + c * k, t, lut, &h0, &h1);
            const __m256 xv = _mm256_set1_ps(xj[c]);
            a0 = _mm256_fmadd_ps(h0, xv, a0);
            a1 = _mm256_fmadd_ps(h1, xv, a1);
        }
    }
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
}

__attribute__((target("avx2,fma"))) static void trellis_3inst_step_avx2(const uint32_t *row_pairs, int64_t tiles,
                                                                       int k, const float *lut, const float *x,
                                                                       float *acc) {
    (void)lut;
    const trellis_lanes256 t0 = tile_lanes_avx2(k, 0), t1 = tile_lanes_avx2(k, 8);
    const int off1 = (8 * k) >> 4;
    __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
    for (int64_t j = 0; j < tiles; j++) {
        const uint32_t *pairs = row_pairs + j * TRELLIS_TILE * k;
        const float *xj = x + j * TRELLIS_TILE;
        for (int c = 0; c < TRELLIS_TILE; c++) {
            const __m256 xv = _mm256_set1_ps(xj[c]);
            a0 = _mm256_fmadd_ps(trellis_3inst_avx2(trellis_windows_avx2(pairs + c * k, t0)), xv, a0);
            a1 = _mm256_fmadd_ps(trellis_3inst_avx2(trellis_windows_avx2(pairs + c * k + off1, t1)), xv, a1);
        }
    }
    _mm256_storeu_ps(acc, a0);
    _mm256_storeu_ps(acc + 8, a1);
}
#endif

static trellis_accumulate_fn trellis_accumulate(int level) {
#if QS_X86
    if (level == QS_LEVEL_VNNI || level == QS_LEVEL_AVX512) return trellis_accumulate_avx512;
    if (level == QS_LEVEL_AVX2) return trellis_accumulate_avx2;
#endif
#if QS_ARM
    if (level == QS_LEVEL_NEON || level == QS_LEVEL_NEON_DOT) return trellis_accumulate_neon;
#endif
    return trellis_accumulate_scalar;
}

/* A tile-decoded layer's slab operation at one level: its tile decoder, accumulation and pairs builder. */
typedef struct {
    trellis_tile_fn tile;
    trellis_accumulate_fn accumulate;
    trellis_pairs_fn build_pairs;
    int64_t n, tiles;
    int k;
    const float *lut;
#if QS_X86
    trellis_tile_step_fn step; /* B = 1 on the x86 levels (NULL: decode and accumulate) */
#endif
} trellis_tile_op;

static trellis_tile_op trellis_tile_op_for(int level, int code, int64_t n, int k, const float *lut) {
    trellis_tile_op op = {trellis_tile(level, code), trellis_accumulate(level), trellis_slab_pairs_for(level), n,
                          n / TRELLIS_TILE, k, lut
#if QS_X86
                          , NULL
#endif
    };
#if QS_X86
    const int hyb = code == QS_TRELLIS_HYB;
    if (level == QS_LEVEL_VNNI || level == QS_LEVEL_AVX512) op.step = hyb ? trellis_hyb_step_avx512 : trellis_3inst_step_avx512;
    if (level == QS_LEVEL_AVX2) op.step = hyb ? trellis_hyb_step_avx2 : trellis_3inst_step_avx2;
#endif
    return op;
}

/* The 16 rows of one slab (codes_row: its words): y[b·ystride + r] for every batch row b of x [B, n].
   scratch: B·16 + 256 floats, then the slab's pairs (tiles·16k + 16). */
static void trellis_tile_rows(const trellis_tile_op *op, const int16_t *codes_row, const float *x, int64_t B,
                             float *scratch, float *y, int64_t ystride) {
    float *acc = scratch, *w = scratch + B * TRELLIS_TILE;
    uint32_t *pairs = (uint32_t *)(w + TRELLIS_TILE * TRELLIS_TILE);
    const int64_t tile_words = TRELLIS_TILE * op->k;
    memset(acc, 0, sizeof(float) * (size_t)(B * TRELLIS_TILE));
    op->build_pairs(codes_row, op->tiles, op->k, pairs);
#if QS_X86
    if (B == 1 && op->step) {
        op->step(pairs, op->tiles, op->k, op->lut, x, acc);
        memcpy(y, acc, sizeof(float) * TRELLIS_TILE);
        return;
    }
#endif
    for (int64_t j = 0; j < op->tiles; j++) {
        op->tile(pairs + j * tile_words, op->k, op->lut, w);
        op->accumulate(w, x + j * TRELLIS_TILE, B, op->n, acc);
    }
    for (int64_t b = 0; b < B; b++) memcpy(y + b * ystride, acc + b * TRELLIS_TILE, sizeof(float) * TRELLIS_TILE);
}

static int trellis_tile_args_ok(const int16_t *codes, int64_t m, int64_t n, int k, int code, const float *lut,
                                int nthreads) {
    return codes && (code == QS_TRELLIS_3INST || (code == QS_TRELLIS_HYB && lut)) && m > 0 && n > 0 && m % TRELLIS_TILE == 0 && n % TRELLIS_TILE == 0 && k >= 2 &&
           k <= TRELLIS_MAX_K && nthreads >= 1;
}

/*
 * y [B, m] = x [B, n] · Cᵀ with C [m, n] the code of a trellis matrix (bits k per weight; code
 * QS_TRELLIS_HYB with its table lut [512][2], or QS_TRELLIS_3INST's raw values, lut unused); m, n
 * multiples of 16. Threads split the 16-row slabs.
 */
QS_API int qs_trellis_tile_matmul(const int16_t *codes, int64_t m, int64_t n, int k, int code, const float *lut,
                                  const float *x, int64_t B, float *y, int nthreads, int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!trellis_tile_args_ok(codes, m, n, k, code, lut, nthreads) || !x || !y || B < 1) return QS_EBADARG;
    const int64_t slabs = m / TRELLIS_TILE, row_words = n * k;
    const trellis_tile_op op = trellis_tile_op_for(level, code, n, k, lut);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && slabs > 1)
    {
        /* per thread: accumulators [B][16], one decoded tile, the pairs of a slab row (+16 for the last load) */
        float *acc = (float *)malloc(sizeof(float) * (size_t)(B * TRELLIS_TILE + TRELLIS_TILE * TRELLIS_TILE) +
                                     sizeof(uint32_t) * (size_t)(row_words + TRELLIS_TILE));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < slabs; i++) {
            if (!acc) continue;
            trellis_tile_rows(&op, codes + i * row_words, x, B, acc, y + i * TRELLIS_TILE, m);
        }
        free(acc);
    }
    return failed ? QS_ENOMEM : QS_OK;
}

/* A whole tile-decoded trellis layer in one call: qs_trellis_linear's formula with C the code (float32
   activations at every batch size; wscale: the layer's scale, times the code's for 3INST's raw values). */
QS_API int qs_trellis_tile_linear(const float *x, int64_t B, int64_t n, int64_t m, const int16_t *codes, int k,
                                  int code, const float *lut, const float *su, const float *sv, float wscale,
                                  const float *bias, int use_hadamard, int64_t k_in, const float *m_in, int64_t k_out,
                                  const float *m_out_t, float *out, int nthreads, int level) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!linear_args_ok(x, out, su, sv, B, n, m, use_hadamard, k_in, m_in, k_out, m_out_t) ||
        !trellis_tile_args_ok(codes, m, n, k, code, lut, nthreads))
        return QS_EBADARG;
    if (B == 0) return QS_OK;
    int64_t kmax = n > m ? n : m;
    int nt = linear_threads(B, kmax, nthreads);
    float *h = (float *)malloc(sizeof(float) * (size_t)(B * n + kmax * nt));
    if (!h) return QS_ENOMEM;
    linear_input(h, x, B, n, kmax, su, use_hadamard, k_in, m_in, nt, level);
    int rc = qs_trellis_tile_matmul(codes, m, n, k, code, lut, h, B, out, nthreads, level);
    if (rc == QS_OK) linear_output(out, B, m, h, n, kmax, sv, wscale, bias, use_hadamard, k_out, m_out_t, nt, level);
    free(h);
    return rc;
}

/* The code of a trellis matrix as float32 (HYB: the table's values; 3INST: its raw values; exact on every
   level): out [m, n] (transposed = 0) or its transpose [n, m] (transposed = 1). Threads split the 16-row slabs. */
QS_API int qs_trellis_tile_decode(const int16_t *codes, int64_t m, int64_t n, int k, int code, const float *lut,
                                  float *out, int nthreads, int level, int transposed) {
    if (!level_ok(level)) return QS_EBADLEVEL;
    if (!trellis_tile_args_ok(codes, m, n, k, code, lut, nthreads) || !out) return QS_EBADARG;
    const int64_t slabs = m / TRELLIS_TILE, tiles = n / TRELLIS_TILE, tile_words = TRELLIS_TILE * k;
    const int64_t row_words = tiles * tile_words;
    const trellis_tile_fn tile = trellis_tile(level, code);
    const trellis_pairs_fn build_pairs = trellis_slab_pairs_for(level);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && slabs > 1)
    {
        uint32_t *pairs = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)(row_words + TRELLIS_TILE));
        if (!pairs) {
#pragma omp atomic write
            failed = 1;
        }
        float w[TRELLIS_TILE * TRELLIS_TILE];
#pragma omp for schedule(static)
        for (int64_t i = 0; i < slabs; i++) {
            if (!pairs) continue;
            build_pairs(codes + i * row_words, tiles, k, pairs);
            for (int64_t j = 0; j < tiles; j++) {
                tile(pairs + j * tile_words, k, lut, w); /* w [16c + r] */
                trellis_store_tile(w, out, i, j, m, n, transposed);
            }
        }
        free(pairs);
    }
    return failed ? QS_ENOMEM : QS_OK;
}

/* ------------------------------------------------------- one decoding step of a whole model */
/*
 * The lean loop's single-token step (quipsharp/fastdecode.py, LeanDecoder._blocks with T = 1) as one
 * native call per token: every block's norms, linears (quantized: the fused transform-decode-matmul
 * of qs_linear or of qs_trellis_linear; or dense float32), RoPE, KV-cache write, attention and MLP, in one OpenMP parallel
 * region. Per token the Python loop paid ~7 µs per linear call and ~10 µs per small tensor op, and a
 * 576-wide matrix stayed on one thread (a parallel region per call costs more than it saves); here
 * the threads stay in one region and meet at a barrier between phases, and the q/k/v (gate/up) rows
 * of a block are split over the threads as one list.
 *
 * The model is described once (qs_step_model, built by quipsharp/kernels/native.py) and read-only
 * here; the caller's x [hidden] holds the token's embedding on entry and the last block's output on
 * exit; the KV caches are written at position pos. Numerics: the same formulas as the Python loop
 * in float32 (sums of squares and softmax denominators in double), equal to it up to rounding.
 */
enum { QS_ACT_SILU = 0, QS_ACT_GELU = 1, QS_ACT_GELU_TANH = 2 };
#define STEP_MAX_PARTS 3 /* linears sharing one input: q, k, v */

typedef struct {
    int64_t n, m;                /* in and out features */
    const uint8_t *codes;        /* quantized: [m, n/8 * CB] (trellis: int16 [m/16, (n/16)·16k]); NULL: dense */
    const qs_codebook *t;
    const float *su, *sv;        /* [n], [m] */
    float wscale;
    int64_t use_hadamard, k_in, k_out;
    const float *m_in, *m_out_t; /* K x K factors (NULL when K = 1) */
    const float *weight;         /* dense: [m, n] float32 row-major */
    const float *bias;           /* [m] or NULL */
    int64_t level;               /* this layer's kernel level (the selector's choice) */
    int64_t trellis_k;           /* 2..4: codes are a trellis matrix's int16 words (t unused); 0: not */
    int64_t trellis_int8;        /* a trellis layer's int8 activations (as qs_trellis_linear's int8) */
    int64_t trellis_code;        /* 0: 1MAD (qs_trellis_linear); QS_TRELLIS_HYB or _3INST (qs_trellis_tile_linear) */
    const float *trellis_lut;    /* a HYB layer's table [512][2] */
} qs_step_linear;

typedef struct {
    qs_step_linear qkv[STEP_MAX_PARTS]; /* [q | k | v] as one fused linear (n_qkv = 1) or three */
    int64_t n_qkv;
    qs_step_linear o;
    qs_step_linear gate_up[2]; /* [gate | up] fused (n_gate_up = 1) or two */
    int64_t n_gate_up;
    qs_step_linear down;
    const float *attn_norm, *mlp_norm;                   /* [hidden] */
    const float *attn_out_norm, *mlp_out_norm;           /* [hidden] or NULL (Gemma-2/3 post-norms) */
    const float *q_norm, *k_norm;                        /* [head_dim] or NULL (Qwen3, Gemma-3) */
    int64_t window;                                      /* sliding window, 0: none */
    int64_t rope;                                        /* index of its RoPE table */
    float *k_cache, *v_cache;                            /* [kv_heads, max_len, head_dim] */
} qs_step_block;

typedef struct {
    int64_t n_blocks, hidden, heads, kv_heads, head_dim, inter, max_len, act, level;
    float eps, scale, attn_softcap; /* softcap 0: none */
    const qs_step_block *blocks;
    int64_t n_ropes;
    /* per RoPE table r: rot(v) = v · cos[pos] + v[perm] · ssin[pos], each [max_len, head_dim]; the
       long tables (LongRoPE, may be NULL) replace them when pos + 1 > rope_switch[r] */
    const float *const *cos, *const *ssin, *const *long_cos, *const *long_ssin;
    const int64_t *rope_switch;
    const int64_t *const *perm; /* [head_dim] */
    /* the int8 LM head (optional): logits = head_scale ⊙ (head · q8(U rms(x))) with U = M ⊗ H_P / sqrt(P),
       head the int8 rows of the U-rotated weights (W Uᵀ), q8 the int8 quantization of one vector */
    const float *final_norm;  /* [hidden] */
    const int8_t *head;       /* [vocab, hidden]; NULL: no head */
    const float *head_scale;  /* [vocab] */
    int64_t vocab, head_k;
    const float *head_m;      /* [head_k, head_k] (NULL when head_k = 1) */
} qs_step_model;

/* One linear of a phase: its input, output, optional residual (added last) and int8 operands. */
typedef struct {
    const qs_step_linear *L;
    const float *in;
    float *out;
    const float *resid;
    float *h;       /* [n] the transformed input */
    int8_t *xq;     /* [n] */
    int16_t *xbs;   /* [n / 8] */
    float xscale;
    int32_t xsum;
    int int8;       /* the int8 path (else float32 activations) */
    mm_args a;
    mm_rows_fn fn;
    int64_t tasks; /* row tasks of ROWS_PER_TASK rows */
    /* a trellis layer: its int8 operation (xw [n] the activations' lanes, offset 510·Σ xq), or its float
       slab and pairs builder */
    int32_t *xw;
    int32_t offset;
    trellis_int8_op top;
    trellis_slab_fn tslab;
    trellis_pairs_fn tpairs;
    trellis_tile_op tile_op; /* a tile-decoded trellis layer's slab operation (HYB, 3INST) */
} step_part;

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[j + l] * b[j + l];
    for (; j < n; j++) acc[0] += a[j] * b[j];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* out [n] = x · rsqrt(mean(x²) + eps) · w  (out may be x) */
static void step_rms(const float *x, const float *w, int64_t n, float eps, float *out) {
    double ss = 0.0;
    for (int64_t j = 0; j < n; j++) ss += (double)x[j] * x[j];
    float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t j = 0; j < n; j++) out[j] = (x[j] * r) * w[j];
}

/* A part's input pass (one thread): the transform U (su ⊙ x), int8 quantization, the row kernel. */
static void step_prepare(step_part *p, float *tmp) {
    const qs_step_linear *L = p->L;
    p->tasks = (L->m + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
    if (!L->codes) return;
    int64_t n = L->n;
    memcpy(p->h, p->in, sizeof(float) * (size_t)n);
    if (L->use_hadamard)
        hadamard_vec(p->h, L->k_in, n / L->k_in, L->m_in, L->su, NULL, 1.0f / sqrtf((float)(n / L->k_in)), tmp,
                     (int)L->level);
    else
        for (int64_t j = 0; j < n; j++) p->h[j] *= L->su[j];
    if (L->trellis_k && L->trellis_code) { /* as qs_trellis_tile_linear, B = 1 */
        p->int8 = 0;
        p->tile_op = trellis_tile_op_for((int)L->level, (int)L->trellis_code, n, (int)L->trellis_k, L->trellis_lut);
        return;
    }
    if (L->trellis_k) { /* as qs_trellis_linear, B = 1 */
        p->int8 = (int)L->trellis_int8;
        if (p->int8) {
            p->top = trellis_int8_op_for((int)L->level, n / TRELLIS_TILE, (int)L->trellis_k, 1, n);
            trellis_quantize_x(p->h, n, p->top.form, p->xq, p->xw, &p->xscale, &p->offset);
            p->top.xq = p->xq, p->top.xw = p->xw, p->top.xscale = &p->xscale, p->top.offset = &p->offset;
        } else {
            p->tslab = trellis_slab((int)L->level);
            p->tpairs = trellis_slab_pairs_for((int)L->level);
        }
        return;
    }
    mm_args *a = &p->a;
    memset(a, 0, sizeof(*a));
    a->codes = L->codes;
    a->m = L->m;
    a->n = n;
    a->nblk = n / DIM;
    a->cb = L->t->cb;
    a->row_bytes = a->nblk * a->cb;
    a->kind = L->t->kind;
    a->t = L->t;
    a->x = p->h;
    a->B = 1;
    a->out = p->out;
    if (L->use_hadamard && L->t->int8_ok) { /* as qs_linear: int8 activations only after the transform */
        quantize_row(p->h, n, p->xq, &p->xscale, &p->xsum);
        block_sums(p->xq, a->nblk, p->xbs);
        a->xq = p->xq;
        a->xscale = &p->xscale;
        a->xsum = &p->xsum;
        a->xbs = p->xbs;
        p->fn = int8_kernel((int)L->level, L->t);
        p->int8 = 1;
    } else {
        p->fn = float_kernel((int)L->level);
        p->int8 = 0;
    }
}

/* Per-thread scratch of a trellis part's rows (4-byte units): the int8 accumulators or the float slab's
   (16 + 256 floats), then the pairs of one slab (at most 16·TRELLIS_MAX_K per input and 16 more). */
_Static_assert(ROWS_PER_TASK % TRELLIS_TILE == 0, "a row task of a trellis layer is whole slabs");
#define STEP_TRELLIS_SCRATCH(n) (TRELLIS_TILE + TRELLIS_TILE * TRELLIS_TILE + TRELLIS_MAX_K * (n) + TRELLIS_TILE)

/* Rows [r0, r1) of a part (a trellis layer: whole slabs of 16 rows). tmp: STEP_TRELLIS_SCRATCH(n). */
static void step_rows(const step_part *p, int64_t r0, int64_t r1, float *tmp) {
    const qs_step_linear *L = p->L;
    if (L->trellis_k) {
        const int64_t tiles = L->n / TRELLIS_TILE, row_words = tiles * TRELLIS_TILE * L->trellis_k;
        const int16_t *codes = (const int16_t *)(const void *)L->codes;
        for (int64_t i = r0 / TRELLIS_TILE; i < r1 / TRELLIS_TILE; i++) {
            if (L->trellis_code)
                trellis_tile_rows(&p->tile_op, codes + i * row_words, p->h, 1, tmp, p->out + i * TRELLIS_TILE, L->m);
            else if (p->int8)
                trellis_int8_rows(&p->top, codes + i * row_words, (int32_t *)(void *)tmp,
                                  (uint32_t *)(void *)(tmp + TRELLIS_TILE + TRELLIS_TILE * TRELLIS_TILE),
                                  p->out + i * TRELLIS_TILE, L->m);
            else
                trellis_float_rows(p->tslab, p->tpairs, codes + i * row_words, tiles, (int)L->trellis_k, p->h, 1,
                                   L->n, tmp, p->out + i * TRELLIS_TILE, L->m);
        }
        return;
    }
    if (L->codes) {
        p->fn(&p->a, r0, r1, 0, 1);
        return;
    }
    for (int64_t i = r0; i < r1; i++) p->out[i] = dot_f32(L->weight + i * L->n, p->in, L->n);
}

/* A part's output pass (one thread): sv ⊙ (wscale · Vᵀ y), bias, residual. */
static void step_finish(const step_part *p, float *tmp) {
    const qs_step_linear *L = p->L;
    float *y = p->out;
    int64_t m = L->m;
    if (L->codes) {
        if (!p->int8 && !row_finite(p->h, L->n))
            for (int64_t i = 0; i < m; i++) y[i] = NAN; /* the float path: NaN/Inf in, NaN out */
        if (L->use_hadamard)
            hadamard_vec(y, L->k_out, m / L->k_out, L->m_out_t, NULL, L->sv, L->wscale / sqrtf((float)(m / L->k_out)),
                         tmp, (int)L->level);
        else
            for (int64_t i = 0; i < m; i++) y[i] *= L->wscale * L->sv[i];
    } else if (!row_finite(p->in, L->n)) {
        for (int64_t i = 0; i < m; i++) y[i] = NAN;
    }
    if (L->bias)
        for (int64_t i = 0; i < m; i++) y[i] += L->bias[i];
    if (p->resid)
        for (int64_t i = 0; i < m; i++) y[i] += p->resid[i];
}

/* The n linears L of one phase as parts: all read in, their outputs side by side from out, each
   plus resid (NULL: none; only with n = 1). Returns n. */
static int step_parts(step_part *parts, const qs_step_linear *L, int64_t n, const float *in, float *out,
                      const float *resid) {
    for (int64_t i = 0; i < n; i++) {
        parts[i].L = &L[i];
        parts[i].in = in;
        parts[i].out = out;
        parts[i].resid = resid;
        out += L[i].m;
    }
    return (int)n;
}

/* The linears of one phase, run by every thread of the region (orphaned worksharing): inputs, then
   all their rows as one list split over the threads, then outputs; a barrier after each. */
static void step_group(step_part *parts, int np, float *tmp) {
#pragma omp for schedule(static)
    for (int i = 0; i < np; i++) step_prepare(&parts[i], tmp);
    int64_t total = 0;
    for (int i = 0; i < np; i++) total += parts[i].tasks;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < total; task++) {
        int i = 0;
        int64_t k = task;
        while (k >= parts[i].tasks) k -= parts[i++].tasks;
        int64_t r0 = k * ROWS_PER_TASK, m = parts[i].L->m;
        step_rows(&parts[i], r0, r0 + ROWS_PER_TASK < m ? r0 + ROWS_PER_TASK : m, tmp);
    }
#pragma omp for schedule(static)
    for (int i = 0; i < np; i++) step_finish(&parts[i], tmp);
}

static float step_act(float g, int64_t act) {
    if (act == QS_ACT_SILU) return g / (1.0f + expf(-g));
    if (act == QS_ACT_GELU) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    const float k = 0.7978845608028654f; /* sqrt(2 / pi) */
    return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g)));
}

/* Attention of head hd's query q [D] at position pos over its KV head's cached keys and values
   (positions lo..pos): out [D]. scores: [max_len] scratch. Compiled once per ISA (the same C; the
   compiler vectorises the 8-lane sums and the value loop for the target). */
#define QS_DEFINE_STEP_HEAD(NAME, ATTR)                                                                        \
    ATTR static void NAME(const qs_step_model *M, const qs_step_block *B, const float *q, int64_t kvh, int64_t pos, \
                          float *scores, float *out) {                                                         \
        int64_t D = M->head_dim, lo = B->window > 0 && pos - B->window + 1 > 0 ? pos - B->window + 1 : 0;        \
        const float *K = B->k_cache + kvh * M->max_len * D, *V = B->v_cache + kvh * M->max_len * D;            \
        float mx = -INFINITY;                                                                                  \
        for (int64_t j = lo; j <= pos; j++) {                                                                  \
            float s = dot_f32(q, K + j * D, D) * M->scale;                                                     \
            if (M->attn_softcap > 0.0f) s = tanhf(s / M->attn_softcap) * M->attn_softcap;                      \
            scores[j] = s;                                                                                     \
            mx = s > mx ? s : mx;                                                                              \
        }                                                                                                      \
        double den = 0.0;                                                                                      \
        for (int64_t j = lo; j <= pos; j++) {                                                                  \
            scores[j] = expf(scores[j] - mx);                                                                  \
            den += scores[j];                                                                                  \
        }                                                                                                      \
        float inv = (float)(1.0 / den);                                                                        \
        for (int64_t d = 0; d < D; d++) out[d] = 0.0f;                                                         \
        for (int64_t j = lo; j <= pos; j++) {                                                                  \
            float p = scores[j] * inv;                                                                         \
            const float *v = V + j * D;                                                                        \
            for (int64_t d = 0; d < D; d++) out[d] += p * v[d];                                                \
        }                                                                                                      \
    }

QS_DEFINE_STEP_HEAD(step_head_base, )
#if QS_X86
QS_DEFINE_STEP_HEAD(step_head_avx2, __attribute__((target("avx2,fma"))))
QS_DEFINE_STEP_HEAD(step_head_avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
#endif

static void step_head(const qs_step_model *M, const qs_step_block *B, const float *q, int64_t kvh, int64_t pos,
                      float *scores, float *out) {
#if QS_X86
    if (is_avx512((int)M->level)) {
        step_head_avx512(M, B, q, kvh, pos, scores, out);
        return;
    }
    if (M->level == QS_LEVEL_AVX2) {
        step_head_avx2(M, B, q, kvh, pos, scores, out);
        return;
    }
#endif
    step_head_base(M, B, q, kvh, pos, scores, out);
}

/* RoPE of one head vector v [D] in place (tmp [D] scratch). */
static void step_rope(float *v, const float *cos, const float *ssin, const int64_t *perm, int64_t D, float *tmp) {
    memcpy(tmp, v, sizeof(float) * (size_t)D);
    for (int64_t d = 0; d < D; d++) v[d] = tmp[d] * cos[d] + tmp[perm[d]] * ssin[d];
}

static int step_linear_ok(const qs_step_linear *L, int64_t n, int64_t m) {
    if (L->n != n || L->m != m || n <= 0 || m <= 0) return 0;
    if (!level_ok((int)L->level)) return 0;
    if (!L->codes) return L->weight != NULL && !L->trellis_k && !L->trellis_code;
    if (L->trellis_k) {
        if (L->trellis_k < 2 || L->trellis_k > TRELLIS_MAX_K || n % TRELLIS_TILE || m % TRELLIS_TILE ||
            (L->trellis_int8 && (n > TRELLIS_INT8_MAX_N || L->trellis_code)) ||
            (L->trellis_code && L->trellis_code != QS_TRELLIS_3INST &&
             (L->trellis_code != QS_TRELLIS_HYB || !L->trellis_lut)) ||
            !L->su || !L->sv)
            return 0;
    } else if (!L->t || !L->su || !L->sv || n % DIM) {
        return 0;
    }
    return !L->use_hadamard || (L->k_in >= 1 && L->k_out >= 1 && n % L->k_in == 0 && m % L->k_out == 0 &&
                                hadamard_args_ok(L->k_in, n / L->k_in, L->m_in) &&
                                hadamard_args_ok(L->k_out, m / L->k_out, L->m_out_t));
}

/* Every shape of the description is consistent (checked once by the caller after building it). */
QS_API int qs_step_check(const qs_step_model *M) {
    if (!M || M->n_blocks < 1 || !M->blocks || M->hidden < 1 || M->heads < 1 || M->kv_heads < 1 ||
        M->heads % M->kv_heads || M->head_dim < 1 || M->inter < 1 || M->max_len < 1 || M->n_ropes < 1 ||
        M->act < QS_ACT_SILU || M->act > QS_ACT_GELU_TANH || !level_ok((int)M->level) || !M->cos || !M->ssin ||
        !M->perm || !M->rope_switch)
        return QS_EBADARG;
    int64_t H = M->heads, Hk = M->kv_heads, D = M->head_dim, I = M->inter, hid = M->hidden;
    for (int64_t r = 0; r < M->n_ropes; r++) {
        if (!M->cos[r] || !M->ssin[r] || !M->perm[r]) return QS_EBADARG;
        if (M->rope_switch[r] > 0 && (!M->long_cos || !M->long_ssin || !M->long_cos[r] || !M->long_ssin[r]))
            return QS_EBADARG;
        for (int64_t d = 0; d < D; d++)
            if (M->perm[r][d] < 0 || M->perm[r][d] >= D) return QS_EBADARG;
    }
    if (M->head && (!M->final_norm || !M->head_scale || M->vocab < 1 || M->head_k < 1 || hid % M->head_k ||
                    !hadamard_args_ok(M->head_k, hid / M->head_k, M->head_m)))
        return QS_EBADARG;
    for (int64_t l = 0; l < M->n_blocks; l++) {
        const qs_step_block *B = &M->blocks[l];
        if (!B->attn_norm || !B->mlp_norm || !B->k_cache || !B->v_cache || B->rope < 0 || B->rope >= M->n_ropes ||
            B->window < 0 || (!B->q_norm != !B->k_norm))
            return QS_EBADARG;
        if (B->n_qkv == 1) {
            if (!step_linear_ok(&B->qkv[0], hid, (H + 2 * Hk) * D)) return QS_EBADARG;
        } else if (B->n_qkv == 3) {
            if (!step_linear_ok(&B->qkv[0], hid, H * D) || !step_linear_ok(&B->qkv[1], hid, Hk * D) ||
                !step_linear_ok(&B->qkv[2], hid, Hk * D))
                return QS_EBADARG;
        } else {
            return QS_EBADARG;
        }
        if (!step_linear_ok(&B->o, H * D, hid) || !step_linear_ok(&B->down, I, hid)) return QS_EBADARG;
        if (B->n_gate_up == 1) {
            if (!step_linear_ok(&B->gate_up[0], hid, 2 * I)) return QS_EBADARG;
        } else if (B->n_gate_up == 2) {
            if (!step_linear_ok(&B->gate_up[0], hid, I) || !step_linear_ok(&B->gate_up[1], hid, I)) return QS_EBADARG;
        } else {
            return QS_EBADARG;
        }
    }
    return QS_OK;
}

/* One token through every block: x [hidden] in and out, keys/values written at position pos; with
   logits (not NULL; the model must have a head) also the next-token logits [vocab]. */
QS_API int qs_step(const qs_step_model *M, float *x, int64_t pos, float *logits, int nthreads) {
    if (!M || !x || pos < 0 || pos >= M->max_len || nthreads < 1 || (logits && !M->head)) return QS_EBADARG;
    int64_t H = M->heads, Hk = M->kv_heads, D = M->head_dim, I = M->inter, hid = M->hidden;
    int64_t qkv_n = (H + 2 * Hk) * D, widest = hid;
    if (2 * I > widest) widest = 2 * I;
    if (qkv_n > widest) widest = qkv_n;
    /* per thread: the transform's or a trellis layer's scratch, then the attention scores */
    int64_t scratch_len = STEP_TRELLIS_SCRATCH(widest) > widest ? STEP_TRELLIS_SCRATCH(widest) : widest;
    int64_t per_thread = scratch_len + M->max_len;
    int nt = nthreads;
    /* float buffers: h, x2, ob (hidden each), qkv, attn, gu, act, the parts' inputs; then per thread */
    size_t nf = (size_t)(3 * hid + qkv_n + H * D + 2 * I + I + STEP_MAX_PARTS * widest + per_thread * nt);
    float *buf = (float *)malloc(sizeof(float) * nf);
    int8_t *xq = (int8_t *)malloc((size_t)(STEP_MAX_PARTS * widest) + 1);
    int32_t *xw = (int32_t *)malloc(sizeof(int32_t) * (size_t)(STEP_MAX_PARTS * widest));
    int16_t *xbs = (int16_t *)malloc(sizeof(int16_t) * (size_t)(STEP_MAX_PARTS * widest / DIM + 1));
    step_part *parts = (step_part *)calloc(STEP_MAX_PARTS, sizeof(step_part));
    if (!buf || !xq || !xw || !xbs || !parts) {
        free(buf), free(xq), free(xw), free(xbs), free(parts);
        return QS_ENOMEM;
    }
    float *h = buf, *x2 = h + hid, *ob = x2 + hid, *qkv = ob + hid, *attn = qkv + qkv_n, *gu = attn + H * D;
    float *av = gu + 2 * I, *hin = av + I, *scratch = hin + STEP_MAX_PARTS * widest;
    for (int i = 0; i < STEP_MAX_PARTS; i++) {
        parts[i].h = hin + i * widest;
        parts[i].xq = xq + i * widest;
        parts[i].xbs = xbs + i * widest / DIM;
        parts[i].xw = xw + i * widest;
    }
    int np = 0; /* parts of the current phase (set in a single, read by all after its barrier) */
    float hscale = 0.0f; /* the head's activation scale */
    int32_t hsum = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        float *tmp = scratch + (size_t)omp_get_thread_num() * (size_t)per_thread;
#else
        float *tmp = scratch;
#endif
        float *scores = tmp + scratch_len;
        for (int64_t l = 0; l < M->n_blocks; l++) {
            const qs_step_block *B = &M->blocks[l];
#pragma omp single
            {
                step_rms(x, B->attn_norm, hid, M->eps, h);
                np = step_parts(parts, B->qkv, B->n_qkv, h, qkv, NULL);
            }
            step_group(parts, np, tmp);
#pragma omp single
            {
                int64_t r = B->rope;
                int use_long = M->rope_switch[r] > 0 && pos + 1 > M->rope_switch[r];
                const float *cos = (use_long ? M->long_cos[r] : M->cos[r]) + pos * D;
                const float *ssin = (use_long ? M->long_ssin[r] : M->ssin[r]) + pos * D;
                for (int64_t hd = 0; hd < H + Hk; hd++) {
                    float *v = qkv + hd * D;
                    if (B->q_norm) step_rms(v, hd < H ? B->q_norm : B->k_norm, D, M->eps, v);
                    step_rope(v, cos, ssin, M->perm[r], D, tmp);
                }
                for (int64_t g = 0; g < Hk; g++) {
                    memcpy(B->k_cache + (g * M->max_len + pos) * D, qkv + (H + g) * D, sizeof(float) * (size_t)D);
                    memcpy(B->v_cache + (g * M->max_len + pos) * D, qkv + (H + Hk + g) * D, sizeof(float) * (size_t)D);
                }
                np = step_parts(parts, &B->o, 1, attn, B->attn_out_norm ? ob : x2, B->attn_out_norm ? NULL : x);
            }
#pragma omp for schedule(static)
            for (int64_t hd = 0; hd < H; hd++) step_head(M, B, qkv + hd * D, hd / (H / Hk), pos, scores, attn + hd * D);
            step_group(parts, np, tmp);
#pragma omp single
            {
                if (B->attn_out_norm) {
                    step_rms(ob, B->attn_out_norm, hid, M->eps, ob);
                    for (int64_t j = 0; j < hid; j++) x2[j] = x[j] + ob[j];
                }
                step_rms(x2, B->mlp_norm, hid, M->eps, h);
                np = step_parts(parts, B->gate_up, B->n_gate_up, h, gu, NULL);
            }
            step_group(parts, np, tmp);
#pragma omp for schedule(static)
            for (int64_t j = 0; j < I; j++) av[j] = step_act(gu[j], M->act) * gu[I + j];
#pragma omp single
            {
                np = step_parts(parts, &B->down, 1, av, B->mlp_out_norm ? ob : x, B->mlp_out_norm ? NULL : x2);
            }
            step_group(parts, np, tmp);
            if (B->mlp_out_norm) {
#pragma omp single
                {
                    step_rms(ob, B->mlp_out_norm, hid, M->eps, ob);
                    for (int64_t j = 0; j < hid; j++) x[j] = x2[j] + ob[j];
                }
            }
        }
        if (logits) {
#pragma omp single
            {
                int64_t P = hid / M->head_k;
                step_rms(x, M->final_norm, hid, M->eps, h);
                hadamard_vec(h, M->head_k, P, M->head_m, NULL, NULL, 1.0f / sqrtf((float)P), tmp, (int)M->level);
                quantize_row(h, hid, xq, &hscale, &hsum);
            }
            dot_rows_fn fn = dot_rows_kernel((int)M->level);
            int64_t ntasks = (M->vocab + DOT_ROWS_PER_TASK - 1) / DOT_ROWS_PER_TASK;
#pragma omp for schedule(static)
            for (int64_t task = 0; task < ntasks; task++) {
                int64_t r0 = task * DOT_ROWS_PER_TASK;
                int64_t r1 = r0 + DOT_ROWS_PER_TASK < M->vocab ? r0 + DOT_ROWS_PER_TASK : M->vocab;
                int32_t dots[DOT_ROWS_PER_TASK];
                fn(M->head + r0 * hid, hid, xq, 0, r1 - r0, dots);
                for (int64_t v = r0; v < r1; v++) logits[v] = M->head_scale[v] * hscale * (float)dots[v - r0];
            }
        }
    }
    free(buf);
    free(xq);
    free(xw);
    free(xbs);
    free(parts);
    return QS_OK;
}

/* ------------------------------------------------------------------ importable module stub */
#ifndef QS_STANDALONE
static struct PyModuleDef qs_module = {PyModuleDef_HEAD_INIT, "_qskernels",
                                       "quipsharp native kernels (called through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__qskernels(void) { return PyModule_Create(&qs_module); }
#endif
