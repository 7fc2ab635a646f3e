// Cross-entropy of the output head's logits, forward and backward, a block a row: npllama/ops/
// cross_entropy.py's arithmetic, where the array code runs an argmax, two gathers, a subtraction,
// an exp, a sum, a log1p and as many passes again backward, each over the (rows, V) logits. In the
// compute type C (float for float32 and float16, double for float64), each result rounded once:
//     forward:   a = argmax_v z_v (the first of equal maxima; a NaN is larger than any number, as
//                NumPy's argmax has it),  m = z_a
//                e_v = exp(z_v - m) for v != a, e_a = 1 (kept: backward turns it into dz)
//                rest = sum over v != a of e_v
//                nll = (m - z_t) + log1p(rest) on a counted row, 0 on an ignored one
//     backward:  s = counted ? dy / N' : 0 (given as one C on the device: no host round trip)
//                dz_v = e_v (s / (1 + rest)), and at v = t:
//                dz_t = ((-rest) s) / (1 + rest) when t = a (no cancellation), else dz_t - s
//                an ignored row is 0 (its logits may be inf or nan)
// The array code's operations in its order; the sum runs in its own order (a thread every
// THREADS-th entry, then a butterfly in each warp, then the warps' sums in warp order), and exp and
// log1p are CUDA's, so the numbers are within a few units of NumPy's, and bitwise the same run to
// run: no atomics. A target outside [0, V) on a counted row (model.py checks them on the host)
// gives a NaN loss and a NaN gradient row, never a read outside the logits. CuPy compiles with
// -ftz=true, which flushes float32 subnormals in comparisons too: in a row whose largest logits are
// subnormal, two of them may compare equal (the first then wins), where NumPy picks the larger.

#include "rounded.cuh"
#include "storage.cuh"

#ifndef NPLLAMA_CPU_EMULATION
#define NPLLAMA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace npllama {

