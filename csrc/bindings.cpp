// All torch glue for bitfast._C: tensor checks, output allocation, dtype/stream plumbing, pybind11 bindings.
// The kernels themselves (csrc/<op>_cpu.cpp, csrc/<op>.cu) see only raw pointers. The Python layer
// (bitfast/ops/<op>.py) validates arguments with friendly messages first; the checks here are the last line
// of defence against a segfault.
#include <torch/extension.h>

#ifdef BITFAST_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include <map>
#include <mutex>
#include <string>

#include "group_norm.h"
#include "weight_standardize.h"

namespace bitfast {
namespace {

DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    case at::kDouble: return DType::f64;
    default: TORCH_CHECK(false, "bitfast: ", name, " must be float32, float16, bfloat16 or float64, got ", t);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// True for channels_last / channels_last_3d tensors that are not also plain-contiguous.
bool is_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return true;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return true;
  TORCH_CHECK(false, "bitfast: x must be contiguous or channels_last, got strides ", x.strides());
}

// dy and x (or dy and a weight) are read in one memory order: compare layouts, not raw strides, which differ in
// size-1 dimensions (a channels_last (N, C, 1, 1) tensor is also contiguous, with strides (C, 1, C, C)).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && is_channels_last(a) == is_channels_last(b);
}

at::Tensor empty_same_layout(const at::Tensor& x, bool channels_last, at::ScalarType dtype) {
  auto opts = x.options().dtype(dtype);
  if (!channels_last) return at::empty(x.sizes(), opts);
  auto fmt = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return at::empty(x.sizes(), opts.memory_format(fmt));
}

void check_vec(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t C, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "bitfast: ", name, " must have shape (", C, "), got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), "bitfast: ", name, " is on ", t->device(), " but x is on ", x.device());
  TORCH_CHECK(t->scalar_type() == acc_type(x.scalar_type()) && t->is_contiguous(), "bitfast: ", name,
              " must be a contiguous ", acc_type(x.scalar_type()), " tensor (the Python layer casts it)");
}

const void* ptr_or_null(const c10::optional<at::Tensor>& t) { return t ? t->data_ptr() : nullptr; }

#ifdef BITFAST_WITH_CUDA
void* current_stream() { return static_cast<void*>(at::cuda::getCurrentCUDAStream().stream()); }
void check_status(Status s, const char* what) { TORCH_CHECK(s == nullptr, "bitfast: ", what, " failed: ", s); }
at::Tensor workspace(const at::Tensor& x, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}
#endif

void check_device_compiled(const at::Tensor& x) {
  if (x.is_cuda()) {
#ifndef BITFAST_WITH_CUDA
    TORCH_CHECK(false, "bitfast._C was built without CUDA kernels");
#endif
    return;
  }
  TORCH_CHECK(x.is_cpu(), "bitfast: unsupported device ", x.device());
}

// ---------------------------------------------------------------------------------------------- group_norm

GNArgs gn_args(const at::Tensor& x, int64_t G, double eps, bool relu) {
  TORCH_CHECK(x.dim() >= 2, "bitfast: x must have at least 2 dimensions (N, C, *), got ", x.dim());
  TORCH_CHECK(G > 0 && x.size(1) % G == 0, "bitfast: num_groups=", G, " must divide C=", x.size(1));
  GNArgs a;
  a.N = x.size(0);
  a.C = x.size(1);
  a.S = a.N * a.C == 0 ? 0 : x.numel() / (a.N * a.C);
  a.G = G;
  a.channels_last = is_channels_last(x);
  a.relu = relu;
  a.eps = eps;
  return a;
}

