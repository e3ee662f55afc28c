/*
 * Standalone test of the AArch64 kernels (make test-arm: cross-compiled, run under qemu-aarch64).
 *
 * Built as one translation unit with the kernels (QS_STANDALONE: no Python), so the static decode
 * helpers are reachable. For the neon and neon_dotprod levels it checks, bit for bit against the
 * portable scalar reference:
 *   - the NEON operand decode of every one of the 65,536 E8P12 codes (stage-1 table and sign table);
 *   - qs_decode (float32 weights) against decode_scalar;
 *   - the int8 sums, i.e. qs_matmul outputs against qs_matmul_int8_ref, for the three codebook kinds,
 *     odd shapes (tails of every loop, several GEMM column tiles) and batch sizes 1..16 (<= 8: row
 *     kernels, above: GEMM tiles), including rows with NaN / Inf activations;
 *   - the Hadamard transform against the scalar level;
 *   - the int8 LM head's rows · vector kernel against exact integer sums;
 *   - the trellis Viterbi (the same paths on every level);
 *   - the trellis decode-matvec, float32 and int8 (NEON kernels; the same bits as the scalar level);
 *   - the trellis weight decode, as W and as its transpose (the same values as the scalar level);
 *   - the HYB (a per-matrix table) and 3INST trellis codes: decode and decode-matvec (the same bits as the
 *     scalar level).
 * A level the CPU lacks must be refused (QS_EBADLEVEL) rather than run: `qemu-aarch64 -cpu cortex-a53`
 * has no dot product, `-cpu max` has it.
 *
 * The codebook tables are synthetic (random values on the int8 path's grid, including its extremes:
 * stage-1 values ±1/2, ±3/2, ±5/2; RVQ3 stage-2 values k/2 for k in [-16, 111]); the kernels' integer
 * arithmetic does not depend on which valid values they hold.
 */
#define QS_STANDALONE 1
#include "../../src/quipsharp/csrc/qs_kernels.c"

#include <stdio.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float rnd_normal(void) { /* sum of uniforms: roughly Gaussian, enough for activations */
    float s = 0.0f;
    for (int i = 0; i < 4; i++) s += (float)(rnd() & 0xFFFF) / 65536.0f - 0.5f;
    return s * 1.7f;
}

static int failures = 0;
#define CHECK(cond, ...)                                                                                  \
    do {                                                                                                  \
        if (!(cond)) {                                                                                    \
            failures++;                                                                                   \
            if (failures <= 20) {                                                                         \
                printf("FAIL %s:%d: ", __FILE__, __LINE__);                                               \
                printf(__VA_ARGS__);                                                                      \
                printf("\n");                                                                             \
            }                                                                                             \
        }                                                                                                 \
    } while (0)

static void e8p_table(float *t) {
    static const float mags[3] = {0.5f, 1.5f, 2.5f};
    for (int i = 0; i < NSRC * DIM; i++) t[i] = (rnd() & 1 ? -1.0f : 1.0f) * mags[rnd() % 3];
}

static qs_codebook *make_codebook(int kind) {
    float src1[NSRC * DIM], tab2[NSRC * DIM];
    e8p_table(src1);
    if (kind == QS_KIND_RVQ4) e8p_table(tab2);
    if (kind == QS_KIND_RVQ3) {
        for (int i = 0; i < NSRC * DIM; i++) tab2[i] = (float)((int)(rnd() % 128) - 16) / 2.0f;
        tab2[0] = -8.0f;  /* the grid's extremes: operands 0 and 127 */
        tab2[1] = 55.5f;
    }
    qs_codebook *t = qs_codebook_new(kind, src1, kind == QS_KIND_E8P ? NULL : tab2, 3.0f);
    CHECK(t && t->int8_ok, "codebook kind %d: tables not accepted", kind);
    return t;
}

static const char *LEVEL_NAMES[QS_NUM_LEVELS] = {"scalar", "avx2", "avx512", "avx512vnni", "neon", "neon_dotprod"};

