// semilla's CPU kernels for inference, built on first use by kernels.py.
//
// decode_attention: one decode step of attention over a KV cache. Every row of the batch
// rotates its new query and key (RoPE, when given), writes its key and value into its own cache
// slot, then attends to slots 0..slot of its own row: rows of different lengths need no mask.
// This is the part of a batched decode step that reads the most memory (the whole cache, every
// step); PyTorch's kernels take about twice the time of reading those bytes, this loop streams
// each row's keys and values once, in float32 arithmetic whatever the storage type, with the
// rows split over PyTorch's own threads. For a single stream it replaces a dozen small
// operators per layer with one call.
//
// linear_rows: y = x W^T + b for a few rows of x (a single stream decodes one): weight-bound,
// so the weights, packed once into the order the loop reads them, are streamed once against
// every x row at the memory's speed (oneDNN's kernels are built for bigger batches and read the
// weights a quarter slower). Several layers of one input (q, k, v) are packed as one weight.
//
// rms_norm: y = w * x / rms(x) per row, in float32 (one call instead of five operators).
//
// decode_layer: a whole llama layer of a single stream's decode step, from the kernels above.
//
// For training, the elementwise parts of a llama layer, forward and backward, each one pass over
// its rows where PyTorch runs four to ten operators (each a pass over memory, each recorded by
// autograd): rms_norm_forward/backward, swiglu_forward/backward, rope_forward/backward; and the
// scores and softmax of causal attention computed as matmuls (causal_attention_probs/dscores). They
// compute in float32 and round once to the output's dtype; a weight's gradient is summed over
// fixed blocks of rows in a fixed order, so results do not depend on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef float f32x16 __attribute__((vector_size(64)));  // a cache line: the matmul's unit
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline f32x8 load8(const at::BFloat16* p) {  // bfloat16 is the top half of a float32
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x8)(__builtin_convertvector(h, u32x8) << 16);
}

static inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline f32x16 load16(const at::BFloat16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}

static inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

template <typename U32, typename U16, typename F>
static inline void store_bf16(at::BFloat16* p, F v) {  // round to nearest, ties to even
  U32 u = (U32)v;
  u += 0x7fff + ((u >> 16) & 1);
  U16 h = __builtin_convertvector(u >> 16, U16);
  std::memcpy(p, &h, sizeof h);
}

static inline void store8(at::BFloat16* p, f32x8 v) { store_bf16<u32x8, u16x8>(p, v); }

static inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

static inline void store16(at::BFloat16* p, f32x16 v) { store_bf16<u32x16, u16x16>(p, v); }

static inline float sum8(f32x8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

static inline float sum16(f32x16 v) {  // (no memcpy: an address taken would keep sums off registers)
  return sum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
}

// x (hs values of type T) -> out (float), rotated by RoPE in Llama's rotate-half layout when
// cos and sin are given: out_j = x_j cos_j - x_{j+hs/2} sin_j, out_{j+hs/2} = x_{j+hs/2} cos + x_j sin.
template <typename T>
static void rotate(const T* x, const T* cos, const T* sin, int64_t hs, float* out) {
  const int64_t half = hs / 2;
  for (int64_t j = 0; j < hs; ++j) {
    const float xj = static_cast<float>(x[j]);
    if (cos == nullptr) {
      out[j] = xj;
    } else {
      const float other = j < half ? -static_cast<float>(x[j + half]) : static_cast<float>(x[j - half]);
      out[j] = xj * static_cast<float>(cos[j]) + other * static_cast<float>(sin[j]);
    }
  }
}

// One query head of one row: softmax(q . k_s / sqrt(hs)) over s < len, times v_s. `scores`
// holds len floats. C = hs / 8 vectors of 8: a constant, so q and the sum stay in registers.
template <typename T, int C>
static void attend(const float* q, const T* k, const T* v, int64_t len, float scale, float* scores, T* out) {
  constexpr int64_t hs = 8 * C;
  f32x8 qs[C], acc[C] = {};
  for (int c = 0; c < C; ++c) qs[c] = load8(q + 8 * c) * scale;
  for (int64_t s = 0; s < len; ++s) {
    f32x8 d = qs[0] * load8(k + s * hs);
    for (int c = 1; c < C; ++c) d += qs[c] * load8(k + s * hs + 8 * c);
    scores[s] = sum8(d);
  }
  float top = scores[0], total = 0.f;
  for (int64_t s = 1; s < len; ++s) top = std::max(top, scores[s]);
  for (int64_t s = 0; s < len; ++s) {
    scores[s] = std::exp(scores[s] - top);
    total += scores[s];
  }
  for (int64_t s = 0; s < len; ++s)
    for (int c = 0; c < C; ++c) acc[c] += scores[s] * load8(v + s * hs + 8 * c);
  for (int c = 0; c < C; ++c) store8(out + 8 * c, acc[c] * (1.f / total));
}

template <typename T>
using AttendFn = void (*)(const float*, const T*, const T*, int64_t, float, float*, T*);

// attend<T, C> for every C in 1..32 (head sizes 8..256), indexed by C.
template <typename T, int... C>
static constexpr std::array<AttendFn<T>, sizeof...(C)> heads(std::integer_sequence<int, C...>) {
  return {(C == 0 ? nullptr : &attend<T, (C == 0 ? 1 : C)>)...};
}

template <typename T>
static void decode_step(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        torch::Tensor& k_cache, torch::Tensor& v_cache, const int64_t* slots,
                        const T* cos, const T* sin, int64_t rope_stride, torch::Tensor& out) {
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(2), nkv = k_cache.size(1);
  const int64_t S = k_cache.size(2), row = k_cache.stride(0), group = nh / nkv;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  auto rope = [&](int64_t b, const T* table) { return table ? table + b * rope_stride : nullptr; };
  std::vector<float> rotated(hs);
  for (int64_t b = 0; b < B; ++b) {  // this step's keys (rotated) and values into their slots
    for (int64_t h = 0; h < nkv; ++h) {
      const int64_t at = b * row + (h * S + slots[b]) * hs;
      rotate(kp + b * k.stride(0) + h * k.stride(1), rope(b, cos), rope(b, sin), hs, rotated.data());
      for (int64_t j = 0; j < hs; ++j) kc[at + j] = static_cast<T>(rotated[j]);
      std::memcpy(vc + at, vp + b * v.stride(0) + h * v.stride(1), hs * sizeof(T));
    }
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  const AttendFn<T> attend_head = heads<T>(std::make_integer_sequence<int, 33>{})[hs / 8];
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, slots[b] + 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / (longest * hs));  // small steps stay on one thread
  at::parallel_for(0, B * nh, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(longest), query(hs);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nh, h = i % nh, at = b * row + (h / group) * S * hs;
      rotate(qp + b * q.stride(0) + h * q.stride(1), rope(b, cos), rope(b, sin), hs, query.data());
      attend_head(query.data(), kc + at, vc + at, slots[b] + 1, scale, scores.data(), op + i * hs);
    }
  });
}

