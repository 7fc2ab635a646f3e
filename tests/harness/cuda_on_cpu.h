// cuda_on_cpu.h: just enough of CUDA to run our kernel sources (.cu) on the CPU, one real
// std::thread per CUDA thread, so that the sanitizers (AddressSanitizer + UBSan, ThreadSanitizer)
// can check them in CI without a GPU.
//
// It emulates exactly what npllama's kernels use, nothing more:
//   - the qualifiers __global__, __device__, __forceinline__, __launch_bounds__(n) (g++ knows
//     __restrict__ itself), and `#pragma unroll` (compile with -Wno-unknown-pragmas);
//   - threadIdx, blockIdx, blockDim, gridDim, and the vector type uint4;
//   - __syncthreads() and __shfl_xor_sync(mask, value, lane_mask) for float, double and int;
//   - dynamic shared memory, declared in a kernel body as NPLLAMA_DYNAMIC_SHARED(name);
//   - expf, exp, logf, log, fmaxf, fminf, sqrtf, INFINITY, with the float overloads for floats;
//   - __int_as_float and __longlong_as_double;
//   - the round-to-nearest arithmetic intrinsics __f{mul,add,sub,div,sqrt}_rn and __d{...}_rn (one
//     IEEE operation each, never fused: on the CPU every float and double operation is that);
//   - __int_as_float, __float_as_uint, __uint_as_float and __longlong_as_double;
//   - npllama/kernels/float16.cuh and tensor_cores.cuh, which are inline PTX on the GPU:
//     float_to_half (round to nearest even) and half_to_float, float16 held as its 16 bits;
//     float_to_tf32 (round to nearest, ties away from zero, to 10 fraction bits); mma_16816 and
//     mma_1688_tf32 (one warp's mma.sync.m16n8k16 with float16 operands and mma.sync.m16n8k8 with
//     TF32 operands, float32 accumulators, in the PTX ISA's fragment layouts).
//
// Execution model: the blocks of a grid run one after another (blockIdx.x fastest, then y, then
// z); the threads of a block run concurrently, one std::thread each, so a missing __syncthreads is
// a real data race that ThreadSanitizer sees, and a divergent one is a real hang that the
// harness's watchdog reports. The same blockDim threads serve every block of the grid.
//
// What a GPU would do differently and the emulation does not try to copy: warps are not run in
// lockstep (code that relies on implicit warp-synchronous execution races here, as it should
// under the CUDA memory model), and shared memory starts as 0xFF bytes (NaN) in every block, where
// a GPU leaves whatever the previous block wrote.
#pragma once

#ifndef NPLLAMA_CPU_EMULATION
#error "cuda_on_cpu.h is the CPU emulation of CUDA: compile with -DNPLLAMA_CPU_EMULATION"
#endif

#include <algorithm>
#include <array>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <latch>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#include <pthread.h>
#include <signal.h>

// ---------------------------------------------------------------------------------------------
// Qualifiers. Every function is an ordinary host function here; a kernel is a plain function that
// each emulated thread calls.
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---------------------------------------------------------------------------------------------
// Math. <cmath> puts expf, logf, fmaxf, fminf, sqrtf and INFINITY in the global namespace, but
// there `exp` and `log` are only the C functions on double: exp(a_float) would compute in double
// and round, which is not what the GPU does (CUDA has float overloads of exp and log). Bring the
// C++ overloads in, so that exp(float) is std::exp(float) as on the GPU.
using std::exp;
using std::log;
static_assert(std::is_same_v<decltype(exp(1.0f)), float> && std::is_same_v<decltype(log(1.0f)), float>,
              "exp and log of a float must be the float overloads, as on the GPU");

// Reinterpreting bits, as the CUDA intrinsics do (attention.cu spells -inf this way, since NVRTC
// compiles without the host headers that define INFINITY).
inline float __int_as_float(int bits) { return std::bit_cast<float>(bits); }
inline unsigned __float_as_uint(float value) { return std::bit_cast<unsigned>(value); }
inline float __uint_as_float(unsigned bits) { return std::bit_cast<float>(bits); }
inline double __longlong_as_double(long long bits) { return std::bit_cast<double>(bits); }

// One IEEE operation, rounded to nearest, as the *_rn intrinsics promise: the harness compiles with
// -ffp-contract=off, so no multiply is fused with an add and the plain operators are exactly these.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }

// ---------------------------------------------------------------------------------------------
// The built-in index variables. CUDA's are uint3 / dim3; one struct of three unsigned ints does
// for both. Each emulated thread has its own copy (thread_local), set before it runs the kernel.
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

