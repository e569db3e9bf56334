// GroupNorm(+ReLU) on the CPU (C++17 + OpenMP). The CUDA kernels in group_norm.cu follow the same algorithm.
// Per (n, g) over M = C/G * S elements, in the acc type A (float; double for f64 storage):
//   mean, M2 = sum (x - mean)^2  by Chan merges of exact two-pass pieces (never E[x^2] - E[x]^2),
//   rstd = 1 / sqrt(M2 / M + eps),   z = (x - mean) * (rstd * w[c]) + b[c],   y = relu(z) or z.
// Backward, with dz = dy masked by z > 0 (z recomputed from x exactly as forward did, never stored), sums per (n, c):
//   sdz[n,c] = sum_s dz,  sdzxm[n,c] = sum_s dz * (x - mean)
//   dbias[c] = sum_n sdz,  dweight[c] = sum_n rstd * sdzxm       (n in increasing order: deterministic)
//   c1 = sum_{c in g} w sdz / M,  c2 = rstd * sum_{c in g} w sdzxm / M
//   dx = dz * (rstd * w[c]) + (x - mean) * (-rstd^2 c2) - rstd c1
// Layouts. NCHW, x is (N, C, S): one task per (n, g), whose C/G * S elements are contiguous and small enough to stay
// in L2 between the stats pass and the output pass; the pieces are kChunk-element chunks, two-pass while in L1.
// NHWC, x is (N, S, C): blocks of R rows; a block gives per-channel two-pass moments (SIMD across channels), blocks
// merge per channel in a fixed order, then a group's channels merge into the group. A thread runs whole samples
// when there are enough of them, else the blocks of a cache-sized chunk of samples run in parallel; either way the
// output pass re-reads x (and dy) from cache, not DRAM.
// Sums run on x - (an element of the same sample), so a large common offset (x = 1000 + noise) loses no bits.
// Every summation order is fixed by the shape and the clone: bit-identical results run to run and for any thread
// count. The AVX2 and baseline clones agree bitwise except the NCHW backward's per-channel sums (an omp simd
// reduction, whose lane count is the vector width). "avx2" enables no FMA, and ISO -std=c++NN builds use
// -ffp-contract=off, so z is rounded the same way in the forward pass and in the backward mask.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>
#include <type_traits>
#include <vector>

#include "group_norm.h"

// Hot task functions get an AVX2 clone picked at load time (ifunc); other targets use the baseline build.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define BITFAST_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BITFAST_CLONES
#endif
#define BITFAST_SIMD _Pragma("omp simd")
#define BITFAST_UNROLL _Pragma("GCC unroll 8")  // unrolled before vectorization: no inner loop in the SIMD body