static void test_operand_decode(const qs_codebook *t) {
#if QS_ARM
    uint8_t codes[4];
    for (uint32_t c = 0; c < 65536; c += 2) { /* two codes per vector: c and c + 1 */
        codes[0] = (uint8_t)c, codes[1] = (uint8_t)(c >> 8), codes[2] = (uint8_t)(c + 1), codes[3] = (uint8_t)((c + 1) >> 8);
        int8_t got[16];
        vst1q_s8(got, e8p_u2_neon(t->tab1q, t->sgnq, codes, 2));
        for (int h = 0; h < 2; h++) {
            uint32_t code = c + (uint32_t)h;
            int odd;
            uint32_t sg = e8p_signs(code, &odd);
            for (int j = 0; j < DIM; j++) {
                int8_t v = t->tab1q[(code & SRC_MASK) * DIM + j];
                int want = (((sg >> j) & 1u) ? -v : v) + INT8_OFFSET + (odd ? -1 : 1);
                CHECK(got[h * DIM + j] == want, "operand of code %u coordinate %d: %d != %d", code, j, got[h * DIM + j], want);
            }
        }
    }
#else
    (void)t;
#endif
}

static void test_kind(int kind, int levels) {
    qs_codebook *t = make_codebook(kind);
    if (!t) return;
    test_operand_decode(t);
    static const int64_t shapes[][2] = {{1, 8}, {5, 24}, {17, 136}, {33, 1032}, {7, 4360}, {20, 2056}};
    int nshapes = (int)(sizeof(shapes) / sizeof(shapes[0]));
    for (int s = 0; s < nshapes; s++) {
        int64_t m = shapes[s][0], n = shapes[s][1], row_bytes = n / DIM * t->cb;
        uint8_t *codes = (uint8_t *)malloc((size_t)(m * row_bytes));
        float *x = (float *)malloc(sizeof(float) * (size_t)(16 * n));
        float *ref = (float *)malloc(sizeof(float) * (size_t)(16 * m)), *got = (float *)malloc(sizeof(float) * (size_t)(16 * m));
        float *w_ref = (float *)malloc(sizeof(float) * (size_t)(m * n)), *w_got = (float *)malloc(sizeof(float) * (size_t)(m * n));
        for (int64_t i = 0; i < m * row_bytes; i++) codes[i] = (uint8_t)rnd();
        /* decode (float32) on every level against the scalar definition */
        for (int64_t i = 0; i < m; i++)
            for (int64_t k = 0; k < n / DIM; k++)
                decode_scalar(read_code(codes + i * row_bytes + k * t->cb, t->cb), kind, t->src1, t->tab2, t->resid_scale,
                              w_ref + i * n + k * DIM);
        for (int level = 0; level < QS_NUM_LEVELS; level++) {
            if (!((levels >> level) & 1)) continue;
            CHECK(qs_decode(codes, m, n, t, w_got, 2, level) == QS_OK, "decode rc");
            CHECK(memcmp(w_ref, w_got, sizeof(float) * (size_t)(m * n)) == 0, "decode kind %d %s (%ld x %ld)", kind,
                  LEVEL_NAMES[level], (long)m, (long)n);
        }
        for (int64_t B = 1; B <= 16; B++) {
            for (int64_t i = 0; i < B * n; i++) x[i] = rnd_normal();
            if (B >= 3) {
                x[1 * n + (n - 1)] = NAN; /* row 1: NaN, row 2: +Inf -> NaN rows */
                x[2 * n] = INFINITY;
            }
            CHECK(qs_matmul_int8_ref(codes, m, n, t, x, B, ref, 2) == QS_OK, "reference rc");
            for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
                int rc = qs_matmul(codes, m, n, t, x, B, got, 2, level, 1);
                if (!((levels >> level) & 1)) {
                    CHECK(rc == QS_EBADLEVEL, "%s ran on a CPU without it (rc %d)", LEVEL_NAMES[level], rc);
                    continue;
                }
                CHECK(rc == QS_OK, "matmul rc %d", rc);
                int same = 1;
                for (int64_t i = 0; i < B * m; i++)
                    same &= (isnan(ref[i]) && isnan(got[i])) || memcmp(&ref[i], &got[i], sizeof(float)) == 0;
                CHECK(same, "int8 sums kind %d %s (%ld x %ld) batch %ld differ from the reference", kind,
                      LEVEL_NAMES[level], (long)m, (long)n, (long)B);
                if (B >= 3)
                    CHECK(isnan(got[1 * m]) && isnan(got[2 * m]) && !isnan(got[0]), "non-finite rows %s",
                          LEVEL_NAMES[level]);
            }
        }
        free(codes), free(x), free(ref), free(got), free(w_ref), free(w_got);
    }
    qs_codebook_free(t);
}

