// GroupNorm(+ReLU) kernels: declarations shared by group_norm_cpu.cpp, group_norm.cu and bindings.cpp.
#pragma once
#include "common.h"

namespace bitfast {

// x is (N, C, S) when !channels_last and (N, S, C) when channels_last; S = prod(spatial) (1 for 2-D input).
// Groups are G blocks of C/G consecutive channels.
struct GNArgs {
  int64_t N, C, S, G;
  bool channels_last;
  bool relu;
  double eps;
};

// Forward. x, y: storage dtype. weight, bias: acc dtype (C,) or nullptr (no affine). mean, rstd: acc (N, G).
void group_norm_fwd_cpu(DType dt, const GNArgs& a, const void* x, const void* weight, const void* bias, void* y,
                        void* mean, void* rstd);
// Backward. dy, x, dx: storage dtype, same layout as x. dweight, dbias: acc (C,), always written
// (sum over N and S of dy*xhat and dy, after the ReLU mask). Deterministic: no float atomics.
void group_norm_bwd_cpu(DType dt, const GNArgs& a, const void* dy, const void* x, const void* weight,
                        const void* bias, const void* mean, const void* rstd, void* dx, void* dweight, void* dbias);

#ifdef BITFAST_WITH_CUDA
// Scratch bytes the CUDA launchers need (the caller allocates them on the device; may be 0).
size_t group_norm_fwd_cuda_workspace(DType dt, const GNArgs& a);
size_t group_norm_bwd_cuda_workspace(DType dt, const GNArgs& a);
// Same contracts as the CPU versions; pointers are device pointers, stream is a cudaStream_t.
Status group_norm_fwd_cuda(DType dt, const GNArgs& a, const void* x, const void* weight, const void* bias, void* y,
                           void* mean, void* rstd, void* workspace, void* stream);
Status group_norm_bwd_cuda(DType dt, const GNArgs& a, const void* dy, const void* x, const void* weight,
                           const void* bias, const void* mean, const void* rstd, void* dx, void* dweight,
                           void* dbias, void* workspace, void* stream);
#endif

}  // namespace bitfast