// q (B, nh, hs), k and v (B, nkv, hs): this step's query, key and value, any strides with the
// last dimension contiguous. k_cache, v_cache (B, nkv, S, hs), contiguous past the batch
// dimension. slots (B,): where each row's key goes. cos, sin: None, or (B or 1, hs) RoPE
// tables at each row's position. Returns (B, nh, hs) in q's dtype; hs a multiple of 8 up to 256.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor k_cache,
                               torch::Tensor v_cache, torch::Tensor slots, c10::optional<torch::Tensor> cos,
                               c10::optional<torch::Tensor> sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k and v must be (B, heads, head size)");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "caches must be (B, nkv, S, hs)");
  const int64_t B = q.size(0), nh = q.size(1), hs = q.size(2), nkv = k_cache.size(1);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(B > 0 && nh > 0 && nkv > 0, "nothing to attend: no rows or no heads");
  TORCH_CHECK(k_cache.stride(0) != 0 || B == 1, "cache rows must not be expanded views of one row");
  TORCH_CHECK(hs % 8 == 0 && hs <= 256, "head size must be a multiple of 8, at most 256");
  TORCH_CHECK(k.size(0) == B && k.size(1) == nkv && k.size(2) == hs && k.sizes() == v.sizes(),
              "k and v must be (B, nkv, hs)");
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(3) == hs && nh % nkv == 0, "cache shape mismatch");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head size must be contiguous");
  for (const auto& c : {k_cache, v_cache}) {
    TORCH_CHECK(c.stride(3) == 1 && c.stride(2) == hs && c.stride(1) == c.size(2) * hs,
                "cache rows must be contiguous");
  }
  TORCH_CHECK(k_cache.stride(0) == v_cache.stride(0), "caches must share a layout");
  for (const auto& t : {k, v, k_cache, v_cache}) TORCH_CHECK(t.scalar_type() == dtype, "dtype mismatch");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin go together");
  torch::Tensor cos_table, sin_table;
  if (cos.has_value()) {
    cos_table = cos->reshape({-1, hs}).contiguous();
    sin_table = sin->reshape({-1, hs}).contiguous();
    TORCH_CHECK(cos_table.scalar_type() == dtype && sin_table.scalar_type() == dtype, "rope dtype mismatch");
    TORCH_CHECK((cos_table.size(0) == B || cos_table.size(0) == 1) && sin_table.sizes() == cos_table.sizes(),
                "cos and sin must be (B or 1, hs)");
  }
  const int64_t rope_stride = cos.has_value() && cos_table.size(0) == B ? hs : 0;
  auto positions = slots.to(torch::kLong).contiguous();
  TORCH_CHECK(positions.numel() == B, "one slot per row");
  const int64_t* sp = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sp[b] >= 0 && sp[b] < k_cache.size(2), "slot out of range");
  auto out = torch::empty({B, nh, hs}, q.options());
  if (dtype == torch::kFloat32) {
    const float* c = cos.has_value() ? cos_table.data_ptr<float>() : nullptr;
    const float* s = cos.has_value() ? sin_table.data_ptr<float>() : nullptr;
    decode_step<float>(q, k, v, k_cache, v_cache, sp, c, s, rope_stride, out);
  } else if (dtype == torch::kBFloat16) {
    using bf16 = at::BFloat16;
    const bf16* c = cos.has_value() ? cos_table.data_ptr<bf16>() : nullptr;
    const bf16* s = cos.has_value() ? sin_table.data_ptr<bf16>() : nullptr;
    decode_step<bf16>(q, k, v, k_cache, v_cache, sp, c, s, rope_stride, out);
  } else {
    TORCH_CHECK(false, "decode_attention supports float32 and bfloat16");
  }
  return out;
}