static void test_hadamard(int levels) {
    const int64_t K = 12, P = 64, n = K * P, B = 3;
    float M[12 * 12], x0[3 * 768], a[3 * 768], b[3 * 768], pre[768];
    for (int i = 0; i < K * K; i++) M[i] = rnd_normal();
    for (int i = 0; i < B * n; i++) x0[i] = rnd_normal();
    for (int i = 0; i < n; i++) pre[i] = rnd_normal();
    memcpy(a, x0, sizeof(a));
    CHECK(qs_hadamard(a, B, K, P, M, pre, NULL, 0.5f, 1, QS_LEVEL_SCALAR) == QS_OK, "hadamard scalar");
    for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
        if (!((levels >> level) & 1)) continue;
        memcpy(b, x0, sizeof(b));
        CHECK(qs_hadamard(b, B, K, P, M, pre, NULL, 0.5f, 1, level) == QS_OK, "hadamard rc");
        CHECK(memcmp(a, b, sizeof(a)) == 0, "hadamard %s differs from scalar", LEVEL_NAMES[level]);
    }
}

/* The int8 head's rows · vector kernel: exact int32 sums on every level (tails of every length, the
   ±127 extremes), and a refused level where the CPU lacks it. */
static void test_dot_rows(int levels) {
    const int64_t V = 37, ns[] = {1, 15, 16, 17, 576, 1000};
    for (size_t c = 0; c < sizeof(ns) / sizeof(ns[0]); c++) {
        int64_t n = ns[c];
        int8_t *W = malloc((size_t)(V * n)), *xq = malloc((size_t)n);
        int32_t *ref = malloc(sizeof(int32_t) * V), *got = malloc(sizeof(int32_t) * V);
        for (int64_t i = 0; i < V * n; i++) W[i] = (int8_t)((int)(rnd() % 255) - 127);
        for (int64_t j = 0; j < n; j++) {
            W[j] = 127, W[n + j] = -127; /* rows 0 and 1 at the extremes */
            xq[j] = j % 2 ? (int8_t)((int)(rnd() % 255) - 127) : -127;
        }
        CHECK(qs_dot_rows_int8(W, V, n, xq, ref, 1, QS_LEVEL_SCALAR) == QS_OK, "dot_rows scalar");
        for (int64_t v = 0; v < V; v++) {
            int32_t s = 0;
            for (int64_t j = 0; j < n; j++) s += (int32_t)W[v * n + j] * xq[j];
            CHECK(ref[v] == s, "dot_rows scalar row %lld", (long long)v);
        }
        for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
            int rc = qs_dot_rows_int8(W, V, n, xq, got, 2, level);
            if (!((levels >> level) & 1)) {
                CHECK(rc == QS_EBADLEVEL, "dot_rows %s not refused", LEVEL_NAMES[level]);
                continue;
            }
            CHECK(rc == QS_OK && memcmp(ref, got, sizeof(int32_t) * V) == 0, "dot_rows %s n=%lld differs from scalar",
                  LEVEL_NAMES[level], (long long)n);
        }
        free(W), free(xq), free(ref), free(got);
    }
}

/* The trellis Viterbi: every level finds the same paths as the scalar one (portable C on ARM), with
   float32 and with 16-bit costs (the codes kept under 4 so that these apply). */
static void test_viterbi(int levels) {
    enum { L = 10, KV = 2, N = 40, B = 3 };
    static float code[1 << L], x[B * N];
    int32_t ref[B * N], got[B * N];
    float cref[B], cgot[B];
    for (int i = 0; i < (1 << L); i++) {
        float c = rnd_normal();
        code[i] = c > 3.5f ? 3.5f : (c < -3.5f ? -3.5f : c);
    }
    for (int i = 0; i < B * N; i++) x[i] = rnd_normal();
    for (int metric = QS_VITERBI_FLOAT32; metric <= QS_VITERBI_INT16; metric++) {
        CHECK(qs_viterbi(x, B, N, code, L, KV, 1, 1, ref, cref, 1, QS_LEVEL_SCALAR, metric) == QS_OK,
              "viterbi scalar");
        for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
            int rc = qs_viterbi(x, B, N, code, L, KV, 1, 1, got, cgot, 2, level, metric);
            if (!((levels >> level) & 1)) {
                CHECK(rc == QS_EBADLEVEL, "viterbi %s not refused", LEVEL_NAMES[level]);
                continue;
            }
            CHECK(rc == QS_OK && memcmp(ref, got, sizeof(ref)) == 0 && memcmp(cref, cgot, sizeof(cref)) == 0,
                  "viterbi %s metric %d differs from scalar", LEVEL_NAMES[level], metric);
        }
    }
}

