// Fused elementwise ops of the phi-1 block, for CPU here and for CUDA in fused_ops_cuda.cu.
//
//   bias_gelu   y = gelu_new(x + b): one pass instead of an add and a gelu (each a full read and write of the
//               (tokens, d_mlp) activation, the largest of the block). The backward is one pass too: it
//               writes dL/dx and sums dL/db on the way, in fp32 partial sums over fixed blocks of rows (the
//               same bits on every run, unlike atomics), instead of a gelu backward and a separate reduction.
//   rotary_qkv  the fused q/k/v projection's output (B, T, nh, 3, hs) -> q, k, v as one (3, B, nh, T, hs)
//               tensor, the first rotary_dim dims of q and k rotated (NeoX rotate-half). Replaces the split,
//               the transposes and the ~8 slice / neg / cat / mul / add kernels per tensor of the PyTorch
//               path, and hands attention contiguous (B, nh, T, hs) tensors.
//
// All arithmetic is in fp32 whatever the storage dtype. The Python side (phi1/ops/) holds the autograd
// functions, the PyTorch references the tests compare against, and the fallback when this is not built.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <tuple>

#include "gelu_rotary_math.h"

namespace phi1 {

#ifdef PHI1_WITH_CUDA
// Defined in fused_ops_cuda.cu.
void bias_gelu_forward_cuda(const at::Tensor& x, const at::Tensor& bias, at::Tensor& out);
void bias_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias, at::Tensor& out,
                             at::Tensor& bias_grad_partials, int64_t rows_per_block);
int64_t bias_gelu_backward_cuda_rows_per_block(int64_t rows, int64_t n);
void rotary_qkv_cuda(const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& dst,
                     int64_t rotary_dim, bool to_heads_first, bool inverse);
#endif

namespace {

// Rows of the (rows, n) activation handed to each task: enough work to amortise a thread wake-up.
constexpr int64_t kGrainRows = 16;

template <typename scalar_t>
void bias_gelu_forward_cpu(const at::Tensor& x, const at::Tensor& bias, at::Tensor& out) {
  const int64_t n = bias.numel();
  const int64_t rows = x.numel() / n;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * n;
      scalar_t* outr = op + r * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        outr[i] = static_cast<scalar_t>(gelu_tanh(static_cast<float>(xr[i]) + static_cast<float>(bp[i])));
      }
    }
  });
}

// Rows per block of the bias-gradient partial sums on CPU. Fixed, not derived from the thread count, so the
// bias gradient has the same bits on any machine.
constexpr int64_t kBiasGradRows = 32;

template <typename scalar_t>
void bias_gelu_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias, at::Tensor& out,
                            at::Tensor& partials) {
  const int64_t n = bias.numel();
  const int64_t rows = x.numel() / n;
  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* pp = partials.data_ptr<float>();
  at::parallel_for(0, partials.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      float* acc = pp + block * n;
      const int64_t last = std::min(rows, (block + 1) * kBiasGradRows);
      for (int64_t r = block * kBiasGradRows; r < last; ++r) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const int64_t k = r * n + i;
          const float d = static_cast<float>(gp[k]) * gelu_tanh_grad(static_cast<float>(xp[k]) + static_cast<float>(bp[i]));
          op[k] = static_cast<scalar_t>(d);
          acc[i] += d;
        }
      }
    }
  });
}