// R weight rows (K columns) against the M rows of x (float, K columns), into y[m * ldy + r].
// The R rows are packed (`packed`): for each 16 columns, the R rows' 16 values side by side, so
// the weights are read as one sequential stream (R rows read in parallel from their own places
// run at ~60% of the memory's speed: the hardware prefetcher follows one stream, not four).
// Each x vector loaded serves R weight rows. The arithmetic of a row is the same either way.
template <typename T, int M, int R>
static void weight_rows(const T* w, const T* bias, const float* x, int64_t K, T* y, int64_t ldy) {
  f32x16 acc[M][R] = {};
  for (int64_t k = 0; k < K; k += 16) {
    f32x16 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16(w + k * R + r * 16);
    for (int m = 0; m < M; ++m) {
      const f32x16 xv = load16(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      const float b = bias ? static_cast<float>(bias[r]) : 0.f;
      y[m * ldy + r] = static_cast<T>(sum16(acc[m][r]) + b);
    }
}

constexpr int64_t PACK = 4;  // weight rows per packed group (kernels.pack_rows)

template <typename T, int M>
static void linear_rows_m(const T* w, const T* bias, const float* x, int64_t K, T* y, int64_t N) {
  const int64_t groups = N / PACK;  // then N % PACK rows as they are
  const int64_t grain = std::max<int64_t>(1, 16384 / K);  // ~256 KB of weights per task
  at::parallel_for(0, groups + N % PACK, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n = g < groups ? g * PACK : groups * PACK + (g - groups);
      const T* b = bias ? bias + n : nullptr;
      if (g < groups) {
        weight_rows<T, M, PACK>(w + n * K, b, x, K, y + n, N);
      } else {
        weight_rows<T, M, 1>(w + n * K, b, x, K, y + n, N);
      }
    }
  });
}

template <typename T>
static torch::Tensor linear_rows_typed(const torch::Tensor& x, const torch::Tensor& w,
                                       const c10::optional<torch::Tensor>& bias) {
  const int64_t K = x.size(-1), M = x.numel() / K, N = w.size(0);
  std::vector<float> xf(M * K);  // x in float32, read once per weight row
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const T* wp = w.data_ptr<T>();
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  switch (M) {
    case 1: linear_rows_m<T, 1>(wp, bp, xf.data(), K, yp, N); break;
    case 2: linear_rows_m<T, 2>(wp, bp, xf.data(), K, yp, N); break;
    case 3: linear_rows_m<T, 3>(wp, bp, xf.data(), K, yp, N); break;
    case 4: linear_rows_m<T, 4>(wp, bp, xf.data(), K, yp, N); break;
    default: TORCH_CHECK(false, "linear_rows takes 1 to 4 rows");
  }
  return y;
}

// x (..., K) with 1 to 4 rows, contiguous; weight (N, K) packed by kernels.pack_rows (groups of
// PACK rows, then the N % PACK last rows as they are); bias None or (N,) -> (..., N).
// K a multiple of 16; float32 or bfloat16.
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.is_contiguous() && x.size(-1) % 16 == 0, "x must be contiguous, K a multiple of 16");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(-1) && weight.is_contiguous() &&
                  weight.scalar_type() == x.scalar_type(),
              "the weight must be (N, K), contiguous, in x's dtype");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == weight.size(0) && bias->is_contiguous() &&
                                    bias->scalar_type() == x.scalar_type()),
              "the bias must be (N,), contiguous, in x's dtype");
  if (x.scalar_type() == torch::kFloat32) return linear_rows_typed<float>(x, weight, bias);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "linear_rows supports float32 and bfloat16");
  return linear_rows_typed<at::BFloat16>(x, weight, bias);
}

// x (..., C) float32, contiguous; weight (C,) -> w * x * rsqrt(mean(x^2) + eps), row by row.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous tensors only");
  const int64_t C = x.size(-1), rows = x.numel() / std::max<int64_t>(C, 1);
  TORCH_CHECK(weight.numel() == C, "weight must match the last dimension");
  auto out = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * C;
      float squares = 0.f;
      for (int64_t j = 0; j < C; ++j) squares += xr[j] * xr[j];
      const float rstd = 1.f / std::sqrt(squares / static_cast<float>(C) + static_cast<float>(eps));
      for (int64_t j = 0; j < C; ++j) op[r * C + j] = w[j] * (xr[j] * rstd);
    }
  });
  return out;
}

