// The arithmetic of the fused ops, written once for the C++ kernels (fused_ops.cpp) and the CUDA ones
// (fused_ops_cuda.cu): the CPU tests of the one check the formulas the GPU runs.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PHI1_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PHI1_HOST_DEVICE inline
#endif

namespace phi1 {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

// gelu_new(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), computed as x * sigmoid(2u): expf is
// a GPU intrinsic and vectorises on CPU (glibc's libmvec) where tanhf does not.
PHI1_HOST_DEVICE float gelu_tanh(float x) {
  const float inner = kSqrt2OverPi * (x + kCubic * x * x * x);
  return x / (1.0f + expf(-2.0f * inner));
}

// d/dx gelu_new(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) u'(x), t = tanh(u).
PHI1_HOST_DEVICE float gelu_tanh_grad(float x) {
  const float x2 = x * x;
  const float t = 2.0f / (1.0f + expf(-2.0f * kSqrt2OverPi * (x + kCubic * x2 * x))) - 1.0f;
  return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x2);
}

// NeoX rotate-half of one value: in the first half of the rotary dims, x1 c - x2 s; in the second, x2 c + x1 s.
// `self` is the value at this position, `partner` the one rotary_dim / 2 away.
PHI1_HOST_DEVICE float rotate_half(float self, float partner, float c, float s, bool first_half) {
  return first_half ? self * c - partner * s : self * c + partner * s;
}

}  // namespace phi1
