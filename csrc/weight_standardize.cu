// Weight standardization on CUDA, torch-free (raw pointers + cudaStream_t). Same math as weight_standardize_cpu.cpp
// (corrected two-pass): per row of K elements, m0 = sum(w)/K, d = w - m0, c = sum(d)/K, var = sum(d^2)/K - c^2,
// mean = m0 + c, rstd = 1/sqrt(var + eps), y = (d - c) * rstd; backward
// dw = rstd * (dy - mean(dy) - yhat * mean(dy * yhat)) with yhat = (w - mean) * rstd.
// One thread block per row. Rows of real convs (<= 18432 elements = 72 KiB fp32 for R152x4) stay in L1/L2 between the
// passes, so DRAM sees one read and one write per element. Sums are fp32 (fp64 for fp64 weights) per thread, then a
// tree reduction over the block; indices are 64-bit so rows of >= 2^20 elements (or O*K >= 2^31) work.
// The many-tensor kernels take a device table of WSItem and find the item of their row by binary search on row0, so
// a whole model is standardized in one launch per direction.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_launch.h"
#include "weight_standardize.h"

namespace bitfast {
namespace {

// One block size for every row: the single- and many-tensor kernels then sum in the same order, so their results
// (and gradients) are bitwise identical. 256 threads keep a 4608-element R50 row at 18 elements per thread.
constexpr int kThreads = 256;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename A> __device__ __forceinline__ A load(const float* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load(const double* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load(const __half* p) { return static_cast<A>(__half2float(*p)); }
template <typename A> __device__ __forceinline__ A load(const __nv_bfloat16* p) {
  return static_cast<A>(__bfloat162float(*p));
}
template <typename A> __device__ __forceinline__ void store(float* p, A v) { *p = static_cast<float>(v); }
template <typename A> __device__ __forceinline__ void store(double* p, A v) { *p = static_cast<double>(v); }
template <typename A> __device__ __forceinline__ void store(__half* p, A v) {
  *p = __float2half_rn(static_cast<float>(v));
}
template <typename A> __device__ __forceinline__ void store(__nv_bfloat16* p, A v) {
  *p = __float2bfloat16_rn(static_cast<float>(v));
}

// Sums v[0..N) over the block; every thread gets the totals. blockDim.x == kThreads.
template <typename A, int N> __device__ __forceinline__ void block_sum(A (&v)[N]) {
  __shared__ A buf[N][kThreads / 32 + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = kThreads / 32;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    for (int o = 16; o > 0; o >>= 1) v[j] += __shfl_down_sync(0xffffffffu, v[j], o);
    if (lane == 0) buf[j][warp] = v[j];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      A s = lane < warps ? buf[j][lane] : A(0);
      for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
      if (lane == 0) buf[j][kThreads / 32] = s;
    }
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = buf[j][kThreads / 32];
  __syncthreads();  // buf may be reused by the next call
}

template <typename In, typename Out>
__device__ __forceinline__ void fwd_row(const In* __restrict__ w, Out* __restrict__ y, int64_t K, double eps,
                                        typename AccOf<In>::type* mean_out, typename AccOf<In>::type* rstd_out) {
  using A = typename AccOf<In>::type;
  A s[1] = {A(0)};
  for (int64_t i = threadIdx.x; i < K; i += kThreads) s[0] += load<A>(w + i);
  block_sum(s);
  const A m0 = static_cast<A>(static_cast<double>(s[0]) / K);
  A q[2] = {A(0), A(0)};  // sum(d), sum(d^2) with d = w - m0
  for (int64_t i = threadIdx.x; i < K; i += kThreads) {
    const A d = load<A>(w + i) - m0;
    q[0] += d;
    q[1] += d * d;
  }
  block_sum(q);
  const double c = static_cast<double>(q[0]) / K, var = static_cast<double>(q[1]) / K - c * c;
  const A rstd = static_cast<A>(1.0 / sqrt(fmax(var, 0.0) + eps));
  const A shift = static_cast<A>(c);
  for (int64_t i = threadIdx.x; i < K; i += kThreads) store(y + i, ((load<A>(w + i) - m0) - shift) * rstd);
  if (threadIdx.x == 0) {
    *mean_out = static_cast<A>(m0 + c);
    *rstd_out = rstd;
  }
}

template <typename In, typename Out>
__device__ __forceinline__ void bwd_row(const Out* __restrict__ dy, const In* __restrict__ w, In* __restrict__ dw,
                                        int64_t K, typename AccOf<In>::type mean, typename AccOf<In>::type rstd) {
  using A = typename AccOf<In>::type;
  A s[2] = {A(0), A(0)};  // sum(dy), sum(dy * yhat)
  for (int64_t i = threadIdx.x; i < K; i += kThreads) {
    const A g = load<A>(dy + i);
    s[0] += g;
    s[1] += g * ((load<A>(w + i) - mean) * rstd);
  }
  block_sum(s);
  const A m_dy = static_cast<A>(static_cast<double>(s[0]) / K);
  const A m_dyx = static_cast<A>(static_cast<double>(s[1]) / K);
  for (int64_t i = threadIdx.x; i < K; i += kThreads) {
    const A xhat = (load<A>(w + i) - mean) * rstd;
    store(dw + i, rstd * (load<A>(dy + i) - m_dy - xhat * m_dyx));
  }
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const In* w, Out* y, int64_t K, double eps, typename AccOf<In>::type* mean,
               typename AccOf<In>::type* rstd) {
  const int64_t r = blockIdx.x;
  fwd_row<In, Out>(w + r * K, y + r * K, K, eps, mean + r, rstd + r);
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads)
    bwd_kernel(const Out* dy, const In* w, In* dw, int64_t K, const typename AccOf<In>::type* mean,
               const typename AccOf<In>::type* rstd) {
  const int64_t r = blockIdx.x;
  bwd_row<In, Out>(dy + r * K, w + r * K, dw + r * K, K, mean[r], rstd[r]);
}

// The item owning this block's row (items sorted by row0, items[0].row0 == 0).
__device__ __forceinline__ WSItem find_item(const WSItem* items, int64_t n, int64_t r) {
  __shared__ int64_t idx;
  if (threadIdx.x == 0) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (items[mid].row0 <= r) lo = mid; else hi = mid - 1;
    }
    idx = lo;
  }
  __syncthreads();
  return items[idx];
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads)
    many_fwd_kernel(const WSItem* items, int64_t n, double eps, typename AccOf<In>::type* mean,
                    typename AccOf<In>::type* rstd) {
  const int64_t r = blockIdx.x;
  const WSItem it = find_item(items, n, r);
  if (r < it.row0 || r - it.row0 >= it.O) return;  // a row of an empty (O, 0) weight: no item owns it
  const int64_t off = (r - it.row0) * it.K;
  fwd_row<In, Out>(static_cast<const In*>(it.w) + off, static_cast<Out*>(it.out) + off, it.K, eps, mean + r,
                   rstd + r);
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads)
    many_bwd_kernel(const WSItem* items, int64_t n, const typename AccOf<In>::type* mean,
                    const typename AccOf<In>::type* rstd) {
  const int64_t r = blockIdx.x;
  const WSItem it = find_item(items, n, r);
  if (r < it.row0 || r - it.row0 >= it.O) return;  // a row of an empty (O, 0) weight: no item owns it
  const int64_t off = (r - it.row0) * it.K;
  bwd_row<In, Out>(static_cast<const Out*>(it.dy) + off, static_cast<const In*>(it.w) + off,
                   static_cast<In*>(it.out) + off, it.K, mean[r], rstd[r]);
}

// Calls f(In{}, Out{}) for the runtime dtype pair (the values only carry the types).
template <typename In, typename F> void dispatch_out(DType out, F&& f) {
  switch (out) {
    case DType::f32: f(In{}, float{}); break;
    case DType::f16: f(In{}, __half{}); break;
    case DType::bf16: f(In{}, __nv_bfloat16{}); break;
    case DType::f64: f(In{}, double{}); break;
  }
}
template <typename F> void dispatch(DType in, DType out, F&& f) {
  switch (in) {
    case DType::f32: dispatch_out<float>(out, f); break;
    case DType::f16: dispatch_out<__half>(out, f); break;
    case DType::bf16: dispatch_out<__nv_bfloat16>(out, f); break;
    case DType::f64: dispatch_out<double>(out, f); break;
  }
}

Status last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit: one block per row

}  // namespace

Status weight_standardize_fwd_cuda(DType in, DType out, const WSArgs& a, const void* w, void* y, void* mean,
                                   void* rstd, void* stream) {
  if (a.O == 0 || a.K == 0) return nullptr;
  if (a.O > kMaxGrid) return "weight_standardize: more than 2^31-1 output channels";
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(in, out, [&](auto i, auto o) {
    using In = decltype(i);
    using Out = decltype(o);
    using A = typename AccOf<In>::type;
    launch(fwd_kernel<In, Out>, static_cast<unsigned>(a.O), kThreads, 0, s, static_cast<const In*>(w),
           static_cast<Out*>(y), a.K, a.eps, static_cast<A*>(mean), static_cast<A*>(rstd));
  });
  return last_error();
}

Status weight_standardize_bwd_cuda(DType in, DType out, const WSArgs& a, const void* dy, const void* w,
                                   const void* mean, const void* rstd, void* dw, void* stream) {
  if (a.O == 0 || a.K == 0) return nullptr;
  if (a.O > kMaxGrid) return "weight_standardize: more than 2^31-1 output channels";
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(in, out, [&](auto i, auto o) {
    using In = decltype(i);
    using Out = decltype(o);
    using A = typename AccOf<In>::type;
    launch(bwd_kernel<In, Out>, static_cast<unsigned>(a.O), kThreads, 0, s, static_cast<const Out*>(dy),
           static_cast<const In*>(w), static_cast<In*>(dw), a.K, static_cast<const A*>(mean),
           static_cast<const A*>(rstd));
  });
  return last_error();
}

Status weight_standardize_many_fwd_cuda(DType in, DType out, const WSItem* items, int64_t n, int64_t rows,
                                        double eps, void* mean, void* rstd, void* stream) {
  if (n <= 0 || rows == 0) return nullptr;
  if (rows > kMaxGrid) return "weight_standardize_many: more than 2^31-1 rows in total";
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(in, out, [&](auto i, auto o) {
    using In = decltype(i);
    using Out = decltype(o);
    using A = typename AccOf<In>::type;
    launch(many_fwd_kernel<In, Out>, static_cast<unsigned>(rows), kThreads, 0, s, items, n, eps,
           static_cast<A*>(mean), static_cast<A*>(rstd));
  });
  return last_error();
}

Status weight_standardize_many_bwd_cuda(DType in, DType out, const WSItem* items, int64_t n, int64_t rows,
                                        const void* mean, const void* rstd, void* stream) {
  if (n <= 0 || rows == 0) return nullptr;
  if (rows > kMaxGrid) return "weight_standardize_many: more than 2^31-1 rows in total";
  auto s = static_cast<cudaStream_t>(stream);
  dispatch(in, out, [&](auto i, auto o) {
    using In = decltype(i);
    using Out = decltype(o);
    using A = typename AccOf<In>::type;
    launch(many_bwd_kernel<In, Out>, static_cast<unsigned>(rows), kThreads, 0, s, items, n,
           static_cast<const A*>(mean), static_cast<const A*>(rstd));
  });
  return last_error();
}

}  // namespace bitfast