namespace bitfast {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

constexpr int kLanes = 16;                 // independent partial sums: SIMD without reassociating
// Sums are two-level: kLanes partials (or a channel's running sum) over at most kChunk elements (NCHW) or kRows
// rows (NHWC), then the piece totals in order. Short sequential runs keep fp32 sums within a few ulps.
constexpr int64_t kChunk = 1024;           // NCHW: elements per exact two-pass piece (4 KiB of fp32: L1)
constexpr int64_t kRows = 64;              // NHWC: rows per block (the partials add 2/64 of x's size)
constexpr int64_t kCacheElems = 1 << 19;   // NHWC: elements per sample chunk (x and dy of a chunk stay in cache)
constexpr int64_t kParamSlice = 16;        // dweight/dbias: samples per slice, = BITFAST_GN_PARAM_SLICE of the .cu
constexpr int64_t kParallelMin = 1 << 14;  // fewer elements than this stay on one thread

template <typename T, typename A> inline A ld(const T* p, int64_t i) { return static_cast<A>(p[i]); }

// keep ? v : 0 without a branch: the ReLU mask is data-dependent, and a branch in a scalar tail mispredicts half the
// time (it was the top cost of the NCHW backward at S = 49). Bit select, so a NaN or inf dy is masked to 0 as well.
// Callers pass keep = !(z <= 0), as torch's threshold_backward does: a NaN z lets the gradient through.
template <typename A> inline A keep_if(bool keep, A v) {
  using U = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;
  return std::bit_cast<A>(std::bit_cast<U>(v) & (U(0) - U(keep)));
}

// Running (count, mean, M2); chan_merge adds a piece of nb elements with mean mb and M2 qb.
template <typename A> struct Moments { A n = 0, mean = 0, m2 = 0; };
template <typename A> inline void chan_merge(Moments<A>& m, A nb, A mb, A qb) {
  const A n = m.n + nb, d = mb - m.mean, f = nb / n;
  m.mean += d * f;
  m.m2 += qb + d * d * (m.n * f);
  m.n = n;
}
// The same merge with f = nb / (m.n + nb) and g = m.n * f given: NHWC merges every channel's blocks in the same
// order, so the counts (and the divisions) are per block, not per channel (~4% of the C = 1024 channels_last
// forward, bench/ab_native.py). m.n is left alone.
template <typename A> inline void chan_merge(Moments<A>& m, double f, double g, A mb, A qb) {
  const A d = mb - m.mean;
  m.mean += d * static_cast<A>(f);
  m.m2 += qb + d * d * static_cast<A>(g);
}

template <typename A> inline A rsqrt_var(A m2, int64_t count, double eps) {
  return static_cast<A>(1.0 / std::sqrt(static_cast<double>(m2 / static_cast<A>(count)) + eps));
}

// acc[0] + ... + acc[kLanes - 1] as a fixed pairwise tree, not a chain of kLanes dependent adds (~4 cycles each).
// Written out level by level so that it compiles to two vector adds and a short shuffle tail, not a loop. lane_sum
// (NCHW forward, once per kChunk piece) gains ~4% at C = 1024/2048 from it (bench/ab_native.py).
template <typename A> inline A tree_sum(const A* acc) {
  static_assert(kLanes == 16, "tree_sum is written for 16 lanes");
  A h8[8], h4[4];
  for (int j = 0; j < 8; ++j) h8[j] = acc[j] + acc[j + 8];
  for (int j = 0; j < 4; ++j) h4[j] = h8[j] + h8[j + 4];
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

// sum_{i < n} f(i) with kLanes independent partials (vectorises; the order depends on n only).
template <typename A, typename F> inline A lane_sum(int64_t n, F f) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  A s = 0;
  for (; i < n; ++i) s += f(i);
  return tree_sum(acc) + s;
}

// for i in [0, n): f(i), as an OpenMP loop only when `par`. An `if (false)` parallel region still sets up a team
// of one, ~1-2 us each; the NHWC per-sample path opens three per sample (~6% of a 2048x7x7 forward on one thread).
template <typename F> inline void for_range(bool par, int64_t n, F&& f) {
  if (!par) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) f(i);
}

// ------------------------------------------------------------------------------------------------ NCHW
// One (n, g): x, y hold D channel rows of S elements; w, b point at the group's first channel (or are null).
template <bool Relu, typename T, typename A>
BITFAST_CLONES void fwd_group(const T* x, T* y, int64_t D, int64_t S, const A* w, const A* b, double eps, A* mean,
                              A* rstd) {
  const int64_t M = D * S;
  const A x0 = ld<T, A>(x, 0);  // shift
  Moments<A> m;
  for (int64_t i0 = 0; i0 < M; i0 += kChunk) {
    const int64_t L = std::min(kChunk, M - i0);
    const T* p = x + i0;
    const A cm = lane_sum<A>(L, [&](int64_t i) { return ld<T, A>(p, i) - x0; }) / static_cast<A>(L);
    const A q = lane_sum<A>(L, [&](int64_t i) {
      const A d = ld<T, A>(p, i) - x0 - cm;
      return d * d;
    });
    chan_merge(m, static_cast<A>(L), cm, q);
  }
  const A mu = x0 + m.mean, rs = rsqrt_var(m.m2, M, eps);
  *mean = mu;
  *rstd = rs;
  for (int64_t d = 0; d < D; ++d) {
    const A k = w ? rs * w[d] : rs, h = b ? b[d] : A(0);
    const T* xc = x + d * S;
    T* yc = y + d * S;
    BITFAST_SIMD
    for (int64_t i = 0; i < S; ++i) {
      A z = (ld<T, A>(xc, i) - mu) * k + h;
      if (Relu) z = z < A(0) ? A(0) : z;
      yc[i] = static_cast<T>(z);
    }
  }
}