// CUDA's 16-byte vector of four unsigned ints, as aligned as on the GPU (a kernel that reads one
// from an address not a multiple of 16 is reported by UBSan's alignment check)
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace cuda_on_cpu {

constexpr unsigned warp_size = 32;
constexpr std::size_t shared_alignment = 16;  // what __align__(16) gives the .cu's declaration

// Ends the process with a message. Used for misuse of the emulation inside a kernel thread,
// where throwing would only reach std::terminate anyway.
[[noreturn]] inline void die(const std::string& message) {
    std::fprintf(stderr, "harness: %s\n", message.c_str());
    std::fflush(stderr);
    std::_Exit(71);
}

inline std::string hex(unsigned value) {
    char text[16];
    std::snprintf(text, sizeof text, "0x%08X", value);
    return text;
}

// A warp: its lanes meet at `barrier` to exchange values through `slots` (one per lane, wide
// enough for a double).
struct Warp {
    explicit Warp(unsigned lanes) : lanes(lanes), barrier(lanes) {}
    const unsigned lanes;  // 32, or fewer in the last warp of a block whose size is not a multiple of 32
    std::barrier<> barrier;
    std::array<std::uint64_t, warp_size> slots{};
    std::array<std::array<std::uint32_t, 6>, warp_size> fragments{};  // each lane's a[4], b[2] for an mma
};

// Sets a block's shared memory to 0xFF bytes: NaN for float and double, -1 for int. Run between
// blocks, by the last thread to arrive at the barrier that separates them.
struct RefillShared {
    unsigned char* memory;
    std::size_t bytes;
    void operator()() noexcept { std::memset(memory, 0xFF, bytes); }
};

// What the threads of the block now running share: the shared memory, the barrier behind
// __syncthreads, the warps, and the barrier the threads meet at between two blocks.
struct Block {
    Block(unsigned threads, std::size_t shared_bytes)
        : threads(threads),
          shared_bytes(shared_bytes),
          // A heap buffer of exactly shared_bytes bytes, so that AddressSanitizer reports a kernel
          // that reaches past the dynamic shared memory its launch asked for.
          shared(static_cast<unsigned char*>(::operator new(shared_bytes, std::align_val_t{shared_alignment}))),
          syncthreads(threads),
          between_blocks(threads, RefillShared{shared, shared_bytes}) {
        for (unsigned first = 0; first < threads; first += warp_size)
            warps.push_back(std::make_unique<Warp>(std::min(warp_size, threads - first)));
        RefillShared{shared, shared_bytes}();
    }
    ~Block() { ::operator delete(shared, std::align_val_t{shared_alignment}); }
    Block(const Block&) = delete;
    Block& operator=(const Block&) = delete;

    const unsigned threads;
    const std::size_t shared_bytes;
    unsigned char* const shared;
    std::barrier<> syncthreads;
    std::vector<std::unique_ptr<Warp>> warps;
    // A separate barrier from __syncthreads's: a thread that returns early from the kernel must
    // not stand in for a __syncthreads the others are waiting at. (CUDA leaves a __syncthreads
    // that not every thread reaches undefined; here it hangs, and the watchdog says so.)
    std::barrier<RefillShared> between_blocks;
};

// The emulated thread's place: its block, and its linear index within the block.
inline thread_local Block* this_block = nullptr;
inline thread_local unsigned this_thread_linear = 0;

inline Block& current_block(const char* what) {
    if (this_block == nullptr)
        die(std::string(what) + " used outside a kernel launch (at namespace scope, or from the harness itself)");
    return *this_block;
}

inline unsigned char* dynamic_shared_memory() { return current_block("NPLLAMA_DYNAMIC_SHARED").shared; }

// The launch configuration of one kernel launch.
struct LaunchConfig {
    dim3 grid;
    dim3 block;
    std::size_t shared_bytes = 0;
};

// Runs `body` (which calls the kernel with its arguments) as each thread of each block of the
// grid. Blocks run in order, blockIdx.x fastest; a block's threads run concurrently.
template <class Body>
void launch(const LaunchConfig& config, const Body& body) {
    const unsigned threads = config.block.x * config.block.y * config.block.z;
    Block block(threads, config.shared_bytes);

    // All threads start the kernel together, once all exist: a thread that started early would run
    // alone (until its first __syncthreads) while the launching thread still creates the others.
    std::latch all_started(threads);

    auto run_thread = [&](unsigned linear) {
        all_started.arrive_and_wait();
        threadIdx = dim3{linear % config.block.x, (linear / config.block.x) % config.block.y,
                         linear / (config.block.x * config.block.y)};
        blockDim = config.block;
        gridDim = config.grid;
        this_block = &block;
        this_thread_linear = linear;
        try {
            for (unsigned z = 0; z < config.grid.z; ++z)
                for (unsigned y = 0; y < config.grid.y; ++y)
                    for (unsigned x = 0; x < config.grid.x; ++x) {
                        blockIdx = dim3{x, y, z};
                        body();
                        block.between_blocks.arrive_and_wait();
                    }
        } catch (const std::exception& error) {
            die(std::string("a kernel thread threw: ") + error.what());
        } catch (...) {
            die("a kernel thread threw something that is not a std::exception");
        }
        this_block = nullptr;
    };

    // The kernel threads keep SIGALRM blocked, so that the watchdog's alarm is delivered to this
    // (the launching) thread, which waits in join(). A thread spinning in a kernel may never reach
    // a point where ThreadSanitizer would run a signal handler it deferred.
    sigset_t alarm_only, previous;
    sigemptyset(&alarm_only);
    sigaddset(&alarm_only, SIGALRM);
    pthread_sigmask(SIG_BLOCK, &alarm_only, &previous);
    std::vector<std::thread> workers;
    workers.reserve(threads);
    try {
        for (unsigned linear = 0; linear < threads; ++linear) workers.emplace_back(run_thread, linear);
    } catch (const std::system_error& error) {
        die("cannot start " + std::to_string(threads) + " threads for one block: " + error.what());
    }
    pthread_sigmask(SIG_SETMASK, &previous, nullptr);
    for (std::thread& worker : workers) worker.join();
}

}  // namespace cuda_on_cpu

