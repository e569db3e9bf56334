// GroupNorm(+ReLU) CUDA kernels: torch-free (raw pointers + a stream); fp32 / fp16 / bf16 storage, fp32 math.
// Same algorithm as group_norm_cpu.cpp (read its header comment first); each kernel names its CPU twin.
//   - Statistics: Chan merges of exact two-pass pieces, on x minus an element of the same sample (a large common
//     offset loses no bits). Never E[x^2] - E[x]^2.
//   - Backward: sdz = sum dz, sdzxm = sum dz * (x - mean) per (n, c), dz = dy masked by the recomputed z > 0;
//     dx = dz * (rstd w) + (x - mean) * q + r with q = -rstd^2 c2, r = -rstd c1 per (n, g).
//   - Determinism: every reduction (warp shuffles, shared memory, over blocks, over n) runs in an order fixed by the
//     shape; no atomics. dweight/dbias: one thread per channel sums n in fixed slices of kParamSlice, then the
//     slices (param_grads, param_reduce).
// NCHW (x is (N, C, S)): one block per (n, g) whose D*S elements are contiguous (fwd_group / bwd_group on the CPU);
//   the first kNchwCacheBytes of the group's x (bwd: and dy) stay in shared memory for the output pass; packs of
//   16, 8 or 4 bytes, the widest that divides S. y and dx (both layouts) are streaming stores (__stcs).
// NHWC (x is (N, S, C)): per chunk of NS samples (sized to stay in L2 between kernels, like the CPU's cache chunk):
//   1. a block per (sample, block of R rows, tile of CT channel vectors); a thread owns one vector of V channels and
//      K rows, held in registers (backward sums: kRowBatch at a time) -> two-pass moments (or backward sums); phases merge in shared memory; per-block
//      per-channel partials go to the workspace (block_moments / block_bwd_sums);
//   2. a warp per (n, g): merges the partials of its channels over blocks, then the channels into the group;
//   3. the output pass on the same tiles (block_normalize / block_bwd_dx).
//   Loads are 16-byte vectors (V channels) when C % V == 0 and pointers are aligned; a warp reads whole rows.
// All element offsets are int64. fp64 is not supported here (the Python layer routes fp64 to the CPU backends).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "cuda_launch.h"
#include "group_norm.h"

namespace bitfast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerThread = 8;               // NHWC: K rows per thread
constexpr int kRowBatch = 2;                    // NHWC bwd sums: rows loaded together, K / kRowBatch steps
#ifndef BITFAST_GN_L2_BYTES  // the emulator tests set it small, to reach several chunks with small shapes
#define BITFAST_GN_L2_BYTES (24ll << 20)
#endif
constexpr int64_t kL2Bytes = BITFAST_GN_L2_BYTES;  // NHWC: a sample chunk's x (and dy) should fit in L2
constexpr int64_t kMaxGrid = 2147483647;
#ifndef BITFAST_GN_PARAM_SLICE
#define BITFAST_GN_PARAM_SLICE 16
#endif
constexpr int64_t kParamSlice = BITFAST_GN_PARAM_SLICE;  // samples per param_grads slice
constexpr int64_t kNchwCacheBytes = 46 << 10;  // NCHW: x (and dy) kept in dynamic shared memory per block

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The bits of v as a To (__uint_as_float and the like; memcpy compiles to a move, also in the emulator's build).
template <typename To, typename From> __device__ __forceinline__ To bits_as(From v) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To t;
  memcpy(&t, &v, sizeof t);
  return t;
}

// V consecutive elements, loaded/stored as one 16-byte access when V * sizeof(T) == 16; get/put convert one element
// from/to fp32. 2-byte packs are held as 32-bit words, 2 elements each, converted at use (bf16: a shift or a mask,
// exact like __bfloat162float): as 16-bit elements, ptxas moved every bf16 high half into a register of its own
// right after the load (PRMT), doubling the registers of each pack held (nhwc_bwd_sums<bf16>: 183 vs fp16's 121).
template <typename T, int V, bool Words = sizeof(T) == 2 && V % 2 == 0> struct Pack;
template <typename T, int V> struct alignas(sizeof(T) * V) Pack<T, V, false> {
  T v[V];
  __device__ __forceinline__ float get(int j) const { return to_f(v[j]); }
  __device__ __forceinline__ void put(int j, float f) { v[j] = from_f<T>(f); }
};
template <typename T, int V> struct alignas(sizeof(T) * V) Pack<T, V, true> {
  uint32_t w[V / 2];
  __device__ __forceinline__ float get(int j) const {
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
      return bits_as<float>(j % 2 ? w[j / 2] & 0xffff0000u : w[j / 2] << 16);
    else
      return __half2float(__ushort_as_half(static_cast<unsigned short>(j % 2 ? w[j / 2] >> 16 : w[j / 2])));
  }
  __device__ __forceinline__ void put(int j, float f) {
    uint32_t h;
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
      h = __bfloat16_as_ushort(__float2bfloat16_rn(f));
    else
      h = __half_as_ushort(__float2half_rn(f));
    w[j / 2] = j % 2 ? (w[j / 2] & 0xffffu) | (h << 16) : (w[j / 2] & 0xffff0000u) | h;
  }
};
template <typename T, int V> __device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
// Streaming (evict-first) store, for y and dx: no kernel of the op reads them again, and written lines that stay in
// L2 would evict the x (and dy) that the output pass re-reads (bench/budget.py's reread_streaming).
// (The words are passed as values: a reinterpret_cast of the pack put it on the stack, as ptxas "spills".)
template <typename T, int V, bool Wd> __device__ __forceinline__ void store_cs(T* p, const Pack<T, V, Wd>& v) {
  if constexpr (Wd && V == 8) {
    uint4 u;
    u.x = v.w[0], u.y = v.w[1], u.z = v.w[2], u.w = v.w[3];
    __stcs(reinterpret_cast<uint4*>(p), u);
  } else if constexpr (Wd && V == 4) {
    uint2 u;
    u.x = v.w[0], u.y = v.w[1];
    __stcs(reinterpret_cast<uint2*>(p), u);
  } else if constexpr (Wd && V == 2) {
    __stcs(reinterpret_cast<unsigned*>(p), v.w[0]);
  } else if constexpr (std::is_same<T, float>::value && V == 4) {
    uint4 u;
    u.x = bits_as<uint32_t>(v.v[0]), u.y = bits_as<uint32_t>(v.v[1]), u.z = bits_as<uint32_t>(v.v[2]), u.w = bits_as<uint32_t>(v.v[3]);
    __stcs(reinterpret_cast<uint4*>(p), u);
  } else if constexpr (std::is_same<T, float>::value && V == 2) {
    float2 u;
    u.x = v.v[0], u.y = v.v[1];
    __stcs(reinterpret_cast<float2*>(p), u);
  } else if constexpr (std::is_same<T, float>::value && V == 1) {
    __stcs(p, v.v[0]);
  } else {
    static_assert(V == 1 && sizeof(T) == 2, "store_cs: pack shape");
    unsigned short h;
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
      h = __bfloat16_as_ushort(v.v[0]);
    else
      h = __half_as_ushort(v.v[0]);
    __stcs(reinterpret_cast<unsigned short*>(p), h);
  }
}

