// Fused CPU kernels for the decode step of dialogue/model/fastllama.py, registered as torch.ops.rapport.*.
//
// Each replaces a chain of small ATen ops whose dispatch costs more than their arithmetic at a batch of a few
// rows, and decode attention also avoids the copy oneDNN makes of a KV-arena slice (it only takes dense
// operands). Every kernel computes what the Python path in fastllama.py computes, rounding where it rounds,
// in float32 or bfloat16; tests/test_kernels.py holds them to it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }  // bfloat16: round to nearest even, as ATen does

// exp for x <= 0 (softmax after subtracting the maximum), written so that the compiler vectorises it:
// 2^(x·log2 e) split into an integer power (built in the exponent bits) and a polynomial for the fraction.
// Relative error at most 1.1e-5 over [-87, 0] (measured against float64 on 2M points; mostly the float32
// argument reduction), far below the bfloat16 rounding the probabilities get next (3.9e-3).
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);  // a max, not a branch: loops over it vectorise
  const float t = x * 1.44269504088896341f;
  const float fi = std::floor(t);
  const float f = t - fi;
  const float p = 1.0f + f * (0.693147182f + f * (0.240226507f + f * (0.0555041087f +
                  f * (0.00961812911f + f * (0.00133335581f + f * 0.000154035304f)))));
  int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// out = weight * round(x * rsqrt(mean(x^2) + eps)): RMSNorm as transformers' Llama computes it.
template <typename T>
void rms_norm_impl(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, double eps) {
  const int64_t rows = x.size(0), n = x.size(1), in_stride = x.stride(0);
  const T* X = x.data_ptr<T>();
  const T* W = weight.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = X + r * in_stride;
      T* orow = O + r * n;
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < n; ++i) {
        const float v = to_float(xr[i]);
        sum += v * v;
      }
      const float inv = 1.0f / std::sqrt(sum / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) {
        orow[i] = round_to<T>(to_float(W[i]) * to_float(round_to<T>(to_float(xr[i]) * inv)));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "rms_norm: x must be (rows, n) with unit inner stride, weight (n,)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight dtypes differ");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    rms_norm_impl<c10::BFloat16>(x, weight, out, eps);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rms_norm: float32 or bfloat16 only");
    rms_norm_impl<float>(x, weight, out, eps);
  }
  return out;
}

// In place on x (rows, heads, dim): x = x*cos + rotate_half(x)*sin with cos and sin the rows of the
// (positions, dim) tables at each row's position; each product rounded, then the sum, as ATen does.
template <typename T>
void rope_impl(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions) {
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  T* X = x.data_ptr<T>();
  const T* C = cos.data_ptr<T>();
  const T* S = sin.data_ptr<T>();
  const int64_t* P = positions.data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = C + P[r] * dim;
      const T* s = S + P[r] * dim;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = X + r * row_stride + h * head_stride;
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(v[i]), b = to_float(v[i + half]);
          const float lo = to_float(round_to<T>(a * to_float(c[i]))) + to_float(round_to<T>(-b * to_float(s[i])));
          const float hi = to_float(round_to<T>(b * to_float(c[i + half]))) + to_float(round_to<T>(a * to_float(s[i + half])));
          v[i] = round_to<T>(lo);
          v[i + half] = round_to<T>(hi);
        }
      }
    }
  });
}

void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && cos.is_contiguous() && sin.is_contiguous() &&
              cos.size(1) == x.size(2) && positions.scalar_type() == at::kLong && positions.is_contiguous() &&
              positions.size(0) == x.size(0),
              "rope_: x (rows, heads, dim) with unit inner stride, cos/sin (positions, dim), positions (rows,) int64");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type(), "rope_: dtypes differ");
  const int64_t* P = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < positions.size(0); ++r) {
    TORCH_CHECK(P[r] >= 0 && P[r] < cos.size(0), "rope_: position out of range");
  }
  if (x.scalar_type() == at::kBFloat16) {
    rope_impl<c10::BFloat16>(x, cos, sin, positions);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rope_: float32 or bfloat16 only");
    rope_impl<float>(x, cos, sin, positions);
  }
}

// The Llama MLP's gate: out = silu(gate) * up for gate_up = [gate | up] (rows, 2·inter), rounded where ATen's
// F.silu(gate) * up rounds. One pass over the rows instead of two ATen kernels and an intermediate tensor
// (a prompt chunk of 800 rows: 3 ms a layer as two ops, the bulk of it memory traffic).
template <typename T>
void silu_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2, stride = gate_up.stride(0);
  const T* G = gate_up.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = G + r * stride;
      const T* u = g + inter;
      T* o = O + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        const float x = to_float(g[i]);
        const float e = exp_neg(-std::fabs(x));  // exp(-|x|) <= 1: no overflow either side
        const float inv = 1.0f / (1.0f + e);
        const float sigmoid = x >= 0.0f ? inv : e * inv;
        o[i] = round_to<T>(to_float(round_to<T>(x * sigmoid)) * to_float(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_mul: gate_up must be (rows, 2·inter) with unit inner stride");
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) {
    silu_mul_impl<c10::BFloat16>(gate_up, out);
  } else {
    TORCH_CHECK(gate_up.scalar_type() == at::kFloat, "silu_mul: float32 or bfloat16 only");
    silu_mul_impl<float>(gate_up, out);
  }
  return out;
}

