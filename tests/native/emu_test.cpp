// The CUDA kernels of csrc/group_norm.cu and csrc/weight_standardize.cu, run through the CPU emulation
// (csrc/emu/cuda_emu.h) and compared with the C++ CPU twins in fp64, by the GUIDE's criterion:
//   err(cuda kernel in dtype) <= 2 * err(cpu twin in the same dtype) + atol,  err = max |. - fp64 reference|.
// The cpu twin in dtype stands in for "torch's own op" (it is tested against torch in tests/). Outputs and
// workspaces are poisoned with NaN before every launch; the backward runs twice and must be bitwise identical.
// ctest runs this binary in three builds (plain, ASan+UBSan, TSan; tests/native/CMakeLists.txt) and, built with a
// planted bug, expects it to fail. Seed: BITFAST_EMU_SEED (default: from the clock, printed).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "group_norm.h"
#include "weight_standardize.h"

using namespace bitfast;

int emu_selftest();  // tests/native/emu_selftest.cu: the intrinsics the kernels do not use yet

namespace {

int failures = 0;
std::mt19937_64 rng;

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<__half>() { return DType::f16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::bf16; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <typename T> const char* name_of() {
  constexpr DType d = dtype_of<T>();
  return d == DType::f32 ? "f32" : d == DType::f16 ? "f16" : d == DType::bf16 ? "bf16" : "f64";
}
template <typename T> double ulp_of() {  // relative spacing at 1.0
  constexpr DType d = dtype_of<T>();
  return d == DType::f32 ? 0x1p-23 : d == DType::f16 ? 0x1p-10 : d == DType::bf16 ? 0x1p-7 : 0x1p-52;
}

double to_d(float v) { return v; }
double to_d(double v) { return v; }
double to_d(__half v) { return __half2float(v); }
double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_d(double v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(float(v));
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(float(v));
  else return T(v);
}
template <typename T> std::vector<T> nan_vec(size_t n) { return std::vector<T>(n, from_d<T>(NAN)); }
template <typename T> std::vector<double> as_d(const std::vector<T>& v, size_t off = 0) {
  std::vector<double> r(v.size() - off);
  for (size_t i = 0; i < r.size(); ++i) r[i] = to_d(v[i + off]);
  return r;
}
// Random values offset + scale * N(0, 1), rounded to T, with `pad` extra leading elements (misaligned pointers).
template <typename T> std::vector<T> randn(size_t n, double offset, double scale, size_t pad = 0) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> v(n + pad);
  for (auto& e : v) e = from_d<T>(offset + scale * normal(rng));
  return v;
}

double max_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double e = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::fabs(got[i] - ref[i]);
    if (!(d <= e)) e = std::isnan(d) ? INFINITY : d;
  }
  return e;
}
double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double e : v) m = std::fmax(m, std::fabs(e));
  return m;
}

// The criterion for one output; atol is `ulps` ulps of the dtype at the reference's magnitude.
void check(const std::string& what, const std::vector<double>& cuda, const std::vector<double>& cpu,
           const std::vector<double>& ref, double ulp, double ulps = 2) {
  const double ec = max_err(cuda, ref), et = max_err(cpu, ref), atol = ulps * ulp * (max_abs(ref) + 1e-30);
  if (!(ec <= 2 * et + atol)) {
    std::printf("FAIL %s: cuda err %.3g > 2 * cpu err %.3g + atol %.3g\n", what.c_str(), ec, et, atol);
    ++failures;
  }
}
void expect(bool ok, const std::string& what) {
  if (!ok) std::printf("FAIL %s\n", what.c_str()), ++failures;
}
template <typename T> bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// ------------------------------------------------------------------------------------------------ GroupNorm
struct GNCase {
  int64_t N, C, S, G;
  bool cl, relu, affine;
  double offset;
  size_t pad;  // 1: every pointer off 16-byte alignment -> the scalar (V = 1) path
};

// Index of element (n, c, s) in x's layout.
size_t gn_index(const GNArgs& a, int64_t n, int64_t c, int64_t s) {
  return size_t(a.channels_last ? (n * a.S + s) * a.C + c : (n * a.C + c) * a.S + s);
}