template <bool Relu, typename T, typename A>
BITFAST_CLONES void bwd_group(const T* dy, const T* x, T* dx, int64_t D, int64_t S, const A* w, const A* b, A mu,
                              A rs, A* sdz, A* sdzxm) {
  A gw = 0, gwxm = 0;
  for (int64_t d = 0; d < D; ++d) {  // per-channel sums of dz and dz * (x - mean)
    const T* xc = x + d * S;
    const T* gc = dy + d * S;
    const A wc = w ? w[d] : A(1), k = rs * wc, h = b ? b[d] : A(0);
    auto add = [&](int64_t i, A& t0, A& t1) {
      const A xm = ld<T, A>(xc, i) - mu;
      A dz = ld<T, A>(gc, i);
      if (Relu) dz = keep_if(!(xm * k + h <= A(0)), dz);
      t0 += dz;
      t1 += dz * xm;
    };
    // omp simd reduction, not lane arrays + a tree: on 49-element rows (BiT's last stage) the compiler's own
    // register reduction made the whole backward 17% faster. Its lane count is the clone's vector width, so the
    // AVX2 and baseline builds may differ in the last bits (each is still deterministic). Pieces of kChunk bound
    // the length of each lane's sequential sum.
    A t0 = 0, t1 = 0;
    for (int64_t i0 = 0; i0 < S; i0 += kChunk) {
      const int64_t i1 = std::min(S, i0 + kChunk);
      A u0 = 0, u1 = 0;
#pragma omp simd reduction(+ : u0, u1)
      for (int64_t i = i0; i < i1; ++i) add(i, u0, u1);
      t0 += u0;
      t1 += u1;
    }
    sdz[d] = t0;
    sdzxm[d] = t1;
    gw += wc * t0;
    gwxm += wc * t1;
  }
  const int64_t M = D * S;
  const A c1 = gw / static_cast<A>(M), c2 = rs * gwxm / static_cast<A>(M), q = -rs * rs * c2, r = -rs * c1;
  for (int64_t d = 0; d < D; ++d) {
    const T* xc = x + d * S;
    const T* gc = dy + d * S;
    T* dxc = dx + d * S;
    const A k = w ? rs * w[d] : rs, h = b ? b[d] : A(0);
    BITFAST_SIMD
    for (int64_t i = 0; i < S; ++i) {
      const A xm = ld<T, A>(xc, i) - mu;
      A dz = ld<T, A>(gc, i);
      if (Relu) dz = xm * k + h <= A(0) ? A(0) : dz;
      dxc[i] = static_cast<T>(dz * k + xm * q + r);
    }
  }
}

template <bool Relu, typename T, typename A>
void fwd_nchw(const GNArgs& a, const T* x, const A* w, const A* b, T* y, A* mean, A* rstd) {
  const int64_t D = a.C / a.G, M = D * a.S;
#pragma omp parallel for schedule(static) if (a.N * a.C * a.S >= kParallelMin)
  for (int64_t ng = 0; ng < a.N * a.G; ++ng) {
    const int64_t c0 = (ng % a.G) * D;
    fwd_group<Relu, T, A>(x + ng * M, y + ng * M, D, a.S, w ? w + c0 : nullptr, b ? b + c0 : nullptr, a.eps,
                          mean + ng, rstd + ng);
  }
}

template <bool Relu, typename T, typename A>
void bwd_nchw(const GNArgs& a, const T* dy, const T* x, const A* w, const A* b, const A* mean, const A* rstd, T* dx,
              A* sdz, A* sdzxm) {
  const int64_t D = a.C / a.G, M = D * a.S;
#pragma omp parallel for schedule(static) if (a.N * a.C * a.S >= kParallelMin)
  for (int64_t ng = 0; ng < a.N * a.G; ++ng) {
    const int64_t c0 = (ng % a.G) * D;
    bwd_group<Relu, T, A>(dy + ng * M, x + ng * M, dx + ng * M, D, a.S, w ? w + c0 : nullptr, b ? b + c0 : nullptr,
                          mean[ng], rstd[ng], sdz + ng * D, sdzxm + ng * D);
  }
}

// ------------------------------------------------------------------------------------------------ NHWC
// Task functions on an (R, C) block of rows; per-channel arrays are (C,). Loops run rows outer, channels inner:
// x streams sequentially and the per-channel state stays in L1.

