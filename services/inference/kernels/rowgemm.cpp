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

#include <omp.h>

#include <algorithm>
#include <vector>

namespace {
// Software prefetch PFB output blocks ahead, spread over a block's iterations: the hardware
// prefetcher alone leaves the memory bus idle between rows (measured: ~2x on AVX2 EPYC).
// 4 blocks (~18 KiB of the 135M model's rows) measured ~3% faster than 8, same elsewhere.
#ifndef PFB
#define PFB 4
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

// e^x for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for
// e^r, then 2^n in the exponent bits): within 2 ulp of expf, ~10x faster than calling it per
// element. x is clamped to [-87, 88], where e^x stays a normal float (what softmax and SiLU need).
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// e^x over n floats in place, 8 at a time (the tail through a padded copy: same arithmetic).
inline void exp_inplace(float* p, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, exp8(_mm256_loadu_ps(p + i)));
    if (i < n) {
        float pad[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (long j = i; j < n; ++j) pad[j - i] = p[j];
        _mm256_storeu_ps(pad, exp8(_mm256_loadu_ps(pad)));
        for (long j = i; j < n; ++j) p[j] = pad[j - i];
    }
}

// MB rows x NB outputs starting at (m0, n0).
struct Out {
    float* y;
    long ldy;      // row stride of y
    float alpha;   // y = alpha * dot, or y += alpha * dot when accumulating
    bool accumulate;
    long n_base = 0;  // y holds outputs from n_base on
    inline void put(long m, long n, float dot) const {
        float* p = y + m * ldy + (n - n_base);
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

// The weights decode reads next (the following matrix of the step), or none.
struct Next {
    const void* w = nullptr;
    long N = 0, K = 0;
};

// Thread t of T's share [b0, b1) of ``blocks``: contiguous, as OpenMP's static schedule.
inline void share(long blocks, int t, int T, long& b0, long& b1) {
    const long q = blocks / T, r = blocks % T;
    b0 = t * q + (t < r ? t : r);
    b1 = b0 + q + (t < r ? 1 : 0);
}

// What a thread prefetches: its own share of this matrix, then its share of the next one, so
// that a matrix's first rows are already on their way when the thread reaches them (measured
// ~3-4% on the 135M model's step, whose 121 matrices are small).
struct Ahead {
    const char* end;   // end of this thread's share here
    const char* next;  // start of its share of the next matrix, or null
    inline const char* at(const char* p) const {
        if (p < end) return p;
        return next ? next + (p - end) : nullptr;
    }
};

// x for a bf16 loop of ``width`` lanes: each width-chunk of a row with its even elements first,
// then its odd ones (the tail past the last whole chunk is read from x itself).
inline void reorder(const float* x, long M, long K, int width, float* xp) {
    const int half = width / 2;
    for (long m = 0; m < M; ++m)
        for (long c = 0; c + width <= K; c += width)
            for (int i = 0; i < half; ++i) {
                xp[m * K + c + i] = x[m * K + c + 2 * i];
                xp[m * K + c + half + i] = x[m * K + c + 2 * i + 1];
            }
}

// bf16 weights, 16 at a time: the low halves of a 32-bit lane shifted up are the even
// elements as fp32, the lane with its low half cleared is the odd one; no widening needed.
// ``xp`` holds x with each 16-chunk's even elements first, then its odd ones.
// MB rows x NB outputs: each widened weight vector feeds MB rows' FMAs (the shift and mask
// take the same vector ports as the FMAs, so a batch is compute-bound without sharing them).
// Two chains per output (even and odd elements), summed at the end: every output's chains and
// final sum are the same whatever MB and NB, so a row's result does not depend on the batch.
template <int MB, int NB>
inline void tile_bf16(const float* xp, const float* x, long K, const uint16_t* w, const Out& y, long m0, long n0,
                      const Ahead* ahead) {
    __m256 acc_e[MB][NB], acc_o[MB][NB];
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) acc_e[i][j] = acc_o[i][j] = _mm256_setzero_ps();
    const uint16_t* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + j) * K;
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    // The prefetch walks PFB 4-output blocks ahead at the pace this tile reads.
    const char* from = reinterpret_cast<const char*>(rows[0] + PFB * 4 * K);
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        if (ahead)
            if (const char* p = ahead->at(from + k * NB * 2))
                for (int b = 0; b < (NB + 1) / 2; ++b) _mm_prefetch(p + 64 * b, _MM_HINT_T0);
        for (int j = 0; j < NB; ++j) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + k));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
            const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, high));
            for (int i = 0; i < MB; ++i) {
                const float* xr = xp + (m0 + i) * K + k;
                acc_e[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), we, acc_e[i][j]);
                acc_o[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), wo, acc_o[i][j]);
            }
        }
    }
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) {
            float s = hsum(_mm256_add_ps(acc_e[i][j], acc_o[i][j]));
            for (long t = k; t < K; ++t) s += x[(m0 + i) * K + t] * W<BF16>::one(rows[j] + t);
            y.put(m0 + i, n0 + j, s);
        }
}