// Moves elements whose pre-ReLU value z is within 0.02 of the kink to z = +-0.25 (a few passes, as the statistics
// move with them). At the kink, the ReLU mask of the backward flips on a last-bit difference in the statistics, which
// says nothing about a kernel's correctness but would make the comparison flaky.
template <typename T>
void away_from_kink(const GNArgs& a, std::vector<T>& x, const std::vector<float>& w, const std::vector<float>& b,
                    bool affine) {
  const size_t p = x.size() - size_t(a.N * a.C * a.S);
  const int64_t D = a.C / a.G;
  for (int pass = 0; pass < 4; ++pass) {
    std::vector<double> xd = as_d(x, p), y(xd.size()), m(size_t(a.N * a.G)), r(m.size());
    const GNArgs plain{a.N, a.C, a.S, a.G, a.channels_last, false, a.eps};
    std::vector<double> wd = as_d(w), bd = as_d(b);
    group_norm_fwd_cpu(DType::f64, plain, xd.data(), affine ? wd.data() : nullptr, affine ? bd.data() : nullptr,
                       y.data(), m.data(), r.data());
    bool moved = false;
    for (int64_t n = 0; n < a.N; ++n)
      for (int64_t c = 0; c < a.C; ++c)
        for (int64_t s = 0; s < a.S; ++s) {
          const size_t i = gn_index(a, n, c, s);
          if (std::fabs(y[i]) >= 0.02) continue;
          const double k = r[size_t(n * a.G + c / D)] * (affine ? wd[size_t(c)] : 1.0), h = affine ? bd[size_t(c)] : 0.0;
          const double z = (i % 2 ? 0.25 : -0.25);
          x[i + p] = from_d<T>(m[size_t(n * a.G + c / D)] + (z - h) / k);
          moved = true;
        }
    if (!moved) return;
  }
}

