// Fused CPU kernels for tinkerd's decode step (model/decoder.py); built and loaded by
// model/kernels/__init__.py. Each replaces a run of small eager ops whose per-op overhead
// costs more than their arithmetic at decode (one token per row). Rounding follows the eager
// ops they replace: every step that rounds to the tensor dtype in eager rounds here too,
// except attention, which keeps scores, probabilities and sums in float32 (the eager path
// rounds the bmm outputs to the cache dtype).

// The build defines no CPU_CAPABILITY: take the one the compiler targets (-march=native),
// so ATen's Vectorized<float> uses this CPU's widest vectors (and torch's Sleef exp).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
using BF16 = c10::BFloat16;
constexpr int64_t kVec = Vec::size();

// kVec elements of a float32 or bfloat16 array as float32, and back (rounded to nearest even).
inline Vec load(const float* p) { return Vec::loadu(p); }
inline Vec load(const BF16* p) {
  Vec out;
  at::vec::load_fp32_from_bf16(p, out);
  return out;
}
inline void store(float* p, const Vec& v) { v.store(p); }
inline void store(BF16* p, const Vec& v) { at::vec::convert_float_bfloat16(v, v).store(p, kVec); }
// What an eager op's output rounding does to a float32 value.
inline Vec round_to(const Vec& v, const float*) { return v; }
inline Vec round_to(const Vec& v, const BF16*) {
  return std::get<0>(at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v)));
}

// Rows per parallel chunk such that a chunk has at least ~32k elements of work: smaller
// loops run on one thread (waking the pool costs more than they take).
int64_t grain(int64_t per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_row)); }

// f(begin, end) over [0, n) in chunks of at least `min_chunk`, on the calling thread's OpenMP
// team (its `omp_get_max_threads()`: what torch.set_num_threads set in that thread). Not
// at::parallel_for: its inlined lazy init keeps a thread-local flag per library, and on first
// use in a thread re-applies the process-wide thread count, which would undo a scheduler
// thread's own count (engine/threads.py).
template <typename F>
void parallel_for(int64_t n, int64_t min_chunk, const F& f) {
  const int64_t teams = std::min<int64_t>(omp_get_max_threads(), (n + min_chunk - 1) / min_chunk);
  if (teams <= 1 || omp_in_parallel()) {
    f(0, n);
    return;
  }
#pragma omp parallel num_threads(teams)
  {
    const int64_t chunk = (n + teams - 1) / teams, begin = omp_get_thread_num() * chunk;
    if (begin < n) f(begin, std::min(n, begin + chunk));
  }
}

