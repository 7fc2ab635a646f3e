// Causal attention on the tensor cores, for float16 inputs (mixed precision): the same algorithm
// as attention.cu (FlashAttention-2, Dao 2023), every matrix product an mma.sync.m16n8k16
// instruction (float16 operands, float32 accumulation) and every statistic (the running max, the
// sum, the logsumexp L, Dvec) in float32. For one (batch, query head):
//     S = s Q K^T  (masked to -inf where a key comes after its query),  L = logsumexp_j S,
//     O = exp(S - L) V
// and, with Dvec = rowsum(dO * O) (computed beside these kernels, in float32),
//     P = exp(S - L)   dV = P^T dO   dP = dO V^T   dS = P * (dP - Dvec)   dQ = s dS K   dK = s dS^T Q
// Outputs in float16, each rounded once at the end: O, dQ, dK, dV; L stays float32. The operands of
// the second product of each pair (P for P V and P^T dO, dS for dS K and dS^T Q) are rounded to
// float16, as FlashAttention-2 rounds them to the inputs' type.
// Grouped-query attention as in attention.cu: query head `head` reads key/value head head / G.
// Query i sits at position Tk - Tq + i and sees keys 0 .. Tk - Tq + i.
//
// The one layer between these kernels and the tensor cores is float16.cuh: mma_16816 (d += a b for
// one warp's 16 x 16 by 16 x 8 product, in the PTX ISA's fragment layouts, written out there) and
// float_to_half. On the GPU they are inline PTX (sm_80 and later); on the CPU the test harness
// defines them, the product by gathering the warp's fragments through shared scratch in exactly
// those layouts, so the harness runs these kernels under the sanitizers; `mma_16816_once` lets a
// test compare the two on a GPU.
//
// Kernels, each a block of kF16Threads threads (kF16Warps warps, 16 rows of the block's tile each):
//   attention_forward_f16   a block per kF16Queries queries of one query head; it walks key tiles of
//                           kF16Keys keys up to the diagonal. Each warp keeps its Q fragments in
//                           registers for the whole walk, its scores (16 x 64) and O (16 x D) as
//                           float32 accumulators; K and V tiles are in shared memory.
//   attention_backward_dkdv_f16  a block per kF16Keys keys of one key/value head; it walks the
//                           query tiles (kF16BackQueries queries) that see them, for each of the G
//                           query heads of its group in turn, and accumulates dK and dV for its keys.
//   attention_backward_dq_f16    a block per kF16Queries queries of one query head; it walks key
//                           tiles of kF16BackKeys keys up to the diagonal and accumulates dQ.
// Shared tiles have rows of D + 8 halves, so the rows a warp reads together start in other banks.
// A thread holds two rows (g and g + 8) of every fragment, so a row's max and sum need shuffles
// among the 4 lanes of its group only. No atomics: every output element is written once, by one
// thread.

#ifndef NPLLAMA_CPU_EMULATION
#define NPLLAMA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include "float16.cuh"

