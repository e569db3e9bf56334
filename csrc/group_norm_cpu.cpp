// GroupNorm(+ReLU) on the CPU (C++17 + OpenMP). The CUDA kernels in group_norm.cu follow the same algorithm.
// Per (n, g) over M = C/G * S elements, in the acc type A (float; double for f64 storage):
//   mean, M2 = sum (x - mean)^2  by Chan merges of exact small pieces (never E[x^2] - E[x]^2),
//   rstd = 1 / sqrt(M2 / M + eps),   z = (x - mean) * (rstd * w[c]) + b[c],   y = relu(z) or z.
// Backward, with dz = dy masked by z > 0 (z recomputed from x, never stored) and sums per (n, c) over S:
//   sdz[n,c] = sum dz,  sdzxm[n,c] = sum dz * (x - mean)
//   dbias[c] = sum_n sdz,  dweight[c] = sum_n rstd * sdzxm       (fixed order over n: deterministic)
//   c1 = sum_c w sdz / M,  c2 = rstd * sum_c w sdzxm / M
//   dx = dz * (rstd * w[c]) + (x - mean) * (-rstd^2 c2) - rstd c1
// Layouts: NCHW (x is (N, C, S)): one task per (n, g), whose C/G * S elements are contiguous; the pieces are
// kChunk-element chunks, each two-pass while it sits in L1. NHWC (x is (N, S, C)): tasks are (n, block of rows);
// each block gives per-channel two-pass moments (SIMD across a tile of channels), blocks merge per channel in a
// fixed order, then the channels of a group merge into the group. Sums run on x - (a nearby element of x), so a
// large common offset (x = 1000 + noise) loses no bits. Lanes/tiles give SIMD without -ffast-math, and every
// summation order is fixed by the shape alone: results are bit-identical run to run and across thread counts.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "group_norm.h"

namespace bitfast {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

constexpr int kLanes = 16;
constexpr int64_t kChunk = 4096;          // NCHW: elements per exact two-pass piece (16 KiB of fp32: stays in L1)
constexpr int64_t kBlockElems = 1 << 15;  // NHWC: about this many elements per (n, row block) task
constexpr int64_t kMinRows = 64;          // NHWC: at least this many rows per block (bounds the partials' size)
constexpr int64_t kParallelMin = 1 << 14; // fewer elements than this stay on one thread

// Running (count, mean, M2) of a set; chan_merge adds a piece of nb elements with mean mb and M2 qb.
template <typename A> struct Moments { A n = 0, mean = 0, m2 = 0; };
template <typename A> inline void chan_merge(Moments<A>& m, A nb, A mb, A qb) {
  const A n = m.n + nb, d = mb - m.mean, f = nb / n;
  m.mean += d * f;
  m.m2 += qb + d * d * m.n * f;
  m.n = n;
}

// sum_{i < n} f(i) with kLanes independent partials (vectorises; order fixed by n).
template <typename A, typename F> inline A lane_sum(int64_t n, F f) {
  A acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += f(i + j);
  A s = 0;
  for (; i < n; ++i) s += f(i);
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

inline int64_t rows_per_block(int64_t C, int64_t S) {
  return std::min(S, std::max(kMinRows, kBlockElems / std::max<int64_t>(C, 1)));
}

// ------------------------------------------------------------------------------------------------ NCHW
// Moments of x[0:n] - x[0]: the shift keeps sums and running means small, so a large common offset loses no bits.
template <typename T, typename A> Moments<A> row_moments(const T* x, int64_t n) {
  const A x0 = static_cast<A>(x[0]);
  Moments<A> m;
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t L = std::min(kChunk, n - i0);
    const T* p = x + i0;
    const A cm = lane_sum<A>(L, [&](int64_t i) { return static_cast<A>(p[i]) - x0; }) / static_cast<A>(L);
    const A q = lane_sum<A>(L, [&](int64_t i) {
      const A d = static_cast<A>(p[i]) - x0 - cm;
      return d * d;
    });
    chan_merge(m, static_cast<A>(L), cm, q);
  }
  return m;
}

template <bool Relu, typename T, typename A>
void fwd_nchw(const GNArgs& a, const T* x, const A* w, const A* b, T* y, A* mean, A* rstd) {
  const int64_t S = a.S, D = a.C / a.G, M = D * S;
#pragma omp parallel for schedule(static) if (a.N * a.C * S >= kParallelMin)
  for (int64_t ng = 0; ng < a.N * a.G; ++ng) {  // x[ng * M : (ng + 1) * M] is group g of sample n
    const Moments<A> m = row_moments<T, A>(x + ng * M, M);
    const A mu = static_cast<A>(x[ng * M]) + m.mean, rs = static_cast<A>(1.0 / std::sqrt(static_cast<double>(m.m2 / M) + a.eps));
    mean[ng] = mu;
    rstd[ng] = rs;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t c = (ng % a.G) * D + d;
      const A sc = w ? rs * w[c] : rs, sh = b ? b[c] : A(0);
      const T* __restrict__ xc = x + ng * M + d * S;
      T* __restrict__ yc = y + ng * M + d * S;
      for (int64_t i = 0; i < S; ++i) {
        A z = (static_cast<A>(xc[i]) - mu) * sc + sh;
        if (Relu) z = z < A(0) ? A(0) : z;
        yc[i] = static_cast<T>(z);
      }
    }
  }
}

