// Causal attention on the tensor cores: the same algorithm as attention.cu (FlashAttention-2, Dao
// 2023), every matrix product an mma.sync instruction (float32 accumulation) and every statistic
// (the running max, the sum, the logsumexp L, Dvec) in float32, in two instances:
//   Float16Operands  float16 inputs and outputs (mixed precision): mma.m16n8k16 with float16
//                    operands; O, dQ, dK, dV rounded to float16 once, at the end.
//   Tf32Operands     float32 inputs and outputs (--tf32): mma.m16n8k8 with TF32 operands, each
//                    input element rounded to TF32 (10 fraction bits, float32's exponent range) once,
//                    as its tile is loaded; outputs in float32.
// For one (batch, query head):
//     S = s Q K^T  (masked to -inf where a key comes after its query),  L = logsumexp_j S,
//     O = exp(S - L) V
// and, with Dvec = rowsum(dO * O) (computed beside these kernels, in float32),
//     P = exp(S - L)   dV = P^T dO   dP = dO V^T   dS = P * (dP - Dvec)   dQ = s dS K   dK = s dS^T Q
// L stays float32. The operands of the second product of each pair (P for P V and P^T dO, dS for
// dS K and dS^T Q) are rounded to the operand format, as FlashAttention-2 rounds them to the
// inputs' type.
// Grouped-query attention as in attention.cu: query head `head` reads key/value head head / G.
// Query i sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i.
//
// The one layer between these kernels and the tensor cores is tensor_cores.cuh: mma_16816 and
// mma_1688_tf32 (d += a b for one warp's 16 x k by k x 8 product, in the PTX ISA's fragment layouts,
// written out there), float_to_half and float_to_tf32. On the GPU they are inline PTX (sm_80 and
// later); on the CPU the test harness defines them, each product by gathering the warp's fragments
// through shared scratch in exactly those layouts, so the harness runs these kernels under the
// sanitizers; `mma_16816_once` and `mma_1688_tf32_once` let a test compare the two on a GPU. The
// operand formats below are the only code that knows a fragment's layout.
//
// Kernels, each a block of kMmaThreads threads (kMmaWarps warps, 16 rows of the block's tile each):
//   attention_forward_mma   a block per kMmaQueries queries of one query head; it walks key tiles of
//                           kMmaKeys keys up to the diagonal. Each warp keeps its Q fragments in
//                           registers for the whole walk, its scores (16 x 64) and O (16 x D) as
//                           float32 accumulators; K and V tiles are in shared memory.
//   attention_backward_dkdv_mma  a block per kMmaKeys keys of one key/value head; it walks the
//                           query tiles (kMmaBackQueries queries) that see them, for each of the G
//                           query heads of its group in turn, and accumulates dK and dV for its keys.
//   attention_backward_dq_mma    a block per kMmaQueries queries of one query head; it walks key
//                           tiles of kMmaBackKeys keys up to the diagonal and accumulates dQ.
// Shared tiles have rows of D + kPad elements (16 bytes more than a row), so the rows a warp reads
// together start in other banks. A thread holds two rows (g and g + 8) of every fragment, so a row's
// max and sum need shuffles among the 4 lanes of its group only. No atomics: every output element is
// written once, by one thread.

#ifndef NPLLAMA_CPU_EMULATION
#define NPLLAMA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include "float16.cuh"
#include "tensor_cores.cuh"

