// Fused CPU kernels for the decode step of dialogue/fastllama.py, registered as torch.ops.rapport.*.
//
// Each replaces a chain of small ATen ops whose dispatch costs more than their arithmetic at a batch of a few
// rows, and decode attention also avoids the copy oneDNN makes of a KV-arena slice (it only takes dense
// operands). Every kernel computes what the Python path in fastllama.py computes, rounding where it rounds,
// in float32 or bfloat16; tests/test_kernels.py holds them to it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
inline T round_to(float x) { return static_cast<T>(x); }  // bfloat16: round to nearest even, as ATen does

// exp for x <= 0 (softmax after subtracting the maximum), written so that the compiler vectorises it:
// 2^(x·log2 e) split into an integer power (built in the exponent bits) and a polynomial for the fraction.
// Relative error about 2e-7, below float32's softmax noise.
inline float exp_neg(float x) {
  x = x < -87.0f ? -87.0f : x;
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

// Decode attention for slots [0, B): row b is slot b's token at position positions[b]. Its key and value are
// first written into the arena; then its queries attend over the slot's positions [0, positions[b]], reading
// the arena in place. q (B, heads, dim); k, v (B, kv_heads, dim); keys (slots, kv_heads, dim, length) and
// values (slots, kv_heads, length, dim) are one layer of the arena. Returns (B, heads * dim).
template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& keys,
                           at::Tensor& values, const at::Tensor& positions, at::Tensor& out, double scale) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2), kv_heads = keys.size(1);
  const int64_t groups = heads / kv_heads;
  const int64_t* P = positions.data_ptr<int64_t>();
  T* K = keys.data_ptr<T>();
  T* V = values.data_ptr<T>();
  const T* Q = q.data_ptr<T>();
  const T* KN = k.data_ptr<T>();
  const T* VN = v.data_ptr<T>();
  const auto ks = keys.strides(), vs = values.strides();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), kns0 = k.stride(0), kns1 = k.stride(1);
  const int64_t vns0 = v.stride(0), vns1 = v.stride(1);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, P[b] + 1);
  T* O = out.data_ptr<T>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * longest), query(groups * dim), acc(groups * dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads, pos = P[b], length = pos + 1;
      T* kb = K + b * ks[0] + h * ks[1];
      T* vb = V + b * vs[0] + h * vs[1];
      for (int64_t d = 0; d < dim; ++d) {
        kb[d * ks[2] + pos] = KN[b * kns0 + h * kns1 + d];
        vb[pos * vs[2] + d] = VN[b * vns0 + h * vns1 + d];
      }
      for (int64_t g = 0; g < groups; ++g) {
        const T* qrow = Q + b * qs0 + (h * groups + g) * qs1;
        for (int64_t d = 0; d < dim; ++d) query[g * dim + d] = to_float(qrow[d]);
      }
      std::fill(scores.begin(), scores.begin() + groups * length, 0.0f);
      // Keys are stored transposed, one contiguous row per dimension: scores += q[d] * row d, four rows a pass.
      int64_t d = 0;
      for (; d + 4 <= dim; d += 4) {
        const T* k0 = kb + d * ks[2];
        const T* k1 = k0 + ks[2];
        const T* k2 = k1 + ks[2];
        const T* k3 = k2 + ks[2];
        for (int64_t g = 0; g < groups; ++g) {
          const float* qg = query.data() + g * dim + d;
          const float q0 = qg[0], q1 = qg[1], q2 = qg[2], q3 = qg[3];
          float* s = scores.data() + g * length;
          for (int64_t l = 0; l < length; ++l) {
            s[l] += q0 * to_float(k0[l]) + q1 * to_float(k1[l]) + q2 * to_float(k2[l]) + q3 * to_float(k3[l]);
          }
        }
      }
      for (; d < dim; ++d) {
        const T* krow = kb + d * ks[2];
        for (int64_t g = 0; g < groups; ++g) {
          const float qd = query[g * dim + d];
          float* s = scores.data() + g * length;
          for (int64_t l = 0; l < length; ++l) s[l] += qd * to_float(krow[l]);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < groups; ++g) {
        float* s = scores.data() + g * length;
        float top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int64_t l = 0; l < length; ++l) {
          s[l] *= static_cast<float>(scale);
          top = std::max(top, s[l]);
        }
        for (int64_t l = 0; l < length; ++l) s[l] = exp_neg(s[l] - top);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t l = 0; l < length; ++l) total += s[l];
        const float norm = 1.0f / total;
        for (int64_t l = 0; l < length; ++l) s[l] *= norm;
      }
      int64_t l = 0;
      for (; l + 4 <= length; l += 4) {  // four value rows a pass
        const T* v0 = vb + l * vs[2];
        const T* v1 = v0 + vs[2];
        const T* v2 = v1 + vs[2];
        const T* v3 = v2 + vs[2];
        for (int64_t g = 0; g < groups; ++g) {
          const float* p = scores.data() + g * length + l;
          const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
          float* a = acc.data() + g * dim;
          for (int64_t e = 0; e < dim; ++e) {
            a[e] += p0 * to_float(v0[e]) + p1 * to_float(v1[e]) + p2 * to_float(v2[e]) + p3 * to_float(v3[e]);
          }
        }
      }
      for (; l < length; ++l) {
        const T* vrow = vb + l * vs[2];
        for (int64_t g = 0; g < groups; ++g) {
          const float p = scores[g * length + l];
          float* a = acc.data() + g * dim;
          for (int64_t e = 0; e < dim; ++e) a[e] += p * to_float(vrow[e]);
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        T* orow = O + b * heads * dim + (h * groups + g) * dim;
        for (int64_t d = 0; d < dim; ++d) orow[d] = round_to<T>(acc[g * dim + d]);
      }
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
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype && keys.scalar_type() == dtype &&
              values.scalar_type() == dtype, "decode_attention: dtypes differ");
  const int64_t* P = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(P[b] >= 0 && P[b] < keys.size(3), "decode_attention: position outside the arena");
  }
  auto out = at::empty({batch, q.size(1) * dim}, q.options());
  if (dtype == at::kBFloat16) {
    decode_attention_impl<c10::BFloat16>(q, k, v, keys, values, positions, out, scale);
  } else {
    TORCH_CHECK(dtype == at::kFloat, "decode_attention: float32 or bfloat16 only");
    decode_attention_impl<float>(q, k, v, keys, values, positions, out, scale);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(rapport, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor positions) -> ()", &rope_);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor positions, "
        "float scale) -> Tensor", &decode_attention);
}