// Per-channel sums over S of dz and dz * (x - mean) for one channel row.
template <bool Relu, typename T, typename A>
inline void bwd_row_sums(const T* dy, const T* x, int64_t S, A mu, A sc, A sh, A* sdz, A* sdzxm) {
  A s0[kLanes] = {}, s1[kLanes] = {};
  auto term = [&](int64_t i, A& dz, A& xm) {
    xm = static_cast<A>(x[i]) - mu;
    dz = static_cast<A>(dy[i]);
    if (Relu) dz = xm * sc + sh <= A(0) ? A(0) : dz;
  };
  int64_t i = 0;
  for (; i + kLanes <= S; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      A dz, xm;
      term(i + j, dz, xm);
      s0[j] += dz;
      s1[j] += dz * xm;
    }
  A t0 = 0, t1 = 0;
  for (; i < S; ++i) {
    A dz, xm;
    term(i, dz, xm);
    t0 += dz;
    t1 += dz * xm;
  }
  for (int j = 0; j < kLanes; ++j) t0 += s0[j], t1 += s1[j];
  *sdz = t0;
  *sdzxm = t1;
}

template <bool Relu, typename T, typename A>
void bwd_nchw(const GNArgs& a, const T* dy, const T* x, const A* w, const A* b, const A* mean, const A* rstd, T* dx,
              A* sdz, A* sdzxm) {
  const int64_t S = a.S, D = a.C / a.G, M = D * S;
#pragma omp parallel for schedule(static) if (a.N * a.C * S >= kParallelMin)
  for (int64_t ng = 0; ng < a.N * a.G; ++ng) {
    const A mu = mean[ng], rs = rstd[ng];
    const int64_t c0 = (ng % a.G) * D, nc0 = ng * D;  // first channel of the group; its (n, c) index
    A gw = 0, gwxm = 0;
    for (int64_t d = 0; d < D; ++d) {
      const A wc = w ? w[c0 + d] : A(1), sh = b ? b[c0 + d] : A(0);
      bwd_row_sums<Relu>(dy + ng * M + d * S, x + ng * M + d * S, S, mu, rs * wc, sh, &sdz[nc0 + d],
                         &sdzxm[nc0 + d]);
      gw += wc * sdz[nc0 + d];
      gwxm += wc * sdzxm[nc0 + d];
    }
    const A c1 = gw / M, c2 = rs * gwxm / M, q = -rs * rs * c2, r = -rs * c1;
    for (int64_t d = 0; d < D; ++d) {
      const A wc = w ? w[c0 + d] : A(1), sh = b ? b[c0 + d] : A(0), p = rs * wc;
      const T* __restrict__ xc = x + ng * M + d * S;
      const T* __restrict__ gc = dy + ng * M + d * S;
      T* __restrict__ dxc = dx + ng * M + d * S;
      for (int64_t i = 0; i < S; ++i) {
        const A xm = static_cast<A>(xc[i]) - mu;
        A dz = static_cast<A>(gc[i]);
        if (Relu) dz = xm * p + sh <= A(0) ? A(0) : dz;
        dxc[i] = static_cast<T>(dz * p + xm * q + r);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ NHWC
// Each loop below walks one tile of V channels down the rows of a block, holding the tile's per-channel state in
// registers (SIMD across channels; a row's tile is one cache line). f(c0, V) for full tiles, then width-1 tiles.
template <int V, typename F> inline void channel_tiles(int64_t C, F&& f) {
  int64_t c0 = 0;
  for (; c0 + V <= C; c0 += V) f(c0, std::integral_constant<int, V>());
  for (; c0 < C; ++c0) f(c0, std::integral_constant<int, 1>());
}

// Per-channel moments of x - x0 over rows [0, R) of an (R, C) block, exact two-pass: a tile's R x 16 column stays
// in L1/L2 between the passes. x0 is row 0 of the sample: the shift keeps the sums small, so a large common offset
// loses no bits.
template <typename T, typename A>
void block_moments(const T* x, const T* x0, int64_t R, int64_t C, A* mean, A* m2) {
  channel_tiles<16>(C, [&](int64_t c0, auto vv) {
    constexpr int V = decltype(vv)::value;
    A sh[V], mu[V] = {}, q[V] = {};
    for (int j = 0; j < V; ++j) sh[j] = static_cast<A>(x0[c0 + j]);
    for (int64_t r = 0; r < R; ++r)
      for (int j = 0; j < V; ++j) mu[j] += static_cast<A>(x[r * C + c0 + j]) - sh[j];
    for (int j = 0; j < V; ++j) mu[j] /= static_cast<A>(R);
    for (int64_t r = 0; r < R; ++r)
      for (int j = 0; j < V; ++j) {
        const A d = static_cast<A>(x[r * C + c0 + j]) - sh[j] - mu[j];
        q[j] += d * d;
      }
    for (int j = 0; j < V; ++j) mean[c0 + j] = mu[j], m2[c0 + j] = q[j];
  });
}

template <bool Relu, typename T, typename A>
void fwd_nhwc(const GNArgs& a, const T* x, const A* w, const A* b, T* y, A* mean, A* rstd) {
  const int64_t N = a.N, C = a.C, S = a.S, G = a.G, D = C / G;
  const int64_t R = rows_per_block(C, S), B = (S + R - 1) / R;
  const bool par = N * C * S >= kParallelMin;
  std::vector<A> pm(N * B * C), pq(N * B * C);  // (N, B, C): per-block channel mean (of x - x0) and M2
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < N * B; ++t) {
    const int64_t n = t / B, s0 = (t % B) * R;
    block_moments(x + (n * S + s0) * C, x + n * S * C, std::min(R, S - s0), C, &pm[t * C], &pq[t * C]);
  }
  std::vector<A> mu(N * C), sc(N * C), sh(N * C);  // (N, C): group mean, scale, shift per channel
#pragma omp parallel for schedule(static) if (par)
  for (int64_t ng = 0; ng < N * G; ++ng) {
    // Channel moments (blocks merged in order), then the group: channels hold S elements each, so the group mean
    // is their plain average. Means are kept relative to ref = x[n, 0, c0] (x0[c] - ref is small).
    const int64_t n = ng / G, c0 = (ng % G) * D;
    const T* x0 = x + n * S * C;
    const A ref = static_cast<A>(x0[c0]);
    std::vector<Moments<A>> ch(D);
    A gmean = 0;  // relative to ref
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t blk = 0; blk < B; ++blk) {
        const int64_t i = (n * B + blk) * C + c0 + d;
        chan_merge(ch[d], static_cast<A>(std::min(R, S - blk * R)), pm[i], pq[i]);
      }
      ch[d].mean += static_cast<A>(x0[c0 + d]) - ref;
      gmean += ch[d].mean;
    }
    gmean /= static_cast<A>(D);
    A m2 = 0;
    for (int64_t d = 0; d < D; ++d) {
      const A dm = ch[d].mean - gmean;
      m2 += ch[d].m2 + static_cast<A>(S) * dm * dm;
    }
    const A rs = static_cast<A>(1.0 / std::sqrt(static_cast<double>(m2 / (D * S)) + a.eps));
    gmean += ref;
    mean[ng] = gmean;
    rstd[ng] = rs;
    for (int64_t c = c0; c < c0 + D; ++c) {
      mu[n * C + c] = gmean;
      sc[n * C + c] = w ? rs * w[c] : rs;
      sh[n * C + c] = b ? b[c] : A(0);
    }
  }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < N * B; ++t) {
    const int64_t n = t / B, s0 = (t % B) * R, s1 = std::min(S, s0 + R);
    channel_tiles<16>(C, [&](int64_t c0, auto vv) {
      constexpr int V = decltype(vv)::value;
      A m[V], k[V], h[V];
      for (int j = 0; j < V; ++j) m[j] = mu[n * C + c0 + j], k[j] = sc[n * C + c0 + j], h[j] = sh[n * C + c0 + j];
      for (int64_t s = s0; s < s1; ++s) {
        const T* xr = x + (n * S + s) * C + c0;
        T* yr = y + (n * S + s) * C + c0;
        for (int j = 0; j < V; ++j) {
          A z = (static_cast<A>(xr[j]) - m[j]) * k[j] + h[j];
          if (Relu) z = z < A(0) ? A(0) : z;
          yr[j] = static_cast<T>(z);
        }
      }
    });
  }
}