// ---------------------------------------------------------------------------------------------
// Block-wide barrier: every thread of the block waits until all have arrived.
inline void __syncthreads() { cuda_on_cpu::current_block("__syncthreads").syncthreads.arrive_and_wait(); }

// Butterfly shuffle within a warp: returns `value` as held by lane (this lane ^ lane_mask). Each
// lane writes its value to its slot, the warp meets, each reads its partner's slot, and the warp
// meets again before a slot can be overwritten by the next shuffle. As on the GPU, a lane whose
// partner lies beyond its group of `width` lanes gets its own value back. Every lane of the warp
// must call it together (mask = all of them), as our kernels do.
template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int>,
                  "the emulated __shfl_xor_sync takes float, double or int");
    using namespace cuda_on_cpu;
    Block& block = current_block("__shfl_xor_sync");
    const unsigned lane = this_thread_linear % warp_size;
    Warp& warp = *block.warps[this_thread_linear / warp_size];
    const unsigned all_lanes = warp.lanes == warp_size ? 0xFFFFFFFFu : (1u << warp.lanes) - 1;
    if ((mask & all_lanes) != all_lanes)
        die("__shfl_xor_sync with mask " + hex(mask) + " in a warp of " + std::to_string(warp.lanes) +
            " lanes: the emulation supports only shuffles that every lane of the warp takes part in");
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
        die("__shfl_xor_sync with width " + std::to_string(width) + ": must be a power of 2 up to 32");

    std::memcpy(&warp.slots[lane], &value, sizeof(T));
    warp.barrier.arrive_and_wait();
    const unsigned source = lane ^ (static_cast<unsigned>(lane_mask) & (warp_size - 1));
    const unsigned last_of_group = (lane & ~static_cast<unsigned>(width - 1)) + static_cast<unsigned>(width) - 1;
    T result = value;
    if (source <= last_of_group && source < warp.lanes) std::memcpy(&result, &warp.slots[source], sizeof(T));
    warp.barrier.arrive_and_wait();
    return result;
}

// float32 to float16 bits, rounded to nearest even (as cvt.rn.f16.f32): g++'s _Float16 conversion.
inline unsigned short float_to_half(float value) { return std::bit_cast<unsigned short>(static_cast<_Float16>(value)); }

// float16 bits to float32: exact
inline float half_to_float(unsigned short bits) { return static_cast<float>(std::bit_cast<_Float16>(bits)); }

inline float half_bits_to_float(std::uint32_t bits) { return half_to_float(static_cast<unsigned short>(bits & 0xFFFFu)); }

// float32 to TF32 (as cvt.rna.tf32.f32 followed by clearing the 13 low bits, tensor_cores.cuh): to
// nearest with ties away from zero, by adding half of the dropped part's unit to the magnitude's
// bits (a carry into the exponent is the next binade, or infinity, as it should be). NaN stays NaN.
inline float float_to_tf32(float value) {
    const std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
    if ((bits & 0x7F800000u) == 0x7F800000u)  // infinity or NaN
        return std::bit_cast<float>((bits & 0x007FFFFFu) ? 0x7FFFE000u : bits);
    return std::bit_cast<float>((bits + 0x1000u) & 0xFFFFE000u);
}