namespace npllama {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;  // threads per block
constexpr int kMmaQueries = 16 * kMmaWarps;  // queries per block: 16 per warp
constexpr int kMmaKeys = 64;                 // keys per tile (forward), keys per block (dK/dV)
constexpr int kMmaBackQueries = 32;          // queries per tile of the dK/dV kernel's walk
constexpr int kMmaBackKeys = 32;             // keys per tile of the dQ kernel's walk
static_assert(kMmaQueries == kMmaKeys, "the forward kernel stages Q in the K tile's place");

__device__ __forceinline__ unsigned pack_halves(unsigned short low, unsigned short high) {
  return static_cast<unsigned>(low) | (static_cast<unsigned>(high) << 16);
}

__device__ __forceinline__ float minus_infinity_f32() { return __int_as_float(static_cast<int>(0xff800000u)); }

// The max and the sum over the 4 lanes of a group (the lanes that hold one row's columns)
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// --- the operand formats: fragments of shared tiles (row-major, `stride` elements a row) ---------
// Each format gives, for one mma of k = kK:
//   load_a(tile, stride, row0, k0)      A (16 x kK) = tile[row0 + i][k0 + j]
//   load_b_from_rows(tile, .., n0, k0)  B (kK x 8) with B[k][n] = tile[n0 + n][k0 + k] (K in Q K^T)
//   load_b_from_columns(.., k0, n0)     B (kK x 8) with B[k][n] = tile[k0 + k][n0 + n] (V in P V)
//   accumulators_to_a(c)                A of one k-step from the C fragments of the kK / 8 n-tiles
//                                       c[0], c[1], .. it spans, rounded to the operand format
// A product's A and B may number k in any order, as long as both use the same one: a sum over k does
// not depend on it (the hardware's order of addition is its own anyway).

// float16 tiles, mma.m16n8k16: the layouts need no reordering (C of n-tiles 2j and 2j + 1 is,
// element for element, A of k-step j)
struct Float16Operands {
  using Storage = unsigned short;  // float16 bits
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
  __device__ static uint4 stored(uint4 halves) { return halves; }  // 8 inputs as the tiles hold them
  __device__ static Storage output(float x) { return float_to_half(x); }

  __device__ static void load_a(const Storage* tile, int stride, int row0, int k0, int g, int t, unsigned a[4]) {
    const Storage* top = tile + (row0 + g) * stride + k0 + 2 * t;
    const Storage* bottom = top + 8 * stride;
    a[0] = pack_halves(top[0], top[1]);
    a[1] = pack_halves(bottom[0], bottom[1]);
    a[2] = pack_halves(top[8], top[9]);
    a[3] = pack_halves(bottom[8], bottom[9]);
  }
  __device__ static void load_b_from_rows(const Storage* tile, int stride, int n0, int k0, int g, int t,
                                          unsigned b[2]) {
    const Storage* row = tile + (n0 + g) * stride + k0 + 2 * t;
    b[0] = pack_halves(row[0], row[1]);
    b[1] = pack_halves(row[8], row[9]);
  }
  __device__ static void load_b_from_columns(const Storage* tile, int stride, int k0, int n0, int g, int t,
                                             unsigned b[2]) {
    const Storage* column = tile + (k0 + 2 * t) * stride + n0 + g;
    b[0] = pack_halves(column[0], column[stride]);
    b[1] = pack_halves(column[8 * stride], column[9 * stride]);
  }
  __device__ static void accumulators_to_a(const float c[][4], unsigned a[4]) {
    a[0] = pack_halves(float_to_half(c[0][0]), float_to_half(c[0][1]));
    a[1] = pack_halves(float_to_half(c[0][2]), float_to_half(c[0][3]));
    a[2] = pack_halves(float_to_half(c[1][0]), float_to_half(c[1][1]));
    a[3] = pack_halves(float_to_half(c[1][2]), float_to_half(c[1][3]));
  }
  __device__ static void mma(float d[4], const unsigned a[4], const unsigned b[2]) { mma_16816(d, a, b); }
};

// float32 tiles holding TF32 values (rounded as loaded), mma.m16n8k8. A C fragment holds columns
// 2t and 2t + 1 of its row where an A fragment holds t and t + 4, so the products whose A comes from
// accumulators number k as 2t -> t, 2t + 1 -> t + 4, in A (accumulators_to_a) and in B
// (load_b_from_columns) alike; the products of two tiles (load_a with load_b_from_rows) keep k's order.
struct Tf32Operands {
  using Storage = float;
  static constexpr int kK = 8;
  static constexpr int kPad = 4;
  __device__ static uint4 stored(uint4 floats) {  // 4 inputs as the tiles hold them: rounded to TF32
    return {__float_as_uint(float_to_tf32(__uint_as_float(floats.x))),
            __float_as_uint(float_to_tf32(__uint_as_float(floats.y))),
            __float_as_uint(float_to_tf32(__uint_as_float(floats.z))),
            __float_as_uint(float_to_tf32(__uint_as_float(floats.w)))};
  }
  __device__ static float output(float x) { return x; }