// Vectors of the build target's width (GCC vector types): AVX-512F, AVX2 or SSE code from one source.
#if defined(__AVX512F__)
constexpr int W = 16;  // floats a vector: one zmm register
#elif defined(__AVX2__)
constexpr int W = 8;  // one ymm register
#else
constexpr int W = 4;  // one xmm register
#endif
typedef float fvec __attribute__((vector_size(4 * W)));
typedef int32_t ivec __attribute__((vector_size(4 * W)));

inline fvec loadv(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void storev(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }

// W values stored as bfloat16, widened to float32 (the upper 16 bits of a float: widen, shift).
inline fvec loadv(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (fvec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#elif defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (fvec)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
  fvec v;
  for (int i = 0; i < W; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}

// One (slot, kv head) of decode attention: `groups` query rows attend over positions [0, length) of keys stored
// transposed (dim rows of `kstride`) and values stored by position (rows of `vstride`). Scores and softmax in
// float32; probabilities rounded to T before they weigh the values, as ATen's bfloat16 matmul path does.
struct Item {
  int64_t groups, dim, length, kstride, vstride;
  float scale;
};

template <typename T>
void softmax_rows(const Item& it, float* scores) {
  for (int64_t g = 0; g < it.groups; ++g) {
    float* s = scores + g * it.length;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t l = 0; l < it.length; ++l) top = std::max(top, s[l]);
    for (int64_t l = 0; l < it.length; ++l) s[l] = exp_neg(s[l] - top);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t l = 0; l < it.length; ++l) total += s[l];
    const float norm = 1.0f / total;
    for (int64_t l = 0; l < it.length; ++l) s[l] = to_float(round_to<T>(s[l] * norm));
  }
}

// Portable path: any T, any shape. `query` (groups, dim) float, `scores` (groups, length), `acc` (groups, dim).
template <typename T, typename S>
void attend_portable(const Item& it, const S* kb, const S* vb, const float* query, float* scores, float* acc, T* out) {
  const int64_t groups = it.groups, dim = it.dim, length = it.length;
  std::fill(scores, scores + groups * length, 0.0f);
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4) {  // four key rows a pass
    const S* k0 = kb + d * it.kstride;
    const S* k1 = k0 + it.kstride;
    const S* k2 = k1 + it.kstride;
    const S* k3 = k2 + it.kstride;
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = query + g * dim + d;
      const float q0 = qg[0], q1 = qg[1], q2 = qg[2], q3 = qg[3];
      float* s = scores + g * length;
      for (int64_t l = 0; l < length; ++l) {
        s[l] += q0 * to_float(k0[l]) + q1 * to_float(k1[l]) + q2 * to_float(k2[l]) + q3 * to_float(k3[l]);
      }
    }
  }
  for (; d < dim; ++d) {
    const S* krow = kb + d * it.kstride;
    for (int64_t g = 0; g < groups; ++g) {
      const float qd = query[g * dim + d];
      float* s = scores + g * length;
      for (int64_t l = 0; l < length; ++l) s[l] += qd * to_float(krow[l]);
    }
  }
  for (int64_t i = 0; i < groups * length; ++i) scores[i] *= it.scale;
  softmax_rows<T>(it, scores);
  std::fill(acc, acc + groups * dim, 0.0f);
  for (int64_t l = 0; l < length; ++l) {
    const S* vrow = vb + l * it.vstride;
    for (int64_t g = 0; g < groups; ++g) {
      const float p = scores[g * length + l];
      float* a = acc + g * dim;
      for (int64_t e = 0; e < dim; ++e) a[e] += p * to_float(vrow[e]);
    }
  }
  for (int64_t i = 0; i < groups * dim; ++i) out[i] = round_to<T>(acc[i]);
}

