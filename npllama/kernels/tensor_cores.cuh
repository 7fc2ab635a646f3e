// The tensor cores for npllama's kernels, in one place: one warp's matrix product in two operand
// formats, and the rounding to TF32. On the GPU they are inline PTX (sm_80 and later); the CPU
// harness of the tests (tests/harness/cuda_on_cpu.h) defines the same three functions, the products
// by gathering the warp's registers in exactly the layouts below, so the kernels that include this
// file also run there, under the sanitizers. kernel_source() (kernels/__init__.py) pastes this file
// where a .cu includes it, for NVRTC; the harness's compiler includes it itself.
//
// Each lane (lane = 4 g + t, g = lane / 4 its group, t = lane % 4) holds the fragments the PTX ISA
// documents for mma.sync (".row.col", float32 accumulators):
//   mma_16816: m16n8k16, float16 operands (two halves a register, the lower half first)
//     A (16 x 16):  a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//     B (16 x 8, indexed [k][n]):  b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   mma_1688_tf32: m16n8k8, TF32 operands (one a register: a float32 whose 13 low bits are zero)
//     A (16 x 8):  a[0] = A[g][t]   a[1] = A[g+8][t]   a[2] = A[g][t+4]   a[3] = A[g+8][t+4]
//     B (8 x 8, indexed [k][n]):  b[0] = B[t][g]   b[1] = B[t+4][g]
//   both: C, D (16 x 8, float32):  d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
#pragma once

#ifndef NPLLAMA_CPU_EMULATION
// d += a b: one warp's 16 x 16 (a) by 16 x 8 (b) product, float16 operands, float32 accumulation
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a b: one warp's 16 x 8 (a) by 8 x 8 (b) product, TF32 operands, float32 accumulation
__device__ __forceinline__ void mma_1688_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// x rounded to TF32 (10 fraction bits: to nearest, ties away from zero, as cvt.rna does), held as
// the float32 whose 13 low bits are zero, so it is one exact value whatever reads it
__device__ __forceinline__ float float_to_tf32(float x) {
  unsigned bits;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(x));
  return __uint_as_float(bits & 0xffffe000u);
}
#endif