  __device__ static void load_a(const Storage* tile, int stride, int row0, int k0, int g, int t, unsigned a[4]) {
    const Storage* top = tile + (row0 + g) * stride + k0 + t;
    const Storage* bottom = top + 8 * stride;
    a[0] = __float_as_uint(top[0]);
    a[1] = __float_as_uint(bottom[0]);
    a[2] = __float_as_uint(top[4]);
    a[3] = __float_as_uint(bottom[4]);
  }
  __device__ static void load_b_from_rows(const Storage* tile, int stride, int n0, int k0, int g, int t,
                                          unsigned b[2]) {
    const Storage* row = tile + (n0 + g) * stride + k0 + t;
    b[0] = __float_as_uint(row[0]);
    b[1] = __float_as_uint(row[4]);
  }
  __device__ static void load_b_from_columns(const Storage* tile, int stride, int k0, int n0, int g, int t,
                                             unsigned b[2]) {
    const Storage* column = tile + (k0 + 2 * t) * stride + n0 + g;
    b[0] = __float_as_uint(column[0]);       // k = t:     row 2t
    b[1] = __float_as_uint(column[stride]);  // k = t + 4: row 2t + 1
  }
  __device__ static void accumulators_to_a(const float c[][4], unsigned a[4]) {
    a[0] = __float_as_uint(float_to_tf32(c[0][0]));  // row g,     k = t:     column 2t
    a[1] = __float_as_uint(float_to_tf32(c[0][2]));  // row g + 8, k = t
    a[2] = __float_as_uint(float_to_tf32(c[0][1]));  // row g,     k = t + 4: column 2t + 1
    a[3] = __float_as_uint(float_to_tf32(c[0][3]));  // row g + 8, k = t + 4
  }
  __device__ static void mma(float d[4], const unsigned a[4], const unsigned b[2]) { mma_1688_tf32(d, a, b); }
};

// rows first .. first + rows - 1 of a (n x D) array into a shared tile of rows of D + kPad, each
// element in the operand format; zeros past row n. 16 bytes (8 halves, 4 floats) a load and a store:
// a row of D elements is a multiple of 16 bytes, and so is a shared row (kPad is 16 bytes), so both
// stay aligned wherever the arrays start on a 16-byte boundary (attention_mma.py sees to it).
template <class Format, int D>
__device__ void load_tile(typename Format::Storage* tile, const typename Format::Storage* source, int first, int rows,
                          int n) {
  constexpr int PER_VECTOR = 16 / sizeof(typename Format::Storage);
  constexpr int VECTORS = D / PER_VECTOR;  // per row
  static_assert(D % PER_VECTOR == 0 && Format::kPad % PER_VECTOR == 0, "rows of whole 16-byte vectors");
  for (int i = threadIdx.x; i < rows * VECTORS; i += kMmaThreads) {
    const int row = i / VECTORS, col = (i % VECTORS) * PER_VECTOR;
    uint4 value = {0u, 0u, 0u, 0u};
    if (first + row < n) value = Format::stored(*reinterpret_cast<const uint4*>(source + (first + row) * D + col));
    *reinterpret_cast<uint4*>(tile + row * (D + Format::kPad) + col) = value;
  }
}

// The backward's two products of a warp's 16 rows (row0 ..) against TILES x 8 rows of two other
// tiles, over D: first = A B^T and second = C E^T, with A, C rows of `a`, `c` and B, E rows of
// `b`, `e` (S = Q K^T with dP = dO V^T, or their transposes), float32 accumulators from zero.
template <class Format, int D, int TILES>
__device__ __forceinline__ void row_products(const typename Format::Storage* a, const typename Format::Storage* b,
                                             const typename Format::Storage* c, const typename Format::Storage* e,
                                             int row0, int g, int t, float first[TILES][4], float second[TILES][4]) {
  constexpr int STRIDE = D + Format::kPad;
#pragma unroll
  for (int n = 0; n < TILES; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) first[n][i] = second[n][i] = 0.0f;
#pragma unroll
    for (int step = 0; step < D / Format::kK; ++step) {
      unsigned a_frag[4], b_frag[2];
      Format::load_a(a, STRIDE, row0, step * Format::kK, g, t, a_frag);
      Format::load_b_from_rows(b, STRIDE, n * 8, step * Format::kK, g, t, b_frag);
      Format::mma(first[n], a_frag, b_frag);
      Format::load_a(c, STRIDE, row0, step * Format::kK, g, t, a_frag);
      Format::load_b_from_rows(e, STRIDE, n * 8, step * Format::kK, g, t, b_frag);
      Format::mma(second[n], a_frag, b_frag);
    }
  }
}