torch::Tensor swiglu_forward(torch::Tensor gate_up);

// One llama decoder layer for a decode step (1 to 4 rows, float32): x + o(attention(rms(x)))
// then + down(silu(gate) * up) of its rms, from the kernels above and ATen's own operators in
// the order the model's Python runs them, so the result is the same to the bit; one call per
// layer instead of ~25 Python-level operations, which took more of a 10M model's decode step
// than its matmuls. Weights packed by kernels.pack_rows; qkv is q, k, v stacked, gate_up gate
// and up; x (B, 1, C); caches, slots, cos and sin as decode_attention takes them.
torch::Tensor decode_layer(torch::Tensor x, torch::Tensor attn_norm, torch::Tensor qkv, c10::optional<torch::Tensor> qkv_bias,
                           torch::Tensor o, c10::optional<torch::Tensor> o_bias, torch::Tensor mlp_norm,
                           torch::Tensor gate_up, c10::optional<torch::Tensor> gate_up_bias, torch::Tensor down,
                           c10::optional<torch::Tensor> down_bias, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor slots, c10::optional<torch::Tensor> cos, c10::optional<torch::Tensor> sin,
                           double eps) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && k_cache.dim() == 4, "x must be (B, 1, C), caches (B, nkv, S, hs)");
  const int64_t B = x.size(0), nkv = k_cache.size(1), hs = k_cache.size(3);
  const int64_t nh = qkv.size(0) / hs - 2 * nkv, hidden = gate_up.size(0) / 2;
  TORCH_CHECK(nh > 0 && qkv.size(0) == (nh + 2 * nkv) * hs, "qkv must stack q, k and v of the cache's heads");
  auto heads = linear_rows(rms_norm(x, attn_norm, eps), qkv, qkv_bias).view({B, nh + 2 * nkv, hs});
  auto attended = decode_attention(heads.narrow(1, 0, nh), heads.narrow(1, nh, nkv), heads.narrow(1, nh + nkv, nkv),
                                   k_cache, v_cache, slots, cos, sin);
  x = x + linear_rows(attended.view({B, 1, nh * hs}), o, o_bias);
  auto gated = linear_rows(rms_norm(x, mlp_norm, eps), gate_up, gate_up_bias);
  auto mixed = hidden % 16 ? at::silu(gated.narrow(-1, 0, hidden)) * gated.narrow(-1, hidden, hidden)
                          : swiglu_forward(gated);  // as fused_ops.swiglu
  return x + linear_rows(mixed, down, down_bias);
}

// ---- training: the elementwise parts of a llama layer, forward and backward ----

constexpr int64_t BLOCK_ROWS = 64;  // rows per partial sum of a weight's gradient

static int64_t rows_of(const torch::Tensor& t) { return t.numel() / std::max<int64_t>(t.size(-1), 1); }

static int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// x (N, C) float32 contiguous, weight (C,) float32 -> y = w * x * rstd in `dtype` (float32 or
// bfloat16, rounded once), rstd (N,) float32: what the backward needs besides x.
template <typename T>
static void rms_forward_rows(const float* x, const float* w, int64_t C, float eps, int64_t begin, int64_t end,
                             T* y, float* rstd) {
  for (int64_t r = begin; r < end; ++r) {
    const float* xr = x + r * C;
    f32x8 acc = {};
    for (int64_t j = 0; j < C; j += 8) acc += load8(xr + j) * load8(xr + j);
    const float s = 1.f / std::sqrt(sum8(acc) / static_cast<float>(C) + eps);
    rstd[r] = s;
    for (int64_t j = 0; j < C; j += 8) store8(y + r * C + j, load8(w + j) * (load8(xr + j) * s));
  }
}

std::vector<torch::Tensor> rms_norm_forward(torch::Tensor x, torch::Tensor weight, double eps, bool bfloat16) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && weight.scalar_type() == torch::kFloat32, "float32 x and weight");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.size(-1) % 8 == 0, "contiguous, C a multiple of 8");
  const int64_t C = x.size(-1), N = rows_of(x);
  TORCH_CHECK(weight.numel() == C, "weight must match the last dimension");
  auto y = torch::empty_like(x, bfloat16 ? torch::kBFloat16 : torch::kFloat32);
  auto rstd = torch::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *w = weight.data_ptr<float>();
  float* sp = rstd.data_ptr<float>();
  at::parallel_for(0, N, grain(C), [&](int64_t begin, int64_t end) {
    if (bfloat16)
      rms_forward_rows(xp, w, C, static_cast<float>(eps), begin, end, y.data_ptr<at::BFloat16>(), sp);
    else
      rms_forward_rows(xp, w, C, static_cast<float>(eps), begin, end, y.data_ptr<float>(), sp);
  });
  return {y, rstd};
}

