// Weight standardization on the CPU (C++17 + OpenMP). A weight is (O, K) rows; each row is standardized on its own
// with the corrected two-pass algorithm (never E[w^2] - E[w]^2 on raw values):
//   m0 = sum(w) / K;  d = w - m0;  c = sum(d) / K  (the rounding error of m0);  var = sum(d^2) / K - c^2,
//   mean = m0 + c,  rstd = 1 / sqrt(var + eps),  y = (d - c) * rstd.
// c repairs the mean when |mean| >> std (w = 1000 + noise), and y uses d - c instead of w - mean so that the
// fp32 rounding of mean itself does not reach y.
// Backward (exact for the formula above, eps included), with yhat = (w - mean) * rstd recomputed from w:
//   dw = rstd * (dy - mean(dy) - yhat * mean(dy * yhat)).
// One row is at most a few tens of KiB for real convs, so its later passes hit L1/L2: DRAM sees one read of w (and
// dy) and one write per element, where the timm composite (batch_norm on the reshaped weight) streams it twice.
// Sums run in the acc type (float; double for f64) over chunks, and the chunk sums add up in double, so long rows
// (>= 2^20 elements) lose no accuracy while the inner loops stay SIMD.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>

#include "weight_standardize.h"

namespace bitfast {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

constexpr int64_t kChunk = 2048;           // elements per float partial sum
constexpr int64_t kParallelMin = 1 << 15;  // below this many elements a call stays on one thread

template <typename T, typename A> inline A ld(T v) { return static_cast<A>(v); }

// sum(f(i)) (and sum(g(i))) over one row. kLanes independent partial sums: one SIMD accumulator would make the
// loop wait on the add latency (~1 cycle per element); kLanes of them keep it throughput-bound and also sum more
// accurately. Chunk sums are added in double.
constexpr int kLanes = 32;

template <typename A, typename F> inline double chunked_sum(int64_t K, F f) {
  double total = 0.0;
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < K ? c0 + kChunk : K;
    A acc[kLanes] = {};
    int64_t i = c0;
    for (; i + kLanes <= c1; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
    }
    for (; i < c1; ++i) acc[0] += f(i);
    A s = 0;
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    total += static_cast<double>(s);
  }
  return total;
}

template <typename A, typename F, typename G> inline void chunked_sum2(int64_t K, F f, G g, double& sf, double& sg) {
  sf = sg = 0.0;
  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < K ? c0 + kChunk : K;
    A a[kLanes] = {}, b[kLanes] = {};
    int64_t i = c0;
    for (; i + kLanes <= c1; i += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        a[l] += f(i + l);
        b[l] += g(i + l);
      }
    }
    for (; i < c1; ++i) {
      a[0] += f(i);
      b[0] += g(i);
    }
    A sa = 0, sb = 0;
    for (int l = 0; l < kLanes; ++l) {
      sa += a[l];
      sb += b[l];
    }
    sf += static_cast<double>(sa);
    sg += static_cast<double>(sb);
  }
}

template <typename In, typename Out>
void fwd_row(const In* w, Out* y, int64_t K, double eps, typename AccOf<In>::type* mean_out,
             typename AccOf<In>::type* rstd_out) {
  using A = typename AccOf<In>::type;
  const A m0 = static_cast<A>(chunked_sum<A>(K, [&](int64_t i) { return ld<In, A>(w[i]); }) / K);
  double s1, s2;
  chunked_sum2<A>(
      K, [&](int64_t i) { return ld<In, A>(w[i]) - m0; },
      [&](int64_t i) {
        const A d = ld<In, A>(w[i]) - m0;
        return d * d;
      },
      s1, s2);
  const double c = s1 / K, var = s2 / K - c * c;
  const A rstd = static_cast<A>(1.0 / std::sqrt((var > 0.0 ? var : 0.0) + eps));
  const A shift = static_cast<A>(c);
#pragma omp simd
  for (int64_t i = 0; i < K; ++i) y[i] = static_cast<Out>(((ld<In, A>(w[i]) - m0) - shift) * rstd);
  *mean_out = static_cast<A>(m0 + c);
  *rstd_out = rstd;
}

template <typename In, typename Out>
void bwd_row(const Out* dy, const In* w, In* dw, int64_t K, typename AccOf<In>::type mean,
             typename AccOf<In>::type rstd) {
  using A = typename AccOf<In>::type;
  double s_dy, s_dyx;
  chunked_sum2<A>(
      K, [&](int64_t i) { return ld<Out, A>(dy[i]); },
      [&](int64_t i) { return ld<Out, A>(dy[i]) * ((ld<In, A>(w[i]) - mean) * rstd); }, s_dy, s_dyx);
  const A m_dy = static_cast<A>(s_dy / K), m_dyx = static_cast<A>(s_dyx / K);
#pragma omp simd
  for (int64_t i = 0; i < K; ++i) {
    const A xhat = (ld<In, A>(w[i]) - mean) * rstd;
    dw[i] = static_cast<In>(rstd * (ld<Out, A>(dy[i]) - m_dy - xhat * m_dyx));
  }
}

