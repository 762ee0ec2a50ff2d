// y[m, n] = sum_k x[m, k] * W[n, k] for a few rows x (fp32) and weights W stored in bf16,
// fp16 or fp32: the decode-step projection, reading the weights once for all rows.
//
// Why not torch: on a CPU without native bf16 (AVX2), torch's bf16 matmul is emulated and
// its fp32 one reads twice the bytes; a decode step is bound by reading the weights.
// Weights are widened to fp32 in registers; activations and accumulation stay fp32.
//
// Every output element is one chain of FMAs over k in a fixed order followed by a fixed
// horizontal sum, so a row's result is bitwise the same whatever the number of rows, the
// blocking or the thread count. The engine relies on that: a seeded generation does not
// depend on what else is in the batch.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

namespace {
// Software prefetch PFB output blocks ahead, spread over a block's iterations: the hardware
// prefetcher alone leaves the memory bus idle between rows (measured: ~2x on AVX2 EPYC).
#ifndef PFB
#define PFB 8
#endif

enum Kind { F32 = 0, BF16 = 1, F16 = 2 };

template <int KIND> struct W;
template <> struct W<F32> {
    using T = float;
    static inline __m256 vec(const T* p) { return _mm256_loadu_ps(p); }
    static inline float one(const T* p) { return *p; }
};
template <> struct W<BF16> {
    using T = uint16_t;
    static inline __m256 vec(const T* p) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static inline float one(const T* p) {
        uint32_t bits = static_cast<uint32_t>(*p) << 16;
        float f;
        __builtin_memcpy(&f, &bits, 4);
        return f;
    }
};
template <> struct W<F16> {
    using T = uint16_t;
    static inline __m256 vec(const T* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static inline float one(const T* p) { return _cvtsh_ss(*p); }
};

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// MB rows x NB outputs starting at (m0, n0).
struct Out {
    float* y;
    long ldy;      // row stride of y
    float alpha;   // y = alpha * dot, or y += alpha * dot when accumulating
    bool accumulate;
    inline void put(long m, long n, float dot) const {
        float* p = y + m * ldy + n;
        *p = accumulate ? *p + dot * alpha : (alpha == 1.0f ? dot : dot * alpha);
    }
};

template <int KIND, int MB, int NB>
inline void block(const float* x, long K, const typename W<KIND>::T* w, const Out& y, long m0, long n0) {
    __m256 acc[MB][NB];
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
    const typename W<KIND>::T* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + j) * K;
    const char* ahead = reinterpret_cast<const char*>(w + (n0 + PFB * NB) * K);
    constexpr long step = NB * 8 * sizeof(typename W<KIND>::T);  // bytes of a block per iteration
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        if (m0 == 0)
            for (long b = 0; b < step; b += 64) _mm_prefetch(ahead + k / 8 * step + b, _MM_HINT_T0);
        __m256 wv[NB];
        for (int j = 0; j < NB; ++j) wv[j] = W<KIND>::vec(rows[j] + k);
        for (int i = 0; i < MB; ++i) {
            const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
            for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) {
            float s = hsum(acc[i][j]);
            for (long t = k; t < K; ++t) s += x[(m0 + i) * K + t] * W<KIND>::one(rows[j] + t);
            y.put(m0 + i, n0 + j, s);
        }
}

template <int KIND, int NB>
inline void columns(const float* x, long M, long K, const typename W<KIND>::T* w, const Out& y, long n0) {
    long m = 0;
    for (; m + 2 <= M; m += 2) block<KIND, 2, NB>(x, K, w, y, m, n0);
    if (m < M) block<KIND, 1, NB>(x, K, w, y, m, n0);
}

// bf16 weights, 16 at a time: the low halves of a 32-bit lane shifted up are the even
// elements as fp32, the lane with its low half cleared is the odd one; no widening needed.
// ``xp`` holds x with each 16-chunk's even elements first, then its odd ones.
template <int NB>
inline void block_bf16(const float* xp, const float* x, long K, const uint16_t* w, const Out& y, long m, long n0) {
    // Two chains per output (even and odd elements), summed at the end: twice the FMAs in flight.
    __m256 acc_e[NB], acc_o[NB];
    for (int j = 0; j < NB; ++j) acc_e[j] = acc_o[j] = _mm256_setzero_ps();
    const uint16_t* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + j) * K;
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const float* xr = xp + m * K;
    const char* ahead = reinterpret_cast<const char*>(w + (n0 + PFB * NB) * K);
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        if (m == 0) {
            _mm_prefetch(ahead + k * NB * 2, _MM_HINT_T0);
            _mm_prefetch(ahead + k * NB * 2 + 64, _MM_HINT_T0);
        }
        const __m256 xe = _mm256_loadu_ps(xr + k), xo = _mm256_loadu_ps(xr + k + 8);
        for (int j = 0; j < NB; ++j) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + k));
            acc_e[j] = _mm256_fmadd_ps(xe, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), acc_e[j]);
            acc_o[j] = _mm256_fmadd_ps(xo, _mm256_castsi256_ps(_mm256_and_si256(v, high)), acc_o[j]);
        }
    }
    for (int j = 0; j < NB; ++j) {
        float s = hsum(_mm256_add_ps(acc_e[j], acc_o[j]));
        for (long t = k; t < K; ++t) s += x[m * K + t] * W<BF16>::one(rows[j] + t);
        y.put(m, n0 + j, s);
    }
}