template <bool Relu, typename T, typename A>
void bwd_nhwc(const GNArgs& a, const T* dy, const T* x, const A* w, const A* b, const A* mean, const A* rstd, T* dx,
              A* sdz, A* sdzxm) {
  const int64_t N = a.N, C = a.C, S = a.S, G = a.G, D = C / G;
  const int64_t R = rows_per_block(C, S), B = (S + R - 1) / R;
  const bool par = N * C * S >= kParallelMin;
  // (N, C) coefficients: dz = dy * [(x - mu) * p + h > 0],  dx = dz * p + (x - mu) * q + r.
  std::vector<A> mu(N * C), p(N * C), h(N * C), q(N * C), r(N * C);
  for (int64_t nc = 0; nc < N * C; ++nc) {
    const int64_t c = nc % C, ng = (nc / C) * G + c / D;
    mu[nc] = mean[ng];
    p[nc] = w ? rstd[ng] * w[c] : rstd[ng];
    h[nc] = b ? b[c] : A(0);
  }
  std::vector<A> p0(N * B * C), p1(N * B * C);  // (N, B, C): per-block sums of dz and dz * (x - mean)
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < N * B; ++t) {
    const int64_t n = t / B, s0 = (t % B) * R, s1 = std::min(S, s0 + R);
    channel_tiles<8>(C, [&](int64_t c0, auto vv) {
      constexpr int V = decltype(vv)::value;
      A m[V], k[V], hh[V], s_dz[V] = {}, s_dzxm[V] = {};
      for (int j = 0; j < V; ++j) m[j] = mu[n * C + c0 + j], k[j] = p[n * C + c0 + j], hh[j] = h[n * C + c0 + j];
      for (int64_t s = s0; s < s1; ++s) {
        const T* xr = x + (n * S + s) * C + c0;
        const T* gr = dy + (n * S + s) * C + c0;
        for (int j = 0; j < V; ++j) {
          const A xm = static_cast<A>(xr[j]) - m[j];
          A dz = static_cast<A>(gr[j]);
          if (Relu) dz = xm * k[j] + hh[j] <= A(0) ? A(0) : dz;
          s_dz[j] += dz;
          s_dzxm[j] += dz * xm;
        }
      }
      for (int j = 0; j < V; ++j) p0[t * C + c0 + j] = s_dz[j], p1[t * C + c0 + j] = s_dzxm[j];
    });
  }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t ng = 0; ng < N * G; ++ng) {
    const int64_t n = ng / G, c0 = (ng % G) * D;
    A gw = 0, gwxm = 0;
    for (int64_t c = c0; c < c0 + D; ++c) {
      A t0 = 0, t1 = 0;
      for (int64_t blk = 0; blk < B; ++blk) t0 += p0[(n * B + blk) * C + c], t1 += p1[(n * B + blk) * C + c];
      sdz[n * C + c] = t0;
      sdzxm[n * C + c] = t1;
      const A wc = w ? w[c] : A(1);
      gw += wc * t0;
      gwxm += wc * t1;
    }
    const A rs = rstd[ng], M = static_cast<A>(D * S), c1 = gw / M, c2 = rs * gwxm / M;
    for (int64_t c = c0; c < c0 + D; ++c) q[n * C + c] = -rs * rs * c2, r[n * C + c] = -rs * c1;
  }
