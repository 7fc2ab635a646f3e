// Small CUDA kernels that test the CPU harness itself (tests/test_kernel_harness.py). They are
// written as for the GPU, and use what npllama's kernels use: dynamic shared memory,
// __syncthreads, __shfl_xor_sync, templates on the element type.

#ifndef NPLLAMA_CPU_EMULATION
#define NPLLAMA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace sample {

__device__ __forceinline__ unsigned linear_thread() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}

__device__ __forceinline__ unsigned linear_block() {
    return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}

// The sum over the 32 lanes of a warp; every lane gets it.
template <class T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
    for (int lane_mask = 16; lane_mask > 0; lane_mask /= 2) value += __shfl_xor_sync(0xFFFFFFFFu, value, lane_mask);
    return value;
}

// out[b] = the sum of row b of `in` (rows of n elements), for each block b of the grid. The block
// may have any shape of up to 1024 threads, a multiple of 32; its dynamic shared memory holds one
// T per warp.
template <class T>
__global__ void __launch_bounds__(1024) block_sum(const T* __restrict__ in, T* __restrict__ out, int n) {
    NPLLAMA_DYNAMIC_SHARED(shared);
    T* warp_sums = reinterpret_cast<T*>(shared);
    const unsigned thread = linear_thread();
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    const T* row = in + static_cast<long long>(linear_block()) * n;

    T partial = 0;
    for (int i = static_cast<int>(thread); i < n; i += static_cast<int>(threads)) partial += row[i];
    partial = warp_sum(partial);
    if (thread % 32 == 0) warp_sums[thread / 32] = partial;
    __syncthreads();  // the warp sums are written before warp 0 reads them
    if (thread < 32) {
        T total = thread < threads / 32 ? warp_sums[thread] : T(0);
        total = warp_sum(total);
        if (thread == 0) out[linear_block()] = total;
    }
}

// data[i] *= factor for the n elements; one thread per element.
template <class T>
__global__ void scale(T* data, T factor, int n) {
    const int i = static_cast<int>(linear_block() * blockDim.x * blockDim.y * blockDim.z + linear_thread());
    if (i < n) data[i] *= factor;
}

// out[b * threads + t] = what thread t of block b finds in shared memory before anything wrote
// there; then it writes there, which the next block must not see.
template <class T>
__global__ void read_shared_before_write(T* out) {
    NPLLAMA_DYNAMIC_SHARED(shared);
    T* values = reinterpret_cast<T*>(shared);
    const unsigned thread = linear_thread();
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    out[linear_block() * threads + thread] = values[thread];
    __syncthreads();
    values[thread] = T(1);
}

// Never returns while *flag is 0.
__global__ void spin_forever(const int* flag) {
    while (*static_cast<const volatile int*>(flag) == 0) {
    }
}

// Thread 0 skips the barrier the others wait at: a hang.
__global__ void divergent_syncthreads() {
    if (linear_thread() != 0) __syncthreads();
}

}  // namespace sample