// f(float{}) or f(BF16{}) by t's dtype: the element type each kernel is instantiated for.
template <typename F>
void by_dtype(const at::Tensor& t, const F& f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    f(BF16{});
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

// transformers' RMSNorm: y = x32 * rsqrt(mean(x32^2) + eps) rounded to the dtype, then
// weight * y in the dtype. x: (n, h) with any row stride; weight: (h,), same dtype.
template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t n = x.size(0), h = x.size(1), xs = x.stride(0), body = h - h % kVec;
  const T* xp = x.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float feps = static_cast<float>(eps);
  parallel_for(n, grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = xp + i * xs;
      T* oi = op + i * h;
      Vec sq(0.f);
      for (int64_t j = 0; j < body; j += kVec) {
        const Vec v = load(xi + j);
        sq = at::vec::fmadd(v, v, sq);
      }
      float squares = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sq);
      for (int64_t j = body; j < h; ++j) squares += float(xi[j]) * float(xi[j]);
      const float inv = 1.0f / std::sqrt(squares / static_cast<float>(h) + feps);
      const Vec vinv(inv);
      for (int64_t j = 0; j < body; j += kVec) {
        store(oi + j, load(wp + j) * round_to(load(xi + j) * vinv, xi));
      }
      for (int64_t j = body; j < h; ++j) {
        oi[j] = static_cast<T>(float(wp[j]) * float(static_cast<T>(float(xi[j]) * inv)));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cpu(x, "x");
  TORCH_CHECK(weight.dtype() == x.dtype() && weight.is_contiguous(), "weight: x's dtype, contiguous");
  const auto shape = x.sizes().vec();
  const at::Tensor rows = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  at::Tensor out = at::empty({rows.size(0), rows.size(1)}, x.options());
  by_dtype(x, [&](auto t) { rms_norm_impl<decltype(t)>(rows, weight, out, eps); });
  return out.view(shape);
}

// RoPE on queries and keys (transformers' `x * cos + rotate_half(x) * sin`, each product and
// the sum rounded to the dtype), then each row's key and value written into the KV arena at
// the row's slot and position. qk: (rows, heads + kv_heads, dim), rows of any stride; v:
// (rows, kv_heads * dim), rows of any stride; cos, sin: (rows, dim); keys, values: (slots,
// kv_heads, width, dim) contiguous, keys transposed: (slots, kv_heads, dim, width);
// positions, slots: (rows,) int64. Returns the rotated queries (rows, heads, dim).
template <typename T>
void rope_store_impl(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                     const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                     const at::Tensor& positions, const at::Tensor& slots, int64_t heads,
                     at::Tensor& q_out) {
  const int64_t rows = qk.size(0), all_heads = qk.size(1), dim = qk.size(2);
  const int64_t kv_heads = all_heads - heads, width = keys.size(3), half = dim / 2;
  const int64_t qks = qk.stride(0), qkh = qk.stride(1), vs = v.stride(0);
  const T* qkp = qk.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* kp = keys.data_ptr<T>();
  T* valp = values.data_ptr<T>();
  T* qp = q_out.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  parallel_for(rows, grain(all_heads * dim), [&](int64_t begin, int64_t end) {
    std::vector<T> key(dim);
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cp + r * dim;
      const T* s = sp + r * dim;
      for (int64_t h = 0; h < all_heads; ++h) {
        const T* x = qkp + r * qks + h * qkh;
        T* dst = h < heads ? qp + (r * heads + h) * dim : key.data();
        int64_t d = 0;
        if (half % kVec == 0) {
          for (; d < dim; d += kVec) {
            const Vec rotated = d < half ? load(x + d + half).neg() : load(x + d - half);
            const Vec a = round_to(load(x + d) * load(c + d), x);
            const Vec b = round_to(rotated * load(s + d), x);
            store(dst + d, a + b);
          }
        }
        for (; d < dim; ++d) {
          const float rotated = d < half ? -static_cast<float>(x[d + half]) : static_cast<float>(x[d - half]);
          const T a = static_cast<T>(static_cast<float>(x[d]) * static_cast<float>(c[d]));
          const T b = static_cast<T>(rotated * static_cast<float>(s[d]));
          dst[d] = static_cast<T>(static_cast<float>(a) + static_cast<float>(b));
        }
        if (h >= heads) {  // keys are stored transposed: (dim, width) per slot and head
          T* column = kp + ((slot[r] * kv_heads) + (h - heads)) * dim * width + pos[r];
          for (int64_t i = 0; i < dim; ++i) column[i * width] = key[i];
        }
      }
      for (int64_t h = 0; h < kv_heads; ++h) {
        const T* src = vp + r * vs + h * dim;
        T* dst = valp + (((slot[r] * kv_heads) + h) * width + pos[r]) * dim;
        std::copy(src, src + dim, dst);
      }
    }
  });
}

// Row r's slot in the arena: `slots[r]` (rows of one prompt's chunk share a slot at
// successive positions; a decode step's row r is slot r). Checked: slots in range, positions
// within the width.
void check_rows(const at::Tensor& positions, const at::Tensor& slots, int64_t rows,
                const at::Tensor& arena, int64_t width) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() &&
                  positions.numel() == rows,
              "positions: (rows,) int64");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == rows,
              "slots: (rows,) int64");
  const int64_t* p = positions.data_ptr<int64_t>();
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(s[r] >= 0 && s[r] < arena.size(0), "slot out of the arena");
    TORCH_CHECK(p[r] >= 0 && p[r] < width, "position out of the arena");
  }
}

at::Tensor rope_store(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, at::Tensor keys, at::Tensor values,
                      const at::Tensor& positions, const at::Tensor& slots, int64_t heads) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&qk, &v, &cos, &sin, &keys, &values}) {
    check_cpu(*t, "rope_store tensors");
    TORCH_CHECK(t->scalar_type() == qk.scalar_type(), "rope_store: one dtype for every tensor");
  }
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1, "qk: (rows, heads, dim), dim contiguous");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous(), "the arena must be contiguous");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous(), "cos/sin must be contiguous");
  check_rows(positions, slots, qk.size(0), keys, keys.size(3));
  at::Tensor q = at::empty({qk.size(0), heads, qk.size(2)}, qk.options());
  by_dtype(qk, [&](auto t) {
    rope_store_impl<decltype(t)>(qk, v, cos, sin, keys, values, positions, slots, heads, q);
  });
  return q;
}