std::vector<at::Tensor> group_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                       const c10::optional<at::Tensor>& bias, int64_t G, double eps, bool relu) {
  check_device_compiled(x);
  const DType dt = to_dtype(x.scalar_type(), "x");
  GNArgs a = gn_args(x, G, eps, relu);
  check_vec(weight, x, a.C, "weight");
  check_vec(bias, x, a.C, "bias");
  at::Tensor y = empty_same_layout(x, a.channels_last, x.scalar_type());
  at::Tensor mean = at::empty({a.N, G}, x.options().dtype(acc_type(x.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  if (x.numel() == 0) return {y, mean, rstd};
  if (x.is_cuda()) {
#ifdef BITFAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor ws = workspace(x, group_norm_fwd_cuda_workspace(dt, a));
    check_status(group_norm_fwd_cuda(dt, a, x.data_ptr(), ptr_or_null(weight), ptr_or_null(bias), y.data_ptr(),
                                     mean.data_ptr(), rstd.data_ptr(), ws.data_ptr(), current_stream()),
                 "group_norm_fwd_cuda");
#endif
  } else {
    group_norm_fwd_cpu(dt, a, x.data_ptr(), ptr_or_null(weight), ptr_or_null(bias), y.data_ptr(), mean.data_ptr(),
                       rstd.data_ptr());
  }
  return {y, mean, rstd};
}

std::vector<at::Tensor> group_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                       const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                       const at::Tensor& mean, const at::Tensor& rstd, int64_t G, bool relu) {
  check_device_compiled(x);
  const DType dt = to_dtype(x.scalar_type(), "x");
  GNArgs a = gn_args(x, G, 0.0, relu);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "bitfast: dy must match x in shape, dtype and device");
  TORCH_CHECK(same_layout(dy, x), "bitfast: dy must have the same memory layout as x");
  check_vec(weight, x, a.C, "weight");
  check_vec(bias, x, a.C, "bias");
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->sizes() == at::IntArrayRef({a.N, G}) && s->scalar_type() == acc_type(x.scalar_type()) &&
                    s->is_contiguous() && s->device() == x.device(),
                "bitfast: mean/rstd must be contiguous (N, G) ", acc_type(x.scalar_type()), " tensors");
  }
  at::Tensor dx = empty_same_layout(x, a.channels_last, x.scalar_type());
  at::Tensor dw = at::empty({a.C}, x.options().dtype(acc_type(x.scalar_type())));
  at::Tensor db = at::empty_like(dw);
  if (x.numel() == 0) return {dx, dw.zero_(), db.zero_()};
  if (x.is_cuda()) {
#ifdef BITFAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    at::Tensor ws = workspace(x, group_norm_bwd_cuda_workspace(dt, a));
    check_status(group_norm_bwd_cuda(dt, a, dy.data_ptr(), x.data_ptr(), ptr_or_null(weight), ptr_or_null(bias),
                                     mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr(),
                                     ws.data_ptr(), current_stream()),
                 "group_norm_bwd_cuda");
#endif
  } else {
    group_norm_bwd_cpu(dt, a, dy.data_ptr(), x.data_ptr(), ptr_or_null(weight), ptr_or_null(bias), mean.data_ptr(),
                       rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(), db.data_ptr());
  }
  return {dx, dw, db};
}

// -------------------------------------------------------------------------------------- weight_standardize