// Running (count, mean, M2) with Chan's merge (chan_merge on the CPU; empty sides allowed here).
struct Mom { float n, mean, m2; };
__device__ __forceinline__ Mom merge(Mom a, Mom b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n, d = b.mean - a.mean, f = b.n / n;
  return {n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f};
}
__device__ __forceinline__ Mom shfl_down(Mom m, int off) {
  return {__shfl_down_sync(0xffffffffu, m.n, off), __shfl_down_sync(0xffffffffu, m.mean, off),
          __shfl_down_sync(0xffffffffu, m.m2, off)};
}
// Lane 0 gets the merge of the warp, in a fixed tree order.
__device__ __forceinline__ Mom warp_merge(Mom m) {
  for (int off = 16; off > 0; off /= 2) m = merge(m, shfl_down(m, off));
  return m;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}
// Every thread gets the block's merge (warps' results merged in warp order by warp 0).
__device__ Mom block_merge(Mom m) {
  __shared__ Mom part[kWarps];
  __shared__ Mom total;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  m = warp_merge(m);
  if (lane == 0) part[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = warp_merge(lane < kWarps ? part[lane] : Mom{0.f, 0.f, 0.f});
    if (lane == 0) total = m;
  }
  __syncthreads();
  return total;
}
// Every thread gets (sum a, sum b) over the block, in a fixed order.
__device__ float2 block_sum2(float a, float b) {
  __shared__ float2 part[kWarps];
  __shared__ float2 total;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) part[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? part[lane].x : 0.f);
    b = warp_sum(lane < kWarps ? part[lane].y : 0.f);
    if (lane == 0) total = make_float2(a, b);
  }
  __syncthreads();
  return total;
}

// ------------------------------------------------------------------------------------------------ NCHW
// Twin of fwd_group: one block per (n, g) = blockIdx.x; the group is x[ng * M : (ng + 1) * M], M = D * S.
// Each thread takes U packs per step (independent loads in flight) as one two-pass piece. The first `cached` packs
// of x (all of a group up to nchw_cache_packs()) stay in dynamic shared memory for the output pass.
template <typename T, int V, bool Relu>
__global__ void __launch_bounds__(kThreads) nchw_fwd(const T* __restrict__ x, T* __restrict__ y,
                                                     const float* __restrict__ w, const float* __restrict__ b,
                                                     float* __restrict__ mean, float* __restrict__ rstd, int64_t G,
                                                     int64_t D, int64_t S, int64_t cached, float eps) {
  constexpr int U = 4;
  BITFAST_DYNAMIC_SMEM(uint4, smem);
  Pack<T, V>* cx = reinterpret_cast<Pack<T, V>*>(smem);
  const int64_t ng = blockIdx.x, M = D * S, step = int64_t(kThreads) * V;
  const T* xg = x + ng * M;
  T* yg = y + ng * M;
  const float x0 = to_f(xg[0]);  // shift
  Mom m{0.f, 0.f, 0.f};
  for (int64_t i0 = int64_t(threadIdx.x) * V; i0 < M; i0 += U * step) {
    Pack<T, V> p[U];
    int np = 0;  // packs in bounds (a prefix of the U)
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i0 + u * step < M + BITFAST_PLANT(2)) p[u] = load<T, V>(xg + i0 + u * step), np = u + 1;  // bug 2: <=
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < np && (i0 + u * step) / V < cached) cx[(i0 + u * step) / V] = p[u];
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < np)
#pragma unroll
        for (int j = 0; j < V; ++j) s += p[u].get(j) - x0;
    const float cnt = float(np * V), cm = s / cnt;
    float q = 0.f;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (u < np)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = p[u].get(j) - x0 - cm;
          q += d * d;
        }
    m = merge(m, Mom{cnt, cm, q});
  }
  m = block_merge(m);
  const float mu = x0 + m.mean, rs = 1.f / sqrtf(m.m2 / float(M) + eps);
  if (threadIdx.x == 0) mean[ng] = mu, rstd[ng] = rs;
  const int64_t c0 = (ng % G) * D;
  const int64_t dc = step / S, dr = step % S;  // S % V == 0: a pack lies in one channel
  int64_t c = c0 + int64_t(threadIdx.x) * V / S, rem = int64_t(threadIdx.x) * V % S;  // channel counter of i
  for (int64_t i = int64_t(threadIdx.x) * V; i < M; i += step, rem += dr, c += dc + (rem >= S), rem -= rem >= S ? S : 0) {
    const float k = w ? rs * w[c] : rs, h = b ? b[c] : 0.f;
    Pack<T, V> p = i / V < cached ? cx[i / V] : load<T, V>(xg + i);  // cx: after block_merge's barriers
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float z = __fmaf_rn(p.get(j) - mu, k, h);
      if (Relu) z = z < 0.f ? 0.f : z;
      p.put(j, z);
    }
    store_cs<T, V>(yg + i, p);
  }
}