// dy (N, C) float32 or bfloat16; x, rstd, weight as the forward had them -> dx (N, C) float32,
// dweight (C,) float32. With xh = x * rstd and g = dy * w: dx = rstd * (g - xh * mean(g * xh)),
// dweight = sum over rows of dy * xh.
template <typename T>
static void rms_backward_rows(const T* dy, const float* x, const float* rstd, const float* w, int64_t C,
                              int64_t begin, int64_t end, float* dx, float* dw) {
  for (int64_t r = begin; r < end; ++r) {
    const T* dr = dy + r * C;
    const float* xr = x + r * C;
    const f32x8 s = f32x8{} + rstd[r];
    f32x8 acc = {};
    for (int64_t j = 0; j < C; j += 8) acc += load8(dr + j) * load8(w + j) * (load8(xr + j) * s);
    const f32x8 mean = f32x8{} + sum8(acc) / static_cast<float>(C);
    for (int64_t j = 0; j < C; j += 8) {
      const f32x8 d = load8(dr + j), xh = load8(xr + j) * s;
      store8(dx + r * C + j, s * (d * load8(w + j) - xh * mean));
      store8(dw + j, load8(dw + j) + d * xh);
    }
  }
}

std::vector<torch::Tensor> rms_norm_backward(torch::Tensor dy, torch::Tensor x, torch::Tensor rstd, torch::Tensor weight) {
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == x.sizes(), "dy must be contiguous and shaped like x");
  TORCH_CHECK(dy.scalar_type() == torch::kFloat32 || dy.scalar_type() == torch::kBFloat16, "dy float32 or bfloat16");
  const int64_t C = x.size(-1), N = rows_of(x), blocks = (N + BLOCK_ROWS - 1) / BLOCK_ROWS;
  auto dx = torch::empty_like(x);
  auto partial = torch::zeros({blocks, C}, x.options());
  const float *xp = x.data_ptr<float>(), *sp = rstd.data_ptr<float>(), *w = weight.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * BLOCK_ROWS, end = std::min(N, begin + BLOCK_ROWS);
      if (dy.scalar_type() == torch::kBFloat16)
        rms_backward_rows(dy.data_ptr<at::BFloat16>(), xp, sp, w, C, begin, end, dxp, pp + b * C);
      else
        rms_backward_rows(dy.data_ptr<float>(), xp, sp, w, C, begin, end, dxp, pp + b * C);
    }
  });
  return {dx, partial.sum(0)};
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// exp of 16 floats (Cephes' expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], a few ulp):
// the C library's expf is one value at a time, and sigmoid over a SwiGLU's rows is all exps.
// 16 lanes, not 8: 1.5x the throughput on a Zen 4 core (fewer instructions for the same work).
static inline f32x16 exp16(f32x16 x) {
  const f32x16 low = f32x16{} - 87.f, high = f32x16{} + 88.f, half = f32x16{} + 0.5f;
  x = x < low ? low : x;
  x = x > high ? high : x;
  const f32x16 scaled = x * 1.44269504088896341f;
  const f32x16 away = (f32x16)(((u32x16)scaled & 0x80000000u) | (u32x16)half);  // +-0.5, scaled's sign
  const i32x16 n = __builtin_convertvector(scaled + away, i32x16);  // rounded to nearest
  const f32x16 nf = __builtin_convertvector(n, f32x16);
  const f32x16 r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  return (f32x16)((i32x16)p + (n << 23));  // times 2^n: n added to the exponent's bits
}

static inline f32x16 sigmoid16(f32x16 x) { return 1.f / (1.f + exp16(-x)); }

// gate_up (N, 2H): gate then up side by side (one matmul's output) -> silu(gate) * up (N, H),
// in gate_up's dtype.
template <typename T>
static void swiglu_rows(const T* gu, int64_t H, int64_t begin, int64_t end, T* h) {
  for (int64_t r = begin; r < end; ++r) {
    const T* row = gu + r * 2 * H;
    for (int64_t j = 0; j < H; j += 16) {
      const f32x16 gj = load16(row + j);
      store16(h + r * H + j, gj * sigmoid16(gj) * load16(row + H + j));
    }
  }
}

torch::Tensor swiglu_forward(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 32 == 0, "gate_up contiguous, 2H a multiple of 32");
  const int64_t H = gate_up.size(-1) / 2, N = rows_of(gate_up);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = H;
  auto h = torch::empty(sizes, gate_up.options());
  at::parallel_for(0, N, grain(H), [&](int64_t begin, int64_t end) {
    if (gate_up.scalar_type() == torch::kBFloat16)
      swiglu_rows(gate_up.data_ptr<at::BFloat16>(), H, begin, end, h.data_ptr<at::BFloat16>());
    else
      swiglu_rows(gate_up.data_ptr<float>(), H, begin, end, h.data_ptr<float>());
  });
  return h;
}