namespace npllama {

constexpr int kF16Warps = 4;
constexpr int kF16Threads = 32 * kF16Warps;  // threads per block
constexpr int kF16Queries = 16 * kF16Warps;  // queries per block: 16 per warp
constexpr int kF16Keys = 64;                 // keys per tile (forward), keys per block (dK/dV)
constexpr int kF16BackQueries = 32;          // queries per tile of the dK/dV kernel's walk
constexpr int kF16BackKeys = 32;             // keys per tile of the dQ kernel's walk

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

// --- fragments from shared tiles of float16 rows (row-major, `stride` halves a row) --------------

// A (16 x 16) = tile[row0 + i][k0 + j]
__device__ __forceinline__ void load_a(const unsigned short* tile, int stride, int row0, int k0, int g, int t,
                                       unsigned a[4]) {
  const unsigned short* top = tile + (row0 + g) * stride + k0 + 2 * t;
  const unsigned short* bottom = top + 8 * stride;
  a[0] = pack_halves(top[0], top[1]);
  a[1] = pack_halves(bottom[0], bottom[1]);
  a[2] = pack_halves(top[8], top[9]);
  a[3] = pack_halves(bottom[8], bottom[9]);
}

// B (16 x 8) with B[k][n] = tile[n0 + n][k0 + k]: a row of the tile for each column of B (K in Q K^T)
__device__ __forceinline__ void load_b_from_rows(const unsigned short* tile, int stride, int n0, int k0, int g, int t,
                                                 unsigned b[2]) {
  const unsigned short* row = tile + (n0 + g) * stride + k0 + 2 * t;
  b[0] = pack_halves(row[0], row[1]);
  b[1] = pack_halves(row[8], row[9]);
}

// B (16 x 8) with B[k][n] = tile[k0 + k][n0 + n]: a column of the tile for each column of B (V in P V)
__device__ __forceinline__ void load_b_from_columns(const unsigned short* tile, int stride, int k0, int n0, int g,
                                                    int t, unsigned b[2]) {
  const unsigned short* column = tile + (k0 + 2 * t) * stride + n0 + g;
  b[0] = pack_halves(column[0], column[stride]);
  b[1] = pack_halves(column[8 * stride], column[9 * stride]);
}

// The A fragment of one k-step from the C fragments of the two n-tiles it spans, rounded to float16:
// C of n-tile 2j and 2j + 1 is, element for element, A of k-step j
__device__ __forceinline__ void accumulators_to_a(const float left[4], const float right[4], unsigned a[4]) {
  a[0] = pack_halves(float_to_half(left[0]), float_to_half(left[1]));
  a[1] = pack_halves(float_to_half(left[2]), float_to_half(left[3]));
  a[2] = pack_halves(float_to_half(right[0]), float_to_half(right[1]));
  a[3] = pack_halves(float_to_half(right[2]), float_to_half(right[3]));
}

// rows first .. first + rows - 1 of a (n x D) float16 array into a shared tile; zeros past row n
template <int D>
__device__ void load_tile(unsigned short* tile, const unsigned short* source, int first, int rows, int n) {
  for (int i = threadIdx.x; i < rows * D; i += kF16Threads) {
    const int row = i / D, col = i % D;
    tile[row * (D + 8) + col] = first + row < n ? source[(first + row) * D + col] : static_cast<unsigned short>(0);
  }
}

// The backward's two products of a warp's 16 rows (row0 ..) against TILES x 8 rows of two other
// tiles, over D: first = A B^T and second = C E^T, with A, C rows of `a`, `c` and B, E rows of
// `b`, `e` (S = Q K^T with dP = dO V^T, or their transposes), float32 accumulators from zero.
template <int D, int TILES>
__device__ __forceinline__ void row_products(const unsigned short* a, const unsigned short* b, const unsigned short* c,
                                             const unsigned short* e, int row0, int g, int t, float first[TILES][4],
                                             float second[TILES][4]) {
  constexpr int STRIDE = D + 8;
#pragma unroll
  for (int n = 0; n < TILES; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) first[n][i] = second[n][i] = 0.0f;
#pragma unroll
    for (int step = 0; step < D / 16; ++step) {
      unsigned a_frag[4], b_frag[2];
      load_a(a, STRIDE, row0, step * 16, g, t, a_frag);
      load_b_from_rows(b, STRIDE, n * 8, step * 16, g, t, b_frag);
      mma_16816(first[n], a_frag, b_frag);
      load_a(c, STRIDE, row0, step * 16, g, t, a_frag);
      load_b_from_rows(e, STRIDE, n * 8, step * 16, g, t, b_frag);
      mma_16816(second[n], a_frag, b_frag);
    }
  }
}