// Twin of bwd_group. Warps take channels round-robin (lanes stride the channel's S elements) and write sdz/sdzxm
// for (n, c); after a barrier the block reduces them over the group and writes dx. The first `cached` packs of x and
// dy (all of a group up to nchw_cache_packs()) are kept in dynamic shared memory for the dx pass, so that only the
// rest is re-read: otherwise the x and dy of all resident groups (100 KB a group at 256 x 56^2) outgrow L2.
template <typename T, int V, bool Relu>
__global__ void __launch_bounds__(kThreads) nchw_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                                     T* __restrict__ dx, const float* __restrict__ w,
                                                     const float* __restrict__ b, const float* __restrict__ mean,
                                                     const float* __restrict__ rstd, int64_t G, int64_t D, int64_t S,
                                                     int64_t cached, float* sdz, float* sdzxm) {
  BITFAST_DYNAMIC_SMEM(uint4, smem);  // one element type for every instantiation (extern __shared__)
  Pack<T, V>* cx = reinterpret_cast<Pack<T, V>*>(smem);  // [0, cached): x packs; [cached, 2 * cached): dy packs
  const int64_t ng = blockIdx.x, M = D * S, c0 = (ng % G) * D, nc0 = (ng / G) * G * D + c0;
  const T* xg = x + ng * M;
  const T* gg = dy + ng * M;
  T* dxg = dx + ng * M;
  const float mu = mean[ng], rs = rstd[ng];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // D < kWarps: P = kWarps / D warps per channel (else the other warps would idle); their parts are summed in part
  // order through s_part.
  __shared__ float2 s_part[kWarps];
  const int Dw = D < kWarps ? int(D) : kWarps, P = kWarps / Dw, part = warp / Dw;
  for (int64_t d = warp % Dw; part < P && d < D; d += Dw) {
    const float k = w ? rs * w[c0 + d] : rs, h = b ? b[c0 + d] : 0.f;
    float s0 = 0.f, s1 = 0.f;
    for (int64_t i = d * S + (int64_t(part) * 32 + lane) * V; i < (d + 1) * S; i += int64_t(32) * V * P) {
      const Pack<T, V> px = load<T, V>(xg + i), pg = load<T, V>(gg + i);
      if (i / V < cached) cx[i / V] = px, cx[cached + i / V] = pg;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float xm = px.get(j) - mu;
        float dz = pg.get(j);
        if (Relu) dz = __fmaf_rn(xm, k, h) <= 0.f ? 0.f : dz;
        s0 += dz;
        s1 += dz * xm;
      }
    }
    s0 = warp_sum(s0);
    s1 = warp_sum(s1);
    if (lane == 0 && P == 1) sdz[nc0 + d] = s0, sdzxm[nc0 + d] = s1;
    if (lane == 0 && P > 1) s_part[warp] = make_float2(s0, s1);  // warp = part * D + d
  }
  __syncthreads();  // makes this block's sdz/sdzxm (or s_part) writes visible to all its threads
  if (P > 1) {  // uniform over the block
    if (threadIdx.x < D) {
      float t0 = 0.f, t1 = 0.f;
      for (int pp = 0; pp < P; ++pp) t0 += s_part[pp * D + threadIdx.x].x, t1 += s_part[pp * D + threadIdx.x].y;
      sdz[nc0 + threadIdx.x] = t0, sdzxm[nc0 + threadIdx.x] = t1;
    }
    __syncthreads();
  }
  float a0 = 0.f, a1 = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    const float wc = w ? w[c0 + d] : 1.f;
    a0 += wc * sdz[nc0 + d];
    a1 += wc * sdzxm[nc0 + d];
  }
  const float2 t = block_sum2(a0, a1);
  const float c1 = t.x / float(M), c2 = rs * t.y / float(M), q = -rs * rs * c2, r = -rs * c1;
  const int64_t step = int64_t(kThreads) * V, dc = step / S, dr = step % S;
  int64_t c = c0 + int64_t(threadIdx.x) * V / S, rem = int64_t(threadIdx.x) * V % S;  // channel counter of i
  for (int64_t i = int64_t(threadIdx.x) * V; i < M; i += step, rem += dr, c += dc + (rem >= S), rem -= rem >= S ? S : 0) {
    const float k = w ? rs * w[c] : rs, h = b ? b[c] : 0.f;
    const bool hit = i / V < cached;  // after the barriers of block_sum2: written by any warp above
    const Pack<T, V> px = hit ? cx[i / V] : load<T, V>(xg + i), pg = hit ? cx[cached + i / V] : load<T, V>(gg + i);
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float xm = px.get(j) - mu;
      float dz = pg.get(j);
      if (Relu) dz = __fmaf_rn(xm, k, h) <= 0.f ? 0.f : dz;
      out.put(j, dz * k + xm * q + r);
    }
    store_cs<T, V>(dxg + i, out);
  }
}