// One (b, t, h) triple per iteration: its 3 x hs values move between the two layouts
//   tokens-first  (B, T, nh, 3, hs)   what the q/k/v GEMM writes
//   heads-first   (3, B, nh, T, hs)   what attention reads
// and the first rotary_dim values of q and k are rotated on the way (by -angle when `inverse`: the rotation is
// orthogonal, so the backward is the same move in the other direction with the angle negated).
template <typename scalar_t>
void rotary_qkv_cpu(const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& dst,
                    int64_t rotary_dim, bool to_heads_first, bool inverse) {
  const int64_t B = cos.size(0), T = cos.size(1);
  const int64_t H = src.size(2);  // (B, T, nh, 3, hs) and (3, B, nh, T, hs) both hold nh at dim 2
  const int64_t D = src.size(-1);
  const int64_t half = rotary_dim / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  const scalar_t* sp = src.data_ptr<scalar_t>();
  scalar_t* dp = dst.data_ptr<scalar_t>();
  const float* cp = cos.data_ptr<float>();
  const float* np = sin.data_ptr<float>();
  at::parallel_for(0, B * T * H, 64, [&](int64_t begin, int64_t end) {
    for (int64_t flat = begin; flat < end; ++flat) {
      const int64_t h = flat % H;
      const int64_t t = (flat / H) % T;
      const int64_t b = flat / (H * T);
      const float* c = cp + (b * T + t) * half;
      const float* s = np + (b * T + t) * half;
      for (int64_t which = 0; which < 3; ++which) {
        const int64_t tokens_first = (((b * T + t) * H + h) * 3 + which) * D;
        const int64_t heads_first = (((which * B + b) * H + h) * T + t) * D;
        const scalar_t* in = sp + (to_heads_first ? tokens_first : heads_first);
        scalar_t* out = dp + (to_heads_first ? heads_first : tokens_first);
        int64_t i = 0;
        if (which < 2) {
          for (; i < half; ++i) {
            const float x1 = static_cast<float>(in[i]), x2 = static_cast<float>(in[i + half]);
            const float si = sign * s[i];
            out[i] = static_cast<scalar_t>(rotate_half(x1, x2, c[i], si, true));
            out[i + half] = static_cast<scalar_t>(rotate_half(x2, x1, c[i], si, false));
          }
          i = rotary_dim;
        }
        for (; i < D; ++i) out[i] = in[i];
      }
    }
  });
}

void check_bias_gelu(const at::Tensor& x, const at::Tensor& bias) {
  TORCH_CHECK(x.is_contiguous() && bias.is_contiguous(), "bias_gelu: x and bias must be contiguous");
  TORCH_CHECK(bias.dim() == 1 && x.size(-1) == bias.numel(), "bias_gelu: bias of ", bias.numel(),
              " features for x whose last dim is ", x.size(-1));
  TORCH_CHECK(x.scalar_type() == bias.scalar_type(), "bias_gelu: x is ", x.scalar_type(), ", bias is ",
              bias.scalar_type());
  TORCH_CHECK(x.device() == bias.device(), "bias_gelu: x and bias on different devices");
}

void check_rotary(const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim) {
  TORCH_CHECK(src.is_contiguous() && cos.is_contiguous() && sin.is_contiguous(), "rotary_qkv: inputs must be contiguous");
  TORCH_CHECK(src.dim() == 5, "rotary_qkv: expected a 5-d q/k/v tensor, got ", src.dim(), " dims");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "rotary_qkv: cos and sin must be fp32");
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes(), "rotary_qkv: cos and sin must be (B, T, rotary_dim / 2)");
  TORCH_CHECK(rotary_dim % 2 == 0 && rotary_dim <= src.size(-1) && cos.size(2) == rotary_dim / 2,
              "rotary_qkv: rotary_dim ", rotary_dim, " does not fit head dim ", src.size(-1), " and cos of ",
              cos.size(2), " angles");
  TORCH_CHECK(src.device() == cos.device() && src.device() == sin.device(), "rotary_qkv: inputs on different devices");
}

}  // namespace

at::Tensor bias_gelu_forward(const at::Tensor& x, const at::Tensor& bias) {
  check_bias_gelu(x, bias);
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
#ifdef PHI1_WITH_CUDA
  if (x.is_cuda()) {
    bias_gelu_forward_cuda(x, bias, out);
    return out;
  }
#endif
  TORCH_CHECK(x.is_cpu(), "bias_gelu: this build has no kernel for ", x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_forward", [&] {
    bias_gelu_forward_cpu<scalar_t>(x, bias, out);
  });
  return out;
}

// (dL/dx, dL/dbias): dL/dx in x's dtype, dL/dbias summed in fp32.
std::tuple<at::Tensor, at::Tensor> bias_gelu_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias) {
  check_bias_gelu(x, bias);
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "bias_gelu: grad must be contiguous and match x");
  const int64_t n = bias.numel();
  const int64_t rows = n > 0 ? x.numel() / n : 0;
  at::Tensor out = at::empty_like(x);
