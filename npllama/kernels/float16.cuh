// float16 on the GPU for npllama's kernels, in one place: conversions and the tensor cores' product.
// float16 values travel as their 16 bits (unsigned short), so no CUDA header is needed (NVRTC
// compiles these kernels without cuda_fp16.h). The CPU harness of the tests
// (tests/harness/cuda_on_cpu.h) defines the same three functions, so the kernels that include this
// file also run there, under the sanitizers. kernel_source() (kernels/__init__.py) pastes this file
// where a .cu includes it, for NVRTC; the harness's compiler includes it itself.
//
// mma_16816's operands follow the fragment layouts the PTX ISA documents for mma.m16n8k16 with
// .f16 inputs and .f32 accumulators (lane = 4 g + t, g = lane / 4 its group, t = lane % 4):
//     A (16 x 16, row-major), 4 registers of two halves, the lower half first:
//         a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//     B (16 x 8, "col": indexed [k][n]), 2 registers:  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//     C, D (16 x 8, float32):  d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
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

// d += a b: one warp's 16 x 16 (a) by 16 x 8 (b) product, float16 operands, float32 accumulation (sm_80+)
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