// The NHWC loops run rows outer, channels inner (SIMD), and hold a channel's state (x0, mean, mu, k, h, q, r,
// running sums) in locals. With C >= kUnrollMinC they take kUnroll rows per pass over the channels, loading that
// state once per kUnroll rows. Measured with bench/ab_native.py against the plain row-by-row loops (batch 8,
// 1 thread, channels_last). Backward: C=2048 +16-18%, C=1024 +4-8%, C=512 +3-15%, C=256 +5-14%; unrolling
// C <= 512 too made those 20-40% slower (2 rows as 4; cause not found). Forward: C=2048 +15-20%, C=1024 +10-15%,
// C=512 -1-2%, C=256 -7-0% (A/A noise there ~10%). Each channel still sees its rows in increasing order, so sums
// round exactly as row by row and the switch never changes results. The row loops are written out in each task:
// routing them through a generic lambda made the small-C forward slower (C=512: -19%).
constexpr int kUnroll = 4;
constexpr int64_t kUnrollMinC = 1024;

// mean[c] += sum over rows [r0, r0 + U) of x - x0.
template <int U, typename T, typename A>
inline void sum_rows(const T* __restrict__ x, const T* __restrict__ x0, int64_t r0, int64_t C, A* __restrict__ mean) {
  BITFAST_SIMD
  for (int64_t c = 0; c < C; ++c) {
    const A s = ld<T, A>(x0, c);
    A t = mean[c];
    BITFAST_UNROLL
    for (int u = 0; u < U; ++u) t += ld<T, A>(x, (r0 + u) * C + c) - s;
    mean[c] = t;
  }
}

// m2[c] += sum over rows [r0, r0 + U) of (x - x0 - mean)^2.
template <int U, typename T, typename A>
inline void sq_rows(const T* __restrict__ x, const T* __restrict__ x0, int64_t r0, int64_t C,
                    const A* __restrict__ mean, A* __restrict__ m2) {
  BITFAST_SIMD
  for (int64_t c = 0; c < C; ++c) {
    const A s = ld<T, A>(x0, c), m = mean[c];
    A t = m2[c];
    BITFAST_UNROLL
    for (int u = 0; u < U; ++u) {
      const A d = ld<T, A>(x, (r0 + u) * C + c) - s - m;
      t += d * d;
    }
    m2[c] = t;
  }
}

// Per-channel moments of x - x0 over the block, exact two-pass (the block stays in L2 between the passes).
template <typename T, typename A>
BITFAST_CLONES void block_moments(const T* __restrict__ x, const T* __restrict__ x0, int64_t R, int64_t C,
                                  A* __restrict__ mean, A* __restrict__ m2) {
  std::fill(mean, mean + C, A(0));
  std::fill(m2, m2 + C, A(0));
  int64_t r = 0;
  if (C >= kUnrollMinC)
    for (; r + kUnroll <= R; r += kUnroll) sum_rows<kUnroll>(x, x0, r, C, mean);
  for (; r < R; ++r) sum_rows<1>(x, x0, r, C, mean);
  const A inv = A(1) / static_cast<A>(R);
  BITFAST_SIMD
  for (int64_t c = 0; c < C; ++c) mean[c] *= inv;
  r = 0;
  if (C >= kUnrollMinC)
    for (; r + kUnroll <= R; r += kUnroll) sq_rows<kUnroll>(x, x0, r, C, mean, m2);
  for (; r < R; ++r) sq_rows<1>(x, x0, r, C, mean, m2);
}

// y = relu?((x - mu) * k + h) over rows [r0, r0 + U).
template <int U, bool Relu, typename T, typename A>
inline void normalize_rows(const T* __restrict__ x, T* __restrict__ y, int64_t r0, int64_t C, const A* __restrict__ mu,
                           const A* __restrict__ k, const A* __restrict__ h) {
  BITFAST_SIMD
  for (int64_t c = 0; c < C; ++c) {
    const A m = mu[c], kc = k[c], hc = h[c];
    BITFAST_UNROLL
    for (int u = 0; u < U; ++u) {
      A z = (ld<T, A>(x, (r0 + u) * C + c) - m) * kc + hc;
      if (Relu) z = z < A(0) ? A(0) : z;
      y[(r0 + u) * C + c] = static_cast<T>(z);
    }
  }
}