// acc (a warp's 16 rows x D) += A B: A (16 x STEPS kK) the float32 accumulators c (C fragments of
// STEPS kK / 8 n-tiles: P or dS) rounded to the operand format, B (STEPS kK x D) the tile's rows
// (V for P V, dO for P^T dO, K for dS K, Q for dS^T Q)
template <class Format, int D, int STEPS>
__device__ __forceinline__ void accumulate_products(const float c[][4], const typename Format::Storage* tile, int g,
                                                    int t, float acc[][4]) {
  constexpr int K = Format::kK, STRIDE = D + Format::kPad;
#pragma unroll
  for (int step = 0; step < STEPS; ++step) {
    unsigned a[4];
    Format::accumulators_to_a(c + step * (K / 8), a);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      unsigned b[2];
      Format::load_b_from_columns(tile, STRIDE, step * K, n * 8, g, t, b);
      Format::mma(acc[n], a, b);
    }
  }
}

// The layer's self-tests: one warp, one product. a (32 x 4) and b (32 x 2) are each lane's
// registers; d (32 x 4) starts as the accumulator c and ends as c + a b, as each lane holds it.
template <class Format>
__device__ void mma_once(const unsigned* a, const unsigned* b, float* d) {
  const int lane = threadIdx.x;
  unsigned a_frag[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  unsigned b_frag[2] = {b[2 * lane], b[2 * lane + 1]};
  float d_frag[4] = {d[4 * lane], d[4 * lane + 1], d[4 * lane + 2], d[4 * lane + 3]};
  Format::mma(d_frag, a_frag, b_frag);
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = d_frag[i];
}

__global__ void mma_16816_once(const unsigned* __restrict__ a, const unsigned* __restrict__ b, float* __restrict__ d) {
  mma_once<Float16Operands>(a, b, d);
}

__global__ void mma_1688_tf32_once(const unsigned* __restrict__ a, const unsigned* __restrict__ b,
                                   float* __restrict__ d) {
  mma_once<Tf32Operands>(a, b, d);
}

// float_to_tf32 of each of n floats, in place: what a test compares with the emulation's rounding
__global__ void tf32_rounding_once(float* __restrict__ x, int n) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = float_to_tf32(x[i]);
}

