// CUDA kernels of the fused ops declared in fused_ops.cpp (see there for what each op replaces).
// All are memory-bound: the point is one read and one write of each activation, in fp32 arithmetic. The
// formulas are those of gelu_rotary_math.h, shared with the C++ kernels that the CPU tests check.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "gelu_rotary_math.h"

namespace phi1 {
namespace {

constexpr int kThreads = 256;

// VEC values moved by one 16-byte (or narrower) load or store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

int sm_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

int64_t blocks_for(int64_t work) {
  // Grid-stride loops: a few waves of blocks per SM are enough to saturate memory bandwidth.
  const int64_t max_blocks = static_cast<int64_t>(sm_count()) * 32;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
}

// Each thread takes packs of VEC consecutive values; n % VEC == 0, so a pack never straddles a row and the
// bias pack at `col` is aligned too.
template <typename scalar_t, int VEC>
__global__ void bias_gelu_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ bias,
                                         scalar_t* __restrict__ out, int64_t packs, int64_t n) {
  using P = Pack<scalar_t, VEC>;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = (p * VEC) % n;
    const P xv = reinterpret_cast<const P*>(x)[p];
    const P bv = *reinterpret_cast<const P*>(bias + col);
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      ov.v[j] = static_cast<scalar_t>(gelu_tanh(static_cast<float>(xv.v[j]) + static_cast<float>(bv.v[j])));
    }
    reinterpret_cast<P*>(out)[p] = ov;
  }
}

// Block (column tile, row block): each thread owns VEC consecutive columns and walks the block's rows, writing
// dL/dx and summing it into fp32 registers; one partial sum per (row block, column) is written at the end and
// the host sums the partials over row blocks. No atomics: the same bits on every run.
template <typename scalar_t, int VEC>
__global__ void bias_gelu_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                          float* __restrict__ partials, int64_t rows, int64_t n,
                                          int64_t rows_per_block) {
  using P = Pack<scalar_t, VEC>;
  const int64_t col = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * VEC;
  if (col >= n) return;
  const int64_t first = blockIdx.y * rows_per_block;
  const int64_t last = rows < first + rows_per_block ? rows : first + rows_per_block;
  const P bv = *reinterpret_cast<const P*>(bias + col);
  float b[VEC], acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    b[j] = static_cast<float>(bv.v[j]);
    acc[j] = 0.0f;
  }
  for (int64_t r = first; r < last; ++r) {
    const int64_t k = r * n + col;
    const P gv = *reinterpret_cast<const P*>(grad + k);
    const P xv = *reinterpret_cast<const P*>(x + k);
    P ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float d = static_cast<float>(gv.v[j]) * gelu_tanh_grad(static_cast<float>(xv.v[j]) + b[j]);
      ov.v[j] = static_cast<scalar_t>(d);
      acc[j] += d;
    }
    *reinterpret_cast<P*>(out + k) = ov;
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) partials[blockIdx.y * n + col + j] = acc[j];
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The widest pack that divides the row and keeps every pointer aligned; 1 otherwise.
template <typename scalar_t>
int pack_width(int64_t n, std::initializer_list<const void*> pointers) {
  const int vec = static_cast<int>(16 / sizeof(scalar_t));
  if (n % vec != 0) return 1;
  for (const void* p : pointers) {
    if (!aligned16(p)) return 1;
  }
  return vec;
}