template <bool Relu, typename T, typename A>
BITFAST_CLONES void block_normalize(const T* __restrict__ x, T* __restrict__ y, int64_t R, int64_t C,
                                    const A* __restrict__ mu, const A* __restrict__ k, const A* __restrict__ h) {
  int64_t r = 0;
  if (C >= kUnrollMinC)
    for (; r + kUnroll <= R; r += kUnroll) normalize_rows<kUnroll, Relu>(x, y, r, C, mu, k, h);
  for (; r < R; ++r) normalize_rows<1, Relu>(x, y, r, C, mu, k, h);
}

// Per-channel sums of dz and dz * (x - mean) over rows [r0, r0 + U), added to s0, s1.
template <int U, bool Relu, typename T, typename A>
inline void bwd_sums_rows(const T* __restrict__ dy, const T* __restrict__ x, int64_t r0, int64_t C,
                          const A* __restrict__ mu, const A* __restrict__ k, const A* __restrict__ h,
                          A* __restrict__ s0, A* __restrict__ s1) {
  BITFAST_SIMD
  for (int64_t c = 0; c < C; ++c) {
    const A m = mu[c], kc = k[c], hc = h[c];
    A t0 = s0[c], t1 = s1[c];
    BITFAST_UNROLL
    for (int u = 0; u < U; ++u) {
      const A xm = ld<T, A>(x, (r0 + u) * C + c) - m;
      A dz = ld<T, A>(dy, (r0 + u) * C + c);
      if (Relu) dz = keep_if(!(xm * kc + hc <= A(0)), dz);
      t0 += dz;
      t1 += dz * xm;
    }
    s0[c] = t0;
    s1[c] = t1;
  }
}

template <bool Relu, typename T, typename A>
BITFAST_CLONES void block_bwd_sums(const T* __restrict__ dy, const T* __restrict__ x, int64_t R, int64_t C,
                                   const A* __restrict__ mu, const A* __restrict__ k, const A* __restrict__ h,
                                   A* __restrict__ s0, A* __restrict__ s1) {
  std::fill(s0, s0 + C, A(0));
  std::fill(s1, s1 + C, A(0));
  int64_t r = 0;
  if (C >= kUnrollMinC)
    for (; r + kUnroll <= R; r += kUnroll) bwd_sums_rows<kUnroll, Relu>(dy, x, r, C, mu, k, h, s0, s1);
  for (; r < R; ++r) bwd_sums_rows<1, Relu>(dy, x, r, C, mu, k, h, s0, s1);
}

// dx = dz * k + (x - mu) * q + r over rows [r0, r0 + U).
template <int U, bool Relu, typename T, typename A>
inline void bwd_dx_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t r0, int64_t C,
                        const A* __restrict__ mu, const A* __restrict__ k, const A* __restrict__ h,
                        const A* __restrict__ q, const A* __restrict__ r) {
  BITFAST_SIMD
  for (int64_t c = 0; c < C; ++c) {
    const A m = mu[c], kc = k[c], hc = h[c], qc = q[c], rc = r[c];
    BITFAST_UNROLL
    for (int u = 0; u < U; ++u) {
      const A xm = ld<T, A>(x, (r0 + u) * C + c) - m;
      A dz = ld<T, A>(dy, (r0 + u) * C + c);
      if (Relu) dz = keep_if(!(xm * kc + hc <= A(0)), dz);
      dx[(r0 + u) * C + c] = static_cast<T>(dz * kc + xm * qc + rc);
    }
  }
}

template <bool Relu, typename T, typename A>
BITFAST_CLONES void block_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, int64_t R,
                                 int64_t C, const A* __restrict__ mu, const A* __restrict__ k,
                                 const A* __restrict__ h, const A* __restrict__ q, const A* __restrict__ r) {
  int64_t s = 0;
  if (C >= kUnrollMinC)
    for (; s + kUnroll <= R; s += kUnroll) bwd_dx_rows<kUnroll, Relu>(dy, x, dx, s, C, mu, k, h, q, r);
  for (; s < R; ++s) bwd_dx_rows<1, Relu>(dy, x, dx, s, C, mu, k, h, q, r);
}