// Rows x outputs of the AVX2 tile for a batch: 3 x 2 (12 accumulators of 16 registers) measured
// 1.11x 4 x 1, 2 x 2 and 4 x 2 (which spills) at batch 8 and 1.09x for an 8-token prefill,
// on an AVX2 EPYC (bench/RESULTS.md).
constexpr long TMB = 3, TNB = 2;

// All M rows for NB outputs, TMB rows at a time; the first tile prefetches.
template <int NB>
inline void rows_bf16(const float* xp, const float* x, long M, long K, const uint16_t* w, const Out& y, long n0,
                      const Ahead* ahead) {
    long m = 0;
    for (; m + TMB <= M; m += TMB) tile_bf16<TMB, NB>(xp, x, K, w, y, m, n0, m == 0 ? ahead : nullptr);
    if (M - m >= 2) {
        tile_bf16<2, NB>(xp, x, K, w, y, m, n0, m == 0 ? ahead : nullptr);
        m += 2;
    }
    for (; m < M; ++m) tile_bf16<1, NB>(xp, x, K, w, y, m, n0, m == 0 ? ahead : nullptr);
}

void rowgemm_bf16(const float* x, long M, long K, const void* weights, long N, const Out& y, int threads, float* xp,
                  const Next& next) {
    const auto* w = static_cast<const uint16_t*>(weights);
    reorder(x, M, K, 16, xp);
    const long blocks = N / 4;
#pragma omp parallel num_threads(threads)
    {
        const int T = omp_get_num_threads(), t = omp_get_thread_num();
        long b0, b1, c0 = 0, c1 = 0;
        share(blocks, t, T, b0, b1);
        if (next.w) share(next.N / 4, t, T, c0, c1);
        const Ahead ahead{reinterpret_cast<const char*>(w + b1 * 4 * K),
                          next.w ? reinterpret_cast<const char*>(static_cast<const uint16_t*>(next.w) + c0 * 4 * next.K)
                                 : nullptr};
        for (long b = b0; b < b1; ++b) {
            if (M == 1) {  // one row: 4 outputs a tile (more loads in flight)
                tile_bf16<1, 4>(xp, x, K, w, y, 0, b * 4, &ahead);
                continue;
            }
            for (long n = b * 4; n < b * 4 + 4; n += TNB) rows_bf16<TNB>(xp, x, M, K, w, y, n, &ahead);
        }
    }
    for (long n = blocks * 4; n < N; ++n) rows_bf16<1>(xp, x, M, K, w, y, n, nullptr);
}

// The same with AVX-512 where the CPU has it (checked at run time: one library runs on every
// x86-64 CPU with AVX2): a 64-byte line of 32 bf16 weights per load, half the instructions of
// the AVX2 loop per byte read. ``xp`` holds x with each 32-chunk's even elements first, then
// its odd ones. Each output is still one fixed chain per (even, odd) lane, so a row's result
// does not depend on the batch; it differs from the AVX2 path's by summation order only.
#define NC_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")))

// MB rows x NB outputs: each widened weight vector feeds MB rows' FMAs (on this loop the
// widening shift/mask competes with the FMAs for the same vector ports, so a batch is
// compute-bound without it). Every output's chains and final sum are the same as with MB = 1.
template <int MB, int NB>
NC_AVX512 inline void tile_bf16_512(const float* xp, const float* x, long K, const uint16_t* w, const Out& y,
                                    long m0, long n0, const Ahead* ahead) {
    __m512 acc_e[MB][NB], acc_o[MB][NB];
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) acc_e[i][j] = acc_o[i][j] = _mm512_setzero_ps();
    const uint16_t* rows[NB];
    for (int j = 0; j < NB; ++j) rows[j] = w + (n0 + j) * K;
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    // The prefetch walks PFB 4-output blocks ahead at the pace this tile reads.
    const char* from = reinterpret_cast<const char*>(rows[0] + PFB * 4 * K);
    long k = 0;
    for (; k + 32 <= K; k += 32) {
        if (ahead)
            for (int j = 0; j < NB; ++j)
                if (const char* p = ahead->at(from + k * NB * 2 + 64 * j)) _mm_prefetch(p, _MM_HINT_T0);
        __m512 we[NB], wo[NB];
        for (int j = 0; j < NB; ++j) {
            const __m512i v = _mm512_loadu_si512(rows[j] + k);
            we[j] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[j] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
        for (int i = 0; i < MB; ++i) {
            const float* xr = xp + (m0 + i) * K + k;
            const __m512 xe = _mm512_loadu_ps(xr), xo = _mm512_loadu_ps(xr + 16);
            for (int j = 0; j < NB; ++j) {
                acc_e[i][j] = _mm512_fmadd_ps(xe, we[j], acc_e[i][j]);
                acc_o[i][j] = _mm512_fmadd_ps(xo, wo[j], acc_o[i][j]);
            }
        }
    }
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(acc_e[i][j], acc_o[i][j]));
            for (long t = k; t < K; ++t) s += x[(m0 + i) * K + t] * W<BF16>::one(rows[j] + t);
            y.put(m0 + i, n0 + j, s);
        }
}