// softmax(q K^T * scaling) V over each row's positions (all up to and including its own
// position, or the last `window` of them), GQA groups sharing their key/value head; float32
// inside, reading row r's slot `slots[r]` (a prompt's rows share one: each attends up to its
// own position, which is causal attention). q: (rows, heads, dim) contiguous; keys: (slots,
// kv_heads, dim, width) (transposed: a block of kVec positions is one vector per dim);
// values: (slots, kv_heads, width, dim); positions, slots: (rows,) int64. Returns (rows,
// heads * dim).

// scores[g][0..kVec) = q_g . k_p for kVec positions from kt (one head's keys, (dim, width)).
template <typename T, int G>
inline void score_block(const T* kt, int64_t width, int64_t dim, const float* qf, float* out,
                        int64_t out_stride) {
  Vec acc[G];
  for (int g = 0; g < G; ++g) acc[g] = Vec(0.f);
  for (int64_t d = 0; d < dim; ++d) {
    const Vec k = load(kt + d * width);
    for (int g = 0; g < G; ++g) acc[g] = at::vec::fmadd(Vec(qf[g * dim + d]), k, acc[g]);
  }
  for (int g = 0; g < G; ++g) acc[g].store(out + g * out_stride);
}

// acc_g[0..kVec) = sum_p probs[g][p] v_p[c..c+kVec) for one dim chunk c.
template <typename T, int G>
inline void value_chunk(const T* v, int64_t n, int64_t dim, const float* probs, int64_t stride,
                        float* acc_out) {
  Vec acc[G];
  for (int g = 0; g < G; ++g) acc[g] = Vec(0.f);
  for (int64_t p = 0; p < n; ++p) {
    const Vec x = load(v + p * dim);
    for (int g = 0; g < G; ++g) acc[g] = at::vec::fmadd(Vec(probs[g * stride + p]), x, acc[g]);
  }
  for (int g = 0; g < G; ++g) acc[g].store(acc_out + g * dim);
}

// One (row, kv head): G queries (G a compile-time group size keeps the accumulators in
// registers), positions first..first+n-1.
template <typename T, int G>
void attend_head(const float* qf, const T* kt, const T* v, int64_t first, int64_t n,
                 int64_t width, int64_t dim, std::vector<float>& scores, float* acc) {
  const int64_t stride = n + kVec;  // room for a whole last block
  scores.resize(G * stride);
  int64_t p = 0;
  for (; p < n && first + p + kVec <= width; p += kVec) {
    score_block<T, G>(kt + first + p, width, dim, qf, scores.data() + p, stride);
  }
  for (; p < n; ++p) {  // the arena's last positions: one at a time
    for (int g = 0; g < G; ++g) {
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += qf[g * dim + d] * static_cast<float>(kt[d * width + first + p]);
      scores[g * stride + p] = dot;
    }
  }
  for (int g = 0; g < G; ++g) {  // softmax over each query's n positions
    float* sg = scores.data() + g * stride;
    const float top = *std::max_element(sg, sg + n);
    at::vec::map([top](Vec x) { return (x - Vec(top)).exp(); }, sg, sg, n);
    const float total = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sg, n);
    const float inv = 1.0f / total;
    at::vec::map([inv](Vec x) { return x * Vec(inv); }, sg, sg, n);
  }
  for (int64_t c = 0; c < dim; c += kVec) {
    value_chunk<T, G>(v + first * dim + c, n, dim, scores.data(), stride, acc + c);
  }
}