// ------------------------------------------------------------------------------------------------ NHWC
// Tile geometry shared by the host and the NHWC kernels.
struct Tiles {
  int64_t S, C, CV;  // CV channel vectors of V channels
  int CT, TR, CB;    // CT vectors per block, TR row phases, CB channel tiles
  int64_t R, B;      // R rows per block, B blocks per sample
  __host__ __device__ Tiles(int64_t S_, int64_t C_, int V) : S(S_), C(C_), CV(C_ / V) {
    CT = CV < 32 ? int(CV) : 32;
    TR = kThreads / CT;
    CB = int((CV + CT - 1) / CT);
    R = int64_t(kRowsPerThread) * TR;
    B = (S + R - 1) / R;
  }
  __host__ __device__ int64_t rows(int64_t blk) const { return S - blk * R < R ? S - blk * R : R; }
};

// This thread's place in an NHWC tile: sample i of the chunk, block blk, channel vector cv, first row r.
struct TileThread {
  int64_t i, blk, cv, r;
  int tr, ct, cb;
  bool active;
  __device__ TileThread(const Tiles& t) {
    const int64_t id = blockIdx.x;
    cb = int(id % t.CB);
    blk = (id / t.CB) % t.B;
    i = id / (int64_t(t.CB) * t.B);
    ct = threadIdx.x % t.CT;
    tr = threadIdx.x / t.CT;
    cv = int64_t(cb) * t.CT + ct;
    r = blk * t.R + tr;
    active = tr < t.TR && cv < t.CV;
  }
};

// Twin of block_moments: per-channel moments of x - x[n, 0, :] over the block's rows -> pm, pq (NS, B, C).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) nhwc_moments(const T* __restrict__ x, Tiles t, int64_t n0,
                                                         float* __restrict__ pm, float* __restrict__ pq) {
  __shared__ float s_cnt[kThreads], s_mu[kThreads * V], s_q[kThreads * V];
  const TileThread th(t);
  const T* xs = x + (n0 + th.i) * t.S * t.C + th.cv * V;  // this sample, this channel vector
  float cnt = 0.f, mu[V], q[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mu[j] = q[j] = 0.f;
  if (th.active) {
    const Pack<T, V> p0 = load<T, V>(xs);
    float sh[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sh[j] = p0.get(j);
    Pack<T, V> p[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t r = th.r + int64_t(k) * t.TR;
      if (r < t.S) p[k] = load<T, V>(xs + r * t.C), cnt += 1.f;
    }
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k)
      if (k < cnt)
#pragma unroll
        for (int j = 0; j < V; ++j) mu[j] += p[k].get(j) - sh[j];
#pragma unroll
    for (int j = 0; j < V; ++j) mu[j] = cnt > 0.f ? mu[j] / cnt : 0.f;
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k)
      if (k < cnt)
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float d = p[k].get(j) - sh[j] - mu[j];
          q[j] += d * d;
        }
  }
  s_cnt[threadIdx.x] = cnt;
#pragma unroll
  for (int j = 0; j < V; ++j) s_mu[threadIdx.x * V + j] = mu[j], s_q[threadIdx.x * V + j] = q[j];
  if (!BITFAST_PLANT(1)) __syncthreads();  // planted bug 1: the barrier removed
  if (th.tr == 0 && th.cv < t.CV && !(BITFAST_PLANT(3) && blockIdx.x == 1)) {  // merge the row phases in order
    // (planted bug 3: block 1 leaves its workspace partials unwritten)
    const int64_t o = (th.i * t.B + th.blk) * t.C + th.cv * V;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      Mom m{0.f, 0.f, 0.f};
      for (int ph = 0; ph < t.TR; ++ph) {
        const int src = ph * t.CT + th.ct;
        m = merge(m, Mom{s_cnt[src], s_mu[src * V + j], s_q[src * V + j]});
      }
      pm[o + j] = m.mean;
      pq[o + j] = m.m2;
    }
  }
}

// Twin of the group loop in fwd_nhwc: one warp per (n, g) of the chunk merges its channels' block partials (in
// block order), shifts them to ref = x[n, 0, c0], and merges the channels into the group.
template <typename T>
__global__ void __launch_bounds__(kThreads) nhwc_group_stats(const T* __restrict__ x, const float* __restrict__ pm,
                                                             const float* __restrict__ pq, Tiles t, int64_t G,
                                                             int64_t n0, int64_t ns, float eps,
                                                             float* __restrict__ mean, float* __restrict__ rstd) {
  const int64_t wid = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (wid >= ns * G) return;  // whole warps leave; no block barrier follows
  const int64_t i = wid / G, g = wid % G, n = n0 + i, D = t.C / G, c0 = g * D;
  const T* x0 = x + n * t.S * t.C;
  const float ref = to_f(x0[c0]);
  Mom acc{0.f, 0.f, 0.f};
  for (int64_t d = lane; d < D; d += 32) {
    Mom ch{0.f, 0.f, 0.f};
    for (int64_t blk = 0; blk < t.B; ++blk) {
      const int64_t o = (i * t.B + blk) * t.C + c0 + d;
      ch = merge(ch, Mom{float(t.rows(blk)), pm[o], pq[o]});
    }
    ch.mean += to_f(x0[c0 + d]) - ref;
    acc = merge(acc, ch);
  }
  acc = warp_merge(acc);
  if (lane == 0) {
    mean[n * G + g] = ref + acc.mean;
    rstd[n * G + g] = 1.f / sqrtf(acc.m2 / float(D * t.S) + eps);
  }
}