// float32: the same sums as attend_portable, arranged so that the accumulators stay in registers. Scores for W
// positions of all G query rows at once, over every dimension (each key row is read once, not once a query row);
// then the values weighted into G x 4 vectors of dimensions at a time. Needs dim a multiple of 4 W.
// `kn`, `vn`: the keys and values of the item this thread attends next (or null): each line of them is asked for
// (into L2) while the same line of this item is read, so the next item does not wait on memory.
template <int G, typename S>
void attend_f32(const Item& it, const S* kb, const S* vb, const float* query, float* scores, float* out, const S* kn,
                const S* vn) {
  const int64_t dim = it.dim, length = it.length;
  // LT vectors of positions a pass: LT·G independent sums, so that the adds do not wait on each other (with G = 3
  // and one vector a pass, each add waited on the one before: decode attention ran at a third of its speed).
  constexpr int LT = std::max(1, std::min(4, 12 / G));
  int64_t l = 0;
  for (; l + LT * W <= length; l += LT * W) {
    fvec acc[LT][G] = {};
    for (int64_t d = 0; d < dim; ++d) {
      const S* krow = kb + d * it.kstride + l;
      __builtin_prefetch(krow + 2 * LT * W);  // two passes ahead: 64 strided rows are more streams than the hardware prefetches (16 conversations: 35 -> 30 ms a step)
      if (kn != nullptr) __builtin_prefetch(kn + d * it.kstride + l, 0, 2);
      for (int j = 0; j < LT; ++j) {
        const fvec k = loadv(krow + j * W);
        for (int g = 0; g < G; ++g) acc[j][g] += query[g * dim + d] * k;
      }
    }
    for (int j = 0; j < LT; ++j)
      for (int g = 0; g < G; ++g) storev(scores + g * length + l + j * W, acc[j][g] * it.scale);
  }
  for (; l + W <= length; l += W) {
    fvec acc[G] = {};
    for (int64_t d = 0; d < dim; ++d) {
      const fvec k = loadv(kb + d * it.kstride + l);
      for (int g = 0; g < G; ++g) acc[g] += query[g * dim + d] * k;
    }
    for (int g = 0; g < G; ++g) storev(scores + g * length + l, acc[g] * it.scale);
  }
  for (; l < length; ++l) {
    for (int g = 0; g < G; ++g) {
      float sum = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sum += query[g * dim + d] * to_float(kb[d * it.kstride + l]);
      scores[g * length + l] = sum * it.scale;
    }
  }
  softmax_rows<float>(it, scores);
  for (int64_t e = 0; e < dim; e += 4 * W) {
    fvec acc[G][4] = {};
    for (int64_t p = 0; p < length; ++p) {
      const S* v = vb + p * it.vstride + e;
      if (vn != nullptr) __builtin_prefetch(vn + p * it.vstride + e, 0, 2);
      const fvec v0 = loadv(v), v1 = loadv(v + W), v2 = loadv(v + 2 * W), v3 = loadv(v + 3 * W);
      for (int g = 0; g < G; ++g) {
        const float w = scores[g * length + p];
        acc[g][0] += w * v0;
        acc[g][1] += w * v1;
        acc[g][2] += w * v2;
        acc[g][3] += w * v3;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < 4; ++j) storev(out + g * dim + e + j * W, acc[g][j]);
  }
}

template <typename S>
using F32Kernel = void (*)(const Item&, const S*, const S*, const float*, float*, float*, const S*, const S*);

template <typename S>
inline F32Kernel<S> pick_f32_kernel(int64_t groups, int64_t dim) {
  if (dim % (4 * W) != 0) return nullptr;
  switch (groups) {
    case 1: return &attend_f32<1, S>;
    case 2: return &attend_f32<2, S>;
    case 3: return &attend_f32<3, S>;
    case 4: return &attend_f32<4, S>;
    case 5: return &attend_f32<5, S>;
    case 6: return &attend_f32<6, S>;
    case 7: return &attend_f32<7, S>;
    case 8: return &attend_f32<8, S>;
    default: return nullptr;
  }
}

#if defined(__AVX512BF16__)
// bfloat16 on CPUs with AVX512-BF16: pairs of bfloat16 multiplied and summed into float32 lanes in one instruction
// (vdpbf16ps). Two key rows (dimensions d, d+1) interleaved by unpacklo/hi give the pairs for 32 positions; two
// value rows (positions l, l+1) the pairs for 32 dimensions. Unpacking works within 128-bit lanes, so float lane
// 4k+j of the "lo" half holds element 8k+j and of the "hi" half element 8k+4+j: put back in order at the end.
inline uint32_t bf16_bits(float x) { return c10::BFloat16(x).x; }

inline void unscramble(__m512 lo, __m512 hi, float* out, float scale) {  // 32 values, in order, times scale
  alignas(64) float a[16], b[16];
  _mm512_store_ps(a, lo);
  _mm512_store_ps(b, hi);
  for (int k = 0; k < 4; ++k) {
    for (int j = 0; j < 4; ++j) {
      out[8 * k + j] = a[4 * k + j] * scale;
      out[8 * k + 4 + j] = b[4 * k + j] * scale;
    }
  }
}

template <int G, int DV>  // G query rows per kv head, DV blocks of 32 dimensions
void attend_bf16(const Item& it, const c10::BFloat16* kb_, const c10::BFloat16* vb_, const c10::BFloat16* const* qrows,
                 float* scores, uint32_t* pairs, c10::BFloat16* out) {
  constexpr int64_t dim = 32 * DV;
  const int64_t length = it.length;
  const uint16_t* kb = reinterpret_cast<const uint16_t*>(kb_);
  const uint16_t* vb = reinterpret_cast<const uint16_t*>(vb_);
  // Scores: query pairs (q[2p], q[2p+1]) against key pairs, 32 positions a block.
  for (int g = 0; g < G; ++g) {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(qrows[g]);
    for (int64_t p = 0; p < dim / 2; ++p) pairs[g * (dim / 2) + p] = q[2 * p] | (uint32_t(q[2 * p + 1]) << 16);
  }
  const int64_t full = length / 32 * 32;
  for (int64_t l0 = 0; l0 < full; l0 += 32) {
    __m512 lo[G], hi[G];
    for (int g = 0; g < G; ++g) lo[g] = hi[g] = _mm512_setzero_ps();
    for (int64_t p = 0; p < dim / 2; ++p) {
      const __m512i r0 = _mm512_loadu_si512(kb + 2 * p * it.kstride + l0);
      const __m512i r1 = _mm512_loadu_si512(kb + (2 * p + 1) * it.kstride + l0);
      const __m512bh a = (__m512bh)_mm512_unpacklo_epi16(r0, r1), b = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
      for (int g = 0; g < G; ++g) {
        const __m512bh qq = (__m512bh)_mm512_set1_epi32(pairs[g * (dim / 2) + p]);
        lo[g] = _mm512_dpbf16_ps(lo[g], a, qq);
        hi[g] = _mm512_dpbf16_ps(hi[g], b, qq);
      }
    }
    for (int g = 0; g < G; ++g) unscramble(lo[g], hi[g], scores + g * length + l0, it.scale);
  }
  for (int64_t l = full; l < length; ++l) {  // the last positions, one by one
    for (int g = 0; g < G; ++g) {
      float sum = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sum += to_float(qrows[g][d]) * to_float(kb_[d * it.kstride + l]);
      scores[g * length + l] = sum * it.scale;
    }
  }
  softmax_rows<c10::BFloat16>(it, scores);
  // Values: probability pairs (p[l], p[l+1]) against value pairs, all dimensions at once.
  const int64_t half = length / 2;
  for (int g = 0; g < G; ++g) {
    const float* s = scores + g * length;
    for (int64_t i = 0; i < half; ++i) pairs[g * half + i] = bf16_bits(s[2 * i]) | (bf16_bits(s[2 * i + 1]) << 16);
  }
  __m512 lo[G][DV], hi[G][DV];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < DV; ++v) lo[g][v] = hi[g][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < half; ++i) {
    const uint16_t* v0 = vb + 2 * i * it.vstride;
    const uint16_t* v1 = v0 + it.vstride;
    for (int v = 0; v < DV; ++v) {
      const __m512i r0 = _mm512_loadu_si512(v0 + 32 * v), r1 = _mm512_loadu_si512(v1 + 32 * v);
      const __m512bh a = (__m512bh)_mm512_unpacklo_epi16(r0, r1), b = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
      for (int g = 0; g < G; ++g) {
        const __m512bh pp = (__m512bh)_mm512_set1_epi32(pairs[g * half + i]);
        lo[g][v] = _mm512_dpbf16_ps(lo[g][v], a, pp);
        hi[g][v] = _mm512_dpbf16_ps(hi[g][v], b, pp);
      }
    }
  }
  alignas(64) float acc[dim];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < DV; ++v) unscramble(lo[g][v], hi[g][v], acc + 32 * v, 1.0f);
    if (length % 2) {  // an odd last position
      const float p = scores[g * length + length - 1];
      const c10::BFloat16* vrow = vb_ + (length - 1) * it.vstride;
      for (int64_t e = 0; e < dim; ++e) acc[e] += p * to_float(vrow[e]);
    }
    for (int64_t e = 0; e < dim; ++e) out[g * dim + e] = c10::BFloat16(acc[e]);
  }
}