// All M rows for NB outputs, MB_MAX rows at a time; the first tile prefetches.
template <int NB>
NC_AVX512 inline void rows_bf16_512(const float* xp, const float* x, long M, long K, const uint16_t* w,
                                    const Out& y, long n0, const Ahead* ahead) {
    long m = 0;
    for (; m + 4 <= M; m += 4) tile_bf16_512<4, NB>(xp, x, K, w, y, m, n0, m == 0 ? ahead : nullptr);
    if (M - m >= 2) {
        tile_bf16_512<2, NB>(xp, x, K, w, y, m, n0, m == 0 ? ahead : nullptr);
        m += 2;
    }
    if (m < M) tile_bf16_512<1, NB>(xp, x, K, w, y, m, n0, m == 0 ? ahead : nullptr);
}

// One thread's share of rowgemm_bf16_512 (a function of its own: the OpenMP region's outlined
// body would not carry the target attribute). One row: 4 outputs a tile (more loads in flight);
// more rows: 2 outputs x up to 4 rows (the accumulators fit the 32 registers).
NC_AVX512 __attribute__((noinline)) void share_bf16_512(const float* xp, const float* x, long M, long K,
                                                        const uint16_t* w, const Out& y, long b0, long b1,
                                                        const Ahead& ahead) {
    for (long b = b0; b < b1; ++b) {
        if (M == 1) {
            tile_bf16_512<1, 4>(xp, x, K, w, y, 0, b * 4, &ahead);
            continue;
        }
        rows_bf16_512<2>(xp, x, M, K, w, y, b * 4, &ahead);
        rows_bf16_512<2>(xp, x, M, K, w, y, b * 4 + 2, &ahead);
    }
}

NC_AVX512 __attribute__((noinline)) void tail_bf16_512(const float* xp, const float* x, long M, long K,
                                                       const uint16_t* w, const Out& y, long n0, long N) {
    for (long n = n0; n < N; ++n) rows_bf16_512<1>(xp, x, M, K, w, y, n, nullptr);
}

void rowgemm_bf16_512(const float* x, long M, long K, const void* weights, long N, const Out& y, int threads,
                      float* xp, const Next& next) {
    const auto* w = static_cast<const uint16_t*>(weights);
    reorder(x, M, K, 32, xp);
    const long blocks = N / 4;
#pragma omp parallel num_threads(threads)
    {
        const int T = omp_get_num_threads(), t = omp_get_thread_num();
        long b0, b1, c0 = 0, c1 = 0;
        share(blocks, t, T, b0, b1);
        if (next.w) share(next.N / 4, t, T, c0, c1);
        const Ahead ahead{reinterpret_cast<const char*>(w + b1 * 4 * K),
                          next.w ? reinterpret_cast<const char*>(static_cast<const uint16_t*>(next.w) + c0 * 4 * next.K)
                                 : nullptr};
        share_bf16_512(xp, x, M, K, w, y, b0, b1, ahead);
    }
    tail_bf16_512(xp, x, M, K, w, y, blocks * 4, N);
}

// Which bf16 loop runs: 1 = AVX-512 (where the CPU has it), 0 = AVX2. Chosen once, at load.
int g_isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) ? 1 : 0;

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

void gemm(int kind, const float* x, long M, long K, const void* w, long N, float* y, long ldy, float alpha,
          bool accumulate, int threads, float* scratch, const Next& next = Next{}) {
    const Out out{y, ldy, alpha, accumulate};
    if (N * K < 65536) threads = 1;  // a LoRA factor: waking a second thread costs more than it saves
    if (kind == BF16 && g_isa == 1) rowgemm_bf16_512(x, M, K, w, N, out, threads, scratch, next);
    else if (kind == BF16) rowgemm_bf16(x, M, K, w, N, out, threads, scratch, next);
    else if (kind == F16) rowgemm<F16>(x, M, K, w, N, out, threads);
    else rowgemm<F32>(x, M, K, w, N, out, threads);
}

