// CUDA emulation for the CPU: compiles the unchanged kernel source of csrc/*.cu as ordinary C++ (g++ -x c++,
// -DBITFAST_CUDA_EMU) and runs it on host memory, so that ASan/UBSan/TSan and an fp64 comparison see the real
// kernels (tests/native/emu_test.cpp, ctest). Only csrc/cuda_launch.h includes this file.
//
// Execution model (csrc/emu/cuda_emu.cpp):
//   - a launch runs its blocks one after another; the threads of a block are real OS threads, all running at
//     once, so a missing barrier is a data race that TSan reports and that usually gives wrong results too;
//   - __syncthreads() is a real barrier of the block's live threads (a thread that returned no longer counts,
//     as on sm_70+); threads that reach different __syncthreads() call sites at once are reported (divergence);
//   - warp intrinsics exchange values through the warp's slots between two barriers of the lanes in the mask;
//     a lane that is named in the mask but has returned, or lanes that disagree on the mask, are reported;
//   - static __shared__ variables are function statics: one copy, shared by the block's threads and reused by
//     the next block (blocks never overlap); dynamic shared memory (BITFAST_DYNAMIC_SMEM) is allocated per
//     launch and poisoned with 0xFF bytes (NaN as floats) before every block;
//   - launch errors (bad block size, empty grid, too much dynamic shared memory) are returned by
//     cudaGetLastError() as on the device; the emulator's own findings abort with a "cuda_emu:" message.
// Not modelled: timing, warp-synchronous execution without *_sync (lanes never run in lockstep here), the
// weak memory ordering of the GPU beyond what barriers give, L1/L2, and more than one mask active in a warp.
#pragma once
#include <cuda_bf16.h>  // host versions of __half / __nv_bfloat16 and their conversions (device rounding)
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>  // cudaError_t, cudaStream_t, dim3 (types only; no libcudart is linked)

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

// CUDA's headers define these as nothing for a host compiler; a block's shared memory is one static copy here.
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace bitfast_emu {

struct ThreadCtx {
  uint3 thread, block;
};
ThreadCtx& ctx();  // this OS thread's indices (thread_local)
const dim3& block_dim();
const dim3& grid_dim();
void* dynamic_smem();

// Runs body() for every thread of every block; returns the launch-configuration error, as <<<>>> would.
cudaError_t launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

void syncthreads(const char* file, int line);
void syncwarp(unsigned mask);
// Warp exchange: this lane offers v; returns the value offered by lane src (src outside the warp: own v).
uint64_t exchange(unsigned mask, uint64_t v, int src);
unsigned ballot(unsigned mask, bool pred);
int lane();

template <typename T> T shfl_from(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "cuda_emu: shuffles of types over 8 bytes are not emulated");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  u = exchange(mask, u, src);
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace bitfast_emu

#define threadIdx (::bitfast_emu::ctx().thread)
#define blockIdx (::bitfast_emu::ctx().block)
#define blockDim (::bitfast_emu::block_dim())
#define gridDim (::bitfast_emu::grid_dim())
#define __syncthreads() ::bitfast_emu::syncthreads(__FILE__, __LINE__)

// Lane arithmetic of the shuffles follows the PTX shfl semantics for width = 32 (segments of `width` lanes).
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int l = bitfast_emu::lane(), base = l & ~(width - 1);
  return bitfast_emu::shfl_from(mask, v, base + (src & (width - 1)));
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int l = bitfast_emu::lane(), seg = l & (width - 1);
  return bitfast_emu::shfl_from(mask, v, seg + int(delta) < width ? l + int(delta) : l);
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int l = bitfast_emu::lane(), seg = l & (width - 1);
  return bitfast_emu::shfl_from(mask, v, seg >= int(delta) ? l - int(delta) : l);
}
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int l = bitfast_emu::lane(), src = l ^ lane_mask;
  return bitfast_emu::shfl_from(mask, v, (src & ~(width - 1)) == (l & ~(width - 1)) ? src : l);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { bitfast_emu::syncwarp(mask); }
inline unsigned __ballot_sync(unsigned mask, int pred) { return bitfast_emu::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return bitfast_emu::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) { return bitfast_emu::ballot(mask, pred != 0) == mask; }

// Arithmetic intrinsics: the host's IEEE operations round to nearest like the _rn forms.
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
// Cache-hinted loads and stores are plain accesses on the host.
template <typename T> T __ldg(const T* p) { return *p; }
template <typename T> T __ldcs(const T* p) { return *p; }
template <typename T> void __stcs(T* p, T v) { *p = v; }
template <typename T> void __stwt(T* p, T v) { *p = v; }
