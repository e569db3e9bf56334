// Self-test of the CUDA emulation (csrc/emu) on what bitfast's kernels do not use yet, so that a future kernel
// can rely on it: every shuffle form with its lane arithmetic, ballot/any/all, __syncwarp, dynamic shared memory
// (private to each block, poisoned before it), 2-D blocks and grids, and the launch-configuration errors that
// cudaGetLastError() reports. Plain CUDA: it builds with nvcc too. Called from emu_test.cpp's main().
#include <cstdio>
#include <vector>

#include "cuda_launch.h"

namespace {

// out[warp * 32 + lane] for each intrinsic; one 64-thread block (two warps).
__global__ void shuffles(int* down, int* up, int* xr, int* idx, unsigned* bal, int* any_all) {
  const int lane = threadIdx.x % 32, t = threadIdx.x;
  down[t] = __shfl_down_sync(0xffffffffu, t, 3);          // t + 3, own value past the warp's end
  up[t] = __shfl_up_sync(0xffffffffu, t, 5, 16);          // t - 5 within 16-lane segments
  xr[t] = __shfl_xor_sync(0xffffffffu, t, 9);             // t ^ 9
  idx[t] = __shfl_sync(0xffffffffu, t, (lane + 7) % 32);  // a rotation
  bal[t] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  __syncwarp();
  any_all[t] = __any_sync(0xffffffffu, lane == 31) + 2 * __all_sync(0xffffffffu, lane < 31);
}

// Each block writes its id into dynamic shared memory after checking that it arrived poisoned, then reads a
// neighbour's slot after a barrier.
__global__ void dynamic_smem(int* ok, int n) {
  BITFAST_DYNAMIC_SMEM(unsigned, buf);
  const int t = threadIdx.y * blockDim.x + threadIdx.x, b = blockIdx.y * gridDim.x + blockIdx.x;
  const bool poisoned = buf[t] == 0xFFFFFFFFu;
  __syncthreads();
  buf[t] = unsigned(b * 1000 + t);
  __syncthreads();
  ok[b * n + t] = poisoned && buf[(t + 1) % n] == unsigned(b * 1000 + (t + 1) % n);
}

template <typename T> int count_bad(const std::vector<T>& got, T (*want)(int), const char* what) {
  int bad = 0;
  for (int i = 0; i < int(got.size()); ++i) bad += got[size_t(i)] != want(i);
  if (bad) std::printf("FAIL emu selftest %s: %d of %zu lanes wrong\n", what, bad, got.size());
  return bad;
}

}  // namespace

int emu_selftest() {
  int bad = 0;
  std::vector<int> down(64), up(64), xr(64), idx(64), aa(64);
  std::vector<unsigned> bal(64);
  bitfast::launch(shuffles, dim3(1), dim3(64), 0, nullptr, down.data(), up.data(), xr.data(), idx.data(),
                  bal.data(), aa.data());
  bad += cudaGetLastError() != cudaSuccess;
  bad += count_bad<int>(down, [](int t) { return t % 32 + 3 < 32 ? t + 3 : t; }, "__shfl_down_sync");
  bad += count_bad<int>(up, [](int t) { return t % 16 >= 5 ? t - 5 : t; }, "__shfl_up_sync width 16");
  bad += count_bad<int>(xr, [](int t) { return t ^ 9; }, "__shfl_xor_sync");
  bad += count_bad<int>(idx, [](int t) { return t / 32 * 32 + (t % 32 + 7) % 32; }, "__shfl_sync");
  bad += count_bad<unsigned>(bal, [](int) { return 0x49249249u; }, "__ballot_sync");
  bad += count_bad<int>(aa, [](int) { return 1; }, "__any_sync/__all_sync");
  const int n = 4 * 8;  // a 4x8 block on a 3x2 grid
  std::vector<int> ok(6 * n, 0);
  bitfast::launch(dynamic_smem, dim3(3, 2), dim3(4, 8), n * sizeof(unsigned), nullptr, ok.data(), n);
  bad += cudaGetLastError() != cudaSuccess;
  bad += count_bad<int>(ok, [](int) { return 1; }, "dynamic shared memory, 2-D grid and block");
  bitfast::launch(dynamic_smem, dim3(1), dim3(2048), 0, nullptr, ok.data(), n);  // too many threads
  const cudaError_t e1 = cudaGetLastError();
  bitfast::launch(dynamic_smem, dim3(0), dim3(32), 0, nullptr, ok.data(), n);  // empty grid
  const cudaError_t e2 = cudaGetLastError();
  if (e1 != cudaErrorInvalidConfiguration || e2 != cudaErrorInvalidConfiguration || cudaGetLastError() != cudaSuccess)
    std::printf("FAIL emu selftest: launch configuration errors not reported (%d, %d)\n", int(e1), int(e2)), ++bad;
  return bad;
}