template <typename T, int G>
void attend_impl(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                 const at::Tensor& positions, const at::Tensor& slots, int64_t window,
                 double scaling, at::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = keys.size(1), width = keys.size(3);
  const T* qp = q.data_ptr<T>();
  const T* kp = keys.data_ptr<T>();
  const T* vp = values.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slot_of = slots.data_ptr<int64_t>();
  const float scale = static_cast<float>(scaling);
  parallel_for(rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * dim), acc(G * dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t last = pos[r];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const T* qh = qp + (r * heads + h * G) * dim;
      for (int64_t i = 0; i < G * dim; ++i) qf[i] = static_cast<float>(qh[i]) * scale;
      const int64_t slot = slot_of[r] * kv_heads + h;
      attend_head<T, G>(qf.data(), kp + slot * dim * width, vp + slot * width * dim, first,
                        last - first + 1, width, dim, scores, acc.data());
      T* o = op + (r * heads + h * G) * dim;
      for (int64_t i = 0; i < G * dim; i += kVec) store(o + i, Vec::loadu(acc.data() + i));
    }
  });
}

template <typename T>
void attend_dispatch(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                     const at::Tensor& positions, const at::Tensor& slots, int64_t window,
                     double scaling, at::Tensor& out) {
  switch (q.size(1) / keys.size(1)) {
    case 1: return attend_impl<T, 1>(q, keys, values, positions, slots, window, scaling, out);
    case 2: return attend_impl<T, 2>(q, keys, values, positions, slots, window, scaling, out);
    case 3: return attend_impl<T, 3>(q, keys, values, positions, slots, window, scaling, out);
    case 4: return attend_impl<T, 4>(q, keys, values, positions, slots, window, scaling, out);
    case 5: return attend_impl<T, 5>(q, keys, values, positions, slots, window, scaling, out);
    case 6: return attend_impl<T, 6>(q, keys, values, positions, slots, window, scaling, out);
    case 7: return attend_impl<T, 7>(q, keys, values, positions, slots, window, scaling, out);
    case 8: return attend_impl<T, 8>(q, keys, values, positions, slots, window, scaling, out);
    default: TORCH_CHECK(false, "attend: GQA groups of 1 to 8 queries only");
  }
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                  const at::Tensor& positions, const at::Tensor& slots, int64_t window,
                  double scaling) {
  for (const at::Tensor* t : {&q, &keys, &values}) {
    check_cpu(*t, "attend tensors");
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == q.scalar_type(),
                "attend: contiguous tensors of one dtype");
  }
  TORCH_CHECK(q.size(1) % keys.size(1) == 0, "heads must be a multiple of kv heads");
  TORCH_CHECK(q.size(2) % kVec == 0 && keys.size(2) == q.size(2), "head dim: a multiple of the vector width");
  TORCH_CHECK(values.size(2) == keys.size(3), "keys (slots, heads, dim, width), values (slots, heads, width, dim)");
  check_rows(positions, slots, q.size(0), keys, keys.size(3));
  at::Tensor out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  by_dtype(q, [&](auto t) {
    attend_dispatch<decltype(t)>(q, keys, values, positions, slots, window, scaling, out);
  });
  return out;
}