// The k best of v[0, V) (k < V), best first, ties to the lower index, in one pass: the
// running k-th is a floor most blocks of 8 do not clear (one compare for the block).
void top_k_ids(const float* v, long V, long k, std::vector<long>& order) {
    auto better = [&](long a, long b) { return v[a] > v[b] || (v[a] == v[b] && a < b); };
    order.clear();
    order.reserve(k + 1);
    auto offer = [&](long i) {  // ids rise, so a later equal value is never better
        if (static_cast<long>(order.size()) == k && !(v[i] > v[order.back()])) return;
        order.insert(std::upper_bound(order.begin(), order.end(), i, better), i);
        if (static_cast<long>(order.size()) > k) order.pop_back();
    };
    long i = 0;
    for (; i < k; ++i) offer(i);
    for (; i + 8 <= V; i += 8) {
        const __m256 bar = _mm256_set1_ps(v[order.back()]);
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + i), bar, _CMP_GT_OQ)) == 0) continue;
        for (long j = i; j < i + 8; ++j) offer(j);
    }
    for (; i < V; ++i) offer(i);
}

// --- The LM head, shortlisted -----------------------------------------------------------------
// A sampler with top-k reads only the k best logits (and those it changes itself, the
// repetition penalty's). An int8 copy of the LM head (per-row scale s_i, q_i = round(w_i / s_i))
// gives every logit to within a bound that holds for any input x:
//     |x.(s_i q_i) - x.w_i| <= |x| |w_i - s_i q_i| + fp32 rounding of both sums
// (Cauchy-Schwarz; ``bound[i]`` holds |w_i - s_i q_i| plus 1e-4 (|w_i| + |s_i q_i|), which
// covers the rounding of 576-term fp32 sums ~30x over). A token whose upper bound is below
// the k-th best lower bound cannot be among the k best: only the others (and the always-exact
// ids) get their logit from the real weights, with the same arithmetic as the full product, so
// those logits are bitwise the full ones and the sampler draws the same token; every other
// logit is -inf. The int8 copy is half the bytes of bf16: a decode step reads ~10% less.

// int8 row dots: MB rows x NB outputs, two chains per output (as the bf16 loop).
template <int MB, int NB>
inline void tile_i8(const float* x, long K, const int8_t* q, const float* scale, float* y, long ldy, long m0,
                    long n0, const int8_t* ahead) {
    __m256 acc_e[MB][NB], acc_o[MB][NB];
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) acc_e[i][j] = acc_o[i][j] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + k * NB), _MM_HINT_T0);
        for (int j = 0; j < NB; ++j) {
            const int8_t* row = q + (n0 + j) * K + k;
            const __m256 we = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row))));
            const __m256 wo = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8))));
            for (int i = 0; i < MB; ++i) {
                const float* xr = x + (m0 + i) * K + k;
                acc_e[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xr), we, acc_e[i][j]);
                acc_o[i][j] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8), wo, acc_o[i][j]);
            }
        }
    }
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < NB; ++j) {
            float s = hsum(_mm256_add_ps(acc_e[i][j], acc_o[i][j]));
            for (long t = k; t < K; ++t) s += x[(m0 + i) * K + t] * static_cast<float>(q[(n0 + j) * K + t]);
            y[(m0 + i) * ldy + n0 + j] = s * scale[n0 + j];
        }
}

// y[m, n] = scale[n] * x[m] . q[n] for every row and output (the approximate logits).
void gemm_i8(const float* x, long M, long K, const int8_t* q, const float* scale, long N, float* y, long ldy,
             int threads) {
    const long blocks = N / 4;
#pragma omp parallel num_threads(threads)
    {
        long b0, b1;
        share(blocks, omp_get_thread_num(), omp_get_num_threads(), b0, b1);
        for (long b = b0; b < b1; ++b) {
            const int8_t* ahead = b + PFB < b1 ? q + (b + PFB) * 4 * K : nullptr;
            long m = 0;
            for (; m + 2 <= M; m += 2) tile_i8<2, 4>(x, K, q, scale, y, ldy, m, b * 4, m == 0 ? ahead : nullptr);
            if (m < M) tile_i8<1, 4>(x, K, q, scale, y, ldy, m, b * 4, m == 0 ? ahead : nullptr);
        }
    }
    for (long n = blocks * 4; n < N; ++n)
        for (long m = 0; m < M; ++m) tile_i8<1, 1>(x, K, q, scale, y, ldy, m, n, nullptr);
}

NC_AVX512 __attribute__((noinline)) float exact_bf16_512(const float* xp, const float* x, long K,
                                                         const uint16_t* w, long n) {
    float v = 0.0f;
    tile_bf16_512<1, 1>(xp, x, K, w, Out{&v, 0, 1.0f, false, n}, 0, n, nullptr);
    return v;
}

