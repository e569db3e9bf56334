// Shared, torch-free declarations for bitfast kernels. Kernels take raw pointers (+ a stream on CUDA) so the
// .cu files never include torch headers (they compile in seconds); all torch glue lives in bindings.cpp.
#pragma once
#include <cstddef>
#include <cstdint>

namespace bitfast {

// Storage dtype of activations / weights. Accumulation is float, except f64 which accumulates in double
// (so gradcheck works); "acc" below means float for f32/f16/bf16 and double for f64.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

// CUDA launchers return nullptr on success, else a static message (e.g. cudaGetErrorString).
using Status = const char*;

}  // namespace bitfast
