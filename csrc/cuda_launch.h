// The one thing the .cu files do differently for the GPU and for the CPU emulation (csrc/emu/cuda_emu.h): a kernel
// launch. Launch sites call bitfast::launch(kernel, grid, block, smem, stream, args...) instead of <<<...>>>, so the
// same kernel source builds with nvcc for the device and with g++ -DBITFAST_CUDA_EMU for the emulator.
#pragma once
#ifdef BITFAST_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif

#include <utility>

// Planted bugs for the emulator's proof that it can fail (tests/native/CMakeLists: emu_planted_*). 0 in every
// real build; a test build sets BITFAST_PLANTED_BUG to 1, 2 or 3 (the sites say which is which).
#ifndef BITFAST_PLANTED_BUG
#define BITFAST_PLANTED_BUG 0
#endif
#define BITFAST_PLANT(n) (BITFAST_PLANTED_BUG == (n))

// Dynamic shared memory: BITFAST_DYNAMIC_SMEM(float, buf); declares `buf` as the block's dynamic shared array.
#ifdef BITFAST_CUDA_EMU
#define BITFAST_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::bitfast_emu::dynamic_smem())
#else
#define BITFAST_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace bitfast {

// Launches kernel on grid x block with smem bytes of dynamic shared memory on stream; errors are left for
// cudaGetLastError(), as with <<<...>>>. Arguments convert to the kernel's parameter types at the call.
template <typename... P, typename... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, A&&... args) {
#ifdef BITFAST_CUDA_EMU
  (void)stream;  // the emulator runs every launch to completion, in order
  ::bitfast_emu::launch(grid, block, smem, [&] { kernel(static_cast<P>(args)...); });
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
#endif
}

}  // namespace bitfast