// The layer's self-test: one warp, one product. a (32 x 4) and b (32 x 2) are each lane's
// registers; d (32 x 4) starts as the accumulator c and ends as c + a b, as each lane holds it.
__global__ void mma_16816_once(const unsigned* __restrict__ a, const unsigned* __restrict__ b,
                               float* __restrict__ d) {
  const int lane = threadIdx.x;
  unsigned a_frag[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
  unsigned b_frag[2] = {b[2 * lane], b[2 * lane + 1]};
  float d_frag[4] = {d[4 * lane], d[4 * lane + 1], d[4 * lane + 2], d[4 * lane + 3]};
  mma_16816(d_frag, a_frag, b_frag);
  for (int i = 0; i < 4; ++i) d[4 * lane + i] = d_frag[i];
}

// q, out (B H, Tq, D) and k, v (B Hkv, Tk, D) hold float16 bits; lse (B H, Tq) is float32.
template <int D>
__global__ void __launch_bounds__(kF16Threads, 1)
attention_forward_f16(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                      const unsigned short* __restrict__ v, unsigned short* __restrict__ out,
                      float* __restrict__ lse, int n_queries, int n_keys, int group_size, float scale) {
  static_assert(D % 16 == 0, "the head dim must be a multiple of mma's k, 16");
  constexpr int STRIDE = D + 8;               // halves per shared row: a warp's rows start in other banks
  constexpr int D_STEPS = D / 16;             // k-steps of S = Q K^T
  constexpr int KEY_STEPS = kF16Keys / 16;    // k-steps of O += P V
  constexpr int SCORE_TILES = kF16Keys / 8;   // n-tiles of S
  constexpr int OUT_TILES = D / 8;            // n-tiles of O
  NPLLAMA_DYNAMIC_SHARED(shared);
  unsigned short* k_tile = reinterpret_cast<unsigned short*>(shared);  // kF16Keys x STRIDE
  unsigned short* v_tile = k_tile + kF16Keys * STRIDE;                 // kF16Keys x STRIDE

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long head = blockIdx.y, kv_head = static_cast<int>(blockIdx.y) / group_size;  // = b Hkv + h / G
  const int offset = n_keys - n_queries;  // the position of query 0
  const int rows[2] = {static_cast<int>(blockIdx.x) * kF16Queries + warp * 16 + g,
                       static_cast<int>(blockIdx.x) * kF16Queries + warp * 16 + g + 8};
  q += head * n_queries * D;
  out += head * n_queries * D;
  lse += head * n_queries;
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;

  // this warp's 16 rows of Q as A fragments, one per k-step (rows past Tq are zeros, never written)
  unsigned q_frag[D_STEPS][4];
#pragma unroll
  for (int step = 0; step < D_STEPS; ++step)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = rows[r % 2], col = step * 16 + 2 * t + (r / 2) * 8;
      q_frag[step][r] = row < n_queries ? pack_halves(q[row * D + col], q[row * D + col + 1]) : 0u;
    }

  float row_max[2] = {minus_infinity_f32(), minus_infinity_f32()};
  float row_sum[2] = {0.0f, 0.0f};  // this lane's share: its columns of the row
  float acc[OUT_TILES][4];
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;

  const int block_last_query = static_cast<int>(blockIdx.x) * kF16Queries + kF16Queries - 1;
  const int last_key = offset + block_last_query < n_keys - 1 ? offset + block_last_query : n_keys - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kF16Keys) {
    __syncthreads();  // every warp is done with the previous K and V tiles
    for (int i = threadIdx.x; i < kF16Keys * D; i += kF16Threads) {
      const int key = i / D, col = i % D;
      const bool inside = k0 + key < n_keys;  // keys past Tk are zeros (and masked below)
      k_tile[key * STRIDE + col] = inside ? k[(k0 + key) * D + col] : static_cast<unsigned short>(0);
      v_tile[key * STRIDE + col] = inside ? v[(k0 + key) * D + col] : static_cast<unsigned short>(0);
    }
    __syncthreads();

    // S = Q K^T: B[k = d][n = key] is K's row `key`, so a lane's two halves are adjacent in it
    float score[SCORE_TILES][4];
#pragma unroll
    for (int n = 0; n < SCORE_TILES; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) score[n][e] = 0.0f;
#pragma unroll
      for (int step = 0; step < D_STEPS; ++step) {
        const unsigned short* key_row = k_tile + (n * 8 + g) * STRIDE + step * 16 + 2 * t;
        const unsigned b_frag[2] = {pack_halves(key_row[0], key_row[1]), pack_halves(key_row[8], key_row[9])};
        mma_16816(score[n], q_frag[step], b_frag);
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

    // P = exp(S - max) in float32 for the sums, rounded to float16 as the A fragments of P V: the
    // C fragment of score tiles 2j and 2j + 1 is, element for element, the A fragment of k-step j
    unsigned p_frag[KEY_STEPS][4];
#pragma unroll
    for (int step = 0; step < KEY_STEPS; ++step) {
      unsigned short p[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int n = 2 * step + e / 4, element = e % 4;
        const float value = expf(score[n][element] - base[element / 2]);
        row_sum[element / 2] += value;
        p[e] = float_to_half(value);
      }
      p_frag[step][0] = pack_halves(p[0], p[1]);  // row g, keys 2t, 2t+1
      p_frag[step][1] = pack_halves(p[2], p[3]);  // row g + 8
      p_frag[step][2] = pack_halves(p[4], p[5]);  // row g, keys 2t + 8, 2t + 9
      p_frag[step][3] = pack_halves(p[6], p[7]);  // row g + 8
    }

    // O += P V: B[k = key][n = d] is V's column d, so a lane's two halves are rows apart
#pragma unroll
    for (int step = 0; step < KEY_STEPS; ++step)
#pragma unroll
      for (int n = 0; n < OUT_TILES; ++n) {
        const unsigned short* column = v_tile + (step * 16 + 2 * t) * STRIDE + n * 8 + g;
        const unsigned b_frag[2] = {pack_halves(column[0], column[STRIDE]),
                                    pack_halves(column[8 * STRIDE], column[9 * STRIDE])};
        mma_16816(acc[n], p_frag[step], b_frag);
      }
  }

  // O = acc / sum, rounded to float16 once; L = max + log(sum)
#pragma unroll
  for (int r = 0; r < 2; ++r) row_sum[r] = quad_sum(row_sum[r]);
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = rows[e / 2];
      if (row < n_queries) out[row * D + n * 8 + 2 * t + e % 2] = float_to_half(acc[n][e] / row_sum[e / 2]);
    }
  if (t == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      if (rows[r] < n_queries) lse[rows[r]] = row_max[r] + logf(row_sum[r]);
}