// Item index owning global row r (items sorted by row0).
inline int64_t find_item(const WSItem* items, int64_t n, int64_t r) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (items[mid].row0 <= r) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Rows of all items in one parallel loop; dynamic schedule because K differs between items.
template <typename In, typename Out>
void many_fwd(const WSItem* items, int64_t n, double eps, void* mean, void* rstd) {
  using A = typename AccOf<In>::type;
  const int64_t rows = items[n - 1].row0 + items[n - 1].O;
  int64_t numel = 0;
  for (int64_t t = 0; t < n; ++t) numel += items[t].O * items[t].K;
#pragma omp parallel for schedule(dynamic, 8) if (numel >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const WSItem& it = items[find_item(items, n, r)];
    const int64_t o = r - it.row0;
    if (o < 0 || o >= it.O) continue;  // a row of an empty (O, 0) weight: no item owns it
    fwd_row<In, Out>(static_cast<const In*>(it.w) + o * it.K, static_cast<Out*>(it.out) + o * it.K, it.K, eps,
                     static_cast<A*>(mean) + r, static_cast<A*>(rstd) + r);
  }
}

template <typename In, typename Out>
void many_bwd(const WSItem* items, int64_t n, const void* mean, const void* rstd) {
  using A = typename AccOf<In>::type;
  const int64_t rows = items[n - 1].row0 + items[n - 1].O;
  int64_t numel = 0;
  for (int64_t t = 0; t < n; ++t) numel += items[t].O * items[t].K;
#pragma omp parallel for schedule(dynamic, 8) if (numel >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const WSItem& it = items[find_item(items, n, r)];
    const int64_t o = r - it.row0;
    if (o < 0 || o >= it.O) continue;  // a row of an empty (O, 0) weight: no item owns it
    bwd_row<In, Out>(static_cast<const Out*>(it.dy) + o * it.K, static_cast<const In*>(it.w) + o * it.K,
                     static_cast<In*>(it.out) + o * it.K, it.K, static_cast<const A*>(mean)[r],
                     static_cast<const A*>(rstd)[r]);
  }
}

// Calls f(In{}, Out{}) for the runtime dtype pair (the values only carry the types).
template <typename In, typename F> void dispatch_out(DType out, F&& f) {
  switch (out) {
    case DType::f32: f(In{}, float{}); break;
    case DType::f16: f(In{}, c10::Half{}); break;
    case DType::bf16: f(In{}, c10::BFloat16{}); break;
    case DType::f64: f(In{}, double{}); break;
  }
}
template <typename F> void dispatch(DType in, DType out, F&& f) {
  switch (in) {
    case DType::f32: dispatch_out<float>(out, f); break;
    case DType::f16: dispatch_out<c10::Half>(out, f); break;
    case DType::bf16: dispatch_out<c10::BFloat16>(out, f); break;
    case DType::f64: dispatch_out<double>(out, f); break;
  }
}

WSItem single_item(const WSArgs& a, const void* w, const void* dy, void* out) { return {w, dy, out, a.O, a.K, 0}; }

}  // namespace

void weight_standardize_many_fwd_cpu(DType in, DType out, const WSItem* items, int64_t n, double eps, void* mean,
                                     void* rstd) {
  if (n <= 0) return;
  dispatch(in, out, [&](auto i, auto o) { many_fwd<decltype(i), decltype(o)>(items, n, eps, mean, rstd); });
}

void weight_standardize_many_bwd_cpu(DType in, DType out, const WSItem* items, int64_t n, const void* mean,
                                     const void* rstd) {
  if (n <= 0) return;
  dispatch(in, out, [&](auto i, auto o) { many_bwd<decltype(i), decltype(o)>(items, n, mean, rstd); });
}

void weight_standardize_fwd_cpu(DType in, DType out, const WSArgs& a, const void* w, void* y, void* mean,
                                void* rstd) {
  if (a.O * a.K == 0) return;
  const WSItem it = single_item(a, w, nullptr, y);
  weight_standardize_many_fwd_cpu(in, out, &it, 1, a.eps, mean, rstd);
}

void weight_standardize_bwd_cpu(DType in, DType out, const WSArgs& a, const void* dy, const void* w,
                                const void* mean, const void* rstd, void* dw) {
  if (a.O * a.K == 0) return;
  const WSItem it = single_item(a, w, dy, dw);
  weight_standardize_many_bwd_cpu(in, out, &it, 1, mean, rstd);
}

}  // namespace bitfast
