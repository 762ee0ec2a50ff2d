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
template <int KIND, int MB, int NB>
inline void block(const float* x, long K, const typename W<KIND>::T* w, float* y, long N, long m0, long n0) {
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
            y[(m0 + i) * N + n0 + j] = s;
        }
}

template <int KIND, int NB>
inline void columns(const float* x, long M, long K, const typename W<KIND>::T* w, float* y, long N, long n0) {
    long m = 0;
    for (; m + 2 <= M; m += 2) block<KIND, 2, NB>(x, K, w, y, N, m, n0);
    if (m < M) block<KIND, 1, NB>(x, K, w, y, N, m, n0);
}

// bf16 weights, 16 at a time: the low halves of a 32-bit lane shifted up are the even
// elements as fp32, the lane with its low half cleared is the odd one; no widening needed.
// ``xp`` holds x with each 16-chunk's even elements first, then its odd ones.
template <int NB>
inline void block_bf16(const float* xp, const float* x, long K, const uint16_t* w, float* y, long N, long m, long n0) {
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
        y[m * N + n0 + j] = s;
    }
}

template <int NB>
inline void columns_bf16(const float* xp, const float* x, long M, long K, const uint16_t* w, float* y, long N, long n0) {
    for (long m = 0; m < M; ++m) block_bf16<NB>(xp, x, K, w, y, N, m, n0);
}

void rowgemm_bf16(const float* x, long M, long K, const void* weights, long N, float* y, int threads, float* xp) {
    const auto* w = static_cast<const uint16_t*>(weights);
    for (long m = 0; m < M; ++m)
        for (long c = 0; c + 16 <= K; c += 16)
            for (int i = 0; i < 8; ++i) {
                xp[m * K + c + i] = x[m * K + c + 2 * i];
                xp[m * K + c + 8 + i] = x[m * K + c + 2 * i + 1];
            }
    const long blocks = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; ++b) columns_bf16<4>(xp, x, M, K, w, y, N, b * 4);
    for (long n = blocks * 4; n < N; ++n) columns_bf16<1>(xp, x, M, K, w, y, N, n);
}

template <int KIND>
void rowgemm(const float* x, long M, long K, const void* weights, long N, float* y, int threads) {
    const auto* w = static_cast<const typename W<KIND>::T*>(weights);
    const long blocks = N / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; ++b) columns<KIND, 4>(x, M, K, w, y, N, b * 4);
    for (long n = blocks * 4; n < N; ++n) columns<KIND, 1>(x, M, K, w, y, N, n);
}

}  // namespace

extern "C" {
int nc_rowgemm_abi() { return 1; }
// kind: 0 fp32, 1 bf16, 2 fp16 weights; x [M, K] and y [M, N] fp32, W [N, K], all contiguous;
// scratch: M * K floats (bf16 only).
void nc_rowgemm(int kind, const float* x, long M, long K, const void* w, long N, float* y, int threads, float* scratch) {
    if (kind == BF16) rowgemm_bf16(x, M, K, w, N, y, threads, scratch);
    else if (kind == F16) rowgemm<F16>(x, M, K, w, N, y, threads);
    else rowgemm<F32>(x, M, K, w, N, y, threads);
}
}