// dK and dV of a block of kF16Keys keys (16 a warp) of one key/value head: the sums over the G
// query heads of its group and over every query that sees the keys. q, dout, dk, dv, k, v hold
// float16 bits; lse and dvec (B H, Tq) are float32.
template <int D>
__global__ void __launch_bounds__(kF16Threads, 1)
attention_backward_dkdv_f16(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                            const unsigned short* __restrict__ v, const unsigned short* __restrict__ dout,
                            const float* __restrict__ lse, const float* __restrict__ dvec,
                            unsigned short* __restrict__ dk, unsigned short* __restrict__ dv, int n_queries,
                            int n_keys, int group_size, float scale) {
  constexpr int STRIDE = D + 8, OUT_TILES = D / 8;
  constexpr int QUERY_TILES = kF16BackQueries / 8, QUERY_STEPS = kF16BackQueries / 16;
  NPLLAMA_DYNAMIC_SHARED(shared);
  unsigned short* k_tile = reinterpret_cast<unsigned short*>(shared);  // kF16Keys x STRIDE
  unsigned short* v_tile = k_tile + kF16Keys * STRIDE;                 // kF16Keys x STRIDE
  unsigned short* q_tile = v_tile + kF16Keys * STRIDE;                 // kF16BackQueries x STRIDE
  unsigned short* dout_tile = q_tile + kF16BackQueries * STRIDE;       // kF16BackQueries x STRIDE
  float* lse_tile = reinterpret_cast<float*>(dout_tile + kF16BackQueries * STRIDE);  // kF16BackQueries
  float* dvec_tile = lse_tile + kF16BackQueries;                                     // kF16BackQueries

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long kv_head = blockIdx.y;
  const int k0 = static_cast<int>(blockIdx.x) * kF16Keys, offset = n_keys - n_queries;
  const int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;
  dk += kv_head * n_keys * D;
  dv += kv_head * n_keys * D;
  load_tile<D>(k_tile, k, k0, kF16Keys, n_keys);
  load_tile<D>(v_tile, v, k0, kF16Keys, n_keys);

  float dk_acc[OUT_TILES][4], dv_acc[OUT_TILES][4];
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;

  const int first_query = k0 - offset > 0 ? k0 - offset : 0;  // the first query that sees a key of the block
  for (int member = 0; member < group_size; ++member) {
    const long long head = kv_head * group_size + member;  // a query head of the group
    for (int q0 = first_query / kF16BackQueries * kF16BackQueries; q0 < n_queries; q0 += kF16BackQueries) {
      __syncthreads();  // every warp is done with the previous tiles (and K, V are loaded)
      load_tile<D>(q_tile, q + head * n_queries * D, q0, kF16BackQueries, n_queries);
      load_tile<D>(dout_tile, dout + head * n_queries * D, q0, kF16BackQueries, n_queries);
      for (int i = threadIdx.x; i < kF16BackQueries; i += kF16Threads) {
        const bool inside = q0 + i < n_queries;
        lse_tile[i] = inside ? lse[head * n_queries + q0 + i] : 0.0f;
        dvec_tile[i] = inside ? dvec[head * n_queries + q0 + i] : 0.0f;
      }
      __syncthreads();

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the tile's queries
      float p_t[QUERY_TILES][4], ds_t[QUERY_TILES][4];
      row_products<D, QUERY_TILES>(k_tile, q_tile, v_tile, dout_tile, warp * 16, g, t, p_t, ds_t);
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
#pragma unroll
      for (int step = 0; step < QUERY_STEPS; ++step) {
        unsigned p_frag[4], ds_frag[4];
        accumulators_to_a(p_t[2 * step], p_t[2 * step + 1], p_frag);
        accumulators_to_a(ds_t[2 * step], ds_t[2 * step + 1], ds_frag);
#pragma unroll
        for (int n = 0; n < OUT_TILES; ++n) {
          unsigned b[2];
          load_b_from_columns(dout_tile, STRIDE, step * 16, n * 8, g, t, b);
          mma_16816(dv_acc[n], p_frag, b);
          load_b_from_columns(q_tile, STRIDE, step * 16, n * 8, g, t, b);
          mma_16816(dk_acc[n], ds_frag, b);
        }
      }
    }
  }
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = keys[e / 2], col = n * 8 + 2 * t + e % 2;
      if (key < n_keys) {
        dk[key * D + col] = float_to_half(dk_acc[n][e] * scale);
        dv[key * D + col] = float_to_half(dv_acc[n][e]);
      }
    }
}