// dh (N, H), gate_up (N, 2H) -> d gate_up (N, 2H) in gate_up's dtype: with s = sigmoid(g),
// d gate = dh * up * s * (1 + g * (1 - s)), d up = dh * g * s.
template <typename T, typename D>
static void swiglu_backward_rows(const D* dh, const T* gu, int64_t H, int64_t begin, int64_t end, T* dgu) {
  for (int64_t r = begin; r < end; ++r) {
    const T* row = gu + r * 2 * H;
    for (int64_t j = 0; j < H; j += 16) {
      const f32x16 d = load16(dh + r * H + j), gj = load16(row + j), sj = sigmoid16(gj);
      store16(dgu + r * 2 * H + j, d * load16(row + H + j) * sj * (1.f + gj * (1.f - sj)));
      store16(dgu + r * 2 * H + H + j, d * gj * sj);
    }
  }
}

torch::Tensor swiglu_backward(torch::Tensor dh, torch::Tensor gate_up) {
  TORCH_CHECK(dh.is_contiguous() && dh.numel() * 2 == gate_up.numel(), "dh contiguous, half of gate_up");
  const int64_t H = gate_up.size(-1) / 2, N = rows_of(gate_up);
  auto dgu = torch::empty_like(gate_up);
  const bool bf16 = gate_up.scalar_type() == torch::kBFloat16, dh_bf16 = dh.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(dh_bf16 || dh.scalar_type() == torch::kFloat32, "dh float32 or bfloat16");
  at::parallel_for(0, N, grain(H), [&](int64_t begin, int64_t end) {
    if (bf16 && dh_bf16)
      swiglu_backward_rows(dh.data_ptr<at::BFloat16>(), gate_up.data_ptr<at::BFloat16>(), H, begin, end,
                           dgu.data_ptr<at::BFloat16>());
    else if (bf16)
      swiglu_backward_rows(dh.data_ptr<float>(), gate_up.data_ptr<at::BFloat16>(), H, begin, end,
                           dgu.data_ptr<at::BFloat16>());
    else if (dh_bf16)
      swiglu_backward_rows(dh.data_ptr<at::BFloat16>(), gate_up.data_ptr<float>(), H, begin, end,
                           dgu.data_ptr<float>());
    else
      swiglu_backward_rows(dh.data_ptr<float>(), gate_up.data_ptr<float>(), H, begin, end, dgu.data_ptr<float>());
  });
  return dgu;
}

// RoPE over the heads of x (B, T, heads, hs), each head's hs values contiguous (x may be a
// slice of the q/k/v matmul's output), with cos and sin (T, hs) float32, in the rotate-half
// layout (h = hs/2). Forward, to float32 (as x * cos with float32 tables gives):
//   y_j = x_j cos_j - x_{j+h} sin_j,        y_{j+h} = x_{j+h} cos_{j+h} + x_j sin_{j+h}
// Backward, dy (B, T, heads, hs) float32 contiguous, to dx in `dtype`:
//   dx_j = dy_j cos_j + dy_{j+h} sin_{j+h}, dx_{j+h} = dy_{j+h} cos_{j+h} - dy_j sin_j
template <typename S, typename T>
static void rope_rows(const S* x, const int64_t* stride, const float* cos, const float* sin, int64_t T_,
                      int64_t heads, int64_t hs, bool forward, int64_t begin, int64_t end, T* y) {
  const int64_t h = hs / 2;
  for (int64_t r = begin; r < end; ++r) {  // r = (b * T + t) * heads + head
    const int64_t head = r % heads, t = (r / heads) % T_, b = r / (heads * T_);
    const S* xr = x + b * stride[0] + t * stride[1] + head * stride[2];
    const float *c = cos + t * hs, *s = sin + t * hs;
    T* yr = y + r * hs;
    for (int64_t j = 0; j < h; j += 8) {
      const f32x8 lo = load8(xr + j), hi = load8(xr + h + j);
      const f32x8 c_lo = load8(c + j), c_hi = load8(c + h + j), s_lo = load8(s + j), s_hi = load8(s + h + j);
      if (forward) {
        store8(yr + j, lo * c_lo - hi * s_lo);
        store8(yr + h + j, hi * c_hi + lo * s_hi);
      } else {
        store8(yr + j, lo * c_lo + hi * s_hi);
        store8(yr + h + j, hi * c_hi - lo * s_lo);
      }
    }
  }
}

template <typename S, typename T>
static torch::Tensor rope_apply(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                                bool forward, torch::ScalarType out) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 16 == 0, "x (B, T, heads, hs), hs a multiple of 16");
  const int64_t B = x.size(0), T_ = x.size(1), heads = x.size(2), hs = x.size(3);
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T_ * hs && sin.numel() == T_ * hs &&
                  cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32,
              "cos and sin (T, hs) float32, contiguous");
  auto y = torch::empty({B, T_, heads, hs}, x.options().dtype(out));
  const int64_t stride[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const S* xp = x.data_ptr<S>();
  T* yp = y.data_ptr<T>();
  at::parallel_for(0, B * T_ * heads, grain(hs), [&](int64_t begin, int64_t end) {
    rope_rows(xp, stride, cos.data_ptr<float>(), sin.data_ptr<float>(), T_, heads, hs, forward, begin, end, yp);
  });
  return y;
}