// Twin of block_normalize.
template <typename T, int V, bool Relu>
__global__ void __launch_bounds__(kThreads) nhwc_normalize(const T* __restrict__ x, T* __restrict__ y,
                                                           const float* __restrict__ w,
                                                           const float* __restrict__ b,
                                                           const float* __restrict__ mean,
                                                           const float* __restrict__ rstd, Tiles t, int64_t G,
                                                           int64_t n0) {
  const TileThread th(t);
  if (!th.active) return;
  const int64_t n = n0 + th.i, D = t.C / G, off = n * t.S * t.C + th.cv * V;
  float mu[V], k[V], h[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t c = th.cv * V + j, ng = n * G + c / D;
    mu[j] = mean[ng];
    k[j] = w ? rstd[ng] * w[c] : rstd[ng];
    h[j] = b ? b[c] : 0.f;
  }
#pragma unroll
  for (int kk = 0; kk < kRowsPerThread; ++kk) {
    const int64_t r = th.r + int64_t(kk) * t.TR;
    if (r >= t.S) break;
    Pack<T, V> p = load<T, V>(x + off + r * t.C);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      float z = __fmaf_rn(p.get(j) - mu[j], k[j], h[j]);
      if (Relu) z = z < 0.f ? 0.f : z;
      p.put(j, z);
    }
    store_cs<T, V>(y + off + r * t.C, p);
  }
}

// Per-thread channel coefficients for the backward tile kernels: mean, rstd * w, b.
template <int V>
__device__ __forceinline__ void bwd_coefs(const float* w, const float* b, const float* mean, const float* rstd,
                                          int64_t n, int64_t cv, int64_t C, int64_t G, float* mu, float* k,
                                          float* h) {
  const int64_t D = C / G;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t c = cv * V + j, ng = n * G + c / D;
    mu[j] = mean[ng];
    k[j] = w ? rstd[ng] * w[c] : rstd[ng];
    h[j] = b ? b[c] : 0.f;
  }
}

// Twin of block_bwd_sums: per-channel sums of dz and dz * (x - mean) over the block's rows -> p0, p1 (NS, B, C).
template <typename T, int V, bool Relu>
__global__ void __launch_bounds__(kThreads) nhwc_bwd_sums(const T* __restrict__ dy, const T* __restrict__ x,
                                                          const float* __restrict__ w, const float* __restrict__ b,
                                                          const float* __restrict__ mean,
                                                          const float* __restrict__ rstd, Tiles t, int64_t G,
                                                          int64_t n0, float* __restrict__ p0,
                                                          float* __restrict__ p1) {
  __shared__ float s_0[kThreads * V], s_1[kThreads * V];
  const TileThread th(t);
  float a0[V], a1[V];
#pragma unroll
  for (int j = 0; j < V; ++j) a0[j] = a1[j] = 0.f;
  if (th.active) {
    const int64_t n = n0 + th.i, off = n * t.S * t.C + th.cv * V;
    float mu[V], k[V], h[V];
    bwd_coefs<V>(w, b, mean, rstd, n, th.cv, t.C, G, mu, k, h);
    // kRowBatch rows of x and dy in flight at a time: holding all K rows (and, for bf16, their unpacked floats,
    // which ptxas hoisted next to the loads) took 183 registers, one block per SM.
#pragma unroll 1
    for (int k0 = 0; k0 < kRowsPerThread; k0 += kRowBatch) {
      Pack<T, V> px[kRowBatch], pg[kRowBatch];
      int cnt = 0;
#pragma unroll
      for (int kk = 0; kk < kRowBatch; ++kk) {
        const int64_t r = th.r + int64_t(k0 + kk) * t.TR;
        if (r < t.S) px[kk] = load<T, V>(x + off + r * t.C), pg[kk] = load<T, V>(dy + off + r * t.C), cnt = kk + 1;
      }
      if (cnt == 0) break;
#pragma unroll
      for (int kk = 0; kk < kRowBatch; ++kk)
        if (kk < cnt)
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float xm = px[kk].get(j) - mu[j];
            float dz = pg[kk].get(j);
            if (Relu) dz = __fmaf_rn(xm, k[j], h[j]) <= 0.f ? 0.f : dz;
            a0[j] += dz;
            a1[j] += dz * xm;
          }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) s_0[threadIdx.x * V + j] = a0[j], s_1[threadIdx.x * V + j] = a1[j];
  __syncthreads();
  // Sum the row phases in order: one thread per channel of the tile (column u = ct * V + j of the shared arrays).
  const int u = threadIdx.x, cols = t.CT * V;
  const int64_t c = th.cb * int64_t(cols) + u;
  if (u < cols && c < t.C) {
    float t0 = 0.f, t1 = 0.f;
    for (int ph = 0; ph < t.TR; ++ph) t0 += s_0[ph * cols + u], t1 += s_1[ph * cols + u];
    const int64_t o = (th.i * t.B + th.blk) * t.C + c;
    p0[o] = t0;
    p1[o] = t1;
  }
}