#pragma omp parallel for schedule(static) if (par)
  for (int64_t t = 0; t < N * B; ++t) {
    const int64_t n = t / B, s0 = (t % B) * R, s1 = std::min(S, s0 + R);
    channel_tiles<8>(C, [&](int64_t c0, auto vv) {
      constexpr int V = decltype(vv)::value;
      A m[V], k[V], hh[V], qq[V], rr[V];
      for (int j = 0; j < V; ++j) {
        const int64_t i = n * C + c0 + j;
        m[j] = mu[i], k[j] = p[i], hh[j] = h[i], qq[j] = q[i], rr[j] = r[i];
      }
      for (int64_t s = s0; s < s1; ++s) {
        const T* xr = x + (n * S + s) * C + c0;
        const T* gr = dy + (n * S + s) * C + c0;
        T* dxr = dx + (n * S + s) * C + c0;
        for (int j = 0; j < V; ++j) {
          const A xm = static_cast<A>(xr[j]) - m[j];
          A dz = static_cast<A>(gr[j]);
          if (Relu) dz = xm * k[j] + hh[j] <= A(0) ? A(0) : dz;
          dxr[j] = static_cast<T>(dz * k[j] + xm * qq[j] + rr[j]);
        }
      }
    });
  }
}

// dweight[c] = sum_n rstd[n, g] * sdzxm[n, c],  dbias[c] = sum_n sdz[n, c], n in increasing order.
template <typename A>
void reduce_param_grads(const GNArgs& a, const A* rstd, const A* sdz, const A* sdzxm, A* dw, A* db) {
  const int64_t D = a.C / a.G;
  for (int64_t c = 0; c < a.C; ++c) {
    A tw = 0, tb = 0;
    for (int64_t n = 0; n < a.N; ++n) {
      tw += rstd[n * a.G + c / D] * sdzxm[n * a.C + c];
      tb += sdz[n * a.C + c];
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

template <typename F> void by_dtype(DType dt, bool relu, F&& f) {
  switch (dt) {
    case DType::f32: return relu ? f(float(), std::true_type()) : f(float(), std::false_type());
    case DType::f16: return relu ? f(c10::Half(), std::true_type()) : f(c10::Half(), std::false_type());
    case DType::bf16: return relu ? f(c10::BFloat16(), std::true_type()) : f(c10::BFloat16(), std::false_type());
    case DType::f64: return relu ? f(double(), std::true_type()) : f(double(), std::false_type());
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