/* The trellis decode-matvec: float32 and int8 (NEON kernels; sdot at neon_dotprod) at every NEON level
   equal to the scalar level bit for bit, for k = 2, 3, 4 and batch sizes 1..3. */
static void test_trellis(int levels) {
    enum { M = 48, N = 64, B = 3 };
    static int16_t codes[M / 16 * N / 16 * 16 * 4];
    static float x[B * N], ref[B * M], got[B * M];
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) codes[i] = (int16_t)(rnd() & 0xFFFF);
    for (int i = 0; i < B * N; i++) x[i] = rnd_normal();
    for (int k = 2; k <= 4; k++)
        for (int b = 1; b <= B; b++)
            for (int int8 = 0; int8 <= 1; int8++) {
                int (*fn)(const int16_t *, int64_t, int64_t, int, const float *, int64_t, float *, int, int) =
                    int8 ? qs_trellis_matmul_int8 : qs_trellis_matmul;
                CHECK(fn(codes, M, N, k, x, b, ref, 1, QS_LEVEL_SCALAR) == QS_OK, "trellis scalar k=%d", k);
                for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
                    int rc = fn(codes, M, N, k, x, b, got, 2, level);
                    if (!((levels >> level) & 1)) {
                        CHECK(rc == QS_EBADLEVEL, "trellis %s not refused", LEVEL_NAMES[level]);
                        continue;
                    }
                    CHECK(rc == QS_OK && memcmp(ref, got, sizeof(float) * (size_t)(b * M)) == 0,
                          "trellis %s (k=%d, B=%d, int8=%d) differs from scalar", LEVEL_NAMES[level], k, b, int8);
                }
            }
}

/* The trellis weight decode (the prefill GEMM's weights): every NEON level writes the scalar level's
   W [M, N], and its transpose with transposed = 1. */
static void test_trellis_decode(int levels) {
    enum { M = 48, N = 64 };
    static int16_t codes[M / 16 * N / 16 * 16 * 4];
    static float ref[M * N], got[M * N];
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) codes[i] = (int16_t)(rnd() & 0xFFFF);
    for (int k = 2; k <= 4; k++) {
        CHECK(qs_trellis_decode(codes, M, N, k, ref, 1, QS_LEVEL_SCALAR, 0) == QS_OK, "decode scalar k=%d", k);
        for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
            int rc = qs_trellis_decode(codes, M, N, k, got, 2, level, 0);
            if (!((levels >> level) & 1)) {
                CHECK(rc == QS_EBADLEVEL, "decode %s not refused", LEVEL_NAMES[level]);
                continue;
            }
            CHECK(rc == QS_OK && memcmp(ref, got, sizeof(ref)) == 0, "decode %s (k=%d) differs from scalar",
                  LEVEL_NAMES[level], k);
            CHECK(qs_trellis_decode(codes, M, N, k, got, 2, level, 1) == QS_OK, "decode %s transposed", LEVEL_NAMES[level]);
            int same = 1;
            for (int r = 0; r < M; r++)
                for (int c = 0; c < N; c++) same &= got[c * M + r] == ref[r * N + c];
            CHECK(same, "decode %s (k=%d) transposed is not the transpose", LEVEL_NAMES[level], k);
        }
    }
}

/* The trellis codes decoded tile by tile (HYB with a per-matrix table, 3INST): every NEON level's
   decode-matvec and decode equal the scalar level's, and the decode follows the Python layout's formula
   (spot-checked at step 0). */
static float half_to_float(uint32_t h) { /* a normal float16 */
    uint32_t f = (((h & 0x7FFFu) << 13) + ((127u - 15u) << 23)) | ((h & 0x8000u) << 16);
    float v;
    memcpy(&v, &f, sizeof v);
    return v;
}