template <typename T> void gn_case(const GNCase& k) {
  const GNArgs a{k.N, k.C, k.S, k.G, k.cl, k.relu, 1e-5};
  const size_t n = size_t(k.N * k.C * k.S), ng = size_t(k.N * k.G), p = k.pad;
  char tag[160];
  std::snprintf(tag, sizeof tag, "gn %s N=%ld C=%ld S=%ld G=%ld %s%s%s off=%g pad=%zu", name_of<T>(), long(k.N),
                long(k.C), long(k.S), long(k.G), k.cl ? "nhwc" : "nchw", k.relu ? " relu" : "",
                k.affine ? " affine" : "", k.offset, p);
  std::vector<T> x = randn<T>(n, k.offset, 1.0, p);
  const std::vector<T> dy = randn<T>(n, 0.0, 1.0, p);
  const std::vector<float> w = randn<float>(size_t(k.C), 1.0, 0.5), b = randn<float>(size_t(k.C), 0.1, 0.5);
  if (k.relu) away_from_kink(a, x, w, b, k.affine);
  const std::vector<double> xd = as_d(x, p), dyd = as_d(dy, p), wd = as_d(w), bd = as_d(b);
  const float* wp = k.affine ? w.data() : nullptr;
  const float* bp = k.affine ? b.data() : nullptr;
  // fp64 reference (cpu twin in f64) and the cpu twin in T.
  std::vector<double> ry(n), rm(ng), rr(ng), rdx(n), rdw(size_t(k.C)), rdb(size_t(k.C));
  group_norm_fwd_cpu(DType::f64, a, xd.data(), k.affine ? wd.data() : nullptr, k.affine ? bd.data() : nullptr,
                     ry.data(), rm.data(), rr.data());
  group_norm_bwd_cpu(DType::f64, a, dyd.data(), xd.data(), k.affine ? wd.data() : nullptr,
                     k.affine ? bd.data() : nullptr, rm.data(), rr.data(), rdx.data(), rdw.data(), rdb.data());
  std::vector<T> ty = nan_vec<T>(n + p), tdx = nan_vec<T>(n + p);
  std::vector<float> tm(ng), tr(ng), tdw(size_t(k.C)), tdb(size_t(k.C));
  group_norm_fwd_cpu(dtype_of<T>(), a, x.data() + p, wp, bp, ty.data() + p, tm.data(), tr.data());
  group_norm_bwd_cpu(dtype_of<T>(), a, dy.data() + p, x.data() + p, wp, bp, tm.data(), tr.data(), tdx.data() + p,
                     tdw.data(), tdb.data());
  // The CUDA kernels, emulated.
  std::vector<T> cy = nan_vec<T>(n + p);
  std::vector<float> cm = nan_vec<float>(ng), cr = nan_vec<float>(ng);
  std::vector<float> fws = nan_vec<float>(group_norm_fwd_cuda_workspace(dtype_of<T>(), a) / sizeof(float));
  Status st = group_norm_fwd_cuda(dtype_of<T>(), a, x.data() + p, wp, bp, cy.data() + p, cm.data(), cr.data(),
                                  fws.data(), nullptr);
  expect(st == nullptr, std::string(tag) + " fwd status: " + (st ? st : ""));
  check(std::string(tag) + " y", as_d(cy, p), as_d(ty, p), ry, ulp_of<T>());
  check(std::string(tag) + " mean", as_d(cm), as_d(tm), rm, 0x1p-23, 8);
  check(std::string(tag) + " rstd", as_d(cr), as_d(tr), rr, 0x1p-23, 8);
  std::vector<T> dx[2];
  std::vector<float> dw[2], db[2];
  for (int rep = 0; rep < 2; ++rep) {
    dx[rep] = nan_vec<T>(n + p);
    dw[rep] = nan_vec<float>(size_t(k.C));
    db[rep] = nan_vec<float>(size_t(k.C));
    std::vector<float> bws = nan_vec<float>(group_norm_bwd_cuda_workspace(dtype_of<T>(), a) / sizeof(float));
    st = group_norm_bwd_cuda(dtype_of<T>(), a, dy.data() + p, x.data() + p, wp, bp, cm.data(), cr.data(),
                             dx[rep].data() + p, dw[rep].data(), db[rep].data(), bws.data(), nullptr);
    expect(st == nullptr, std::string(tag) + " bwd status: " + (st ? st : ""));
  }
  check(std::string(tag) + " dx", as_d(dx[0], p), as_d(tdx, p), rdx, ulp_of<T>(), 4);
  check(std::string(tag) + " dweight", as_d(dw[0]), as_d(tdw), rdw, 0x1p-23, 64);
  check(std::string(tag) + " dbias", as_d(db[0]), as_d(tdb), rdb, 0x1p-23, 64);
  expect(same_bits(dw[0], dw[1]) && same_bits(db[0], db[1]) && same_bits(dx[0], dx[1]),
         std::string(tag) + ": two backward runs differ (not deterministic)");
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename T> void gn_cases(const std::vector<GNCase>& cases) {
  for (const GNCase& k : cases) {
    const double t0 = now_s();
    gn_case<T>(k);
    std::printf("  %-5s N=%ld C=%ld S=%ld G=%ld %s: %.2f s\n", name_of<T>(), long(k.N), long(k.C), long(k.S),
                long(k.G), k.cl ? "nhwc" : "nchw", now_s() - t0);
  }
}

// ------------------------------------------------------------------------------------- weight standardization
template <typename In, typename Out> void ws_case(int64_t O, int64_t K, double offset) {
  const WSArgs a{O, K, 1e-10};
  const size_t n = size_t(O * K);
  char tag[96];
  std::snprintf(tag, sizeof tag, "ws %s->%s O=%ld K=%ld off=%g", name_of<In>(), name_of<Out>(), long(O), long(K),
                offset);
  using A = std::conditional_t<std::is_same_v<In, double>, double, float>;
  const std::vector<In> w = randn<In>(n, offset, 0.05);
  const std::vector<Out> dy = randn<Out>(n, 0.0, 1.0);
  const std::vector<double> wd = as_d(w), dyd = as_d(dy);
  std::vector<double> ry(n), rm(static_cast<size_t>(O)), rr(static_cast<size_t>(O)), rdw(n);
  weight_standardize_fwd_cpu(DType::f64, DType::f64, a, wd.data(), ry.data(), rm.data(), rr.data());
  weight_standardize_bwd_cpu(DType::f64, DType::f64, a, dyd.data(), wd.data(), rm.data(), rr.data(), rdw.data());
  std::vector<Out> ty = nan_vec<Out>(n);
  std::vector<A> tm(static_cast<size_t>(O)), tr(static_cast<size_t>(O));
  std::vector<In> tdw = nan_vec<In>(n);
  weight_standardize_fwd_cpu(dtype_of<In>(), dtype_of<Out>(), a, w.data(), ty.data(), tm.data(), tr.data());
  weight_standardize_bwd_cpu(dtype_of<In>(), dtype_of<Out>(), a, dy.data(), w.data(), tm.data(), tr.data(),
                             tdw.data());
  std::vector<Out> cy = nan_vec<Out>(n);
  std::vector<A> cm = nan_vec<A>(static_cast<size_t>(O)), cr = nan_vec<A>(static_cast<size_t>(O));
  std::vector<In> cdw = nan_vec<In>(n);
  Status st = weight_standardize_fwd_cuda(dtype_of<In>(), dtype_of<Out>(), a, w.data(), cy.data(), cm.data(),
                                          cr.data(), nullptr);
  expect(st == nullptr, std::string(tag) + " fwd status");
  st = weight_standardize_bwd_cuda(dtype_of<In>(), dtype_of<Out>(), a, dy.data(), w.data(), cm.data(), cr.data(),
                                   cdw.data(), nullptr);
  expect(st == nullptr, std::string(tag) + " bwd status");
  check(std::string(tag) + " y", as_d(cy), as_d(ty), ry, ulp_of<Out>());
  check(std::string(tag) + " rstd", as_d(cr), as_d(tr), rr, ulp_of<A>(), 8);
  check(std::string(tag) + " dw", as_d(cdw), as_d(tdw), rdw, ulp_of<In>(), 8);
}

// Many weights in one launch per direction: every row equals the single-weight kernel's, bit for bit, including a
// table with a gap of rows that no item owns (a weight with output channels but no elements, skipped by the
// bindings) and a table whose first item does not start at row 0.
template <typename In, typename Out> void ws_many_case() {
  using A = std::conditional_t<std::is_same_v<In, double>, double, float>;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{7, 27}, {3, 300}, {16, 1}, {5, 1000}};
  const int64_t gap = 8;  // rows of an (8, 0, 3, 3) weight between items 1 and 2
  std::vector<std::vector<In>> w;
  std::vector<std::vector<Out>> y, dy;
  std::vector<std::vector<In>> dw;
  std::vector<WSItem> fwd, bwd;
  int64_t row = gap;  // the first item starts after a gap too
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [O, K] = shapes[i];
    w.push_back(randn<In>(size_t(O * K), 0.1, 0.05));
    dy.push_back(randn<Out>(size_t(O * K), 0.0, 1.0));
    y.push_back(nan_vec<Out>(size_t(O * K)));
    dw.push_back(nan_vec<In>(size_t(O * K)));
    fwd.push_back({w[i].data(), nullptr, y[i].data(), O, K, row});
    bwd.push_back({w[i].data(), dy[i].data(), dw[i].data(), O, K, row});
    row += O + (i == 1 ? gap : 0);
  }
  const int64_t rows = row;
  std::vector<A> mean = nan_vec<A>(size_t(rows)), rstd = nan_vec<A>(size_t(rows));
  Status st = weight_standardize_many_fwd_cuda(dtype_of<In>(), dtype_of<Out>(), fwd.data(), int64_t(fwd.size()),
                                               rows, 1e-10, mean.data(), rstd.data(), nullptr);
  expect(st == nullptr, "ws_many fwd status");
  st = weight_standardize_many_bwd_cuda(dtype_of<In>(), dtype_of<Out>(), bwd.data(), int64_t(bwd.size()), rows,
                                        mean.data(), rstd.data(), nullptr);
  expect(st == nullptr, "ws_many bwd status");
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [O, K] = shapes[i];
    const WSArgs a{O, K, 1e-10};
    std::vector<Out> sy = nan_vec<Out>(size_t(O * K));
    std::vector<In> sdw = nan_vec<In>(size_t(O * K));
    std::vector<A> sm(static_cast<size_t>(O)), sr(static_cast<size_t>(O));
    weight_standardize_fwd_cuda(dtype_of<In>(), dtype_of<Out>(), a, w[i].data(), sy.data(), sm.data(), sr.data(),
                                nullptr);
    weight_standardize_bwd_cuda(dtype_of<In>(), dtype_of<Out>(), a, dy[i].data(), w[i].data(), sm.data(),
                                sr.data(), sdw.data(), nullptr);
    const std::vector<A> mm(mean.begin() + fwd[i].row0, mean.begin() + fwd[i].row0 + O);
    expect(same_bits(sy, y[i]) && same_bits(sdw, dw[i]) && same_bits(sm, mm),
           std::string("ws_many ") + name_of<In>() + "->" + name_of<Out>() + " item " + std::to_string(i) +
               " differs from the single-weight kernel");
  }
}