using Bf16Kernel = void (*)(const Item&, const c10::BFloat16*, const c10::BFloat16*, const c10::BFloat16* const*, float*,
                            uint32_t*, c10::BFloat16*);

template <int G>
Bf16Kernel pick_dv(int64_t dim) {
  switch (dim) {
    case 32: return &attend_bf16<G, 1>;
    case 64: return &attend_bf16<G, 2>;
    case 128: return G <= 4 ? &attend_bf16<G, 4> : nullptr;  // more would not fit in the registers
    default: return nullptr;
  }
}

Bf16Kernel pick_bf16_kernel(int64_t groups, int64_t dim) {
  switch (groups) {
    case 1: return pick_dv<1>(dim);
    case 2: return pick_dv<2>(dim);
    case 3: return pick_dv<3>(dim);
    case 4: return pick_dv<4>(dim);
    case 5: return pick_dv<5>(dim);
    case 6: return pick_dv<6>(dim);
    case 8: return pick_dv<8>(dim);
    default: return nullptr;
  }
}
#endif

// Decode attention for slots [0, B): row b is slot b's token at position positions[b]. Its key and value are
// first written into the arena; then its queries attend over the slot's positions [0, positions[b]], reading
// the arena in place. q (B, heads, dim); k, v (B, kv_heads, dim); keys (slots, kv_heads, dim, length) and
// values (slots, kv_heads, length, dim) are one layer of the arena. Returns (B, heads * dim).
template <typename T, typename S = T>  // S: how the arena stores keys and values (T, or bfloat16 beside float32)
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
                           at::Tensor& values, const at::Tensor& positions, at::Tensor& out, double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = keys.size(1);
  const int64_t groups = heads / kv_heads;
  const int64_t* P = positions.data_ptr<int64_t>();
  S* K = keys.data_ptr<S>();
  S* V = values.data_ptr<S>();
  const T* Q = q.data_ptr<T>();
  const T* KN = k.data_ptr<T>();
  const T* VN = v.data_ptr<T>();
  const auto ks = keys.strides(), vs = values.strides();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), kns0 = k.stride(0), kns1 = k.stride(1);
  const int64_t vns0 = v.stride(0), vns1 = v.stride(1);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, P[b] + 1);
  T* O = out.data_ptr<T>();
#if defined(__AVX512BF16__)
  Bf16Kernel fast = nullptr;
  if constexpr (std::is_same_v<T, c10::BFloat16>) fast = pick_bf16_kernel(groups, dim);  // then S is bfloat16 too
#endif
  F32Kernel<S> fast_f32 = nullptr;
  if constexpr (std::is_same_v<T, float>) fast_f32 = pick_f32_kernel<S>(groups, dim);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * longest), query(groups * dim), acc(groups * dim);
    std::vector<uint32_t> pairs(groups * std::max(dim, longest));
    std::vector<const T*> qrows(groups);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads, pos = P[b];
      S* kb = K + b * ks[0] + h * ks[1];
      S* vb = V + b * vs[0] + h * vs[1];
      for (int64_t d = 0; d < dim; ++d) {
        kb[d * ks[2] + pos] = round_to<S>(to_float(KN[b * kns0 + h * kns1 + d]));
        vb[pos * vs[2] + d] = round_to<S>(to_float(VN[b * vns0 + h * vns1 + d]));
      }
      const Item it{groups, dim, pos + 1, ks[2], vs[2], static_cast<float>(scale)};
      for (int64_t g = 0; g < groups; ++g) qrows[g] = Q + b * qs0 + (h * groups + g) * qs1;
      T* o = O + b * heads * dim + h * groups * dim;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (fast != nullptr) {
          fast(it, kb, vb, qrows.data(), scores.data(), pairs.data(), o);
          continue;
        }
      }