// q, out (B H, Tq, D) and k, v (B Hkv, Tk, D) in the format's storage (float16 bits or float32);
// lse (B H, Tq) is float32.
template <class Format, int D>
__global__ void __launch_bounds__(kMmaThreads, 1)
attention_forward_mma(const typename Format::Storage* __restrict__ q, const typename Format::Storage* __restrict__ k,
                      const typename Format::Storage* __restrict__ v, typename Format::Storage* __restrict__ out,
                      float* __restrict__ lse, int n_queries, int n_keys, int group_size, float scale) {
  using Storage = typename Format::Storage;
  constexpr int K = Format::kK;
  static_assert(D % 16 == 0, "the head dim must be a multiple of 16");
  constexpr int STRIDE = D + Format::kPad;   // elements per shared row: a warp's rows start in other banks
  constexpr int D_STEPS = D / K;             // k-steps of S = Q K^T
  constexpr int KEY_STEPS = kMmaKeys / K;    // k-steps of O += P V
  constexpr int SCORE_TILES = kMmaKeys / 8;  // n-tiles of S
  constexpr int OUT_TILES = D / 8;           // n-tiles of O
  NPLLAMA_DYNAMIC_SHARED(shared);
  Storage* k_tile = reinterpret_cast<Storage*>(shared);  // kMmaKeys x STRIDE
  Storage* v_tile = k_tile + kMmaKeys * STRIDE;          // kMmaKeys x STRIDE

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long head = blockIdx.y, kv_head = static_cast<int>(blockIdx.y) / group_size;  // = b Hkv + h / G
  const int offset = n_keys - n_queries;  // the position of query 0
  const int q0 = static_cast<int>(blockIdx.x) * kMmaQueries;
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  q += head * n_queries * D;
  out += head * n_queries * D;
  lse += head * n_queries;
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;

  // this warp's 16 rows of Q as A fragments, one per k-step, through the K tile's place (rows past Tq
  // are zeros, never written)
  load_tile<Format, D>(k_tile, q, q0, kMmaQueries, n_queries);
  __syncthreads();
  unsigned q_frag[D_STEPS][4];
#pragma unroll
  for (int step = 0; step < D_STEPS; ++step) Format::load_a(k_tile, STRIDE, warp * 16, step * K, g, t, q_frag[step]);

  float row_max[2] = {minus_infinity_f32(), minus_infinity_f32()};
  float row_sum[2] = {0.0f, 0.0f};  // this lane's share: its columns of the row
  float acc[OUT_TILES][4];
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;

  const int block_last_query = q0 + kMmaQueries - 1;
  const int last_key = offset + block_last_query < n_keys - 1 ? offset + block_last_query : n_keys - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kMmaKeys) {
    __syncthreads();  // every warp is done with the previous K and V tiles (or with Q)
    load_tile<Format, D>(k_tile, k, k0, kMmaKeys, n_keys);  // keys past Tk are zeros (and masked below)
    load_tile<Format, D>(v_tile, v, k0, kMmaKeys, n_keys);
    __syncthreads();

    // S = Q K^T: B[k = d][n = key] is K's row `key`
    float score[SCORE_TILES][4];
#pragma unroll
    for (int n = 0; n < SCORE_TILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) score[n][e] = 0.0f;
#pragma unroll
      for (int step = 0; step < D_STEPS; ++step) {
        unsigned b_frag[2];
        Format::load_b_from_rows(k_tile, STRIDE, n * 8, step * K, g, t, b_frag);
        Format::mma(score[n], q_frag[step], b_frag);
      }
    }

    // scale, mask, and the online softmax of rows g (e = 0, 1) and g + 8 (e = 2, 3)
    float tile_max[2] = {minus_infinity_f32(), minus_infinity_f32()};
#pragma unroll
    for (int n = 0; n < SCORE_TILES; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + n * 8 + 2 * t + e % 2, row = rows[e / 2];
        const float s = key > offset + row || key >= n_keys ? minus_infinity_f32() : score[n][e] * scale;
        score[n][e] = s;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], s);
      }
    float base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
      base[r] = new_max == minus_infinity_f32() ? 0.0f : new_max;  // a row with no key yet stays at 0
      const float rescale = expf(row_max[r] - base[r]);  // exp(-inf) = 0 on the row's first keys
      row_sum[r] *= rescale;
#pragma unroll
      for (int n = 0; n < OUT_TILES; ++n) {
        acc[n][2 * r] *= rescale;
        acc[n][2 * r + 1] *= rescale;
      }
      row_max[r] = new_max;
    }
    // P = exp(S - max) in float32, in the scores' place, for the sums
#pragma unroll
    for (int n = 0; n < SCORE_TILES; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        score[n][e] = expf(score[n][e] - base[e / 2]);
        row_sum[e / 2] += score[n][e];
      }

    // O += P V: P rounded to the operand format as A; B[k = key][n = d] is V's column d
    accumulate_products<Format, D, KEY_STEPS>(score, v_tile, g, t, acc);
  }

  // O = acc / sum, in the output format (rounded to float16 once); L = max + log(sum)
#pragma unroll
  for (int r = 0; r < 2; ++r) row_sum[r] = quad_sum(row_sum[r]);
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = rows[e / 2];
      if (row < n_queries) out[row * D + n * 8 + 2 * t + e % 2] = Format::output(acc[n][e] / row_sum[e / 2]);
    }
  if (t == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (rows[r] < n_queries) lse[rows[r]] = row_max[r] + logf(row_sum[r]);
}

