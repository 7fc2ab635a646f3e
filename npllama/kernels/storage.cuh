// How npllama's elementwise kernels store each dtype and compute in it: float32 as float, float64 as
// double, float16 as its 16 bits (unsigned short, float16.cuh); float32 and float16 are computed in
// float, float64 in double, as the array code's compute_dtype does. `widen` reads a stored value into
// the compute type (exactly); `narrow` rounds a computed value to the storage type once (the second
// argument only picks the overload). kernel_source() (kernels/__init__.py) pastes this file where a
// .cu includes it, for NVRTC.
#pragma once

#include "float16.cuh"

namespace npllama {

template <typename T>
struct ComputeType {
  using type = float;  // float32, and float16's bits
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <typename T>
using Compute = typename ComputeType<T>::type;

__device__ __forceinline__ float widen(float x) { return x; }
__device__ __forceinline__ double widen(double x) { return x; }
__device__ __forceinline__ float widen(unsigned short x) { return half_to_float(x); }

__device__ __forceinline__ float narrow(float x, float) { return x; }
__device__ __forceinline__ double narrow(double x, double) { return x; }
__device__ __forceinline__ unsigned short narrow(float x, unsigned short) { return float_to_half(x); }

}  // namespace npllama