#endif
      for (int64_t g = 0; g < groups; ++g)
        for (int64_t d = 0; d < dim; ++d) query[g * dim + d] = to_float(qrows[g][d]);
      if constexpr (std::is_same_v<T, float>) {
        if (fast_f32 != nullptr) {
          const bool next = item + 1 < end;  // this thread's next item: its keys and values are asked for meanwhile
          const int64_t bn = (item + 1) / kv_heads, hn = (item + 1) % kv_heads;
          fast_f32(it, kb, vb, query.data(), scores.data(), o, next ? K + bn * ks[0] + hn * ks[1] : nullptr,
                   next ? V + bn * vs[0] + hn * vs[1] : nullptr);
          continue;
        }
      }
      attend_portable<T, S>(it, kb, vb, query.data(), scores.data(), acc.data(), o);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor keys,
                            at::Tensor values, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "decode_attention: q, k, v must be (rows, heads, dim) with unit inner stride");
  TORCH_CHECK(keys.dim() == 4 && values.dim() == 4 && keys.stride(3) == 1 && values.stride(3) == 1,
              "decode_attention: keys (slots, kv_heads, dim, length), values (slots, kv_heads, length, dim)");
  const int64_t batch = q.size(0), dim = q.size(2), kv_heads = keys.size(1);
  TORCH_CHECK(k.size(0) == batch && v.size(0) == batch && k.size(1) == kv_heads && v.size(1) == kv_heads &&
              keys.size(2) == dim && values.size(3) == dim && q.size(1) % kv_heads == 0 && keys.size(0) >= batch &&
              values.size(0) >= batch && values.size(2) == keys.size(3),
              "decode_attention: shapes do not agree");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.size(0) == batch,
              "decode_attention: positions must be (rows,) int64");
  const auto dtype = q.scalar_type();
  const auto stored = keys.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && values.scalar_type() == stored &&
              (stored == dtype || (dtype == at::kFloat && stored == at::kBFloat16)),
              "decode_attention: dtypes differ (the arena may be bfloat16 beside float32 rows, nothing else)");
  const int64_t* P = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(P[b] >= 0 && P[b] < keys.size(3), "decode_attention: position outside the arena");
  }
  auto out = at::empty({batch, q.size(1) * dim}, q.options());
  if (dtype == at::kBFloat16) {
    decode_attention_impl<c10::BFloat16>(q, k, v, keys, values, positions, out, scale);
  } else if (stored == at::kBFloat16) {
    decode_attention_impl<float, c10::BFloat16>(q, k, v, keys, values, positions, out, scale);
  } else {
    TORCH_CHECK(dtype == at::kFloat, "decode_attention: float32 or bfloat16 only");
    decode_attention_impl<float>(q, k, v, keys, values, positions, out, scale);
  }
  return out;
}


// Weight-only quantised matmul for the few rows of a decode step: out (R, N) = x (R, K) · Wᵀ, with W stored in
// groups of 32 along K, as GGUF's Q8_0 and Q4_1 blocks are:
//   int8: q (N, K) int8, scales (N, K/32) float16:          w = q·d
//   int4: q (N, K/2) uint8, scales (N, K/32, 2) float16:    w = q·d + m, q in [0, 15]; byte j of a group holds
//         element j in its low nibble and element j + 16 in its high one.
// Each weight group is read once, dequantised in registers (float32) and multiplied into every row, so the
// bytes read per step are the quantised ones. Written with GCC vector types of the target's width: one source
// that the compiler turns into AVX-512F, AVX2 or SSE code, whichever the build targets. Every (row, output) sum is accumulated in
// the same order whatever the number of rows, so a row's result does not depend on what it is batched with.
constexpr int64_t QGROUP = 32;

// The scales are float16, as GGUF stores them: a 32-weight int4 group is 20 bytes, not 24, and an int8 one 34, not 36
// (a decode step reads every byte of every weight: 96 MB a token for the embedded model instead of 112). Read with
// F16C's conversion where the build has it.
typedef uint16_t Scale;
inline float scale_of(const Scale* s, int64_t i) {
#if defined(__F16C__)
  return _cvtsh_ss(s[i]);
#else
  return c10::detail::fp16_ieee_to_fp32_value(s[i]);
#endif
}
constexpr int CHUNKS = QGROUP / W;  // vectors a group
constexpr int64_t PREFETCH_TILES = 4;