namespace cuda_on_cpu {
// d += A B for the warp's 16 x K A and K x 8 B: each lane writes its a and b to the warp's scratch,
// the warp meets, each lane computes its four entries of D, d[0], d[1] = D[g][2t, 2t+1] and d[2],
// d[3] = D[g+8][2t, 2t+1] (lane = 4 g + t), from A[row][k] = a_at(registers, row, k) and
// B[k][col] = b_at(registers, k, col) (the operands' products are exact in float32; they are added
// in k order, which the hardware's own order and rounding need not match), and the warp meets again
// before the scratch is reused. Every lane of the warp must take part, as on the GPU.
template <unsigned K, class AAt, class BAt>
void warp_product(const char* what, float d[4], const unsigned a[4], const unsigned b[2], AAt a_at, BAt b_at) {
    Block& block = current_block(what);
    const unsigned lane = this_thread_linear % warp_size;
    Warp& warp = *block.warps[this_thread_linear / warp_size];
    if (warp.lanes != warp_size) die(std::string(what) + " in a warp of " + std::to_string(warp.lanes) + " lanes: needs 32");
    warp.fragments[lane] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    warp.barrier.arrive_and_wait();
    const unsigned g = lane / 4, t = lane % 4;
    float result[4];
    for (unsigned e = 0; e < 4; ++e) {
        const unsigned row = g + 8 * (e / 2), col = 2 * t + e % 2;
        float sum = d[e];
        for (unsigned k = 0; k < K; ++k) sum += a_at(warp.fragments, row, k) * b_at(warp.fragments, k, col);
        result[e] = sum;
    }
    warp.barrier.arrive_and_wait();
    for (unsigned e = 0; e < 4; ++e) d[e] = result[e];
}

using Fragments = std::array<std::array<std::uint32_t, 6>, warp_size>;

// A TF32 operand's value: its register as a float32, whose 13 low bits must be zero (what
// float_to_tf32 leaves). The instruction's reading of other bits is the hardware's own, so a kernel
// that hands it an unrounded float32 is refused here.
inline float tf32_operand(std::uint32_t bits) {
    if (bits & 0x1FFFu) die("mma_1688_tf32: an operand register holds " + hex(bits) + ", not a TF32 value (round it with float_to_tf32)");
    return std::bit_cast<float>(bits);
}
}  // namespace cuda_on_cpu

// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 with d as both c and d (tensor_cores.cuh's layouts):
//     a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//     b[0] = B[2t, 2t+1][g]  b[1] = B[2t+8, 2t+9][g]  (the lower 16 bits hold the first of the two)
inline void mma_16816(float d[4], const unsigned a[4], const unsigned b[2]) {
    using cuda_on_cpu::Fragments;
    auto a_at = [](const Fragments& f, unsigned row, unsigned k) {  // lane 4 (row % 8) + (k % 8) / 2
        return half_bits_to_float(f[4 * (row % 8) + (k % 8) / 2][(row / 8) + 2 * (k / 8)] >> (16 * (k % 2)));
    };
    auto b_at = [](const Fragments& f, unsigned k, unsigned col) {  // lane 4 col + (k % 8) / 2, register 4 + k / 8
        return half_bits_to_float(f[4 * col + (k % 8) / 2][4 + k / 8] >> (16 * (k % 2)));
    };
    cuda_on_cpu::warp_product<16>("mma_16816", d, a, b, a_at, b_at);
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 with d as both c and d (tensor_cores.cuh's layouts):
//     a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]     b[0] = B[t][g]  b[1] = B[t+4][g]
inline void mma_1688_tf32(float d[4], const unsigned a[4], const unsigned b[2]) {
    using cuda_on_cpu::Fragments;
    auto a_at = [](const Fragments& f, unsigned row, unsigned k) {  // lane 4 (row % 8) + k % 4
        return cuda_on_cpu::tf32_operand(f[4 * (row % 8) + k % 4][(row / 8) + 2 * (k / 4)]);
    };
    auto b_at = [](const Fragments& f, unsigned k, unsigned col) {  // lane 4 col + k % 4, register 4 + k / 4
        return cuda_on_cpu::tf32_operand(f[4 * col + k % 4][4 + k / 4]);
    };
    cuda_on_cpu::warp_product<8>("mma_1688_tf32", d, a, b, a_at, b_at);
}

// Dynamic shared memory. On the GPU the .cu declares
//     extern __shared__ __align__(16) unsigned char name[];
// here `name` points to this block's buffer: exactly the launch's shared_bytes, 16-byte aligned,
// filled with 0xFF bytes before the block starts.
#define NPLLAMA_DYNAMIC_SHARED(name) unsigned char* name = ::cuda_on_cpu::dynamic_shared_memory()
