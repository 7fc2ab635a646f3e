// float16 on the GPU for npllama's kernels, in one place: its conversions.
// float16 values travel as their 16 bits (unsigned short), so no CUDA header is needed (NVRTC
// compiles these kernels without cuda_fp16.h). The CPU harness of the tests
// (tests/harness/cuda_on_cpu.h) defines the same two functions, so the kernels that include this
// file also run there, under the sanitizers. kernel_source() (kernels/__init__.py) pastes this file
// where a .cu includes it, for NVRTC; the harness's compiler includes it itself.

#pragma once

#ifndef NPLLAMA_CPU_EMULATION
__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_half(float f) {  // round to nearest even
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#endif