// One output of the full product x @ W.T, bitwise as gemm() computes it (each of its loops
// computes an output with the same chains whatever the tile). ``xp``: x reordered for the
// bf16 loop in use (``reorder_for_isa``).
float exact_dot(int kind, const float* xp, const float* x, long K, const void* w, long n) {
    if (kind == BF16 && g_isa == 1) return exact_bf16_512(xp, x, K, static_cast<const uint16_t*>(w), n);
    float v = 0.0f;
    const Out one{&v, 0, 1.0f, false, n};
    if (kind == BF16) tile_bf16<1, 1>(xp, x, K, static_cast<const uint16_t*>(w), one, 0, n, nullptr);
    else if (kind == F16) block<F16, 1, 1>(x, K, static_cast<const uint16_t*>(w), one, 0, n);
    else block<F32, 1, 1>(x, K, static_cast<const float*>(w), one, 0, n);
    return v;
}

inline void reorder_for_isa(const float* x, long M, long K, float* xp) { reorder(x, M, K, g_isa == 1 ? 32 : 16, xp); }
}  // namespace

extern "C" {
int nc_rowgemm_abi() { return 7; }

// The bf16 loop in use (1 AVX-512, 0 AVX2); ``want`` >= 0 asks for one (AVX-512 only where the
// CPU has it), -1 only asks. For benchmarks and tests that compare the two.
int nc_rowgemm_isa(int want) {
    if (want == 0) g_isa = 0;
    if (want == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) g_isa = 1;
    return g_isa;
}

// y = x @ W.T (or y += alpha * x @ W.T with accumulate): kind 0 fp32, 1 bf16, 2 fp16 weights;
// x [M, K] fp32 and W [N, K] contiguous; y fp32 with row stride ldy; scratch M * K floats.
void nc_rowgemm(int kind, const float* x, long M, long K, const void* w, long N, float* y, long ldy,
                float alpha, int accumulate, int threads, float* scratch) {
    gemm(kind, x, M, K, w, N, y, ldy, alpha, accumulate != 0, threads, scratch);
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
    for (long m = 0; m < M; ++m) {
        const float* g = gu + m * 2 * I;
        float* o = out + m * I;
        for (long i = 0; i < I; ++i) o[i] = -g[i];
        exp_inplace(o, I);
        for (long i = 0; i < I; ++i) o[i] = g[i] / (1.0f + o[i]) * g[I + i];
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
    // A second thread pays off from ~8K multiply-adds (one 40-token row measured 0.45 -> 0.34 ms
    // of attention per step with two threads).
    const int team = (tasks * max_len * D > (1L << 13)) ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
    for (long task = 0; task < tasks; ++task) {
        const long b = task / H, head = task % H, g = head / groups, len = positions[b] + 1;
        const float* q = qkv + b * width + head * D;
        const float* keys = reinterpret_cast<const float*>(k_caches[b]) + (layer * KV + g) * capacity[b] * D;
        const float* values = reinterpret_cast<const float*>(v_caches[b]) + (layer * KV + g) * capacity[b] * D;
        float* p = scores + task * max_len;
        float top = -INFINITY;
        long t = 0;
        if (D % 8 == 0)  // four keys at a time: four independent chains, each key's the same as alone
            for (; t + 4 <= len; t += 4) {
                const float* key = keys + t * D;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (long d = 0; d < D; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(q + d);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key + d), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key + D + d), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key + 2 * D + d), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key + 3 * D + d), a3);
                }
                p[t] = hsum(a0) * scale;
                p[t + 1] = hsum(a1) * scale;
                p[t + 2] = hsum(a2) * scale;
                p[t + 3] = hsum(a3) * scale;
                for (int i = 0; i < 4; ++i) top = p[t + i] > top ? p[t + i] : top;
            }
        for (; t < len; ++t) {
            const float* key = keys + t * D;
            __m256 acc = _mm256_setzero_ps();
            long d = 0;
            for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key + d), acc);
            float dot = hsum(acc);
            for (; d < D; ++d) dot += q[d] * key[d];
            p[t] = dot * scale;
            top = p[t] > top ? p[t] : top;
        }
        for (long t = 0; t < len; ++t) p[t] -= top;
        exp_inplace(p, len);
        float total = 0.0f;
        for (long t = 0; t < len; ++t) total += p[t];
        float* o = out + b * H * D + head * D;
        // Accumulate in a local row (no aliasing with the cache: it stays in registers), then
        // store; the same operations in the same order as accumulating in ``o``.
        float acc[256];
        float* into = D <= 256 ? acc : o;
        for (long d = 0; d < D; ++d) into[d] = 0.0f;
        for (long t = 0; t < len; ++t) {
            const float weight = p[t] / total;
            const float* v = values + t * D;
            for (long d = 0; d < D; ++d) into[d] += weight * v[d];
        }
        if (into != o)
            for (long d = 0; d < D; ++d) o[d] = into[d];
    }
}

