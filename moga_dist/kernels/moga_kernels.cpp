// Fused CPU passes for MOGA with p = 2 (row) / q = 2 (column), fp32, contiguous 2-D runs.
// Phase A reads g and m once and writes m once while accumulating the squared norms (12 B/elt);
// phase B reads m and p once and writes p once (12 B/elt): 24 B per parameter in total,
// versus 28 B for fused AdamW. Registered with TORCH_LIBRARY so no pybind build is needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// m_row <- m_row + w (g_row - m_row); returns sum m_row^2. Two short loops over an L1-resident row:
// the first vectorizes like lerp, the second keeps 8 independent partial sums (no FP reassociation
// flags needed).
inline float lerp_row_sumsq(float* mr, const float* gr, float wf, int64_t cols) {
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) mr[j] = mr[j] + wf * (gr[j] - mr[j]);
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8)
    for (int k = 0; k < 8; ++k) acc[k] += mr[j + k] * mr[j + k];
  float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < cols; ++j) total += mr[j] * mr[j];
  return total;
}

// m <- m + w (g - m); stats[row0 + i] = sum_j m[i, j]^2
void momentum_row_sumsq(at::Tensor m, const at::Tensor& g, double w, at::Tensor stats, int64_t row0) {
  check(m, "m"); check(g, "g"); check(stats, "stats");
  const int64_t rows = m.size(0), cols = m.size(1);
  float* mp = m.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* sp = stats.data_ptr<float>() + row0;
  const float wf = static_cast<float>(w);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) sp[i] = lerp_row_sumsq(mp + i * cols, gp + i * cols, wf, cols);
  });
}

// m <- m + w (g - m); stats[col0 + j] += sum_i m[i, j]^2
void momentum_col_sumsq(at::Tensor m, const at::Tensor& g, double w, at::Tensor stats, int64_t col0) {
  check(m, "m"); check(g, "g"); check(stats, "stats");
  const int64_t rows = m.size(0), cols = m.size(1);
  float* mp = m.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* sp = stats.data_ptr<float>() + col0;
  const float wf = static_cast<float>(w);
  const int64_t nthreads = at::get_num_threads();
  std::vector<float> partial(static_cast<size_t>(nthreads * cols), 0.f);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    float* acc = partial.data() + at::get_thread_num() * cols;
    for (int64_t i = b; i < e; ++i) {
      float* mr = mp + i * cols;
      const float* gr = gp + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) {
        float v = mr[j] + wf * (gr[j] - mr[j]);
        mr[j] = v;
        acc[j] += v * v;
      }
    }
  });
  for (int64_t t = 0; t < nthreads; ++t)
    for (int64_t j = 0; j < cols; ++j) sp[j] += partial[t * cols + j];
}

// p <- p * decay - alpha * m * inv[row0 + i]
void apply_rows(at::Tensor p, const at::Tensor& m, const at::Tensor& inv, int64_t row0, double decay,
                double alpha) {
  check(p, "p"); check(m, "m"); check(inv, "inv");
  const int64_t rows = m.size(0), cols = m.size(1);
  float* pp = p.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const float* ip = inv.data_ptr<float>() + row0;
  const float d = static_cast<float>(decay), a = static_cast<float>(alpha);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* pr = pp + i * cols;
      const float* mr = mp + i * cols;
      const float s = a * ip[i];
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) pr[j] = pr[j] * d - s * mr[j];
    }
  });
}

// p <- p * decay - alpha * m * inv[col0 + j]
void apply_cols(at::Tensor p, const at::Tensor& m, const at::Tensor& inv, int64_t col0, double decay,
                double alpha) {
  check(p, "p"); check(m, "m"); check(inv, "inv");
  const int64_t rows = m.size(0), cols = m.size(1);
  float* pp = p.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  std::vector<float> scaled(static_cast<size_t>(cols));
  const float* ip = inv.data_ptr<float>() + col0;
  for (int64_t j = 0; j < cols; ++j) scaled[j] = static_cast<float>(alpha) * ip[j];
  const float* sp = scaled.data();
  const float d = static_cast<float>(decay);
  at::parallel_for(0, rows, grain_rows(cols), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* pr = pp + i * cols;
      const float* mr = mp + i * cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) pr[j] = pr[j] * d - sp[j] * mr[j];
    }
  });
}

}  // namespace

TORCH_LIBRARY(moga_dist, lib) {
  lib.def("momentum_row_sumsq(Tensor(a!) m, Tensor g, float w, Tensor(b!) stats, int row0) -> ()");
  lib.def("momentum_col_sumsq(Tensor(a!) m, Tensor g, float w, Tensor(b!) stats, int col0) -> ()");
  lib.def("apply_rows(Tensor(a!) p, Tensor m, Tensor inv, int row0, float decay, float alpha) -> ()");
  lib.def("apply_cols(Tensor(a!) p, Tensor m, Tensor inv, int col0, float decay, float alpha) -> ()");
}

TORCH_LIBRARY_IMPL(moga_dist, CPU, lib) {
  lib.impl("momentum_row_sumsq", momentum_row_sumsq);
  lib.impl("momentum_col_sumsq", momentum_col_sumsq);
  lib.impl("apply_rows", apply_rows);
  lib.impl("apply_cols", apply_cols);
}