torch::Tensor rope_forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  if (x.scalar_type() == torch::kBFloat16) return rope_apply<at::BFloat16, float>(x, cos, sin, true, torch::kFloat32);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x float32 or bfloat16");
  return rope_apply<float, float>(x, cos, sin, true, torch::kFloat32);
}

torch::Tensor rope_backward(torch::Tensor dy, torch::Tensor cos, torch::Tensor sin, bool bfloat16) {
  TORCH_CHECK(dy.scalar_type() == torch::kFloat32, "dy float32");
  if (bfloat16) return rope_apply<float, at::BFloat16>(dy, cos, sin, false, torch::kBFloat16);
  return rope_apply<float, float>(dy, cos, sin, false, torch::kFloat32);
}

// Causal attention's scores and softmax, for attention as matmuls (fused_ops.causal_attention).
// Row i of q against keys 0..i only (the causal half of q k^T; a batched matmul computes all of
// it), each block of 16 scores as hs multiply-adds of q's value against a row of k transposed
// (hs, T): kept in L1 for the head, float32 throughout.
template <typename T>
static void transpose_head(const T* x, int64_t T_, int64_t hs, float* xT) {  // (T, hs) -> (hs, T) float32
  for (int64_t t = 0; t < T_; ++t)
    for (int64_t d = 0; d < hs; ++d) xT[d * T_ + t] = static_cast<float>(x[t * hs + d]);
}

// out[0 .. 16 * blocks) = a_row . bT[:, j] for keys j of the first `blocks` blocks of 16
static void causal_row_dots(const float* a, const float* bT, int64_t T_, int64_t hs, int64_t blocks, float* out) {
  int64_t b = 0;
  for (; b + 4 <= blocks; b += 4) {  // four blocks at a time: four independent sums in registers
    f32x16 s0 = {}, s1 = {}, s2 = {}, s3 = {};
    for (int64_t d = 0; d < hs; ++d) {
      const float* row = bT + d * T_ + 16 * b;
      s0 += a[d] * load16(row), s1 += a[d] * load16(row + 16), s2 += a[d] * load16(row + 32);
      s3 += a[d] * load16(row + 48);
    }
    std::memcpy(out + 16 * b, &s0, sizeof s0), std::memcpy(out + 16 * b + 16, &s1, sizeof s1);
    std::memcpy(out + 16 * b + 32, &s2, sizeof s2), std::memcpy(out + 16 * b + 48, &s3, sizeof s3);
  }
  for (; b < blocks; ++b) {  // the rest one block at a time, its sum split in two chains
    f32x16 even = {}, odd = {};
    int64_t d = 0;
    for (; d + 2 <= hs; d += 2) {
      even += a[d] * load16(bT + d * T_ + 16 * b);
      odd += a[d + 1] * load16(bT + (d + 1) * T_ + 16 * b);
    }
    if (d < hs) even += a[d] * load16(bT + d * T_ + 16 * b);
    const f32x16 sum = even + odd;
    std::memcpy(out + 16 * b, &sum, sizeof sum);
  }
}

static void check_heads(const torch::Tensor& a, const torch::Tensor& b, const char* what) {
  TORCH_CHECK(a.dim() == 3 && a.sizes() == b.sizes() && a.is_contiguous() && b.is_contiguous() &&
                  a.scalar_type() == torch::kFloat32 && a.size(1) % 16 == 0,
              what, ": (BH, T, hs) float32 and contiguous, T a multiple of 16");
}

