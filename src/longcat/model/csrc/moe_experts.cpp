// Fused CPU kernels for the MoE's FFN experts, fp32 (loaded by longcat/model/cpu_kernels.py).
//
// Legend: T tokens, H hidden, N FFN experts, I expert width, F routing slots sent to FFN experts, grouped
// by expert (counts[e] slots each, in order), token[f] the token of slot f, gate[f] its gate weight.
//
// Per expert, on one thread: gather its rows of x into a buffer that stays in cache, h = rows w_gate_up^T,
// a = silu(h_gate) * h_up * gate, y = a w_down^T, and add y's rows into the output. The grouped path in
// moe.py writes and re-reads [F, H] tensors between those steps instead. Each thread adds into its own
// [T, H] buffer and the buffers are summed in thread order (see Plan for why the order is fixed).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

// Row-major C[m, n] = op(A) op(B); op(A) is A^T when ta (A stored [k, m]), op(B) is B^T when tb (B stored
// [n, k]). BLAS is column-major, so this computes C^T = op(B)^T op(A)^T.
void gemm(bool ta, bool tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c,
          int ldc) {
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&trb, &tra, &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}

// Experts are shared out between threads once, largest first onto the least loaded thread: a fixed
// assignment, so each thread adds its experts into its own buffer in the same order every run and
// results repeat bit for bit for a given thread count. (Threads taking the next expert as they finish
// measured 2-3% faster, at the price of that repeatability.)
struct Plan {
  std::vector<int64_t> start, rows;          // per expert: first slot, slots
  std::vector<std::vector<int64_t>> lists;   // per thread: its experts, in the order it runs them
  int64_t max_rows = 0;
};

Plan plan(const at::Tensor& counts, int threads) {
  TORCH_CHECK(counts.device().is_cpu() && counts.scalar_type() == at::kLong && counts.dim() == 1,
              "counts must be a 1-d int64 CPU tensor");
  auto c = counts.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  Plan out;
  out.rows.assign(p, p + c.numel());
  out.start.resize(c.numel());
  std::vector<int64_t> order;
  int64_t s = 0;
  for (size_t e = 0; e < out.rows.size(); ++e) {
    TORCH_CHECK(out.rows[e] >= 0, "counts must not be negative");
    out.start[e] = s;
    s += out.rows[e];
    out.max_rows = std::max(out.max_rows, out.rows[e]);
    if (out.rows[e] > 0) order.push_back(e);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return out.rows[a] > out.rows[b]; });
  out.lists.resize(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t e : order) {
    int t = std::min_element(load.begin(), load.end()) - load.begin();
    out.lists[t].push_back(e);
    load[t] += out.rows[e];
  }
  return out;
}

// Calls fn(thread, expert) for every expert with rows, each thread running its own list.
template <typename Fn>
void for_each_expert(const Plan& p, int threads, Fn fn) {
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t e : p.lists[t]) fn(t, e);
  });
}

void check(const at::Tensor& t, const char* name, int dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == dim,
              name, " must be a contiguous float32 CPU tensor of ", dim, " dimensions");
}

void check_token(const at::Tensor& token) {
  TORCH_CHECK(token.device().is_cpu() && token.scalar_type() == at::kLong && token.is_contiguous() &&
                  token.dim() == 1,
              "token must be a contiguous 1-d int64 CPU tensor");
}

// Each thread adds rows into its own [T, H] buffer (thread 0 into the result); total() sums them in
// thread order.
struct ThreadSums {
  std::vector<at::Tensor> buffers;
  std::vector<float*> data;
  ThreadSums(int64_t T, int64_t H, const at::TensorOptions& options, int threads) {
    for (int t = 0; t < threads; ++t) {
      buffers.push_back(at::zeros({T, H}, options));
      data.push_back(buffers.back().data_ptr<float>());
    }
  }
  at::Tensor total() {
    for (size_t t = 1; t < buffers.size(); ++t) buffers[0].add_(buffers[t]);
    return buffers[0];
  }
};

// dst[i] = src[token[i]] for r rows of width H
inline void gather_rows(float* dst, const float* src, const int64_t* token, int64_t r, int64_t H) {
  for (int64_t i = 0; i < r; ++i) std::memcpy(dst + i * H, src + token[i] * H, H * sizeof(float));
}

// acc[token[i]] += src[i] for r rows of width H
inline void add_rows(float* acc, const float* src, const int64_t* token, int64_t r, int64_t H) {
  for (int64_t i = 0; i < r; ++i) {
    float* dst = acc + token[i] * H;
    const float* row = src + i * H;
    for (int64_t j = 0; j < H; ++j) dst[j] += row[j];
  }
}