// Every decoder layer of one decode step for B rows, each with its own adapter or none: the
// same arithmetic as the calls above made one by one, without a trip through Python per op.
// h [B, hidden] is the residual stream (updated in place). weights: per layer six pointers
// (input norm, post-attention norm, fused q/k/v, o, fused gate/up, down), all of ``kind``.
// G adapters: lora [G, layers, 7 modules (q, k, v, o, gate, up, down), 2] the A and B pointers
// (fp32) or 0, lora_scale and lora_rank [G, layers, 7]; adapter_of_row[B]: an index < G, or
// -1 for the base model. Attention arguments as nc_decode_attention.
//
// A LoRA delta is added to each row as ``out + (B(A(x)) * scale)``, rows computed
// independently, so a row's result is the same whichever other rows share its adapter.
void nc_decode_layers(float* h, long B, long hidden, long layers, const int64_t* weights, int kind, float eps,
                      long H, long KV, long D, long inter, long G, const int64_t* lora, const float* lora_scale,
                      const long* lora_rank, const long* adapter_of_row, const long* positions, const float* cos_table,
                      const float* sin_table, const int64_t* k_caches, const int64_t* v_caches,
                      const long* capacity, float attn_scale, long max_len, int threads) {
    const long qkv_width = (H + 2 * KV) * D, attn_width = H * D;
    const long widest = hidden > inter ? hidden : inter;
    long max_rank = 1;
    for (long i = 0; i < G * layers * 7; ++i) max_rank = lora_rank[i] > max_rank ? lora_rank[i] : max_rank;
    const long in_max = widest > attn_width ? widest : attn_width;
    std::vector<float> x(B * hidden), qkv(B * qkv_width), att(B * attn_width), gu(B * 2 * inter),
        act(B * inter), t(B * max_rank), scratch(B * in_max), scores(B * H * max_len), gathered(B * in_max),
        delta(B * in_max);
    // The rows of each adapter.
    std::vector<std::vector<long>> members(G);
    for (long r = 0; r < B; ++r)
        if (adapter_of_row[r] >= 0 && adapter_of_row[r] < G) members[adapter_of_row[r]].push_back(r);
    // Output columns of each module inside its fused output, and its input width.
    const long col[7] = {0, H * D, (H + KV) * D, 0, 0, inter, 0};
    const long cols[7] = {H * D, KV * D, KV * D, hidden, inter, inter, hidden};
    auto add_lora = [&](long l, int m, const float* in, long in_width, float* out, long ldo) {
        for (long g = 0; g < G; ++g) {
            const long slot = (g * layers + l) * 7 + m, n = static_cast<long>(members[g].size());
            const int64_t a = lora[slot * 2], b = lora[slot * 2 + 1];
            const long r = lora_rank[slot];
            if (!a || !b || r <= 0 || n == 0) continue;
            const float scale = lora_scale[slot];
            const void* pa = reinterpret_cast<const void*>(a);
            const void* pb = reinterpret_cast<const void*>(b);
            if (n == B) {  // every row: accumulate in place
                gemm(F32, in, B, in_width, pa, r, t.data(), r, 1.0f, false, threads, scratch.data());
                gemm(F32, t.data(), B, r, pb, cols[m], out + col[m], ldo, scale, true, threads, scratch.data());
                continue;
            }
            for (long i = 0; i < n; ++i)
                for (long k = 0; k < in_width; ++k) gathered[i * in_width + k] = in[members[g][i] * in_width + k];
            gemm(F32, gathered.data(), n, in_width, pa, r, t.data(), r, 1.0f, false, threads, scratch.data());
            gemm(F32, t.data(), n, r, pb, cols[m], delta.data(), cols[m], 1.0f, false, threads, scratch.data());
            for (long i = 0; i < n; ++i) {
                float* row = out + members[g][i] * ldo + col[m];
                for (long j = 0; j < cols[m]; ++j) row[j] = row[j] + delta[i * cols[m] + j] * scale;
            }
        }
    };
    for (long l = 0; l < layers; ++l) {
        const int64_t* w = weights + l * 6;
        const void* ln1 = reinterpret_cast<const void*>(w[0]);
        const void* ln2 = reinterpret_cast<const void*>(w[1]);
        // Each projection prefetches the head of the one after it (the next layer's q/k/v last).
        const Next o_next{reinterpret_cast<const void*>(w[3]), hidden, attn_width};
        const Next gu_next{reinterpret_cast<const void*>(w[4]), 2 * inter, hidden};
        const Next down_next{reinterpret_cast<const void*>(w[5]), hidden, inter};
        const Next qkv_next = l + 1 < layers ? Next{reinterpret_cast<const void*>(w[6 + 2]), qkv_width, hidden} : Next{};
        nc_rmsnorm(h, B, hidden, ln1, kind, eps, x.data());
        gemm(kind, x.data(), B, hidden, reinterpret_cast<const void*>(w[2]), qkv_width, qkv.data(), qkv_width, 1.0f,
             false, threads, scratch.data(), o_next);
        // The keys and values attention reads next were evicted by the step's weight stream:
        // ask for them all now (more misses in flight than its short per-head streams get from
        // the hardware prefetcher), while the LoRA deltas are computed.
        for (long b = 0; b < B; ++b)
            for (long g = 0; g < KV; ++g) {
                const long at = (l * KV + g) * capacity[b] * D, bytes = positions[b] * D * 4;
                const char* kp = reinterpret_cast<const char*>(reinterpret_cast<const float*>(k_caches[b]) + at);
                const char* vp = reinterpret_cast<const char*>(reinterpret_cast<const float*>(v_caches[b]) + at);
                for (long o = 0; o < bytes; o += 64) {
                    _mm_prefetch(kp + o, _MM_HINT_T0);
                    _mm_prefetch(vp + o, _MM_HINT_T0);
                }
            }
        for (int m = 0; m < 3; ++m) add_lora(l, m, x.data(), hidden, qkv.data(), qkv_width);
        nc_decode_attention(qkv.data(), B, H, KV, D, positions, cos_table, sin_table, k_caches, v_caches, capacity, l,
                            attn_scale, att.data(), scores.data(), max_len, threads);
        gemm(kind, att.data(), B, attn_width, reinterpret_cast<const void*>(w[3]), hidden, h, hidden, 1.0f, true,
             threads, scratch.data(), gu_next);
        add_lora(l, 3, att.data(), attn_width, h, hidden);
        nc_rmsnorm(h, B, hidden, ln2, kind, eps, x.data());
        gemm(kind, x.data(), B, hidden, reinterpret_cast<const void*>(w[4]), 2 * inter, gu.data(), 2 * inter, 1.0f,
             false, threads, scratch.data(), down_next);
        for (int m = 4; m < 6; ++m) add_lora(l, m, x.data(), hidden, gu.data(), 2 * inter);
        nc_silu_mul(gu.data(), B, inter, act.data());
        gemm(kind, act.data(), B, inter, reinterpret_cast<const void*>(w[5]), hidden, h, hidden, 1.0f, true, threads,
             scratch.data(), qkv_next);
        add_lora(l, 6, act.data(), inter, h, hidden);
    }
}

