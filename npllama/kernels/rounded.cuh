// One IEEE operation each, rounded to nearest and never fused with another (the _rn intrinsics keep
// NVCC and NVRTC from contracting a multiply and an add into one FMA), overloaded for float and
// double: what lets a kernel repeat an array code's operations in its order and get its bits. The
// CPU harness defines the intrinsics (and compiles with -ffp-contract=off). kernel_source()
// (kernels/__init__.py) pastes this file where a .cu includes it, for NVRTC.
#pragma once

namespace npllama {

__device__ __forceinline__ float multiply(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double multiply(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float subtract(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double subtract(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float divide(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double divide(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float square_root(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double square_root(double a) { return __dsqrt_rn(a); }

}  // namespace npllama