// the exponent is clamped so that no inf appears (the kernels are built with -ffast-math); for
// g < -88 the sigmoid is below 1e-38 either way
inline float sigmoid(float g) { return 1.0f / (1.0f + std::exp(std::min(-g, 88.0f))); }

// a[i, j] = silu(h[i, j]) * h[i, I + j] * gate[i]; sig[i, j] = sigmoid(h[i, j]) when sig is given
inline void gated_swiglu(const float* h, const float* gate, float* a, float* sig, int64_t rows, int64_t I) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* g = h + i * 2 * I;
    const float* u = g + I;
    float* out = a + i * I;
    const float w = gate[i];
    if (sig == nullptr) {
      for (int64_t j = 0; j < I; ++j) out[j] = g[j] * sigmoid(g[j]) * u[j] * w;
    } else {
      float* sg = sig + i * I;
      for (int64_t j = 0; j < I; ++j) {
        sg[j] = sigmoid(g[j]);
        out[j] = g[j] * sg[j] * u[j] * w;
      }
    }
  }
}

// x [T, H], token [F] (the token of each slot, slots grouped by expert), gate [F], counts [N] (slots
// per expert), w_gate_up [N, 2I, H], w_down [N, H, I] -> (out [T, H], h [F, 2I] kept for backward)
std::vector<at::Tensor> experts_forward(const at::Tensor& x, const at::Tensor& token, const at::Tensor& gate,
                                        const at::Tensor& counts, const at::Tensor& w_gate_up,
                                        const at::Tensor& w_down) {
  check(x, "x", 2); check(gate, "gate", 1); check(w_gate_up, "w_gate_up", 3); check(w_down, "w_down", 3);
  check_token(token);
  const int64_t T = x.size(0), H = x.size(1), N = w_gate_up.size(0), I = w_down.size(2);
  TORCH_CHECK(w_down.size(0) == N, "w_gate_up and w_down must hold the same number of experts");
  const int threads = at::get_num_threads();
  Plan p = plan(counts, threads);
  const int64_t F = token.numel();
  TORCH_CHECK((int64_t)p.rows.size() == N && gate.numel() == F, "counts/gate do not match the experts/slots");
  TORCH_CHECK(p.start.empty() || p.start.back() + p.rows.back() == F, "counts must add up to the slots");
  const int64_t* tp = token.data_ptr<int64_t>();
  TORCH_CHECK(std::all_of(tp, tp + F, [T](int64_t t) { return t >= 0 && t < T; }), "token ids out of range");
  TORCH_CHECK(w_gate_up.size(1) == 2 * I && w_gate_up.size(2) == H && w_down.size(1) == H, "weight shapes");
  auto h = at::empty({F, 2 * I}, x.options());
  ThreadSums out(T, H, x.options(), threads);
  const float* xp = x.data_ptr<float>();
  const int64_t* tok = token.data_ptr<int64_t>();
  const float* gp = gate.data_ptr<float>();
  const float* wgu = w_gate_up.data_ptr<float>();
  const float* wd = w_down.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  std::vector<std::vector<float>> scratch(threads);  // per thread: rows [M, H], a [M, I], y [M, H]
  for_each_expert(p, threads, [&](int64_t t, int64_t e) {
    const int64_t s = p.start[e], r = p.rows[e], M = p.max_rows;
    if (scratch[t].empty()) scratch[t].resize(M * (2 * H + I));
    float* xb = scratch[t].data();
    float* ab = xb + M * H;
    float* yb = ab + M * I;
    gather_rows(xb, xp, tok + s, r, H);
    gemm(false, true, r, 2 * I, H, xb, H, wgu + e * 2 * I * H, H, hp + s * 2 * I, 2 * I);
    gated_swiglu(hp + s * 2 * I, gp + s, ab, nullptr, r, I);
    gemm(false, true, r, H, I, ab, I, wd + e * H * I, I, yb, H);
    add_rows(out.data[t], yb, tok + s, r, H);
  });
  return {out.total(), h};
}