// Twin of the group loop in bwd_nhwc: one warp per (n, g) sums its channels' block partials (block order) into
// sdz/sdzxm (N, C), then the group's c1, c2 -> qr[(n, g)] = (q, r).
__global__ void __launch_bounds__(kThreads) nhwc_bwd_group(const float* __restrict__ p0, const float* __restrict__ p1,
                                                           const float* __restrict__ w,
                                                           const float* __restrict__ rstd, Tiles t, int64_t G,
                                                           int64_t n0, int64_t ns, float* __restrict__ sdz,
                                                           float* __restrict__ sdzxm, float2* __restrict__ qr) {
  const int64_t wid = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (wid >= ns * G) return;
  const int64_t i = wid / G, g = wid % G, n = n0 + i, D = t.C / G, c0 = g * D;
  float gw = 0.f, gwxm = 0.f;
  for (int64_t d = lane; d < D; d += 32) {
    float t0 = 0.f, t1 = 0.f;
    for (int64_t blk = 0; blk < t.B; ++blk) {
      const int64_t o = (i * t.B + blk) * t.C + c0 + d;
      t0 += p0[o];
      t1 += p1[o];
    }
    sdz[n * t.C + c0 + d] = t0;
    sdzxm[n * t.C + c0 + d] = t1;
    const float wc = w ? w[c0 + d] : 1.f;
    gw += wc * t0;
    gwxm += wc * t1;
  }
  gw = warp_sum(gw);
  gwxm = warp_sum(gwxm);
  if (lane == 0) {
    const float rs = rstd[n * G + g], M = float(D * t.S), c1 = gw / M, c2 = rs * gwxm / M;
    qr[n * G + g] = make_float2(-rs * rs * c2, -rs * c1);
  }
}

// Twin of block_bwd_dx.
template <typename T, int V, bool Relu>
__global__ void __launch_bounds__(kThreads) nhwc_bwd_dx(const T* __restrict__ dy, const T* __restrict__ x,
                                                        T* __restrict__ dx, const float* __restrict__ w,
                                                        const float* __restrict__ b, const float* __restrict__ mean,
                                                        const float* __restrict__ rstd,
                                                        const float2* __restrict__ qr, Tiles t, int64_t G,
                                                        int64_t n0) {
  const TileThread th(t);
  if (!th.active) return;
  const int64_t n = n0 + th.i, D = t.C / G, off = n * t.S * t.C + th.cv * V;
  float mu[V], k[V], h[V], q[V], r[V];
  bwd_coefs<V>(w, b, mean, rstd, n, th.cv, t.C, G, mu, k, h);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const float2 v = qr[n * G + (th.cv * V + j) / D];
    q[j] = v.x;
    r[j] = v.y;
  }
#pragma unroll
  for (int kk = 0; kk < kRowsPerThread; ++kk) {
    const int64_t row = th.r + int64_t(kk) * t.TR;
    if (row >= t.S) break;
    const Pack<T, V> px = load<T, V>(x + off + row * t.C), pg = load<T, V>(dy + off + row * t.C);
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float xm = px.get(j) - mu[j];
      float dz = pg.get(j);
      if (Relu) dz = __fmaf_rn(xm, k[j], h[j]) <= 0.f ? 0.f : dz;
      out.put(j, dz * k[j] + xm * q[j] + r[j]);
    }
    store_cs<T, V>(dx + off + row * t.C, out);
  }
}

// Twin of reduce_param_grads, in two steps so that no thread loops over all of N (a dependent L2 load per n):
// block (slice s, channel block) sums n in [s * kParamSlice, min(N, (s + 1) * kParamSlice)) in increasing order
// into row s of (P, C) slices (dw/db themselves when P == 1); param_reduce sums the P rows in increasing order. The
// slices depend on N only, so dweight/dbias are bitwise repeatable.
__global__ void __launch_bounds__(kThreads) param_grads(const float* __restrict__ rstd, const float* __restrict__ sdz,
                                                        const float* __restrict__ sdzxm, int64_t N, int64_t C,
                                                        int64_t G, float* __restrict__ dw, float* __restrict__ db) {
  const int64_t cblocks = (C + kThreads - 1) / kThreads, s = blockIdx.x / cblocks;
  const int64_t c = (blockIdx.x % cblocks) * kThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t g = c / (C / G), n1 = N < (s + 1) * kParamSlice ? N : (s + 1) * kParamSlice;
  float tw = 0.f, tb = 0.f;
  for (int64_t n = s * kParamSlice; n < n1; ++n) {
    tw += rstd[n * G + g] * sdzxm[n * C + c];
    tb += sdz[n * C + c];
  }
  dw[s * C + c] = tw;
  db[s * C + c] = tb;
}

__global__ void __launch_bounds__(kThreads) param_reduce(const float* __restrict__ pw, const float* __restrict__ pb,
                                                         int64_t P, int64_t C, float* __restrict__ dw,
                                                         float* __restrict__ db) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  float tw = 0.f, tb = 0.f;
  for (int64_t s = 0; s < P; ++s) tw += pw[s * C + c], tb += pb[s * C + c];
  dw[c] = tw;
  db[c] = tb;
}

// ------------------------------------------------------------------------------------------------ host
// Samples per NHWC chunk: the chunk's tensors (bytes per element summed over x, dy) fit in kL2Bytes, and the chunks
// are balanced (ceil(N / chunks)): a 1-2 sample tail chunk would run a fraction of a wave on its own.
int64_t chunk_samples(const GNArgs& a, int64_t bytes) {
  const int64_t per = a.S * a.C * bytes;
  const int64_t ns = per > 0 ? kL2Bytes / per : a.N;
  const int64_t cap = ns < 1 ? 1 : (ns > a.N ? a.N : ns);
  if (cap < 1) return cap;  // N == 0: no chunks, no workspace
  const int64_t chunks = (a.N + cap - 1) / cap;
  return (a.N + chunks - 1) / chunks;
}