WSArgs ws_args(const at::Tensor& w, double eps) {
  TORCH_CHECK(w.dim() >= 2, "bitfast: weight must have at least 2 dimensions (O, ...), got ", w.dim());
  TORCH_CHECK(w.is_contiguous() || (w.dim() == 4 && w.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
                  (w.dim() == 5 && w.is_contiguous(at::MemoryFormat::ChannelsLast3d)),
              "bitfast: weight must be contiguous or channels_last");
  WSArgs a;
  a.O = w.size(0);
  a.K = a.O == 0 ? 0 : w.numel() / a.O;
  a.eps = eps;
  return a;
}

std::vector<at::Tensor> weight_standardize_fwd(const at::Tensor& w, double eps,
                                               c10::optional<at::ScalarType> out_dtype) {
  check_device_compiled(w);
  const at::ScalarType out_t = out_dtype.value_or(w.scalar_type());
  const DType in = to_dtype(w.scalar_type(), "weight"), out = to_dtype(out_t, "out_dtype");
  WSArgs a = ws_args(w, eps);
  at::Tensor y = at::empty_like(w, w.options().dtype(out_t));  // keeps w's memory format, so rows stay (O, K)
  at::Tensor mean = at::empty({a.O}, w.options().dtype(acc_type(w.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  if (w.numel() == 0) return {y, mean, rstd};
  if (w.is_cuda()) {
#ifdef BITFAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(w.device());
    check_status(weight_standardize_fwd_cuda(in, out, a, w.data_ptr(), y.data_ptr(), mean.data_ptr(),
                                             rstd.data_ptr(), current_stream()),
                 "weight_standardize_fwd_cuda");
#endif
  } else {
    weight_standardize_fwd_cpu(in, out, a, w.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr());
  }
  return {y, mean, rstd};
}

at::Tensor weight_standardize_bwd(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& mean,
                                  const at::Tensor& rstd) {
  check_device_compiled(w);
  const DType in = to_dtype(w.scalar_type(), "weight"), out = to_dtype(dy.scalar_type(), "dy");
  WSArgs a = ws_args(w, 0.0);
  TORCH_CHECK(dy.sizes() == w.sizes() && same_layout(dy, w) && dy.device() == w.device(),
              "bitfast: dy must match weight in shape, layout and device");
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == a.O && s->scalar_type() == acc_type(w.scalar_type()) &&
                    s->is_contiguous() && s->device() == w.device(),
                "bitfast: mean/rstd must be contiguous (O,) ", acc_type(w.scalar_type()), " tensors");
  }
  at::Tensor dw = at::empty_like(w);
  if (w.numel() == 0) return dw;
  if (w.is_cuda()) {
#ifdef BITFAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(w.device());
    check_status(weight_standardize_bwd_cuda(in, out, a, dy.data_ptr(), w.data_ptr(), mean.data_ptr(),
                                             rstd.data_ptr(), dw.data_ptr(), current_stream()),
                 "weight_standardize_bwd_cuda");
#endif
  } else {
    weight_standardize_bwd_cpu(in, out, a, dy.data_ptr(), w.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
                               dw.data_ptr());
  }
  return dw;
}

// -------------------------------------------------------------------------------- weight_standardize_many
// Many weights in one call (csrc/weight_standardize.h: WSItem). Empty weights get their (empty) outputs but no item.

struct WSMany {
  std::vector<WSItem> items;
  int64_t rows = 0;
};

WSMany ws_many_items(const std::vector<at::Tensor>& ws) {
  TORCH_CHECK(!ws.empty(), "bitfast: weights must be a non-empty list");
  WSMany m;
  for (size_t i = 0; i < ws.size(); ++i) {
    const at::Tensor& w = ws[i];
    TORCH_CHECK(w.scalar_type() == ws[0].scalar_type() && w.device() == ws[0].device(), "bitfast: weights[", i,
                "] is ", w.scalar_type(), " on ", w.device(), " but weights[0] is ", ws[0].scalar_type(), " on ",
                ws[0].device(), "; all weights must share one dtype and device");
    const WSArgs a = ws_args(w, 0.0);
    if (w.numel() > 0) m.items.push_back({w.data_ptr(), nullptr, nullptr, a.O, a.K, m.rows});
    m.rows += a.O;
  }
  return m;
}

#ifdef BITFAST_WITH_CUDA
// The item table in device memory, cached per distinct table (the same weights give the same table every step, so
// a hit costs no copy at all). Each entry keeps its pinned staging buffer and its device copy alive and never
// changes them: under CUDA graph capture (torch.compile mode="reduce-overhead") the captured host-to-device copy
// replays from a buffer whose bytes stay the table it was captured with. Entries made or used during a capture are
// kept for the life of the process, since a graph may replay them at any time; others are evicted when the cache
// holds kMaxTables entries. A mutex makes it safe for several threads (DataParallel-style callers).
struct TableCache {
  struct Entry {
    at::Tensor host, device;
    bool captured;
  };
  static constexpr size_t kMaxTables = 64;
  std::mutex mu;
  std::map<std::string, Entry> entries;
};

at::Tensor device_items(const std::vector<WSItem>& items, const at::Tensor& like) {
  static TableCache cache;
  const size_t bytes = items.size() * sizeof(WSItem);
  std::string key(reinterpret_cast<const char*>(items.data()), bytes);
  key += "@" + std::to_string(like.device().index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  std::lock_guard<std::mutex> lock(cache.mu);
  auto it = cache.entries.find(key);
  if (it != cache.entries.end()) {
    it->second.captured |= capturing;
    return it->second.device;
  }
  if (cache.entries.size() >= TableCache::kMaxTables)
    for (auto e = cache.entries.begin(); e != cache.entries.end();)
      e = e->second.captured ? std::next(e) : cache.entries.erase(e);
  at::Tensor host =
      at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), items.data(), bytes);
  at::Tensor device = host.to(like.device(), /*non_blocking=*/true);
  cache.entries.emplace(std::move(key), TableCache::Entry{host, device, capturing});
  return device;
}
#endif

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> weight_standardize_many_fwd(
    const std::vector<at::Tensor>& ws, double eps, c10::optional<at::ScalarType> out_dtype) {
  WSMany m = ws_many_items(ws);
  const at::Tensor& w0 = ws[0];
  check_device_compiled(w0);
  const at::ScalarType out_t = out_dtype.value_or(w0.scalar_type());
  const DType in = to_dtype(w0.scalar_type(), "weights"), out = to_dtype(out_t, "out_dtype");
  std::vector<at::Tensor> ys;
  for (const at::Tensor& w : ws) ys.push_back(at::empty_like(w, w.options().dtype(out_t)));  // keeps the layout
  for (size_t i = 0, j = 0; i < ws.size(); ++i)
    if (ws[i].numel() > 0) m.items[j++].out = ys[i].data_ptr();
  at::Tensor mean = at::empty({m.rows}, w0.options().dtype(acc_type(w0.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  if (m.items.empty()) return {ys, mean, rstd};
  const int64_t n = static_cast<int64_t>(m.items.size());
  if (w0.is_cuda()) {
#ifdef BITFAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(w0.device());
    at::Tensor table = device_items(m.items, w0);
    check_status(weight_standardize_many_fwd_cuda(in, out, static_cast<const WSItem*>(table.data_ptr()), n,
                                                  m.rows, eps, mean.data_ptr(), rstd.data_ptr(),
                                                  current_stream()),
                 "weight_standardize_many_fwd_cuda");
#endif
  } else {
    weight_standardize_many_fwd_cpu(in, out, m.items.data(), n, eps, mean.data_ptr(), rstd.data_ptr());
  }
  return {ys, mean, rstd};
}

std::vector<at::Tensor> weight_standardize_many_bwd(const std::vector<at::Tensor>& dys,
                                                    const std::vector<at::Tensor>& ws, const at::Tensor& mean,
                                                    const at::Tensor& rstd) {
  WSMany m = ws_many_items(ws);
  const at::Tensor& w0 = ws[0];
  check_device_compiled(w0);
  TORCH_CHECK(dys.size() == ws.size(), "bitfast: got ", dys.size(), " grads for ", ws.size(), " weights");
  const DType in = to_dtype(w0.scalar_type(), "weights"), out = to_dtype(dys[0].scalar_type(), "grads");
  for (size_t i = 0; i < ws.size(); ++i) {
    TORCH_CHECK(dys[i].sizes() == ws[i].sizes() && same_layout(dys[i], ws[i]) &&
                    dys[i].device() == ws[i].device() && dys[i].scalar_type() == dys[0].scalar_type(),
                "bitfast: grads[", i, "] must match weights[", i, "] in shape, layout and device, and grads[0] in ",
                "dtype");
  }
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->dim() == 1 && s->size(0) == m.rows && s->scalar_type() == acc_type(w0.scalar_type()) &&
                    s->is_contiguous() && s->device() == w0.device(),
                "bitfast: mean/rstd must be contiguous (", m.rows, ",) ", acc_type(w0.scalar_type()), " tensors");
  }
  std::vector<at::Tensor> dws;
  for (const at::Tensor& w : ws) dws.push_back(at::empty_like(w));
  for (size_t i = 0, j = 0; i < ws.size(); ++i) {
    if (ws[i].numel() == 0) continue;
    m.items[j].dy = dys[i].data_ptr();
    m.items[j++].out = dws[i].data_ptr();
  }
  if (m.items.empty()) return dws;
  const int64_t n = static_cast<int64_t>(m.items.size());
  if (w0.is_cuda()) {
#ifdef BITFAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(w0.device());
    at::Tensor table = device_items(m.items, w0);
    check_status(weight_standardize_many_bwd_cuda(in, out, static_cast<const WSItem*>(table.data_ptr()), n,
                                                  m.rows, mean.data_ptr(), rstd.data_ptr(),
                                                  current_stream()),
                 "weight_standardize_many_bwd_cuda");
#endif
  } else {
    weight_standardize_many_bwd_cpu(in, out, m.items.data(), n, mean.data_ptr(), rstd.data_ptr());
  }
  return dws;
}
// ---------------------------------------------------------------------------- end weight_standardize_many

}  // namespace
}  // namespace bitfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bitfast compiled kernels (C++ CPU, and CUDA when built with it)";
#ifdef BITFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("group_norm_fwd", &bitfast::group_norm_fwd, "GroupNorm(+ReLU) forward -> (y, mean, rstd)");
  m.def("group_norm_bwd", &bitfast::group_norm_bwd, "GroupNorm(+ReLU) backward -> (dx, dweight, dbias)");
  m.def("weight_standardize_fwd", &bitfast::weight_standardize_fwd, "weight standardization -> (y, mean, rstd)");
  m.def("weight_standardize_bwd", &bitfast::weight_standardize_bwd, "weight standardization backward -> dw");
  // weight_standardize_many
  m.def("weight_standardize_many_fwd", &bitfast::weight_standardize_many_fwd,
        "weight standardization of a list of weights -> (ys, mean, rstd), mean/rstd concatenated over rows");
  m.def("weight_standardize_many_bwd", &bitfast::weight_standardize_many_bwd,
        "weight standardization backward of a list of weights -> dws");
}
