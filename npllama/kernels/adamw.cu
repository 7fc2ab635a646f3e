// AdamW's update of one parameter in one pass, one thread per element: the operations of
// npllama.optim's array code, in its order, each rounded once as NumPy rounds it (the *_rn
// intrinsics: no multiply-add is fused), so the float32 and float64 updates are NumPy's bits
// (CuPy compiles with -ftz=true: values below the smallest normal number flush to zero here, where
// NumPy keeps them). The array code makes a dozen passes over the parameter; this one reads p, m,
// v, g once and writes p, m, v once.
//
// With the scalars the caller rounds to T from optim.AdamWCoefficients:
//     m = m beta1 + g g_scale                        g_scale = (1 - beta1) clip
//     v = v beta2 + (g g) g2_scale                   g2_scale = (1 - beta2) clip^2
//     p = p decay - (m / (sqrt(v inv_bias2) + eps)) step_size
//                                                    decay = 1 - lr wd (1: not decayed), inv_bias2 =
//                                                    1 / (1 - beta2^t), step_size = lr / (1 - beta1^t)
// Shapes: p, m, v, g (n,), contiguous, one dtype.

#include "rounded.cuh"

namespace npllama {

template <typename T>
__global__ void adamw_update(T* __restrict__ p, T* __restrict__ m, T* __restrict__ v, const T* __restrict__ g,
                             long long n, T beta1, T beta2, T g_scale, T g2_scale, T decay, T inv_bias2, T eps,
                             T step_size) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T gradient = g[i];
  // m = beta1 m + (1 - beta1) c g
  const T first = add(multiply(m[i], beta1), multiply(gradient, g_scale));
  // v = beta2 v + (1 - beta2) (c g)^2
  const T second = add(multiply(v[i], beta2), multiply(multiply(gradient, gradient), g2_scale));
  // p = p (1 - lr wd) - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
  const T denominator = add(square_root(multiply(second, inv_bias2)), eps);
  p[i] = subtract(multiply(p[i], decay), multiply(divide(first, denominator), step_size));
  m[i] = first;
  v[i] = second;
}

}  // namespace npllama