constexpr int kCrossEntropyThreads = 256;
constexpr int kCrossEntropyWarps = kCrossEntropyThreads / 32;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log1p_of(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_of(double x) { return log1p(x); }
__device__ __forceinline__ float not_a_number(float) { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double not_a_number(double) { return __longlong_as_double(0x7ff8000000000000LL); }

// Whether (value, index) comes before (best, best_index) in argmax's order: NaN first, then larger
// values, then, among equal ones, the smaller index. A total order, so the butterfly below gives
// every lane the same winner.
template <typename C>
__device__ __forceinline__ bool beats(C value, int index, C best, int best_index) {
  const bool value_nan = value != value, best_nan = best != best;
  if (value_nan || best_nan) return value_nan && (!best_nan || index < best_index);
  return value > best || (value == best && index < best_index);
}

// The block's argmax of (value, index), every thread getting it; scratch holds kCrossEntropyWarps of
// each. Every thread of the block must call it.
template <typename C>
__device__ void block_argmax(C& value, int& index, C* scratch_values, int* scratch_indices) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const C other = __shfl_xor_sync(0xffffffffu, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (beats(other, other_index, value, index)) {
      value = other;
      index = other_index;
    }
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    scratch_values[warp] = value;
    scratch_indices[warp] = index;
  }
  __syncthreads();
  value = scratch_values[0];
  index = scratch_indices[0];
  for (int w = 1; w < kCrossEntropyWarps; ++w) {
    if (beats(scratch_values[w], scratch_indices[w], value, index)) {
      value = scratch_values[w];
      index = scratch_indices[w];
    }
  }
  __syncthreads();  // before the scratch is written again
}

// The block's sum of x, in one fixed order, every thread getting the same bits.
template <typename C>
__device__ C block_sum(C x, C* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) x = add(x, __shfl_xor_sync(0xffffffffu, x, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  C total = scratch[0];
  for (int w = 1; w < kCrossEntropyWarps; ++w) total = add(total, scratch[w]);
  __syncthreads();
  return total;
}

// Grid (rows); dynamic shared memory: kCrossEntropyWarps of C, then as many ints.
template <typename T>
__global__ void __launch_bounds__(kCrossEntropyThreads)
cross_entropy_forward(const T* __restrict__ logits, const long long* __restrict__ targets,
                      const int* __restrict__ counted, Compute<T>* __restrict__ exps, Compute<T>* __restrict__ rest,
                      long long* __restrict__ argmax, Compute<T>* __restrict__ nll, int vocab) {
  using C = Compute<T>;
  NPLLAMA_DYNAMIC_SHARED(shared);
  C* scratch_values = reinterpret_cast<C*>(shared);
  int* scratch_indices = reinterpret_cast<int*>(shared + kCrossEntropyWarps * sizeof(C));
  const long long start = static_cast<long long>(blockIdx.x) * vocab;
  const int first = static_cast<int>(threadIdx.x);
  int best_index = first < vocab ? first : 0;  // a thread past the row starts from entry 0, which is in it
  C best = widen(logits[start + best_index]);
  for (int v = first + kCrossEntropyThreads; v < vocab; v += kCrossEntropyThreads) {
    const C z = widen(logits[start + v]);
    if (beats(z, v, best, best_index)) {
      best = z;
      best_index = v;
    }
  }
  block_argmax(best, best_index, scratch_values, scratch_indices);
  const C m = best;
  C sum = 0;
  for (int v = first; v < vocab; v += kCrossEntropyThreads) {
    const C e = exp_of(subtract(widen(logits[start + v]), m));
    exps[start + v] = v == best_index ? C(1) : e;
    if (v != best_index) sum = add(sum, e);
  }
  sum = block_sum(sum, scratch_values);
  if (threadIdx.x == 0) {
    const long long target = targets[blockIdx.x];
    rest[blockIdx.x] = sum;
    argmax[blockIdx.x] = best_index;
    if (!counted[blockIdx.x])
      nll[blockIdx.x] = C(0);
    else if (target < 0 || target >= vocab)
      nll[blockIdx.x] = not_a_number(C());
    else
      nll[blockIdx.x] = add(subtract(m, widen(logits[start + target])), log1p_of(sum));
  }
}

// Grid (rows). exps and dlogits may be one buffer (float32 and float64: dz is written over e in
// place, as the array code does); each entry is read and then written by one thread.
template <typename T>
__global__ void __launch_bounds__(kCrossEntropyThreads)
cross_entropy_backward(const Compute<T>* exps, const Compute<T>* __restrict__ rest,
                       const long long* __restrict__ argmax, const long long* __restrict__ targets,
                       const int* __restrict__ counted, const Compute<T>* __restrict__ scale, T* dlogits, int vocab) {
  using C = Compute<T>;
  const long long start = static_cast<long long>(blockIdx.x) * vocab, target = targets[blockIdx.x];
  if (!counted[blockIdx.x]) {  // forward was: nll = 0 on an ignored row, so its gradient is 0
    for (int v = static_cast<int>(threadIdx.x); v < vocab; v += kCrossEntropyThreads) dlogits[start + v] = narrow(C(0), T());
    return;
  }
  // forward was: loss = (1/N') sum_n (lse_n - z[n, t_n]), d lse_n / d z[n, v] = e_v / (1 + rest_n)
  // so dz_v = (dy / N') (e_v / (1 + rest) - [v == t])
  const C s = *scale, r = rest[blockIdx.x], one_plus_rest = add(C(1), r), factor = divide(s, one_plus_rest);
  const bool target_is_argmax = target == argmax[blockIdx.x], bad_target = target < 0 || target >= vocab;
  for (int v = static_cast<int>(threadIdx.x); v < vocab; v += kCrossEntropyThreads) {
    C dz = multiply(exps[start + v], factor);
    if (v == target) dz = target_is_argmax ? divide(multiply(-r, s), one_plus_rest) : subtract(dz, s);
    if (bad_target) dz = not_a_number(C());
    dlogits[start + v] = narrow(dz, T());
  }
}

}  // namespace npllama