template <int NB>
inline void columns_bf16(const float* xp, const float* x, long M, long K, const uint16_t* w, const Out& y, long n0) {
    for (long m = 0; m < M; ++m) block_bf16<NB>(xp, x, K, w, y, m, n0);
}

void rowgemm_bf16(const float* x, long M, long K, const void* weights, long N, const Out& y, int threads, float* xp) {
    const auto* w = static_cast<const uint16_t*>(weights);
    for (long m = 0; m < M; ++m)
        for (long c = 0; c + 16 <= K; c += 16)
            for (int i = 0; i < 8; ++i) {
                xp[m * K + c + i] = x[m * K + c + 2 * i];
                xp[m * K + c + 8 + i] = x[m * K + c + 2 * i + 1];
            }
    const long blocks = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; ++b) columns_bf16<4>(xp, x, M, K, w, y, b * 4);
    for (long n = blocks * 4; n < N; ++n) columns_bf16<1>(xp, x, M, K, w, y, n);
}

template <int KIND>
void rowgemm(const float* x, long M, long K, const void* weights, long N, const Out& y, int threads) {
    const auto* w = static_cast<const typename W<KIND>::T*>(weights);
    const long blocks = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; ++b) columns<KIND, 4>(x, M, K, w, y, b * 4);
    for (long n = blocks * 4; n < N; ++n) columns<KIND, 1>(x, M, K, w, y, n);
}

inline float widen(const void* w, int kind, long i) {
    if (kind == BF16) return W<BF16>::one(static_cast<const uint16_t*>(w) + i);
    if (kind == F16) return W<F16>::one(static_cast<const uint16_t*>(w) + i);
    return static_cast<const float*>(w)[i];
}

}  // namespace