// Floats in one (NS, B, C) partials array, for the smallest R any V gives (TR >= 8 rows phases).
int64_t partial_floats(const GNArgs& a, int64_t bytes) {
  const int64_t R = int64_t(kRowsPerThread) * 8;
  return chunk_samples(a, bytes) * ((a.S + R - 1) / R) * a.C;
}

int64_t elem_bytes(DType dt) { return dt == DType::f32 ? 4 : 2; }

// NCHW: packs of x (bwd: and as many of dy; `tensors`) a block keeps in shared memory, of a group's `packs`: at
// most kNchwCacheBytes in all, so that no opt-in above 48 KB is needed and 4 blocks fit an SM's 228 KB.
int64_t nchw_cache_packs(int64_t packs, int64_t pack_bytes, int64_t tensors) {
  const int64_t cap = kNchwCacheBytes / (tensors * pack_bytes);
  return packs < cap ? packs : cap;
}

// param_grads's slices of n (a function of N only).
int64_t param_slices(int64_t N) { return (N + kParamSlice - 1) / kParamSlice; }

// Backward workspace floats before the param_grads slices: sdz, sdzxm (N, C); NHWC: p0, p1 partials and qr (N, G).
int64_t bwd_floats_before_slices(const GNArgs& a, int64_t bytes) {
  int64_t floats = 2 * a.N * a.C;
  if (a.channels_last) floats += 2 * partial_floats(a, 2 * bytes) + 2 * a.N * a.G;
  return floats;
}

// The OR of the addresses: aligned to n bytes (a power of 2) iff addr_bits % n == 0.
uintptr_t addr_bits(std::initializer_list<const void*> ps) {
  uintptr_t bits = 0;
  for (const void* p : ps) bits |= reinterpret_cast<uintptr_t>(p);
  return bits;
}

Status last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

unsigned grid_of(int64_t blocks) { return unsigned(blocks); }

template <typename T, int V, bool Relu>
Status fwd_launch(const GNArgs& a, const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                  float* ws, cudaStream_t st) {
  const int64_t D = a.C / a.G;
  if (!a.channels_last) {
    if (a.N * a.G > kMaxGrid) return "group_norm: N * num_groups exceeds the CUDA grid limit";
    const int64_t cached = nchw_cache_packs(D * a.S / V, V * sizeof(T), 1);
    launch(nchw_fwd<T, V, Relu>, grid_of(a.N * a.G), kThreads, size_t(cached) * V * sizeof(T), st, x, y, w, b, mean,
           rstd, a.G, D, a.S, cached, float(a.eps));
    return last_error();
  }
  if constexpr (V == 1 || V * sizeof(T) == 16) {  // NHWC: 16-byte packs or scalars (with_vec)
    const Tiles t(a.S, a.C, V);
    const int64_t NS = chunk_samples(a, sizeof(T));
    float *pm = ws, *pq = ws + partial_floats(a, sizeof(T));
    for (int64_t n0 = 0; n0 < a.N; n0 += NS) {
      const int64_t ns = a.N - n0 < NS ? a.N - n0 : NS, tiles = ns * t.B * t.CB;
      if (tiles > kMaxGrid) return "group_norm: input too large for the CUDA grid";
      launch(nhwc_moments<T, V>, grid_of(tiles), kThreads, 0, st, x, t, n0, pm, pq);
      launch(nhwc_group_stats<T>, grid_of((ns * a.G + kWarps - 1) / kWarps), kThreads, 0, st, x, pm, pq, t, a.G,
             n0, ns, float(a.eps), mean, rstd);
      launch(nhwc_normalize<T, V, Relu>, grid_of(tiles), kThreads, 0, st, x, y, w, b, mean, rstd, t, a.G, n0);
    }
  }
  return last_error();
}

template <typename T, int V, bool Relu>
Status bwd_launch(const GNArgs& a, const T* dy, const T* x, const float* w, const float* b, const float* mean,
                  const float* rstd, T* dx, float* dw, float* db, float* ws, cudaStream_t st) {
  const int64_t D = a.C / a.G;
  float *sdz = ws, *sdzxm = ws + a.N * a.C;
  if (!a.channels_last) {
    if (a.N * a.G > kMaxGrid) return "group_norm: N * num_groups exceeds the CUDA grid limit";
    const int64_t cached = nchw_cache_packs(D * a.S / V, V * sizeof(T), 2);
    launch(nchw_bwd<T, V, Relu>, grid_of(a.N * a.G), kThreads, size_t(2 * cached) * V * sizeof(T), st, dy, x, dx, w,
           b, mean, rstd, a.G, D, a.S, cached, sdz, sdzxm);
  } else if constexpr (V == 1 || V * sizeof(T) == 16) {  // NHWC: 16-byte packs or scalars (with_vec)
    const Tiles t(a.S, a.C, V);
    const int64_t NS = chunk_samples(a, 2 * sizeof(T)), P = partial_floats(a, 2 * sizeof(T));
    float *p0 = sdzxm + a.N * a.C, *p1 = p0 + P;
    float2* qr = reinterpret_cast<float2*>(p1 + P);  // (N, G); an even float offset: 8-byte aligned
    for (int64_t n0 = 0; n0 < a.N; n0 += NS) {
      const int64_t ns = a.N - n0 < NS ? a.N - n0 : NS, tiles = ns * t.B * t.CB;
      if (tiles > kMaxGrid) return "group_norm: input too large for the CUDA grid";
      launch(nhwc_bwd_sums<T, V, Relu>, grid_of(tiles), kThreads, 0, st, dy, x, w, b, mean, rstd, t, a.G, n0, p0, p1);
      launch(nhwc_bwd_group, grid_of((ns * a.G + kWarps - 1) / kWarps), kThreads, 0, st, p0, p1, w, rstd, t, a.G, n0,
             ns, sdz, sdzxm, qr);
      launch(nhwc_bwd_dx<T, V, Relu>, grid_of(tiles), kThreads, 0, st, dy, x, dx, w, b, mean, rstd, qr, t, a.G, n0);
    }
  }
  const int64_t P = param_slices(a.N), cblocks = (a.C + kThreads - 1) / kThreads;
  float* pw = ws + bwd_floats_before_slices(a, sizeof(T));  // (P, C) rows of dweight, then of dbias
  if (P == 1) {
    launch(param_grads, grid_of(cblocks), kThreads, 0, st, rstd, sdz, sdzxm, a.N, a.C, a.G, dw, db);
  } else {
    if (P * cblocks > kMaxGrid) return "group_norm: N * C too large for the CUDA grid";
    launch(param_grads, grid_of(P * cblocks), kThreads, 0, st, rstd, sdz, sdzxm, a.N, a.C, a.G, pw, pw + P * a.C);
    launch(param_reduce, grid_of(cblocks), kThreads, 0, st, pw, pw + P * a.C, P, a.C, dw, db);
  }
  return last_error();
}

