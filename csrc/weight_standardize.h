// Weight standardization kernels: declarations shared by weight_standardize_cpu.cpp, weight_standardize.cu and
// bindings.cpp.
#pragma once
#include "common.h"

namespace bitfast {

// A conv weight viewed as (O, K) rows: K = Cin/groups * kh * kw elements per output channel, contiguous per row
// (true for both contiguous and channels_last weights: the order inside a row does not matter).
struct WSArgs {
  int64_t O, K;
  double eps;
};

// Forward: y = (w - mean) / sqrt(var + eps) per row, biased var, computed in acc precision (float, double for
// f64). w in dtype `in`, y written in dtype `out`. mean, rstd: acc (O,).
void weight_standardize_fwd_cpu(DType in, DType out, const WSArgs& a, const void* w, void* y, void* mean,
                                void* rstd);
// Backward: dw = rstd * (dy - mean(dy) - yhat * mean(dy * yhat)) per row, yhat recomputed from w. dy in dtype
// `out`, w and dw in dtype `in`.
void weight_standardize_bwd_cpu(DType in, DType out, const WSArgs& a, const void* dy, const void* w,
                                const void* mean, const void* rstd, void* dw);

#ifdef BITFAST_WITH_CUDA
Status weight_standardize_fwd_cuda(DType in, DType out, const WSArgs& a, const void* w, void* y, void* mean,
                                   void* rstd, void* stream);
Status weight_standardize_bwd_cuda(DType in, DType out, const WSArgs& a, const void* dy, const void* w,
                                   const void* mean, const void* rstd, void* dw, void* stream);
#endif

// ---- weight_standardize_many: every weight of a model in one call (one kernel launch per direction on CUDA).
// All items share one in dtype, one out dtype and one device. Item i owns rows [row0, row0 + O) of the
// concatenated mean/rstd (acc, (sum O,)). fwd reads w, writes out = y (dtype out); bwd reads dy (dtype out) and
// w, writes out = dw (dtype in); dy is unused (nullptr) forward. On CUDA the item table lives in device memory.
struct WSItem {
  const void* w;
  const void* dy;
  void* out;
  int64_t O, K, row0;
};

void weight_standardize_many_fwd_cpu(DType in, DType out, const WSItem* items, int64_t n, double eps, void* mean,
                                     void* rstd);
void weight_standardize_many_bwd_cpu(DType in, DType out, const WSItem* items, int64_t n, const void* mean,
                                     const void* rstd);

#ifdef BITFAST_WITH_CUDA
// items: device pointer to n WSItem sorted by row0 (row0 of item 0 is 0); rows = sum of O.
Status weight_standardize_many_fwd_cuda(DType in, DType out, const WSItem* items, int64_t n, int64_t rows,
                                        double eps, void* mean, void* rstd, void* stream);
Status weight_standardize_many_bwd_cuda(DType in, DType out, const WSItem* items, int64_t n, int64_t rows,
                                        const void* mean, const void* rstd, void* stream);
#endif

}  // namespace bitfast