// The next token of one request from its fp32 logits row, in Hugging Face's order: repetition
// penalty (on ``logits``, in place: the row is the caller's copy), temperature, top-k, top-p.
// ``u`` in [0, 1) is the request's own uniform draw; the token is the inverse CDF at ``u`` over
// the kept tokens, best logit first (ties: lower id first), or in id order when neither top-k
// nor top-p filters. ``sampling.py`` holds the same algorithm in torch for engines without this
// library. One pass selects the top k (torch.topk and a softmax over the whole row cost ~0.5 ms
// per token here, a few percent of a decode step).
long nc_sample(float* logits, long V, const int64_t* seen, long nseen, float penalty, double temperature,
               long top_k, double top_p, double u) {
    if (penalty != 1.0f && nseen > 0) {
        std::vector<float> scores(nseen);  // gather first: a repeated id is penalized once
        for (long i = 0; i < nseen; ++i) scores[i] = logits[seen[i]];
        for (long i = 0; i < nseen; ++i)
            logits[seen[i]] = scores[i] < 0.0f ? scores[i] * penalty : scores[i] / penalty;
    }
    if (temperature == 0.0) {
        long best = 0;
        for (long i = 1; i < V; ++i)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    const bool by_rank = (top_k > 0 && top_k < V) || top_p < 1.0;
    const long k = top_k > 0 && top_k < V ? top_k : V;
    std::vector<long> order;
    if (k < V) {
        top_k_ids(logits, V, k, order);
    } else {
        order.resize(V);
        for (long i = 0; i < V; ++i) order[i] = i;
        auto better = [&](long a, long b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
        if (by_rank) std::sort(order.begin(), order.end(), better);
    }
    float top = logits[order[0]];
    for (long i : order) top = logits[i] > top ? logits[i] : top;
    std::vector<double> p(order.size());
    double total = 0.0;
    for (size_t i = 0; i < order.size(); ++i) {
        p[i] = exp((static_cast<double>(logits[order[i]]) - top) / temperature);
        total += p[i];
    }
    size_t kept = order.size();
    if (top_p < 1.0) {  // keep a token while the mass of strictly better ones is below top_p
        double before = 0.0;
        for (kept = 0; kept < order.size() && (kept == 0 || before < top_p * total); ++kept) before += p[kept];
    }
    double mass = 0.0;
    for (size_t i = 0; i < kept; ++i) mass += p[i];
    const double target = u * mass;
    double acc = 0.0;
    for (size_t i = 0; i < kept; ++i) {
        acc += p[i];
        if (target < acc) return order[i];
    }
    return order[kept - 1];
}

// The LM head's logits for B rows when row b's sampler reads only its k[b] best logits and
// those of its always[b] ids (always_n[b] of them; int64): those are exact (bitwise the full
// product's), every other logit is -inf; 1 <= k[b] < V - always_n[b]. x [B, K] fp32
// (the final-normed hidden states), q [V, K] int8 with scale[V] and bound[V] (see above), w
// [V, K] the real weights of ``kind``; out [B, V]; scratch (B * K floats) for the reordered x.
void nc_lm_head_shortlist(const float* x, long B, long K, const int8_t* q, const float* scale, const float* bound,
                          const void* w, int kind, long V, const long* k, const int64_t* always,
                          const long* always_n, float* out, int threads, float* scratch) {
    gemm_i8(x, B, K, q, scale, V, out, V, threads);
    if (kind == BF16) reorder_for_isa(x, B, K, scratch);
    std::vector<uint8_t> keep(V);
    std::vector<long> ids;
    std::vector<float> lower(V);
    for (long b = 0; b < B; ++b) {
        float* row = out + b * V;
        const float* xb = x + b * K;
        const float* xpb = scratch + b * K;
        double norm2 = 0.0;
        for (long d = 0; d < K; ++d) norm2 += static_cast<double>(xb[d]) * xb[d];
        const float nx = static_cast<float>(sqrt(norm2) * (1.0 + 1e-6));  // rounded up
        std::fill(keep.begin(), keep.end(), 0);
        const auto* always_b = reinterpret_cast<const int64_t*>(always[b]);
        for (long i = 0; i < always_n[b]; ++i) keep[always_b[i]] = 1;
        // The k-th best lower bound over the other ids: a lower bound of the k-th best logit.
        const __m256 vnx = _mm256_set1_ps(nx);
        for (long i = 0; i + 8 <= V; i += 8)
            _mm256_storeu_ps(lower.data() + i,
                             _mm256_fnmadd_ps(vnx, _mm256_loadu_ps(bound + i), _mm256_loadu_ps(row + i)));
        for (long i = V / 8 * 8; i < V; ++i) lower[i] = row[i] - nx * bound[i];
        for (long i = 0; i < always_n[b]; ++i) lower[always_b[i]] = -INFINITY;
        top_k_ids(lower.data(), V, k[b], ids);
        const float floor = lower[ids.back()];
        ids.clear();
        const __m256 vfloor = _mm256_set1_ps(floor), minus_inf = _mm256_set1_ps(-INFINITY);
        long n = 0;
        for (; n + 8 <= V; n += 8) {
            const __m256 upper = _mm256_fmadd_ps(vnx, _mm256_loadu_ps(bound + n), _mm256_loadu_ps(row + n));
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(upper, vfloor, _CMP_GE_OQ));
            mask |= static_cast<int>(_mm_movemask_epi8(_mm_cmpgt_epi8(  // the always ids
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep.data() + n)), _mm_setzero_si128())));
            _mm256_storeu_ps(row + n, minus_inf);
            for (; mask; mask &= mask - 1) ids.push_back(n + __builtin_ctz(mask));
        }
        for (; n < V; ++n) {
            if (keep[n] || row[n] + nx * bound[n] >= floor) ids.push_back(n);
            row[n] = -INFINITY;
        }
        const long count = static_cast<long>(ids.size());
        const long row_bytes = K * (kind == F32 ? 4 : 2);
#pragma omp parallel for num_threads(count > 64 ? threads : 1) schedule(static)
        for (long c = 0; c < count; ++c) {
            if (c + 4 < count) {  // scattered rows: ask for one four ahead
                const char* ahead = static_cast<const char*>(w) + ids[c + 4] * row_bytes;
                for (long o = 0; o < row_bytes; o += 64) _mm_prefetch(ahead + o, _MM_HINT_T0);
            }
            row[ids[c]] = exact_dot(kind, xpb, xb, K, w, ids[c]);
        }
    }
}
}