// Picks V and the ReLU flag: 16-byte packs when C (NHWC) or S (NCHW) and the pointers allow; NCHW also 8- and
// 4-byte packs, the widest that divides S (gcd(S, 16 / sizeof(T))): 14^2 layers get 8-byte bf16 packs, not scalars.
template <typename T, typename F> Status with_vec(const GNArgs& a, uintptr_t addr_bits, F&& f) {
  constexpr int V = 16 / sizeof(T);
  const auto go = [&](auto v) { return a.relu ? f(v, std::true_type()) : f(v, std::false_type()); };
  const auto fits = [&](int v) {
    return addr_bits % (v * sizeof(T)) == 0 && (a.channels_last ? a.C : a.S) % v == 0;
  };
  if (fits(V)) return go(std::integral_constant<int, V>());
  if (!a.channels_last && fits(V / 2)) return go(std::integral_constant<int, V / 2>());
  if constexpr (V / 4 > 1)
    if (!a.channels_last && fits(V / 4)) return go(std::integral_constant<int, V / 4>());
  return go(std::integral_constant<int, 1>());
}

template <typename T>
Status fwd_typed(const GNArgs& a, const void* x, const void* w, const void* b, void* y, void* mean, void* rstd,
                 void* ws, cudaStream_t st) {
  return with_vec<T>(a, addr_bits({x, y}), [&](auto v, auto relu) {
    return fwd_launch<T, decltype(v)::value, decltype(relu)::value>(
        a, static_cast<const T*>(x), static_cast<const float*>(w), static_cast<const float*>(b), static_cast<T*>(y),
        static_cast<float*>(mean), static_cast<float*>(rstd), static_cast<float*>(ws), st);
  });
}

template <typename T>
Status bwd_typed(const GNArgs& a, const void* dy, const void* x, const void* w, const void* b, const void* mean,
                 const void* rstd, void* dx, void* dw, void* db, void* ws, cudaStream_t st) {
  return with_vec<T>(a, addr_bits({dy, x, dx}), [&](auto v, auto relu) {
    return bwd_launch<T, decltype(v)::value, decltype(relu)::value>(
        a, static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const float*>(w),
        static_cast<const float*>(b), static_cast<const float*>(mean), static_cast<const float*>(rstd),
        static_cast<T*>(dx), static_cast<float*>(dw), static_cast<float*>(db), static_cast<float*>(ws), st);
  });
}

}  // namespace

size_t group_norm_fwd_cuda_workspace(DType dt, const GNArgs& a) {
  if (!a.channels_last || dt == DType::f64) return 0;
  return size_t(2 * partial_floats(a, elem_bytes(dt))) * sizeof(float);
}

size_t group_norm_bwd_cuda_workspace(DType dt, const GNArgs& a) {
  if (dt == DType::f64) return 0;
  const int64_t P = param_slices(a.N);
  return size_t(bwd_floats_before_slices(a, elem_bytes(dt)) + (P > 1 ? 2 * P * a.C : 0)) * sizeof(float);
}

Status group_norm_fwd_cuda(DType dt, const GNArgs& a, const void* x, const void* weight, const void* bias, void* y,
                           void* mean, void* rstd, void* workspace, void* stream) {
  if (a.N * a.C * a.S == 0) return nullptr;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::f32: return fwd_typed<float>(a, x, weight, bias, y, mean, rstd, workspace, st);
    case DType::f16: return fwd_typed<__half>(a, x, weight, bias, y, mean, rstd, workspace, st);
    case DType::bf16: return fwd_typed<__nv_bfloat16>(a, x, weight, bias, y, mean, rstd, workspace, st);
    default: return "float64 not supported on CUDA (use the cpu or torch backend)";
  }
}

Status group_norm_bwd_cuda(DType dt, const GNArgs& a, const void* dy, const void* x, const void* weight,
                           const void* bias, const void* mean, const void* rstd, void* dx, void* dweight,
                           void* dbias, void* workspace, void* stream) {
  if (a.N * a.C * a.S == 0) return nullptr;
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::f32:
      return bwd_typed<float>(a, dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, st);
    case DType::f16:
      return bwd_typed<__half>(a, dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, st);
    case DType::bf16:
      return bwd_typed<__nv_bfloat16>(a, dy, x, weight, bias, mean, rstd, dx, dweight, dbias, workspace, st);
    default: return "float64 not supported on CUDA (use the cpu or torch backend)";
  }
}

}  // namespace bitfast