// q, k (BH, T, hs) float32 -> probabilities (BH, T, T) bfloat16: softmax(scale * q k^T) over keys
// 0..i of row i, zeros past it.
torch::Tensor causal_attention_probs(torch::Tensor q, torch::Tensor k, double scale) {
  check_heads(q, k, "q and k");
  const int64_t BH = q.size(0), T = q.size(1), hs = q.size(2);
  auto probs = torch::empty({BH, T, T}, q.options().dtype(torch::kBFloat16));
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  at::BFloat16* pp = probs.data_ptr<at::BFloat16>();
  const float s = static_cast<float>(scale);
  f32x16 lane;
  for (int j = 0; j < 16; ++j) lane[j] = static_cast<float>(j);
  at::parallel_for(0, BH, 1, [&](int64_t first, int64_t last) {
    std::vector<float> kT(hs * T), e(T);
    for (int64_t h = first; h < last; ++h) {
      transpose_head(kp + h * T * hs, T, hs, kT.data());
      for (int64_t i = 0; i < T; ++i) {
        const int64_t blocks = i / 16 + 1;  // keys 0..i, in whole blocks of 16
        causal_row_dots(qp + (h * T + i) * hs, kT.data(), T, hs, blocks, e.data());
        const f32x16 last_key = f32x16{} + static_cast<float>(i);
        f32x16 top = f32x16{} + e[0];
        for (int64_t b = 0; b < blocks; ++b) {
          const f32x16 x = load16(e.data() + 16 * b);
          top = (x > top) & (lane + 16.f * b <= last_key) ? x : top;  // keys past i do not count
        }
        float m = top[0];
        for (int j = 1; j < 16; ++j) m = std::max(m, top[j]);
        f32x16 acc = {};
        for (int64_t b = 0; b < blocks; ++b) {
          f32x16 x = exp16((load16(e.data() + 16 * b) - m) * s);
          x = lane + 16.f * b <= last_key ? x : f32x16{};
          acc += x;
          std::memcpy(e.data() + 16 * b, &x, sizeof x);
        }
        const float inv = 1.f / sum16(acc);
        at::BFloat16* out = pp + (h * T + i) * T;
        for (int64_t b = 0; b < blocks; ++b) store16(out + 16 * b, load16(e.data() + 16 * b) * inv);
        for (int64_t j = 16 * blocks; j < T; j += 16) store16(out + j, f32x16{});
      }
    }
  });
  return probs;
}

// The backward: the output's gradient dout (BH, T, hs) float32, v (BH, T, hs) bfloat16 and the
// probabilities p -> d scores (BH, T, T) bfloat16 = scale * p * (dp - sum_j p_j dp_j), with
// dp = dout v^T over keys 0..i; zeros past the diagonal.
torch::Tensor causal_attention_dscores(torch::Tensor dout, torch::Tensor v, torch::Tensor probs, double scale) {
  TORCH_CHECK(v.scalar_type() == torch::kBFloat16 && v.sizes() == dout.sizes() && v.is_contiguous(),
              "v (BH, T, hs) bfloat16, contiguous");
  check_heads(dout, dout, "dout");
  const int64_t BH = dout.size(0), T = dout.size(1), hs = dout.size(2);
  TORCH_CHECK(probs.scalar_type() == torch::kBFloat16 && probs.is_contiguous() && probs.numel() == BH * T * T,
              "probabilities (BH, T, T) bfloat16, contiguous");
  auto dscores = torch::empty_like(probs);
  const float* gp = dout.data_ptr<float>();
  const at::BFloat16 *vp = v.data_ptr<at::BFloat16>(), *pp = probs.data_ptr<at::BFloat16>();
  at::BFloat16* out = dscores.data_ptr<at::BFloat16>();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, BH, 1, [&](int64_t first, int64_t last) {
    std::vector<float> vT(hs * T), dp(T);
    for (int64_t h = first; h < last; ++h) {
      transpose_head(vp + h * T * hs, T, hs, vT.data());
      for (int64_t i = 0; i < T; ++i) {
        const int64_t blocks = i / 16 + 1;  // p is zero past i: so is d scores
        causal_row_dots(gp + (h * T + i) * hs, vT.data(), T, hs, blocks, dp.data());
        const at::BFloat16* p = pp + (h * T + i) * T;
        f32x16 acc = {};
        for (int64_t b = 0; b < blocks; ++b) acc += load16(p + 16 * b) * load16(dp.data() + 16 * b);
        const float dot = sum16(acc);
        at::BFloat16* row = out + (h * T + i) * T;
        for (int64_t b = 0; b < blocks; ++b)
          store16(row + 16 * b, load16(p + 16 * b) * (load16(dp.data() + 16 * b) - dot) * s);
        for (int64_t j = 16 * blocks; j < T; j += 16) store16(row + j, f32x16{});
      }
    }
  });
  return dscores;
}

// The GIL is released while a kernel runs, as PyTorch's own operators do: a server's HTTP
// threads go on while the engine thread decodes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("decode_attention", &decode_attention, "one decode step of attention over a KV cache", release());
  m.def("rms_norm", &rms_norm, "RMSNorm of each row, float32", release());
  m.def("decode_layer", &decode_layer, "one llama decoder layer for a decode step, float32", release());
  m.def("linear_rows", &linear_rows, "x W^T + b for 1 to 4 rows of x, the weight packed by pack_rows", release());
  m.def("rms_norm_forward", &rms_norm_forward, "training RMSNorm: y and rstd", release());
  m.def("rms_norm_backward", &rms_norm_backward, "training RMSNorm's backward: dx and dweight", release());
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up of gate and up side by side", release());
  m.def("swiglu_backward", &swiglu_backward, "SwiGLU's backward: d gate and d up side by side", release());
  m.def("rope_forward", &rope_forward, "training RoPE of (B, T, heads, hs), to float32", release());
  m.def("rope_backward", &rope_backward, "training RoPE's backward", release());
  m.def("causal_attention_probs", &causal_attention_probs, "causal attention's probabilities", release());
  m.def("causal_attention_dscores", &causal_attention_dscores, "the gradient of causal attention's scores", release());
}