// The launchers' refusal path: fp64 GroupNorm has no CUDA kernel and must come back as an error status (bad launch
// configurations are checked in emu_selftest.cu).
void refused_dtype() {
  const GNArgs a{1, 64, 9, 32, false, false, 1e-5};
  std::vector<float> x(64 * 9, 1.f), y(64 * 9), m(32), r(32);
  expect(group_norm_fwd_cuda(DType::f64, a, x.data(), nullptr, nullptr, y.data(), m.data(), r.data(), nullptr,
                             nullptr) != nullptr,
         "f64 group_norm on CUDA must be refused");
}

}  // namespace

int main(int argc, char** argv) {
  const char* env = std::getenv("BITFAST_EMU_SEED");
  const uint64_t seed = env ? std::strtoull(env, nullptr, 10)
                            : uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  rng.seed(seed);
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // unbuffered: a sanitizer abort keeps every line before it
  const bool big = argc > 1 && std::string(argv[1]) == "--big";
  std::printf("emu_test seed %llu (BITFAST_EMU_SEED=%llu reproduces)%s\n", (unsigned long long)seed,
              (unsigned long long)seed, big ? " --big" : "");
  // Shapes: every code path of group_norm.cu. NCHW: vector loads (S % V == 0, aligned; 2-byte types also 8- and
  // 4-byte packs for S % 8 = 4, 2) and scalar (odd S, or pad = 1); C/G < 8 (warps split within a channel). NHWC: vector (C % V == 0) and scalar; more than one L2 chunk (small BITFAST_GN_L2_BYTES in the
  // sanitizer builds; --big: at the real 24 MB); D < V (C/G = 2 or 4 < 8 channels per 16-byte vector); C/G = 1;
  // S = 1; N = 1; 13x17; N = 33 (param_grads in 3 slices of n, the last one short); NCHW groups larger than the
  // kernels' shared-memory cache (C/G * S = 12544). Offsets of 1000 check the shifted two-pass statistics.
  const std::vector<GNCase> common = {
      {2, 64, 64, 32, false, true, true, 0, 0},     {2, 64, 64, 32, false, true, true, 0, 1},
      {3, 32, 221, 8, false, false, true, 1000, 0}, {1, 16, 1, 16, false, true, false, 0, 0},
      {2, 96, 49, 32, false, true, true, 3, 0},     {2, 64, 64, 32, true, true, true, 0, 0},
      {2, 64, 64, 32, true, true, true, 0, 1},      {3, 24, 221, 6, true, false, true, 1000, 0},
      {1, 16, 1, 16, true, true, false, 0, 0},      {2, 128, 49, 32, true, true, true, 0, 0},
      {4, 40, 15, 20, true, true, true, -2, 0},     {5, 48, 196, 16, true, true, true, 0, 0},
      {33, 32, 9, 8, false, true, true, 0, 0},      {33, 32, 9, 8, true, true, true, 0, 0},  // 3 param_grads slices
      {1, 16, 3136, 4, false, true, true, 1, 0},  // NCHW groups over the 46 KB shared-memory cache: partly re-read
      {2, 64, 196, 32, false, true, true, 0, 0},    {2, 48, 50, 16, false, true, true, 0.5, 0},  // S % 8 = 4, 2
  };
  gn_cases<float>(common);
  gn_cases<__half>(common);
  gn_cases<__nv_bfloat16>(common);
  if (big)  // two chunks of the real L2 size: 2 samples of 1024 x 56^2 fp32 (12.8 MB each) in the forward
    gn_case<float>({2, 1024, 3136, 32, true, true, true, 0.5, 0});
  ws_case<float, float>(6, 4608, 0.3);
  ws_case<float, __nv_bfloat16>(5, 147, 0.0);
  ws_case<float, __half>(4, 9, 0.0);
  ws_case<float, float>(3, 1, 0.0);
  ws_case<__half, __half>(4, 300, 0.0);
  ws_case<__nv_bfloat16, __nv_bfloat16>(4, 300, 1.0);
  ws_case<double, double>(3, 700, 0.5);
  ws_many_case<float, float>();
  ws_many_case<float, __nv_bfloat16>();
  ws_many_case<__half, __half>();
  refused_dtype();
  failures += emu_selftest();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