// W bytes widened to 32-bit lanes, signed or not. GCC's own conversion of a byte vector goes element by element,
// so on x86 the widening load is the instruction that does it (vpmovsxbd / vpmovzxbd).
template <bool SIGNED>
inline ivec widen(const uint8_t* p) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (ivec)(SIGNED ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (ivec)(SIGNED ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#elif defined(__SSE4_1__)
  int32_t word;
  std::memcpy(&word, p, sizeof word);
  const __m128i b = _mm_cvtsi32_si128(word);
  return (ivec)(SIGNED ? _mm_cvtepi8_epi32(b) : _mm_cvtepu8_epi32(b));
#else
  ivec v;
  for (int i = 0; i < W; ++i) v[i] = SIGNED ? int32_t(int8_t(p[i])) : int32_t(p[i]);
  return v;
#endif
}

inline fvec to_fvec(ivec v) { return __builtin_convertvector(v, fvec); }

// a * b + c rounded once. Written out, not left to the compiler: GCC contracts a * b + c into an FMA or not per
// instantiation, so the same row could round differently in a batch of one and a batch of four.
inline fvec madd(fvec a, fvec b, fvec c) {
#if defined(__AVX512F__)
  return (fvec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
  return (fvec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  fvec product = a * b;  // no FMA instruction: a multiply, then an add
  __asm__("" : "+x"(product));
  return product + c;
#endif
}

inline float hsum(fvec v) {  // a fixed order: the same bits for the same inputs
  float s[W];
  std::memcpy(s, &v, sizeof s);
  float a = 0.0f;
  for (int i = 0; i < W; ++i) a += s[i];
  return a;
}

// Group g of output row n, dequantised: w[j] holds elements [jW, jW + W).
template <int BITS>
inline void dequant(const uint8_t* q, const Scale* scales, int64_t groups, int64_t n, int64_t g, fvec* w) {
  const int64_t block = n * groups + g;
  if constexpr (BITS == 8) {
    const uint8_t* p = q + block * QGROUP;
    const fvec d = fvec{} + scale_of(scales, block);
    for (int j = 0; j < CHUNKS; ++j) w[j] = to_fvec(widen<true>(p + j * W)) * d;
  } else {  // byte i: element i (low nibble) and element i + 16 (high nibble)
    const uint8_t* p = q + block * (QGROUP / 2);
    const fvec d = fvec{} + scale_of(scales, 2 * block), m = fvec{} + scale_of(scales, 2 * block + 1);
    for (int j = 0; j < CHUNKS / 2; ++j) {
      const ivec bytes = widen<false>(p + j * W);
      w[j] = madd(to_fvec(bytes & 0x0F), d, m);
      w[j + CHUNKS / 2] = madd(to_fvec(bytes >> 4), d, m);
    }
  }
}

// Ask for the tile PREFETCH_TILES ahead of outputs [n0, n0 + NT) while this one is computed: its weights and scales
// come from memory (a step streams all 96 MB), and the hardware prefetcher alone left a one-row step at a third of
// the bandwidth (AVX2: the output matrix 5.0 -> 2.5 ms).
template <int BITS, int NT>
inline void prefetch_ahead(int64_t K, const uint8_t* q, const Scale* scales, int64_t n0, int64_t N) {
  const int64_t ahead = n0 + PREFETCH_TILES * NT;
  if (ahead + NT > N) return;
  const int64_t row_bytes = BITS == 8 ? K : K / 2, scale_bytes = K / QGROUP * (BITS == 8 ? 1 : 2) * sizeof(Scale);
  const char* qa = reinterpret_cast<const char*>(q + ahead * row_bytes);
  const char* sa = reinterpret_cast<const char*>(scales) + ahead * scale_bytes;
  for (int64_t b = 0; b < NT * row_bytes; b += 64) __builtin_prefetch(qa + b, 0, 0);
  for (int64_t b = 0; b < NT * scale_bytes; b += 64) __builtin_prefetch(sa + b, 0, 0);
}

// A matmul's rows: float32 (row stride K) and, for the int8-activation kernel, the same rows quantised.
struct QuantRows;
struct Rows {
  const float* x;
  const QuantRows* q;
  int64_t first;  // the first row this call computes
};

// Outputs [n0, n0 + NT) for R rows of x (float32, row stride K).
template <int BITS, int R, int NT>
inline void qtile(const float* x, int64_t K, const uint8_t* q, const Scale* scales, int64_t n0, float* out, int64_t N) {
  const int64_t groups = K / QGROUP;
  fvec acc[NT][R];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = fvec{};
  prefetch_ahead<BITS, NT>(K, q, scales, n0, N);
  for (int64_t g = 0; g < groups; ++g) {
    for (int t = 0; t < NT; ++t) {
      fvec w[CHUNKS];
      dequant<BITS>(q, scales, groups, n0 + t, g, w);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * K + g * QGROUP;
        for (int j = 0; j < CHUNKS; ++j) acc[t][r] = madd(w[j], loadv(xr + j * W), acc[t][r]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) out[r * N + n0 + t] = hsum(acc[t][r]);
}

#if defined(__AVX2__)
// The same matmul with the activations quantised too, as llama.cpp's Q4_1·Q8_0 / Q8_0·Q8_0 dot products do: each
// row of x in groups of 32 as int8 codes xq with a float step dx (nearest, |xq| <= 127), and a group's dot product
// summed in integers (vpmaddubsw: 32 byte products in one instruction), then scaled once. A 32-weight int4 group
// costs about half the instructions of dequantising it to float32, so it wins where a decode step is compute-bound
// (a one-row step with the weights prefetched; many rows); the calibration races it against the float32 path.
//   int4: Σ (q·d + m)·(xq·dx) = d·dx·Σ q·xq + m·(dx·Σ xq)        int8: Σ (q·d)·(xq·dx) = d·dx·Σ q·xq
struct QuantRows {
  std::vector<int8_t> q;   // (R, K)
  std::vector<float> d;    // (R, K/32): dx
  std::vector<float> s;    // (R, K/32): dx·Σ xq
};

inline void quantize_rows(const float* x, int64_t rows, int64_t K, QuantRows& out) {
  const int64_t groups = K / QGROUP;
  out.q.resize(rows * K);
  out.d.resize(rows * groups);
  out.s.resize(rows * groups);
  for (int64_t i = 0; i < rows * groups; ++i) {
    const float* xg = x + i * QGROUP;
    float amax = 0.0f;
    for (int j = 0; j < QGROUP; ++j) amax = std::max(amax, std::fabs(xg[j]));
    const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int j = 0; j < QGROUP; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xg[j] * inv));
      out.q[i * QGROUP + j] = static_cast<int8_t>(v);
      sum += v;
    }
    out.d[i] = d;
    out.s[i] = d * static_cast<float>(sum);
  }
}

// The 32 elements of an int4 group as bytes 0..15, in order (byte i holds element i and element i + 16).
inline __m256i nibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

// Σ u·s over 32 byte pairs, as 8 float32 partial sums; exact for u <= 128 (int4 codes, |int8 codes|): a pair's sum,
// at most 2·128·127, fits vpmaddubsw's saturating int16.
inline __m256 dot_bytes(__m256i u, __m256i s) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

inline float hsum8(__m256 v) {  // a fixed order: the same bits for the same inputs
  float s[8];
  _mm256_storeu_ps(s, v);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

template <int BITS, int R, int NT>
inline void qtile_a8(const QuantRows& x, int64_t r0, int64_t K, const uint8_t* q, const Scale* scales, int64_t n0,
                     float* out, int64_t N) {
  const int64_t groups = K / QGROUP;
  __m256 acc[NT][R];
  float offset[NT][R];
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps(), offset[t][r] = 0.0f;
  prefetch_ahead<BITS, NT>(K, q, scales, n0, N);
  for (int64_t g = 0; g < groups; ++g) {
    for (int t = 0; t < NT; ++t) {
      const int64_t block = (n0 + t) * groups + g;
      __m256i w, sign;
      float dw, mw = 0.0f;
      if constexpr (BITS == 8) {
        sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + block * QGROUP));
        w = _mm256_sign_epi8(sign, sign);  // |q| as unsigned bytes (-128 gives 128, still right)
        dw = scale_of(scales, block);
      } else {
        w = nibbles(q + block * (QGROUP / 2));
        dw = scale_of(scales, 2 * block);
        mw = scale_of(scales, 2 * block + 1);
      }
      for (int r = 0; r < R; ++r) {
        const int64_t xg = (r0 + r) * groups + g;
        __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q.data() + xg * QGROUP));
        if constexpr (BITS == 8) xv = _mm256_sign_epi8(xv, sign);  // the weight's sign moved onto x
        acc[t][r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d[xg]), dot_bytes(w, xv), acc[t][r]);
        if constexpr (BITS == 4) offset[t][r] = std::fma(mw, x.s[xg], offset[t][r]);
      }
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int r = 0; r < R; ++r) out[r * N + n0 + t] = hsum8(acc[t][r]) + offset[t][r];
}
#endif