// dQ of a block of kF16Queries queries (16 a warp) of one query head. q, dout, k, v, dq hold
// float16 bits; lse and dvec (B H, Tq) are float32.
template <int D>
__global__ void __launch_bounds__(kF16Threads, 1)
attention_backward_dq_f16(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k,
                          const unsigned short* __restrict__ v, const unsigned short* __restrict__ dout,
                          const float* __restrict__ lse, const float* __restrict__ dvec,
                          unsigned short* __restrict__ dq, int n_queries, int n_keys, int group_size, float scale) {
  constexpr int STRIDE = D + 8, OUT_TILES = D / 8;
  constexpr int KEY_TILES = kF16BackKeys / 8, KEY_STEPS = kF16BackKeys / 16;
  NPLLAMA_DYNAMIC_SHARED(shared);
  unsigned short* q_tile = reinterpret_cast<unsigned short*>(shared);  // kF16Queries x STRIDE
  unsigned short* dout_tile = q_tile + kF16Queries * STRIDE;           // kF16Queries x STRIDE
  unsigned short* k_tile = dout_tile + kF16Queries * STRIDE;           // kF16BackKeys x STRIDE
  unsigned short* v_tile = k_tile + kF16BackKeys * STRIDE;             // kF16BackKeys x STRIDE

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long long head = blockIdx.y, kv_head = static_cast<int>(blockIdx.y) / group_size;
  const int q0 = static_cast<int>(blockIdx.x) * kF16Queries, offset = n_keys - n_queries;
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};
  q += head * n_queries * D;
  dout += head * n_queries * D;
  dq += head * n_queries * D;
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;
  load_tile<D>(q_tile, q, q0, kF16Queries, n_queries);
  load_tile<D>(dout_tile, dout, q0, kF16Queries, n_queries);
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

  const int last_key = offset + q0 + kF16Queries - 1 < n_keys - 1 ? offset + q0 + kF16Queries - 1 : n_keys - 1;
  for (int k0 = 0; k0 <= last_key; k0 += kF16BackKeys) {
    __syncthreads();  // every warp is done with the previous K and V tiles (and Q, dO are loaded)
    load_tile<D>(k_tile, k, k0, kF16BackKeys, n_keys);
    load_tile<D>(v_tile, v, k0, kF16BackKeys, n_keys);
    __syncthreads();

    // S = Q K^T and dP = dO V^T for the warp's 16 queries and the tile's keys
    float p[KEY_TILES][4], ds[KEY_TILES][4];
    row_products<D, KEY_TILES>(q_tile, k_tile, dout_tile, v_tile, warp * 16, g, t, p, ds);
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
#pragma unroll
    for (int step = 0; step < KEY_STEPS; ++step) {
      unsigned ds_frag[4];
      accumulators_to_a(ds[2 * step], ds[2 * step + 1], ds_frag);
#pragma unroll
      for (int n = 0; n < OUT_TILES; ++n) {
        unsigned b[2];
        load_b_from_columns(k_tile, STRIDE, step * 16, n * 8, g, t, b);
        mma_16816(dq_acc[n], ds_frag, b);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < OUT_TILES; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (rows[e / 2] < n_queries) dq[rows[e / 2] * D + n * 8 + 2 * t + e % 2] = float_to_half(dq_acc[n][e] * scale);
}

}  // namespace npllama