// transformers' SiLU MLP gate: silu(gate) rounded to the dtype, times up, rounded.
// gate_up: (rows, 2 * inner) contiguous, gate first. Returns (rows, inner).
template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inner = gate_up.size(1) / 2, body = inner - inner % kVec;
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  parallel_for(rows, grain(inner), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * 2 * inner;
      const T* u = g + inner;
      T* o = op + r * inner;
      for (int64_t j = 0; j < body; j += kVec) {
        const Vec x = load(g + j);
        const Vec silu = round_to(x / (Vec(1.f) + x.neg().exp()), g);
        store(o + j, silu * load(u + j));
      }
      for (int64_t j = body; j < inner; ++j) {
        const float x = static_cast<float>(g[j]);
        const T s = static_cast<T>(x / (1.0f + std::exp(-x)));
        o[j] = static_cast<T>(static_cast<float>(s) * static_cast<float>(u[j]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up: (rows, 2 * inner) contiguous");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  by_dtype(gate_up, [&](auto t) { silu_mul_impl<decltype(t)>(gate_up, out); });
  return out;
}

// A float32 linear for the decode step's few rows: y = x W^T + bias, with W packed once into
// panels of kPanel outputs, each panel (K, kPanel) so that a step over K reads kPanel
// consecutive weights. Each thread streams its own run of panels from memory once; inside a
// panel, blocks of kRows rows accumulate kRows x kPanel outputs in registers (one weight load
// serves kRows rows). At 1-16 rows this reads the weights at close to the memory's speed,
// where oneDNN's packed linear reached half of it; at 64-1024 rows it matched or beat oneDNN
// (measured on a 2-core AVX2 EPYC; BENCHMARKS.md). Summation over K is sequential per
// output, so results differ from a BLAS's blocked sums in the last bits only.
constexpr int kPanelVecs = 2;
constexpr int64_t kPanel = kPanelVecs * kVec;
constexpr int kRows = 6;

// weight (N, K) -> (ceil(N / kPanel), K, kPanel), the last panel padded with zeros.
at::Tensor pack_linear(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.device().is_cpu(),
              "weight: (out_features, in_features) float32 on the CPU");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kPanel - 1) / kPanel;
  at::Tensor padded = at::zeros({panels * kPanel, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({panels, kPanel, k}).transpose(1, 2).contiguous();
}

// R rows of x (row stride k) times one panel: y[r, 0:width] (row stride ldy), plus bias.
template <int R>
inline void linear_rows(const float* x, int64_t k, const float* panel, const float* bias, float* y,
                        int64_t ldy, int64_t width) {
  Vec acc[R][kPanelVecs];
  for (int j = 0; j < kPanelVecs; ++j) {
    const Vec b = bias ? Vec::loadu(bias + j * kVec) : Vec(0.f);
    for (int r = 0; r < R; ++r) acc[r][j] = b;
  }
  for (int64_t i = 0; i < k; ++i) {
    Vec w[kPanelVecs];
    for (int j = 0; j < kPanelVecs; ++j) w[j] = Vec::loadu(panel + i * kPanel + j * kVec);
    for (int r = 0; r < R; ++r) {
      const Vec xi(x[r * k + i]);
      for (int j = 0; j < kPanelVecs; ++j) acc[r][j] = at::vec::fmadd(xi, w[j], acc[r][j]);
    }
  }
  float tmp[kPanel];
  for (int r = 0; r < R; ++r) {
    float* out = width == kPanel ? y + r * ldy : tmp;
    for (int j = 0; j < kPanelVecs; ++j) acc[r][j].store(out + j * kVec);
    if (width < kPanel) std::copy(tmp, tmp + width, y + r * ldy);
  }
}

// The last rows % kRows rows: linear_rows<left>, its row count a compile-time constant.
template <int R>
inline void linear_tail(int64_t left, const float* x, int64_t k, const float* panel,
                        const float* bias, float* y, int64_t ldy, int64_t width) {
  if constexpr (R > 0) {
    if (left == R) {
      linear_rows<R>(x, k, panel, bias, y, ldy, width);
    } else {
      linear_tail<R - 1>(left, x, k, panel, bias, y, ldy, width);
    }
  }
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& packed, int64_t out_features,
                  const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "x: (rows, in_features) float32 on the CPU");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), k = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) == k && packed.size(2) == kPanel &&
                  packed.is_contiguous() && panels * kPanel >= out_features &&
                  (panels - 1) * kPanel < out_features,
              "packed: pack_linear of an (out_features, in_features) weight");
  at::Tensor out = at::empty({rows, out_features}, x.options());
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == out_features,
                "bias: (out_features,) float32");
  }
  if (rows == 0) return out;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  parallel_for(panels, grain(k * kPanel), [&](int64_t begin, int64_t end) {
    float tail_bias[kPanel] = {};  // the last, partial panel's bias, padded with zeros
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = wp + p * k * kPanel;
      const int64_t width = std::min<int64_t>(kPanel, out_features - p * kPanel);
      const float* b = bp ? bp + p * kPanel : nullptr;
      if (b && width < kPanel) {
        std::copy(b, b + width, tail_bias);
        b = tail_bias;
      }
      float* y = yp + p * kPanel;
      int64_t r = 0;
      for (; r + kRows <= rows; r += kRows) {
        linear_rows<kRows>(xp + r * k, k, panel, b, y + r * out_features, out_features, width);
      }
      linear_tail<kRows - 1>(rows - r, xp + r * k, k, panel, b, y + r * out_features,
                             out_features, width);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tinkerd_decode, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def(
      "rope_store(Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, "
      "Tensor positions, Tensor slots, int heads) -> Tensor",
      &rope_store);
  m.def("attend(Tensor q, Tensor keys, Tensor values, Tensor positions, Tensor slots, int window, float scaling) -> Tensor",
        &attend);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("pack_linear(Tensor weight) -> Tensor", &pack_linear);
  m.def("linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor", &linear);
}