// One thread per destination value, enumerated in tokens-first order (B, T, nh, 3, hs) so that neighbouring
// threads touch neighbouring values of the hs-long rows in both layouts. A value in the first rotary_dim dims
// of q or k mixes with its rotate-half partner; everything else is copied.
template <typename scalar_t>
__global__ void rotary_qkv_kernel(const scalar_t* __restrict__ src, const float* __restrict__ cos,
                                  const float* __restrict__ sin, scalar_t* __restrict__ dst, int64_t B, int64_t T,
                                  int64_t H, int64_t D, int64_t rotary_dim, bool to_heads_first, float sign) {
  const int64_t total = B * T * H * 3 * D;
  const int64_t half = rotary_dim / 2;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % D;
    int64_t rest = idx / D;
    const int64_t which = rest % 3;
    rest /= 3;
    const int64_t h = rest % H;
    rest /= H;
    const int64_t t = rest % T;
    const int64_t b = rest / T;
    const int64_t tokens_first = idx - i;
    const int64_t heads_first = (((which * B + b) * H + h) * T + t) * D;
    const scalar_t* in = src + (to_heads_first ? tokens_first : heads_first);
    scalar_t* out = dst + (to_heads_first ? heads_first : tokens_first);
    if (which < 2 && i < rotary_dim) {
      const int64_t j = i < half ? i : i - half;
      const float c = cos[(b * T + t) * half + j];
      const float s = sign * sin[(b * T + t) * half + j];
      const bool first_half = i < half;
      const float self = static_cast<float>(in[i]);
      const float partner = static_cast<float>(in[first_half ? i + half : i - half]);
      out[i] = static_cast<scalar_t>(rotate_half(self, partner, c, s, first_half));
    } else {
      out[i] = in[i];
    }
  }
}

}  // namespace

void bias_gelu_forward_cuda(const at::Tensor& x, const at::Tensor& bias, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = bias.numel();
  if (x.numel() == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_forward_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int vec = pack_width<scalar_t>(n, {xp, bp, op});
    constexpr int kWide = 16 / sizeof(scalar_t);
    if (vec == kWide) {
      const int64_t packs = x.numel() / kWide;
      bias_gelu_forward_kernel<scalar_t, kWide><<<blocks_for(packs), kThreads, 0, stream>>>(xp, bp, op, packs, n);
    } else {
      bias_gelu_forward_kernel<scalar_t, 1><<<blocks_for(x.numel()), kThreads, 0, stream>>>(xp, bp, op, x.numel(), n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Enough row blocks for about four blocks per SM over all column tiles, and at most 65,535 (gridDim.y).
int64_t bias_gelu_backward_cuda_rows_per_block(int64_t rows, int64_t n) {
  if (rows == 0 || n == 0) return 1;
  const int64_t column_tiles = std::max<int64_t>(1, n / (kThreads * 8));
  const int64_t wanted_blocks = std::max<int64_t>(1, 4 * static_cast<int64_t>(sm_count()) / column_tiles);
  const int64_t per_block = std::max<int64_t>((rows + wanted_blocks - 1) / wanted_blocks, (rows + 65534) / 65535);
  return std::max<int64_t>(per_block, 1);
}

void bias_gelu_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& bias, at::Tensor& out,
                             at::Tensor& partials, int64_t rows_per_block) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = bias.numel();
  if (x.numel() == 0) {
    partials.zero_();
    return;
  }
  const int64_t rows = x.numel() / n;
  const dim3 blocks_y(1, static_cast<unsigned>(partials.size(0)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_gelu_backward_cuda", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = bias.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    float* pp = partials.data_ptr<float>();
    constexpr int kWide = 16 / sizeof(scalar_t);
    const int vec = pack_width<scalar_t>(n, {gp, xp, bp, op});
    const int64_t threads_x = (n / vec + kThreads - 1) / kThreads;
    const dim3 grid(static_cast<unsigned>(threads_x), blocks_y.y);
    if (vec == kWide) {
      bias_gelu_backward_kernel<scalar_t, kWide><<<grid, kThreads, 0, stream>>>(gp, xp, bp, op, pp, rows, n, rows_per_block);
    } else {
      bias_gelu_backward_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(gp, xp, bp, op, pp, rows, n, rows_per_block);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rotary_qkv_cuda(const at::Tensor& src, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& dst,
                     int64_t rotary_dim, bool to_heads_first, bool inverse) {
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t B = cos.size(0), T = cos.size(1), H = src.size(2), D = src.size(-1);
  const int64_t total = B * T * H * 3 * D;
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "rotary_qkv_cuda", [&] {
    rotary_qkv_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        src.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), dst.data_ptr<scalar_t>(), B, T, H, D,
        rotary_dim, to_heads_first, inverse ? -1.0f : 1.0f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace phi1