// NHWC work split: blocks of R rows (B per sample). With at least 2 samples per thread, each thread runs whole
// samples (one parallel region, no barrier inside: robust when cores are shared); otherwise samples go in chunks of
// NS (a chunk's x and dy fit in cache) and every phase is a parallel loop over the chunk's blocks. The math and its
// order are the same either way.
struct NhwcSplit {
  int64_t R, B, NS;
  bool per_sample;
  std::vector<double> frac, grow;  // (B,): chan_merge's f and g for block blk, merged in block order
  NhwcSplit(const GNArgs& a) {
    R = std::min(a.S, kRows);
    B = (a.S + R - 1) / R;
    // Balanced chunks, as csrc/group_norm.cu: the fewest chunks that fit in cache, of near-equal size, so no
    // chunk is a 1-sample tail with too few blocks to spread over the threads (62 + 2 becomes 32 + 32).
    const int64_t most = std::max<int64_t>(1, std::min(a.N, kCacheElems / (a.S * a.C)));
    const int64_t chunks = (a.N + most - 1) / most;
    NS = (a.N + chunks - 1) / chunks;
    per_sample = a.N >= 2 * omp_get_max_threads();
    for (int64_t blk = 0; blk < B; ++blk) {
      const double before = static_cast<double>(blk * R), f = rows(blk, a.S) / (before + rows(blk, a.S));
      frac.push_back(f);
      grow.push_back(before * f);
    }
  }
  int64_t rows(int64_t blk, int64_t S) const { return std::min(R, S - blk * R); }
  // Calls f(n0, ns, inner_parallel) over all samples as described above; f gets its own scratch per call.
  template <typename F> void run(const GNArgs& a, F&& f) const {
    const bool par = a.N * a.C * a.S >= kParallelMin;
    if (per_sample) {
#pragma omp parallel for schedule(static) if (par)
      for (int64_t n = 0; n < a.N; ++n) f(n, int64_t(1), false);
    } else {
      for (int64_t n0 = 0; n0 < a.N; n0 += NS) f(n0, std::min(NS, a.N - n0), par);
    }
  }
};

// Samples [n0, n0 + ns): block moments -> group stats -> normalize.
template <bool Relu, typename T, typename A>
void fwd_nhwc_samples(const GNArgs& a, const NhwcSplit& sp, const T* x, const A* w, const A* b, T* y, A* mean,
                      A* rstd, int64_t n0, int64_t ns, bool par) {
  const int64_t C = a.C, S = a.S, G = a.G, D = C / G;
  std::vector<A> pm(ns * sp.B * C), pq(ns * sp.B * C);  // (ns, B, C): block moments of x - x[n, 0, :]
  std::vector<A> mu(ns * C), k(ns * C), h(ns * C);      // (ns, C): group mean, rstd * w, b
  for_range(par, ns * sp.B, [&](int64_t t) {
    const int64_t n = n0 + t / sp.B, blk = t % sp.B;
    block_moments(x + (n * S + blk * sp.R) * C, x + n * S * C, sp.rows(blk, S), C, &pm[t * C], &pq[t * C]);
  });
  for_range(par, ns * G, [&](int64_t ig) {
    // Channel moments (blocks merged in order), then the group: channels hold S elements each, so the group mean
    // is their plain average. Means stay relative to ref = x[n, 0, c0] (x[n, 0, c] - ref is small).
    const int64_t i = ig / G, n = n0 + i, c0 = (ig % G) * D;
    const T* x0 = x + n * S * C;
    const A ref = ld<T, A>(x0, c0);
    std::vector<Moments<A>> ch(D);
    A gmean = 0;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t blk = 0; blk < sp.B; ++blk) {
        const int64_t j = (i * sp.B + blk) * C + c0 + d;
        chan_merge(ch[d], sp.frac[blk], sp.grow[blk], pm[j], pq[j]);
      }
      ch[d].mean += ld<T, A>(x0, c0 + d) - ref;
      gmean += ch[d].mean;
    }
    gmean /= static_cast<A>(D);
    A m2 = 0;
    for (int64_t d = 0; d < D; ++d) {
      const A dm = ch[d].mean - gmean;
      m2 += ch[d].m2 + static_cast<A>(S) * dm * dm;
    }
    const A rs = rsqrt_var(m2, D * S, a.eps);
    mean[n * G + ig % G] = ref + gmean;
    rstd[n * G + ig % G] = rs;
    for (int64_t c = c0; c < c0 + D; ++c) {
      mu[i * C + c] = ref + gmean;
      k[i * C + c] = w ? rs * w[c] : rs;
      h[i * C + c] = b ? b[c] : A(0);
    }
  });
  for_range(par, ns * sp.B, [&](int64_t t) {
    const int64_t i = t / sp.B, blk = t % sp.B, off = ((n0 + i) * S + blk * sp.R) * C;
    block_normalize<Relu>(x + off, y + off, sp.rows(blk, S), C, &mu[i * C], &k[i * C], &h[i * C]);
  });
}