// Gradients of experts_forward: (dx [T, H], dgate [F], dw_gate_up [N, 2I, H], dw_down [N, H, I])
std::vector<at::Tensor> experts_backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& token,
                                         const at::Tensor& gate, const at::Tensor& counts,
                                         const at::Tensor& w_gate_up, const at::Tensor& w_down,
                                         const at::Tensor& h) {
  check(dout, "dout", 2); check(x, "x", 2); check(gate, "gate", 1); check(h, "h", 2);
  check(w_gate_up, "w_gate_up", 3); check(w_down, "w_down", 3); check_token(token);
  const int64_t T = x.size(0), H = x.size(1), N = w_gate_up.size(0), I = w_down.size(2);
  const int threads = at::get_num_threads();
  Plan p = plan(counts, threads);
  const int64_t F = token.numel();
  TORCH_CHECK(dout.size(0) == T && dout.size(1) == H && h.size(0) == F && h.size(1) == 2 * I &&
                  gate.numel() == F && (int64_t)p.rows.size() == N && w_down.size(0) == N &&
                  (p.start.empty() || p.start.back() + p.rows.back() == F),
              "experts_backward: the saved tensors do not match each other");
  ThreadSums dx(T, H, x.options(), threads);
  auto dgate = at::empty({F}, x.options());
  auto dwgu = at::empty_like(w_gate_up);
  auto dwd = at::empty_like(w_down);
  const float* dop = dout.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const int64_t* tok = token.data_ptr<int64_t>();
  const float* gp = gate.data_ptr<float>();
  const float* wgu = w_gate_up.data_ptr<float>();
  const float* wd = w_down.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  float* dgp = dgate.data_ptr<float>();
  float* dwgup = dwgu.data_ptr<float>();
  float* dwdp = dwd.data_ptr<float>();
  for (int64_t e = 0; e < N; ++e) {
    if (p.rows[e] == 0) {
      std::fill(dwgup + e * 2 * I * H, dwgup + (e + 1) * 2 * I * H, 0.0f);
      std::fill(dwdp + e * H * I, dwdp + (e + 1) * H * I, 0.0f);
    }
  }
  // per thread: gathered rows [M, H] (dy, then x), a, sigmoid, da [M, I] each, dh [M, 2I], dx rows [M, H]
  std::vector<std::vector<float>> scratch(threads);
  for_each_expert(p, threads, [&](int64_t t, int64_t e) {
    const int64_t s = p.start[e], r = p.rows[e], M = p.max_rows;
    if (scratch[t].empty()) scratch[t].resize(M * (2 * H + 5 * I));
    float* buf = scratch[t].data();
    float* ab = buf + M * H;
    float* sigb = ab + M * I;
    float* dab = sigb + M * I;
    float* dhb = dab + M * I;
    float* dxb = dhb + M * 2 * I;
    const float* he = hp + s * 2 * I;
    gather_rows(buf, dop, tok + s, r, H);
    gated_swiglu(he, gp + s, ab, sigb, r, I);
    gemm(true, false, H, I, r, buf, H, ab, I, dwdp + e * H * I, I);  // dy^T a
    gemm(false, false, r, I, H, buf, H, wd + e * H * I, I, dab, I);  // dy w_down
    for (int64_t i = 0; i < r; ++i) {
      const float* g = he + i * 2 * I;
      const float* u = g + I;
      const float* da = dab + i * I;
      const float* sg = sigb + i * I;
      float* dg = dhb + i * 2 * I;
      float* du = dg + I;
      const float w = gp[s + i];
      float dot = 0.0f;
      for (int64_t j = 0; j < I; ++j) {
        const float silu = g[j] * sg[j];
        dot += da[j] * silu * u[j];
        du[j] = da[j] * w * silu;
        dg[j] = da[j] * w * u[j] * sg[j] * (1.0f + g[j] * (1.0f - sg[j]));  // d silu / dg
      }
      dgp[s + i] = dot;
    }
    gemm(false, false, r, H, 2 * I, dhb, 2 * I, wgu + e * 2 * I * H, H, dxb, H);  // dh w_gate_up
    add_rows(dx.data[t], dxb, tok + s, r, H);
    gather_rows(buf, xp, tok + s, r, H);
    gemm(true, false, 2 * I, H, r, dhb, 2 * I, buf, H, dwgup + e * 2 * I * H, H);  // dh^T x
  });
  return {dx.total(), dgate, dwgu, dwd};
}

}  // namespace

TORCH_LIBRARY(longcat_moe_cpu, m) {
  m.def("experts_forward(Tensor x, Tensor token, Tensor gate, Tensor counts, Tensor w_gate_up, Tensor w_down) -> Tensor[]");
  m.def("experts_backward(Tensor dout, Tensor x, Tensor token, Tensor gate, Tensor counts, Tensor w_gate_up, Tensor w_down, Tensor h) -> Tensor[]");
}
TORCH_LIBRARY_IMPL(longcat_moe_cpu, CPU, m) {
  m.impl("experts_forward", &experts_forward);
  m.impl("experts_backward", &experts_backward);
}