extern "C" {
int nc_rowgemm_abi() { return 2; }

// y = x @ W.T (or y += alpha * x @ W.T with accumulate): kind 0 fp32, 1 bf16, 2 fp16 weights;
// x [M, K] fp32 and W [N, K] contiguous; y fp32 with row stride ldy; scratch M * K floats.
void nc_rowgemm(int kind, const float* x, long M, long K, const void* w, long N, float* y, long ldy,
                float alpha, int accumulate, int threads, float* scratch) {
    const Out out{y, ldy, alpha, accumulate != 0};
    if (N * K < 65536) threads = 1;  // a LoRA factor: waking a second thread costs more than it saves
    if (kind == BF16) rowgemm_bf16(x, M, K, w, N, out, threads, scratch);
    else if (kind == F16) rowgemm<F16>(x, M, K, w, N, out, threads);
    else rowgemm<F32>(x, M, K, w, N, out, threads);
}

// Llama RMSNorm of each row: y = x / sqrt(mean(x^2) + eps) * weight (weight of ``kind``).
void nc_rmsnorm(const float* x, long M, long D, const void* weight, int kind, float eps, float* y) {
    for (long m = 0; m < M; ++m) {
        const float* row = x + m * D;
        float sum = 0.0f;
        for (long d = 0; d < D; ++d) sum += row[d] * row[d];
        const float inv = 1.0f / sqrtf(sum / static_cast<float>(D) + eps);
        for (long d = 0; d < D; ++d) y[m * D + d] = widen(weight, kind, d) * (row[d] * inv);
    }
}

// out[m, :I] = silu(gu[m, :I]) * gu[m, I:2I]   (the fused gate/up output of a Llama MLP)
void nc_silu_mul(const float* gu, long M, long I, float* out) {
    for (long m = 0; m < M; ++m)
        for (long i = 0; i < I; ++i) {
            const float g = gu[m * 2 * I + i];
            out[m * I + i] = g / (1.0f + expf(-g)) * gu[m * 2 * I + I + i];
        }
}

// One decode step of attention for B sequences at one layer. qkv [B, (H + 2 * KV) * D] is the
// fused projection output (q heads, then k heads, then v heads). For row b: rotate q and k at
// positions[b] (Llama's rotate-half convention, cos/sin tables [context, D]), store k and v in
// that sequence's cache (k_caches[b], v_caches[b]: [layers, KV, capacity[b], D] fp32) at
// positions[b], then attend the query heads over positions 0..positions[b] of their kv head.
// out [B, H * D]. Rows are independent: a row's result does not depend on the others.
void nc_decode_attention(float* qkv, long B, long H, long KV, long D, const long* positions,
                         const float* cos_table, const float* sin_table, const int64_t* k_caches,
                         const int64_t* v_caches, const long* capacity, long layer, float scale,
                         float* out, float* scores, long max_len, int threads) {
    const long width = (H + 2 * KV) * D, half = D / 2, groups = H / KV;
    for (long b = 0; b < B; ++b) {
        float* row = qkv + b * width;
        const long pos = positions[b];
        const float* c = cos_table + pos * D;
        const float* s = sin_table + pos * D;
        for (long head = 0; head < H + KV; ++head) {  // q heads then k heads
            float* v = row + head * D;
            for (long d = 0; d < half; ++d) {
                const float a = v[d], b2 = v[d + half];
                v[d] = a * c[d] - b2 * s[d];
                v[d + half] = b2 * c[d + half] + a * s[d + half];
            }
        }
        float* kc = reinterpret_cast<float*>(k_caches[b]);
        float* vc = reinterpret_cast<float*>(v_caches[b]);
        for (long g = 0; g < KV; ++g) {
            const long at = ((layer * KV + g) * capacity[b] + pos) * D;
            for (long d = 0; d < D; ++d) {
                kc[at + d] = row[(H + g) * D + d];
                vc[at + d] = row[(H + KV + g) * D + d];
            }
        }
    }
    const long tasks = B * H;
    const int team = (tasks * max_len * D > (1L << 16)) ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (long task = 0; task < tasks; ++task) {
        const long b = task / H, head = task % H, g = head / groups, len = positions[b] + 1;
        const float* q = qkv + b * width + head * D;
        const float* keys = reinterpret_cast<const float*>(k_caches[b]) + (layer * KV + g) * capacity[b] * D;
        const float* values = reinterpret_cast<const float*>(v_caches[b]) + (layer * KV + g) * capacity[b] * D;
        float* p = scores + task * max_len;
        float top = -INFINITY;
        for (long t = 0; t < len; ++t) {
            const float* key = keys + t * D;
            __m256 acc = _mm256_setzero_ps();
            long d = 0;
            for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key + d), acc);
            float dot = hsum(acc);
            for (; d < D; ++d) dot += q[d] * key[d];
            p[t] = dot * scale;
            top = p[t] > top ? p[t] : top;
        }
        float total = 0.0f;
        for (long t = 0; t < len; ++t) {
            p[t] = expf(p[t] - top);
            total += p[t];
        }
        float* o = out + b * H * D + head * D;
        for (long d = 0; d < D; ++d) o[d] = 0.0f;
        for (long t = 0; t < len; ++t) {
            const float weight = p[t] / total;
            for (long d = 0; d < D; ++d) o[d] += weight * values[t * D + d];
        }
    }
}
}
