// SwiGLU, forward and backward, one pass each: npllama/ops/swiglu.py's arithmetic in one kernel, so
// that the chain of a dozen elementwise array operations (each a kernel, each a temporary) is one
// read of the inputs and one write of the outputs. For each element, in the compute type (float for
// float32 and float16, double for float64), each result rounded to the storage type once:
//     s = 1 / (1 + exp(-a))        y = (a s) b
//     db = (dy a) s                da = ((dy b) s) (1 + a (1 - s))
// the array code's operations in its order, each rounded once (rounded.cuh keeps the GPU from
// fusing a multiply with an add); only exp may differ from NumPy's by its last bits.
// float16 travels as its bits (storage.cuh). One thread per element; no shared memory. CuPy
// compiles with -ftz=true, so on the GPU a float32 subnormal flushes to zero: the numbers are the
// array code's where no value is subnormal.

#include "rounded.cuh"
#include "storage.cuh"

namespace npllama {

constexpr int kSwigluThreads = 256;

// s = 1 / (1 + exp(-a)); exp(-a) overflows to inf for a large negative a, and 1 / inf = 0 is the limit
__device__ __forceinline__ float sigmoid(float a) { return divide(1.0f, add(1.0f, expf(-a))); }
__device__ __forceinline__ double sigmoid(double a) { return divide(1.0, add(1.0, exp(-a))); }

template <typename T>
__global__ void __launch_bounds__(kSwigluThreads)
swiglu_forward(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, long long n) {
  using C = Compute<T>;
  const long long i = static_cast<long long>(blockIdx.x) * kSwigluThreads + threadIdx.x;
  if (i >= n) return;
  const C a_i = widen(a[i]), s = sigmoid(a_i);
  y[i] = narrow(multiply(multiply(a_i, s), widen(b[i])), T());
}

template <typename T>
__global__ void __launch_bounds__(kSwigluThreads)
swiglu_backward(const T* __restrict__ dy, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ da,
                T* __restrict__ db, long long n) {
  using C = Compute<T>;
  const long long i = static_cast<long long>(blockIdx.x) * kSwigluThreads + threadIdx.x;
  if (i >= n) return;
  const C dy_i = widen(dy[i]), a_i = widen(a[i]), b_i = widen(b[i]), s = sigmoid(a_i);
  // forward was: y = a s b, s = sigmoid(a), ds/da = s (1 - s)
  // so dy/db = a s  and  dy/da = b s (1 + a (1 - s))
  db[i] = narrow(multiply(multiply(dy_i, a_i), s), T());
  const C slope = add(C(1), multiply(a_i, subtract(C(1), s)));
  da[i] = narrow(multiply(multiply(multiply(dy_i, b_i), s), slope), T());
}

}  // namespace npllama