template <int BITS, bool INT8_ROWS, int R>
void qmatmul_rows(const Rows& in, int64_t K, const uint8_t* q, const Scale* scales, int64_t N, float* out) {
  constexpr int NT = R <= 2 ? 4 : (R <= 4 ? 2 : 1);  // accumulators NT·R fit the registers
  const int64_t tiles = N / NT;
  auto tile = [&](auto nt, int64_t n0) {
#if defined(__AVX2__)
    if constexpr (INT8_ROWS) return qtile_a8<BITS, R, decltype(nt)::value>(*in.q, in.first, K, q, scales, n0, out, N);
#endif
    if constexpr (!INT8_ROWS) qtile<BITS, R, decltype(nt)::value>(in.x + in.first * K, K, q, scales, n0, out, N);
  };
  at::parallel_for(0, tiles, std::max<int64_t>(1, 2048 / (NT * R * std::max<int64_t>(1, K / 256))),
                   [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) tile(std::integral_constant<int, NT>{}, i * NT);
  });
  for (int64_t n = tiles * NT; n < N; ++n) tile(std::integral_constant<int, 1>{}, n);
}

template <int BITS, bool INT8_ROWS>
void qmatmul_dispatch(int64_t rows, const Rows& in, int64_t K, const uint8_t* q, const Scale* scales, int64_t N,
                      float* out) {
  switch (rows) {
    case 1: return qmatmul_rows<BITS, INT8_ROWS, 1>(in, K, q, scales, N, out);
    case 2: return qmatmul_rows<BITS, INT8_ROWS, 2>(in, K, q, scales, N, out);
    case 3: return qmatmul_rows<BITS, INT8_ROWS, 3>(in, K, q, scales, N, out);
    case 4: return qmatmul_rows<BITS, INT8_ROWS, 4>(in, K, q, scales, N, out);
    case 5: return qmatmul_rows<BITS, INT8_ROWS, 5>(in, K, q, scales, N, out);
    case 6: return qmatmul_rows<BITS, INT8_ROWS, 6>(in, K, q, scales, N, out);
    case 7: return qmatmul_rows<BITS, INT8_ROWS, 7>(in, K, q, scales, N, out);
    case 8: return qmatmul_rows<BITS, INT8_ROWS, 8>(in, K, q, scales, N, out);
    default: break;
  }
  for (int64_t r = 0; r < rows; r += 8) {  // more rows: eight at a time (the same sums, row by row)
    const int64_t take = std::min<int64_t>(8, rows - r);
    std::vector<float> part(take * N);
    qmatmul_dispatch<BITS, INT8_ROWS>(take, Rows{in.x, in.q, in.first + r}, K, q, scales, N, part.data());
    for (int64_t i = 0; i < take; ++i) std::memcpy(out + (r + i) * N, part.data() + i * N, N * sizeof(float));
  }
}

