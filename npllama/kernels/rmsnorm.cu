// RMSNorm, forward and backward: npllama/ops/rmsnorm.py's arithmetic in a few kernels, each reading
// its rows once or twice from memory, where the array code runs a dozen array operations with their
// temporaries. In the compute type (float for float32 and float16, double for float64), each result
// rounded to the storage type once (storage.cuh):
//     forward, one warp a row:       r = 1 / sqrt(sum_c(x_c x_c) / C + eps)
//                                    xhat_c = x_c r        y_c = xhat_c g_c
//     backward, one warp a row:      p = sum_c((dy_c g_c) xhat_c) / C
//                                    dx_c = r ((dy_c g_c) - xhat_c p)
//     the gain's gradient, by columns: dg_c = sum over rows of dy_c xhat_c, in two kernels: each
//                                    block of rows adds its part (in row order), then one thread a
//                                    column adds the parts (in block order)
// The array code's operations in its order, each rounded once (rounded.cuh); only the order of the
// sums differs: a lane adds every 32nd column in turn and the warp's 32 sums meet in a butterfly
// (every lane ends with the same bits), where NumPy sums in its own pairwise order. No atomics: every
// sum has one fixed order, so the kernels are bitwise deterministic. y and xhat are both written
// (the array code's cache keeps xhat, in x's dtype); r is kept in the compute type. CuPy compiles
// with -ftz=true, so on the GPU a float32 subnormal flushes to zero.

#include "rounded.cuh"
#include "storage.cuh"

namespace npllama {

constexpr int kRmsnormThreads = 256;
constexpr int kWarp = 32;
constexpr int kRowsPerBlock = kRmsnormThreads / kWarp;

// The sum of x over the 32 lanes of a warp, the same bits in every lane; every lane must take part.
template <typename C>
__device__ __forceinline__ C warp_sum(C x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = add(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kRmsnormThreads)
rmsnorm_forward(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ y, T* __restrict__ xhat,
                Compute<T>* __restrict__ rstd, int rows, int cols, Compute<T> eps) {
  using C = Compute<T>;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (row >= rows) return;  // the whole warp: its shuffles need every lane
  const long long start = static_cast<long long>(row) * cols;
  C sum_squares = 0;
  for (int c = lane; c < cols; c += kWarp) {
    const C x_c = widen(x[start + c]);
    sum_squares = add(sum_squares, multiply(x_c, x_c));
  }
  sum_squares = warp_sum(sum_squares);
  const C r = divide(C(1), square_root(add(divide(sum_squares, C(cols)), eps)));
  if (lane == 0) rstd[row] = r;
  for (int c = lane; c < cols; c += kWarp) {
    const C xhat_c = multiply(widen(x[start + c]), r);
    xhat[start + c] = narrow(xhat_c, T());
    y[start + c] = narrow(multiply(xhat_c, widen(weight[c])), T());
  }
}

template <typename T>
__global__ void __launch_bounds__(kRmsnormThreads)
rmsnorm_backward(const T* __restrict__ dy, const T* __restrict__ xhat, const T* __restrict__ weight,
                 const Compute<T>* __restrict__ rstd, T* __restrict__ dx, int rows, int cols) {
  using C = Compute<T>;
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (row >= rows) return;
  const long long start = static_cast<long long>(row) * cols;
  // forward was: y = xhat g, so dxhat = dy g
  // and xhat = x r with r = (mean(x^2) + eps)^(-1/2), so dx = r (dxhat - xhat mean(dxhat xhat))
  C projection = 0;
  for (int c = lane; c < cols; c += kWarp) {
    const C dxhat_c = multiply(widen(dy[start + c]), widen(weight[c]));
    projection = add(projection, multiply(dxhat_c, widen(xhat[start + c])));
  }
  projection = divide(warp_sum(projection), C(cols));
  const C r = rstd[row];
  for (int c = lane; c < cols; c += kWarp) {
    const C dxhat_c = multiply(widen(dy[start + c]), widen(weight[c])), xhat_c = widen(xhat[start + c]);
    dx[start + c] = narrow(multiply(r, subtract(dxhat_c, multiply(xhat_c, projection))), T());
  }
}

// dg's first half: partial[b][c] = the sum over the rows of block b (rows_per_block of them, the last
// block fewer) of dy_c xhat_c, one thread a column, rows in order. Grid (column blocks, row blocks).
template <typename T>
__global__ void __launch_bounds__(kRmsnormThreads)
rmsnorm_weight_grad_partial(const T* __restrict__ dy, const T* __restrict__ xhat, Compute<T>* __restrict__ partial,
                            int rows, int cols, int rows_per_block) {
  using C = Compute<T>;
  const int c = blockIdx.x * kRmsnormThreads + threadIdx.x;
  if (c >= cols) return;
  const int first = blockIdx.y * rows_per_block, last = rows - first < rows_per_block ? rows : first + rows_per_block;
  C sum = 0;
  for (int row = first; row < last; ++row) {
    const long long at = static_cast<long long>(row) * cols + c;
    sum = add(sum, multiply(widen(dy[at]), widen(xhat[at])));
  }
  partial[static_cast<long long>(blockIdx.y) * cols + c] = sum;
}

// dg's second half: dg_c = the sum of partial[b][c] over the row blocks b in order, rounded once.
template <typename T>
__global__ void __launch_bounds__(kRmsnormThreads)
rmsnorm_weight_grad_sum(const Compute<T>* __restrict__ partial, T* __restrict__ dweight, int row_blocks, int cols) {
  using C = Compute<T>;
  const int c = blockIdx.x * kRmsnormThreads + threadIdx.x;
  if (c >= cols) return;
  C sum = 0;
  for (int b = 0; b < row_blocks; ++b) sum = add(sum, partial[static_cast<long long>(b) * cols + c]);
  dweight[c] = narrow(sum, T());
}

}  // namespace npllama