// dK and dV of a block of kMmaKeys keys (16 a warp) of one key/value head: the sums over the G
// query heads of its group and over every query that sees the keys. q, dout, dk, dv, k, v in the
// format's storage; lse and dvec (B H, Tq) are float32.
template <class Format, int D>
__global__ void __launch_bounds__(kMmaThreads, 1)
attention_backward_dkdv_mma(const typename Format::Storage* __restrict__ q,
                            const typename Format::Storage* __restrict__ k,
                            const typename Format::Storage* __restrict__ v,
                            const typename Format::Storage* __restrict__ dout, const float* __restrict__ lse,
                            const float* __restrict__ dvec, typename Format::Storage* __restrict__ dk,
                            typename Format::Storage* __restrict__ dv, int n_queries, int n_keys, int group_size,
                            float scale) {
  using Storage = typename Format::Storage;
  constexpr int K = Format::kK, STRIDE = D + Format::kPad, OUT_TILES = D / 8;
  constexpr int QUERY_TILES = kMmaBackQueries / 8, QUERY_STEPS = kMmaBackQueries / K;
  NPLLAMA_DYNAMIC_SHARED(shared);
  Storage* k_tile = reinterpret_cast<Storage*>(shared);  // kMmaKeys x STRIDE
  Storage* v_tile = k_tile + kMmaKeys * STRIDE;          // kMmaKeys x STRIDE
  Storage* q_tile = v_tile + kMmaKeys * STRIDE;          // kMmaBackQueries x STRIDE
  Storage* dout_tile = q_tile + kMmaBackQueries * STRIDE;                             // kMmaBackQueries x STRIDE
  float* lse_tile = reinterpret_cast<float*>(dout_tile + kMmaBackQueries * STRIDE);  // kMmaBackQueries
  float* dvec_tile = lse_tile + kMmaBackQueries;                                     // kMmaBackQueries

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long kv_head = blockIdx.y;
  const int k0 = static_cast<int>(blockIdx.x) * kMmaKeys, offset = n_keys - n_queries;
  const int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;
  dk += kv_head * n_keys * D;
  dv += kv_head * n_keys * D;
  load_tile<Format, D>(k_tile, k, k0, kMmaKeys, n_keys);
  load_tile<Format, D>(v_tile, v, k0, kMmaKeys, n_keys);

  float dk_acc[OUT_TILES][4], dv_acc[OUT_TILES][4];
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;

  const int first_query = k0 - offset > 0 ? k0 - offset : 0;  // the first query that sees a key of the block
  for (int member = 0; member < group_size; ++member) {
    const long long head = kv_head * group_size + member;  // a query head of the group
    for (int q0 = first_query / kMmaBackQueries * kMmaBackQueries; q0 < n_queries; q0 += kMmaBackQueries) {
      __syncthreads();  // every warp is done with the previous tiles (and K, V are loaded)
      load_tile<Format, D>(q_tile, q + head * n_queries * D, q0, kMmaBackQueries, n_queries);
      load_tile<Format, D>(dout_tile, dout + head * n_queries * D, q0, kMmaBackQueries, n_queries);
      for (int i = threadIdx.x; i < kMmaBackQueries; i += kMmaThreads) {
        const bool inside = q0 + i < n_queries;
        lse_tile[i] = inside ? lse[head * n_queries + q0 + i] : 0.0f;
        dvec_tile[i] = inside ? dvec[head * n_queries + q0 + i] : 0.0f;
      }
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the tile's queries
      float p_t[QUERY_TILES][4], ds_t[QUERY_TILES][4];
      row_products<Format, D, QUERY_TILES>(k_tile, q_tile, v_tile, dout_tile, warp * 16, g, t, p_t, ds_t);
      // P^T = exp(s S^T - L) where the query sees the key, and dS^T = P^T * (dP^T - Dvec)
#pragma unroll
      for (int n = 0; n < QUERY_TILES; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int column = n * 8 + 2 * t + e % 2, query = q0 + column, key = keys[e / 2];
          const bool sees = query < n_queries && key < n_keys && key <= offset + query;
          const float p = sees ? expf(p_t[n][e] * scale - lse_tile[column]) : 0.0f;
          p_t[n][e] = p;
          ds_t[n][e] = p * (ds_t[n][e] - dvec_tile[column]);
        }
      // dV += P^T dO and dK += dS^T Q (times s at the end)
      accumulate_products<Format, D, QUERY_STEPS>(p_t, dout_tile, g, t, dv_acc);
      accumulate_products<Format, D, QUERY_STEPS>(ds_t, q_tile, g, t, dk_acc);
    }
  }
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = keys[e / 2], col = n * 8 + 2 * t + e % 2;
      if (key < n_keys) {
        dk[key * D + col] = Format::output(dk_acc[n][e] * scale);
        dv[key * D + col] = Format::output(dv_acc[n][e]);
      }
    }
}