#ifdef PHI1_WITH_CUDA
  if (x.is_cuda()) {
    const int64_t rows_per_block = bias_gelu_backward_cuda_rows_per_block(rows, n);
    at::Tensor partials = at::empty({(rows + rows_per_block - 1) / rows_per_block, n}, x.options().dtype(at::kFloat));
    bias_gelu_backward_cuda(grad, x, bias, out, partials, rows_per_block);
    return {out, partials.sum(0)};
  }
#endif
  TORCH_CHECK(x.is_cpu(), "bias_gelu: this build has no kernel for ", x.device());
  at::Tensor partials = at::zeros({(rows + kBiasGradRows - 1) / kBiasGradRows, n}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_backward", [&] {
    bias_gelu_backward_cpu<scalar_t>(grad, x, bias, out, partials);
  });
  return {out, partials.sum(0)};
}

// qkv (B, T, nh, 3, hs) -> (3, B, nh, T, hs) with q and k rotated; cos, sin (B, T, rotary_dim / 2) fp32.
at::Tensor rotary_qkv_forward(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim) {
  check_rotary(qkv, cos, sin, rotary_dim);
  TORCH_CHECK(qkv.size(3) == 3 && qkv.size(0) == cos.size(0) && qkv.size(1) == cos.size(1),
              "rotary_qkv: qkv ", qkv.sizes(), " does not match cos ", cos.sizes());
  at::Tensor out = at::empty({3, qkv.size(0), qkv.size(2), qkv.size(1), qkv.size(4)}, qkv.options());
#ifdef PHI1_WITH_CUDA
  if (qkv.is_cuda()) {
    rotary_qkv_cuda(qkv, cos, sin, out, rotary_dim, /*to_heads_first=*/true, /*inverse=*/false);
    return out;
  }
#endif
  TORCH_CHECK(qkv.is_cpu(), "rotary_qkv: this build has no kernel for ", qkv.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "rotary_qkv_forward", [&] {
    rotary_qkv_cpu<scalar_t>(qkv, cos, sin, out, rotary_dim, true, false);
  });
  return out;
}

// grad (3, B, nh, T, hs) -> (B, T, nh, 3, hs), rotated back.
at::Tensor rotary_qkv_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin, int64_t rotary_dim) {
  check_rotary(grad, cos, sin, rotary_dim);
  TORCH_CHECK(grad.size(0) == 3 && grad.size(1) == cos.size(0) && grad.size(3) == cos.size(1),
              "rotary_qkv: grad ", grad.sizes(), " does not match cos ", cos.sizes());
  at::Tensor out = at::empty({grad.size(1), grad.size(3), grad.size(2), 3, grad.size(4)}, grad.options());
#ifdef PHI1_WITH_CUDA
  if (grad.is_cuda()) {
    rotary_qkv_cuda(grad, cos, sin, out, rotary_dim, /*to_heads_first=*/false, /*inverse=*/true);
    return out;
  }
#endif
  TORCH_CHECK(grad.is_cpu(), "rotary_qkv: this build has no kernel for ", grad.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "rotary_qkv_backward", [&] {
    rotary_qkv_cpu<scalar_t>(grad, cos, sin, out, rotary_dim, false, true);
  });
  return out;
}

}  // namespace phi1

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "phi1 fused ops: bias + gelu_new, rotary on the fused q/k/v projection";
  m.def("bias_gelu_forward", &phi1::bias_gelu_forward, "gelu_new(x + bias)");
  m.def("bias_gelu_backward", &phi1::bias_gelu_backward, "(grad * gelu_new'(x + bias), its sum over rows in fp32)");
  m.def("rotary_qkv_forward", &phi1::rotary_qkv_forward, "(B,T,nh,3,hs) -> rotated (3,B,nh,T,hs)");
  m.def("rotary_qkv_backward", &phi1::rotary_qkv_backward, "(3,B,nh,T,hs) -> rotated back (B,T,nh,3,hs)");
#ifdef PHI1_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