bool has_int8_rows() {
#if defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, int64_t bits, bool int8_rows) {
  TORCH_CHECK(bits == 8 || bits == 4, "qlinear: bits must be 8 or 4");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && q.is_contiguous() && scales.is_contiguous() &&
              scales.scalar_type() == at::kHalf, "qlinear: x (rows, K), q (N, K or K/2) contiguous, float16 scales");
  const int64_t rows = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(K % QGROUP == 0, "qlinear: K must be a multiple of 32");
  if (bits == 8) {
    TORCH_CHECK(q.scalar_type() == at::kChar && q.size(1) == K && scales.numel() == N * (K / QGROUP),
                "qlinear: int8 weights must be (N, K) int8 with (N, K/32) scales");
  } else {
    TORCH_CHECK(q.scalar_type() == at::kByte && q.size(1) == K / 2 && scales.numel() == N * (K / QGROUP) * 2,
                "qlinear: int4 weights must be (N, K/2) uint8 with (N, K/32, 2) scales");
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qlinear: float32 or bfloat16 x");
#if !defined(__AVX2__)
  TORCH_CHECK(!int8_rows, "qlinear: int8 rows need AVX2; these kernels are built without it");
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, N}, x.options().dtype(at::kFloat));
  if (rows > 0) {
    const uint8_t* qp = reinterpret_cast<const uint8_t*>(q.data_ptr());
    const float* xp = xf.data_ptr<float>();
    const Scale* sp = reinterpret_cast<const Scale*>(scales.data_ptr());
    float* op = out.data_ptr<float>();
    if (int8_rows) {
#if defined(__AVX2__)
      QuantRows xq;
      quantize_rows(xp, rows, K, xq);
      const Rows in{xp, &xq, 0};
      bits == 8 ? qmatmul_dispatch<8, true>(rows, in, K, qp, sp, N, op) : qmatmul_dispatch<4, true>(rows, in, K, qp, sp, N, op);
#endif
    } else {
      const Rows in{xp, nullptr, 0};
      bits == 8 ? qmatmul_dispatch<8, false>(rows, in, K, qp, sp, N, op) : qmatmul_dispatch<4, false>(rows, in, K, qp, sp, N, op);
    }
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// A scale as stored: float16 (nearest even), within float16's range, and a step d never 0 (its smallest subnormal).
inline float as_half(float x) { return static_cast<float>(c10::Half(std::min(65504.0f, std::max(-65504.0f, x)))); }
inline float step_as_half(float d) { return std::max(as_half(d), 5.9604645e-8f); }

// The weights of qlinear, from an (N, K) float32 weight, groups of 32 along K (the same arithmetic, in the same
// float32 order, as fastllama.quantize_weight's PyTorch version, so both give the same bytes):
//   int8: d = max|w| / 127, q = round(w / d);  int4: d = (max - min) / 15, m = min, q = round((w - m) / d),
// with d and m first rounded to the float16 they are stored as, so that the codes fit the stored scales.
// Rounding is to nearest even, as torch.round and torch's float16 conversion. Quantising the embedded model this
// way takes a fraction of a second, where the tensor-op version took seconds at first start.

std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& weight, int64_t bits) {
  TORCH_CHECK(bits == 8 || bits == 4, "quantize: bits must be 8 or 4");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) % QGROUP == 0, "quantize: weight must be (N, K), K a multiple of 32");
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const int64_t N = w.size(0), K = w.size(1), groups = K / QGROUP;
  at::Tensor q = bits == 8 ? at::empty({N, K}, w.options().dtype(at::kChar)) : at::empty({N, K / 2}, w.options().dtype(at::kByte));
  const auto half = w.options().dtype(at::kHalf);
  at::Tensor scales = bits == 8 ? at::empty({N, groups}, half) : at::empty({N, groups, 2}, half);
  const float* wp = w.data_ptr<float>();
  uint8_t* qp = reinterpret_cast<uint8_t*>(q.data_ptr());
  c10::Half* sp = scales.data_ptr<c10::Half>();
  at::parallel_for(0, N * groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* g = wp + b * QGROUP;
      if (bits == 8) {
        float amax = 0.0f;
        for (int i = 0; i < QGROUP; ++i) amax = std::max(amax, std::fabs(g[i]));
        const float d = step_as_half(std::max(amax, 1e-12f) / 127.0f);
        for (int i = 0; i < QGROUP; ++i) {
          const float r = std::nearbyint(g[i] / d);
          qp[b * QGROUP + i] = uint8_t(int8_t(std::min(127.0f, std::max(-127.0f, r))));
        }
        sp[b] = d;
      } else {
        float low = g[0], high = g[0];
        for (int i = 1; i < QGROUP; ++i) low = std::min(low, g[i]), high = std::max(high, g[i]);
        const float d = step_as_half(std::max(high - low, 1e-12f) / 15.0f), m = as_half(low);
        uint8_t nib[QGROUP];
        for (int i = 0; i < QGROUP; ++i) nib[i] = uint8_t(std::min(15.0f, std::max(0.0f, std::nearbyint((g[i] - m) / d))));
        for (int i = 0; i < QGROUP / 2; ++i) qp[b * (QGROUP / 2) + i] = nib[i] | uint8_t(nib[i + QGROUP / 2] << 4);
        sp[2 * b] = d;
        sp[2 * b + 1] = m;
      }
    }
  });
  return {q, scales};
}

}  // namespace

TORCH_LIBRARY(rapport, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor positions) -> ()", &rope_);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor positions, "
        "float scale) -> Tensor", &decode_attention);
  m.def("qlinear(Tensor x, Tensor q, Tensor scales, int bits, bool int8_rows=False) -> Tensor", &qlinear);
  m.def("has_int8_rows() -> bool", &has_int8_rows);
  m.def("quantize(Tensor weight, int bits) -> (Tensor, Tensor)", &quantize);
}