static void test_trellis_tile(int levels) {
    enum { M = 48, N = 64, B = 3 };
    static int16_t codes[M / 16 * N / 16 * 16 * 4];
    static float lut[512 * 2], x[B * N], ref[B * M], got[B * M], w_ref[M * N], w_got[M * N];
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) codes[i] = (int16_t)(rnd() & 0xFFFF);
    for (int i = 0; i < 1024; i++) lut[i] = rnd_normal();
    for (int i = 0; i < B * N; i++) x[i] = rnd_normal();
    for (int code = QS_TRELLIS_HYB; code <= QS_TRELLIS_3INST; code++)
        for (int k = 2; k <= 4; k++) {
            const char *name = code == QS_TRELLIS_HYB ? "hyb" : "3inst";
            CHECK(qs_trellis_tile_decode(codes, M, N, k, code, lut, w_ref, 1, QS_LEVEL_SCALAR, 0) == QS_OK,
                  "%s decode k=%d", name, k);
            uint32_t s = (uint16_t)codes[0]; /* tile 0, step 0: the window at bit 0 is word 0 */
            if (code == QS_TRELLIS_HYB) {
                uint32_t h = (s * (s + 1u)) & 0xFFFFu, e = (h >> 6) & 511;
                CHECK(w_ref[0] == ((h & 0x8000u) ? -lut[2 * e] : lut[2 * e]) && w_ref[N] == lut[2 * e + 1],
                      "hyb decode k=%d: step 0", k);
            } else {
                uint32_t r = ((s * 89226354u + 64248484u) & 0x8FFF8FFFu) ^ 0x3B603B60u;
                CHECK(w_ref[0] == half_to_float(r >> 16) + half_to_float(r & 0xFFFFu), "3inst decode k=%d: step 0", k);
            }
            for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
                int rc = qs_trellis_tile_decode(codes, M, N, k, code, lut, w_got, 2, level, 0);
                if (!((levels >> level) & 1)) {
                    CHECK(rc == QS_EBADLEVEL, "%s decode %s not refused", name, LEVEL_NAMES[level]);
                    continue;
                }
                CHECK(rc == QS_OK && memcmp(w_ref, w_got, sizeof(w_ref)) == 0, "%s decode %s (k=%d) differs", name,
                      LEVEL_NAMES[level], k);
            }
            for (int b = 1; b <= B; b++) {
                CHECK(qs_trellis_tile_matmul(codes, M, N, k, code, lut, x, b, ref, 1, QS_LEVEL_SCALAR) == QS_OK,
                      "%s k=%d", name, k);
                for (int level = QS_LEVEL_NEON; level <= QS_LEVEL_NEON_DOT; level++) {
                    if (!((levels >> level) & 1)) continue;
                    CHECK(qs_trellis_tile_matmul(codes, M, N, k, code, lut, x, b, got, 2, level) == QS_OK &&
                              memcmp(ref, got, sizeof(float) * (size_t)(b * M)) == 0,
                          "%s matmul %s (k=%d, B=%d) differs from scalar", name, LEVEL_NAMES[level], k, b);
                }
            }
        }
    CHECK(qs_trellis_tile_matmul(codes, M, N, 2, QS_TRELLIS_HYB, NULL, x, 1, ref, 1, QS_LEVEL_SCALAR) == QS_EBADARG,
          "hyb without its table not refused");
}

int main(void) {
    int levels = qs_supported_levels();
    printf("test_arm: CPU levels:");
    for (int l = 0; l < QS_NUM_LEVELS; l++)
        if ((levels >> l) & 1) printf(" %s", LEVEL_NAMES[l]);
    printf("\n");
    if (!((levels >> QS_LEVEL_NEON) & 1)) {
        printf("test_arm: FAIL: not an AArch64 CPU with NEON (build with aarch64-linux-gnu-gcc, run under qemu-aarch64)\n");
        return 1;
    }
    if (!((levels >> QS_LEVEL_NEON_DOT) & 1))
        printf("test_arm: neon_dotprod: CPU lacks it; checking that it is refused (QS_EBADLEVEL) instead\n");
    for (int kind = 0; kind < QS_NUM_KINDS; kind++) test_kind(kind, levels);
    test_hadamard(levels);
    test_dot_rows(levels);
    test_viterbi(levels);
    test_trellis(levels);
    test_trellis_decode(levels);
    test_trellis_tile(levels);
    if (failures) {
        printf("test_arm: %d check(s) FAILED\n", failures);
        return 1;
    }
    printf("test_arm: all checks passed (levels tested: neon%s)\n", (levels >> QS_LEVEL_NEON_DOT) & 1 ? ", neon_dotprod" : "");
    return 0;
}
