// Rotary position embedding, forward and backward in one kernel: npllama/ops/rope.py's rotation of
// each interleaved pair, one read of x and one write of y, where the array code gathers the even and
// odd halves, widens them, forms four products and two sums, each an array of its own. In the
// compute type (float for float32 and float16, double for float64), each result rounded once:
//     forward:   y[2i]   = x[2i] cos - x[2i+1] sin        y[2i+1] = x[2i] sin + x[2i+1] cos
//     backward:  the same with sin negated (a rotation's transpose is its inverse), which is exact
// the array code's operations in its order, each rounded once (rounded.cuh): NumPy's bits (on the
// GPU, where no value is subnormal: CuPy compiles with -ftz=true). x (B, T, H, D) is read through
// its strides, so the backward takes attention's (B, H, T, D) gradient transposed without a copy;
// y is written contiguous. cos and sin are the (T, D/2) tables, in the compute type. One thread a
// pair; no shared memory.

#include "rounded.cuh"
#include "storage.cuh"

namespace npllama {

constexpr int kRopeThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kRopeThreads)
rope_rotate(const T* __restrict__ x, long long stride_b, long long stride_t, long long stride_h, long long stride_d,
            const Compute<T>* __restrict__ cos_table, const Compute<T>* __restrict__ sin_table, T* __restrict__ y,
            int batch, int seq, int heads, int half, int inverse) {
  using C = Compute<T>;
  const long long pair = static_cast<long long>(blockIdx.x) * kRopeThreads + threadIdx.x;
  if (pair >= static_cast<long long>(batch) * seq * heads * half) return;
  const int i = static_cast<int>(pair % half);
  const long long row = pair / half;  // (b, t, h) in y's order
  const int h = static_cast<int>(row % heads), t = static_cast<int>((row / heads) % seq);
  const long long b = row / heads / seq;
  const T* at = x + b * stride_b + t * stride_t + h * stride_h + 2 * i * stride_d;
  const C even = widen(at[0]), odd = widen(at[stride_d]);
  const long long angle = static_cast<long long>(t) * half + i;
  const C c = cos_table[angle], s_forward = sin_table[angle];
  const C s = inverse ? -s_forward : s_forward;
  y[2 * pair] = narrow(subtract(multiply(even, c), multiply(odd, s)), T());
  y[2 * pair + 1] = narrow(add(multiply(even, s), multiply(odd, c)), T());
}

}  // namespace npllama