// dQ of a block of kMmaQueries queries (16 a warp) of one query head. q, dout, k, v, dq in the
// format's storage; lse and dvec (B H, Tq) are float32.
template <class Format, int D>
__global__ void __launch_bounds__(kMmaThreads, 1)
attention_backward_dq_mma(const typename Format::Storage* __restrict__ q,
                          const typename Format::Storage* __restrict__ k,
                          const typename Format::Storage* __restrict__ v,
                          const typename Format::Storage* __restrict__ dout, const float* __restrict__ lse,
                          const float* __restrict__ dvec, typename Format::Storage* __restrict__ dq, int n_queries,
                          int n_keys, int group_size, float scale) {
  using Storage = typename Format::Storage;
  constexpr int K = Format::kK, STRIDE = D + Format::kPad, OUT_TILES = D / 8;
  constexpr int KEY_TILES = kMmaBackKeys / 8, KEY_STEPS = kMmaBackKeys / K;
  NPLLAMA_DYNAMIC_SHARED(shared);
  Storage* q_tile = reinterpret_cast<Storage*>(shared);  // kMmaQueries x STRIDE
  Storage* dout_tile = q_tile + kMmaQueries * STRIDE;    // kMmaQueries x STRIDE
  Storage* k_tile = dout_tile + kMmaQueries * STRIDE;    // kMmaBackKeys x STRIDE
  Storage* v_tile = k_tile + kMmaBackKeys * STRIDE;      // kMmaBackKeys x STRIDE

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long head = blockIdx.y, kv_head = static_cast<int>(blockIdx.y) / group_size;
  const int q0 = static_cast<int>(blockIdx.x) * kMmaQueries, offset = n_keys - n_queries;
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  q += head * n_queries * D;
  dout += head * n_queries * D;
  dq += head * n_queries * D;
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;
  load_tile<Format, D>(q_tile, q, q0, kMmaQueries, n_queries);
  load_tile<Format, D>(dout_tile, dout, q0, kMmaQueries, n_queries);
  float row_lse[2], row_dvec[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    row_lse[r] = rows[r] < n_queries ? lse[head * n_queries + rows[r]] : 0.0f;
    row_dvec[r] = rows[r] < n_queries ? dvec[head * n_queries + rows[r]] : 0.0f;
  }
  float dq_acc[OUT_TILES][4];
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq_acc[n][e] = 0.0f;

  const int last_key = offset + q0 + kMmaQueries - 1 < n_keys - 1 ? offset + q0 + kMmaQueries - 1 : n_keys - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kMmaBackKeys) {
    __syncthreads();  // every warp is done with the previous K and V tiles (and Q, dO are loaded)
    load_tile<Format, D>(k_tile, k, k0, kMmaBackKeys, n_keys);
    load_tile<Format, D>(v_tile, v, k0, kMmaBackKeys, n_keys);
    __syncthreads();

    // S = Q K^T and dP = dO V^T for the warp's 16 queries and the tile's keys
    float p[KEY_TILES][4], ds[KEY_TILES][4];
    row_products<Format, D, KEY_TILES>(q_tile, k_tile, dout_tile, v_tile, warp * 16, g, t, p, ds);
    // P = exp(s S - L) where the query sees the key, and dS = P * (dP - Dvec)
#pragma unroll
    for (int n = 0; n < KEY_TILES; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + n * 8 + 2 * t + e % 2, row = rows[e / 2];
        const bool sees = row < n_queries && key < n_keys && key <= offset + row;
        const float probability = sees ? expf(p[n][e] * scale - row_lse[e / 2]) : 0.0f;
        ds[n][e] = probability * (ds[n][e] - row_dvec[e / 2]);
      }
    // dQ += dS K (times s at the end)
    accumulate_products<Format, D, KEY_STEPS>(ds, k_tile, g, t, dq_acc);
  }
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (rows[e / 2] < n_queries) dq[rows[e / 2] * D + n * 8 + 2 * t + e % 2] = Format::output(dq_acc[n][e] * scale);
}

}  // namespace npllama