template <bool Relu, typename T, typename A>
void fwd_nhwc(const GNArgs& a, const T* x, const A* w, const A* b, T* y, A* mean, A* rstd) {
  const NhwcSplit sp(a);
  sp.run(a, [&](int64_t n0, int64_t ns, bool par) {
    fwd_nhwc_samples<Relu>(a, sp, x, w, b, y, mean, rstd, n0, ns, par);
  });
}

// Samples [n0, n0 + ns): block sums -> per-(n, c) sums and group coefficients -> dx.
template <bool Relu, typename T, typename A>
void bwd_nhwc_samples(const GNArgs& a, const NhwcSplit& sp, const T* dy, const T* x, const A* w, const A* b,
                      const A* mean, const A* rstd, T* dx, A* sdz, A* sdzxm, int64_t n0, int64_t ns, bool par) {
  const int64_t C = a.C, S = a.S, G = a.G, D = C / G;
  std::vector<A> p0(ns * sp.B * C), p1(ns * sp.B * C);  // (ns, B, C): block sums of dz, dz * (x - mean)
  // (ns, C): dz = dy * [(x - mu) * k + h > 0],  dx = dz * k + (x - mu) * q + r
  std::vector<A> mu(ns * C), k(ns * C), h(ns * C), q(ns * C), r(ns * C);
  for (int64_t ic = 0; ic < ns * C; ++ic) {
    const int64_t c = ic % C, ng = (n0 + ic / C) * G + c / D;
    mu[ic] = mean[ng];
    k[ic] = w ? rstd[ng] * w[c] : rstd[ng];
    h[ic] = b ? b[c] : A(0);
  }
  for_range(par, ns * sp.B, [&](int64_t t) {
    const int64_t i = t / sp.B, blk = t % sp.B, off = ((n0 + i) * S + blk * sp.R) * C;
    block_bwd_sums<Relu>(dy + off, x + off, sp.rows(blk, S), C, &mu[i * C], &k[i * C], &h[i * C], &p0[t * C],
                         &p1[t * C]);
  });
  for_range(par, ns * G, [&](int64_t ig) {
    const int64_t i = ig / G, n = n0 + i, c0 = (ig % G) * D;
    A gw = 0, gwxm = 0;
    for (int64_t c = c0; c < c0 + D; ++c) {
      A t0 = 0, t1 = 0;
      for (int64_t blk = 0; blk < sp.B; ++blk) t0 += p0[(i * sp.B + blk) * C + c], t1 += p1[(i * sp.B + blk) * C + c];
      sdz[n * C + c] = t0;
      sdzxm[n * C + c] = t1;
      const A wc = w ? w[c] : A(1);
      gw += wc * t0;
      gwxm += wc * t1;
    }
    const A rs = rstd[n * G + ig % G], M = static_cast<A>(D * S), c1 = gw / M, c2 = rs * gwxm / M;
    for (int64_t c = c0; c < c0 + D; ++c) q[i * C + c] = -rs * rs * c2, r[i * C + c] = -rs * c1;
  });
  for_range(par, ns * sp.B, [&](int64_t t) {
    const int64_t i = t / sp.B, blk = t % sp.B, off = ((n0 + i) * S + blk * sp.R) * C;
    block_bwd_dx<Relu>(dy + off, x + off, dx + off, sp.rows(blk, S), C, &mu[i * C], &k[i * C], &h[i * C],
                       &q[i * C], &r[i * C]);
  });
}

template <bool Relu, typename T, typename A>
void bwd_nhwc(const GNArgs& a, const T* dy, const T* x, const A* w, const A* b, const A* mean, const A* rstd, T* dx,
              A* sdz, A* sdzxm) {
  const NhwcSplit sp(a);
  sp.run(a, [&](int64_t n0, int64_t ns, bool par) {
    bwd_nhwc_samples<Relu>(a, sp, dy, x, w, b, mean, rstd, dx, sdz, sdzxm, n0, ns, par);
  });
}

