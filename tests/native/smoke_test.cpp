// Torch-free smoke test of the C++ CPU kernels (run by ctest): GroupNorm forward in both layouts and weight
// standardization forward, against double-precision loops on a large-offset input. Exit code 0 = pass.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "group_norm.h"
#include "weight_standardize.h"

using namespace bitfast;

static int failures = 0;

static void expect_close(const char* what, double got, double want, double tol) {
  if (!(std::fabs(got - want) <= tol)) {
    std::printf("FAIL %s: got %.7g want %.7g\n", what, got, want);
    ++failures;
  }
}

// x in (N, C, S) order; returns y (same order) with affine + ReLU, double precision.
static std::vector<double> gn_reference(const std::vector<float>& x, const std::vector<float>& w,
                                        const std::vector<float>& b, int N, int C, int S, int G, double eps) {
  std::vector<double> y(x.size());
  const int D = C / G * S;
  for (int n = 0; n < N; ++n)
    for (int g = 0; g < G; ++g) {
      const float* p = &x[(size_t(n) * C + size_t(g) * (C / G)) * S];
      double mean = 0, var = 0;
      for (int i = 0; i < D; ++i) mean += p[i];
      mean /= D;
      for (int i = 0; i < D; ++i) var += (p[i] - mean) * (p[i] - mean);
      const double rstd = 1.0 / std::sqrt(var / D + eps);
      for (int i = 0; i < D; ++i) {
        const int c = g * (C / G) + i / S;
        const double v = (p[i] - mean) * rstd * w[c] + b[c];
        y[(size_t(n) * C + size_t(g) * (C / G)) * S + i] = v > 0 ? v : 0;
      }
    }
  return y;
}

static void test_group_norm(bool channels_last) {
  const int N = 3, C = 12, S = 35, G = 4;
  std::mt19937 rng(channels_last ? 1 : 2);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(size_t(N) * C * S), w(C), b(C);
  for (auto& v : x) v = 1000.f + normal(rng);  // large offset: one-pass variance would cancel
  for (auto& v : w) v = normal(rng);
  for (auto& v : b) v = normal(rng);
  std::vector<float> xin(x.size()), y(x.size(), NAN), mean(N * G, NAN), rstd(N * G, NAN);
  for (int n = 0; n < N; ++n)  // lay x out as (N, S, C) for the NHWC kernel
    for (int c = 0; c < C; ++c)
      for (int s = 0; s < S; ++s)
        xin[channels_last ? (size_t(n) * S + s) * C + c : (size_t(n) * C + c) * S + s] = x[(size_t(n) * C + c) * S + s];
  GNArgs a{N, C, S, G, channels_last, /*relu=*/true, 1e-5};
  group_norm_fwd_cpu(DType::f32, a, xin.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data());
  const auto ref = gn_reference(x, w, b, N, C, S, G, 1e-5);
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c)
      for (int s = 0; s < S; ++s) {
        const size_t i = channels_last ? (size_t(n) * S + s) * C + c : (size_t(n) * C + c) * S + s;
        expect_close(channels_last ? "group_norm nhwc" : "group_norm nchw", y[i], ref[(size_t(n) * C + c) * S + s],
                     2e-3);
      }
}

static void test_weight_standardize() {
  const int O = 5, K = 3 * 3 * 7;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 0.05f);
  std::vector<float> w(O * K), y(O * K, NAN), mean(O, NAN), rstd(O, NAN);
  for (auto& v : w) v = 0.3f + normal(rng);
  WSArgs a{O, K, 1e-10};
  weight_standardize_fwd_cpu(DType::f32, DType::f32, a, w.data(), y.data(), mean.data(), rstd.data());
  for (int o = 0; o < O; ++o) {
    double m = 0, v = 0;
    for (int k = 0; k < K; ++k) m += w[o * K + k];
    m /= K;
    for (int k = 0; k < K; ++k) v += (w[o * K + k] - m) * (w[o * K + k] - m);
    const double r = 1.0 / std::sqrt(v / K + 1e-10);
    for (int k = 0; k < K; ++k) expect_close("weight_standardize", y[o * K + k], (w[o * K + k] - m) * r, 1e-4);
  }
}

int main() {
  test_group_norm(false);
  test_group_norm(true);
  test_weight_standardize();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