// dweight[c] = sum_n rstd[n, g] * sdzxm[n, c],  dbias[c] = sum_n sdz[n, c], in csrc/group_norm.cu's order: n in
// increasing order within slices of kParamSlice samples, then the slices in increasing order. One thread: N x C
// multiply-adds are microseconds, and a parallel region's end barrier on busy shared cores costs milliseconds
// (bench/ab_native.py --threads 2 --batch 33 measured 2048x7^2 backward 1.9x slower with channels in parallel).
template <typename A>
void reduce_param_grads(const GNArgs& a, const A* rstd, const A* sdz, const A* sdzxm, A* dw, A* db) {
  const int64_t D = a.C / a.G;
  for (int64_t c = 0; c < a.C; ++c) {
    A tw = 0, tb = 0;
    for (int64_t n0 = 0; n0 < a.N; n0 += kParamSlice) {
      A sw = 0, sb = 0;
      for (int64_t n = n0; n < std::min(a.N, n0 + kParamSlice); ++n) {
        sw += rstd[n * a.G + c / D] * sdzxm[n * a.C + c];
        sb += sdz[n * a.C + c];
      }
      tw += sw, tb += sb;
    }
    dw[c] = tw;
    db[c] = tb;
  }
}

// ------------------------------------------------------------------------------------------------ dispatch
template <typename T, bool Relu>
void fwd_typed(const GNArgs& a, const void* x, const void* w, const void* b, void* y, void* mean, void* rstd) {
  using A = typename AccOf<T>::type;
  auto f = a.channels_last ? fwd_nhwc<Relu, T, A> : fwd_nchw<Relu, T, A>;
  f(a, static_cast<const T*>(x), static_cast<const A*>(w), static_cast<const A*>(b), static_cast<T*>(y),
    static_cast<A*>(mean), static_cast<A*>(rstd));
}

template <typename T, bool Relu>
void bwd_typed(const GNArgs& a, const void* dy, const void* x, const void* w, const void* b, const void* mean,
               const void* rstd, void* dx, void* dw, void* db) {
  using A = typename AccOf<T>::type;
  std::vector<A> sdz(a.N * a.C), sdzxm(a.N * a.C);  // (N, C)
  auto f = a.channels_last ? bwd_nhwc<Relu, T, A> : bwd_nchw<Relu, T, A>;
  f(a, static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const A*>(w), static_cast<const A*>(b),
    static_cast<const A*>(mean), static_cast<const A*>(rstd), static_cast<T*>(dx), sdz.data(), sdzxm.data());
  reduce_param_grads(a, static_cast<const A*>(rstd), sdz.data(), sdzxm.data(), static_cast<A*>(dw),
                     static_cast<A*>(db));
}

// f(T(), std::integral_constant<bool, relu>()) for the storage type of dt.
template <typename F> void by_dtype(DType dt, bool relu, F&& f) {
  auto go = [&](auto t) { relu ? f(t, std::true_type()) : f(t, std::false_type()); };
  switch (dt) {
    case DType::f32: return go(float());
    case DType::f16: return go(c10::Half());
    case DType::bf16: return go(c10::BFloat16());
    case DType::f64: return go(double());
  }
}

}  // namespace

void group_norm_fwd_cpu(DType dt, const GNArgs& a, const void* x, const void* weight, const void* bias, void* y,
                        void* mean, void* rstd) {
  if (a.N * a.C * a.S == 0) return;
  by_dtype(dt, a.relu, [&](auto t, auto relu) {
    fwd_typed<decltype(t), decltype(relu)::value>(a, x, weight, bias, y, mean, rstd);
  });
}

void group_norm_bwd_cpu(DType dt, const GNArgs& a, const void* dy, const void* x, const void* weight,
                        const void* bias, const void* mean, const void* rstd, void* dx, void* dweight, void* dbias) {
  if (a.N * a.C * a.S == 0) return;
  by_dtype(dt, a.relu, [&](auto t, auto relu) {
    bwd_typed<decltype(t), decltype(relu)::value>(a, dy, x, weight, bias, mean, rstd, dx, dweight, dbias);
  });
}

}  // namespace bitfast
