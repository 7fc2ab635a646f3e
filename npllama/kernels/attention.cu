// Causal attention, multi-head or grouped-query, as CUDA kernels: npllama's GPU twin of
// npllama/ops/attention.py.
//
// The algorithm is FlashAttention-2's (Dao, 2023). For one (batch, query head), with s the scale:
//     S = s Q K^T, masked to -inf where a key comes after its query
//     L = logsumexp of each row of S        (kept for backward, one number per query)
//     O = softmax(S) V = exp(S - L) V
// and, in backward, with Dvec = rowsum(dO * O):
//     dV = P^T dO      dP = dO V^T      dS = P * (dP - Dvec)      dQ = s dS K      dK = s dS^T Q
//
// Grouped-query attention (Ainslie et al., 2023): the H query heads share Hkv key/value heads, G =
// H / Hkv query heads each (G = 1 is multi-head attention, Hkv = 1 multi-query). Query head h of
// batch b reads key/value head h / G of batch b; with the flattened index head = b * H + h that is
// kv_head = head / G, since b * H + h = (b * Hkv + h / G) * G + h % G. K and V are never copied per
// query head: the kernels index the shared head. A shared head is read by G query heads, so its
// gradients sum theirs:  dK = sum over the group of s dS^T Q,  dV = sum over the group of P^T dO.
//
// Kernels (every one launched with kThreads threads; the launch configuration of each is computed
// by npllama/kernels/attention.py, the one place that knows grid, block, shared memory and tiles):
//   attention_forward         a block per tile of BQ queries of one query head; it walks the key
//                             tiles up to the diagonal with an online softmax and writes O and L only.
//                             A key tile's K and then its V take turns in one shared buffer, so that
//                             two blocks fit on an A100's multiprocessor at D = 128 in float32 (on
//                             an H100's they fitted only at its largest shared-memory carveout).
//   attention_backward_dvec   Dvec = rowsum(dO * O), one row group of threads per query row.
//   attention_backward_dkdv   a block per tile of BK keys of one key/value head; it walks the query
//                             tiles that see them, for each of the G query heads of its group in
//                             turn, recomputes P = exp(S - L) and accumulates dK and dV in registers.
//   attention_backward_dq     a block per tile of BQ queries of one query head; it walks the key
//                             tiles it sees and accumulates dQ in registers.
// Each output element is written by exactly one thread, once: no atomics, so two runs give the same
// bits. Shapes: q, out, dout, dq (B H, Tq, D); k, v, dk, dv (B Hkv, Tk, D); lse, dvec (B H, Tq), all
// contiguous. gridDim.y is B H for the forward and dQ kernels, B Hkv for dK/dV. Query i sits at
// position Tk - Tq + i (Tq < Tk is decoding after a KV cache) and sees keys 0 .. Tk - Tq + i.
//
// Thread layout, in every kernel: the kThreads threads form kGroups row groups of kLanes
// consecutive threads (one quarter of a warp). A row group owns some rows of a tile; its lanes
// split the columns round-robin (column lane + kLanes * j), so a row's max and sum need only
// shuffles inside the group. Shared tiles have rows of D + 1 elements, so the rows that the lanes
// of a warp read together start in different banks.
//
// This file also compiles on the CPU (tests/harness/): it uses no CUDA feature beyond
// threadIdx/blockIdx, __syncthreads, __shfl_xor_sync, dynamic shared memory, expf/exp/logf/log and
// __int_as_float/__longlong_as_double.

#ifndef NPLLAMA_CPU_EMULATION
#define NPLLAMA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace npllama {

constexpr int kThreads = 128;                // threads per block, in every kernel
constexpr int kLanes = 8;                    // threads that share one row of a tile
constexpr int kGroups = kThreads / kLanes;   // row groups per block

__device__ __forceinline__ float exponential(float x) { return expf(x); }
__device__ __forceinline__ double exponential(double x) { return exp(x); }
__device__ __forceinline__ float logarithm(float x) { return logf(x); }
__device__ __forceinline__ double logarithm(double x) { return log(x); }

// -inf from its bits (NVRTC compiles without the host headers that define INFINITY)
template <typename T>
__device__ __forceinline__ T minus_infinity();
template <>
__device__ __forceinline__ float minus_infinity<float>() { return __int_as_float(static_cast<int>(0xff800000u)); }
template <>
__device__ __forceinline__ double minus_infinity<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ull));
}

template <typename T>
__device__ __forceinline__ T larger(T a, T b) { return a > b ? a : b; }

__device__ __forceinline__ int smaller(int a, int b) { return a < b ? a : b; }

// The max and the sum over the kLanes threads of a row group (consecutive lanes of one warp).
template <typename T>
__device__ __forceinline__ T group_max(T x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x = larger(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <typename T>
__device__ __forceinline__ T group_sum(T x) {
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// tile[r][d] = factor * source[first + r][d] for r < n_rows, with rows past n_total set to zero.
// The tile's rows are D + 1 long (padding); source is (n_total, D), contiguous.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* tile, const T* __restrict__ source, int first, int n_rows,
                                          int n_total, T factor) {
  for (int i = threadIdx.x; i < n_rows * D; i += kThreads) {
    const int r = i / D, d = i % D;
    tile[r * (D + 1) + d] = first + r < n_total ? source[(long long)(first + r) * D + d] * factor : T(0);
  }
}

// Forward: O and L for the BQ queries of tile blockIdx.x of query head blockIdx.y, whose keys and
// values are those of head blockIdx.y / group_size.
template <typename T, int D, int BQ, int BK>
__global__ void __launch_bounds__(kThreads, 1)
attention_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                  T* __restrict__ out, T* __restrict__ lse, int n_queries, int n_keys, int group_size, T scale) {
  constexpr int ROWS = BQ / kGroups;  // query rows per thread
  constexpr int KEYS = BK / kLanes;   // keys per thread in a score tile
  constexpr int COLS = D / kLanes;    // output columns per thread
  constexpr int STRIDE = D + 1;
  static_assert(BQ % kGroups == 0 && BK % kLanes == 0 && D % kLanes == 0, "tiles must split evenly");
  NPLLAMA_DYNAMIC_SHARED(shared);
  T* q_tile = reinterpret_cast<T*>(shared);  // BQ x STRIDE, already times the scale
  T* kv_tile = q_tile + BQ * STRIDE;         // BK x STRIDE: the key tile's K, then its V
  T* p_tile = kv_tile + BK * STRIDE;         // BQ x (BK + 1): this key tile's exp(S - running max)

  const int lane = threadIdx.x % kLanes, group = threadIdx.x / kLanes;
  const long long head = blockIdx.y, kv_head = static_cast<int>(blockIdx.y) / group_size;  // = b Hkv + h / G
  const int q0 = blockIdx.x * BQ;
  const int offset = n_keys - n_queries;  // the position of query 0
  q += head * n_queries * D;
  out += head * n_queries * D;
  lse += head * n_queries;
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;
  load_rows<T, D>(q_tile, q, q0, BQ, n_queries, scale);  // (s Q) K^T = s (Q K^T)

  T row_max[ROWS], row_sum[ROWS], acc[ROWS][COLS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    row_max[i] = minus_infinity<T>();
    row_sum[i] = T(0);  // this thread's share of the row's sum: its lanes' columns only
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[i][c] = T(0);
  }
  const int last_key = smaller(offset + q0 + BQ - 1, n_keys - 1);  // the last key the tile's queries see
  for (int k0 = 0; k0 <= last_key; k0 += BK) {
    __syncthreads();  // every thread is done with the previous V and P tiles (and Q is loaded)
    load_rows<T, D>(kv_tile, k, k0, BK, n_keys, T(1));
    __syncthreads();

    // S = (s Q) K^T for this thread's rows (group * ROWS + i) and keys (lane + kLanes * j)
    T score[ROWS][KEYS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
      for (int j = 0; j < KEYS; ++j) score[i][j] = T(0);
    for (int d = 0; d < D; ++d) {
      T q_col[ROWS], k_col[KEYS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) q_col[i] = q_tile[(group * ROWS + i) * STRIDE + d];
#pragma unroll
      for (int j = 0; j < KEYS; ++j) k_col[j] = kv_tile[(lane + kLanes * j) * STRIDE + d];
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int j = 0; j < KEYS; ++j) score[i][j] += q_col[i] * k_col[j];
    }

    // online softmax: rescale what the earlier key tiles gave by exp(old max - new max)
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int query_pos = offset + q0 + group * ROWS + i;
      T tile_max = minus_infinity<T>();
#pragma unroll
      for (int j = 0; j < KEYS; ++j) {
        const int key = k0 + lane + kLanes * j;
        if (key > query_pos || key >= n_keys) score[i][j] = minus_infinity<T>();  // the future, or past the end
        tile_max = larger(tile_max, score[i][j]);
      }
      // every query sees key 0, in the first key tile, so new_max is finite from there on
      const T new_max = larger(row_max[i], group_max(tile_max));
      const T rescale = exponential(row_max[i] - new_max);  // exp(-inf) = 0 on the first tile
      T partial_sum = T(0);
#pragma unroll
      for (int j = 0; j < KEYS; ++j) {
        const T prob = exponential(score[i][j] - new_max);
        partial_sum += prob;
        p_tile[(group * ROWS + i) * (BK + 1) + lane + kLanes * j] = prob;
      }
      row_sum[i] = row_sum[i] * rescale + partial_sum;
#pragma unroll
      for (int c = 0; c < COLS; ++c) acc[i][c] *= rescale;
      row_max[i] = new_max;
    }
    __syncthreads();  // the whole P tile is written
    // (and every thread is done with K: its buffer takes V)
    load_rows<T, D>(kv_tile, v, k0, BK, n_keys, T(1));
    __syncthreads();  // the whole V tile is loaded

    // O += P V for this thread's rows and columns (lane + kLanes * c)
    for (int key = 0; key < BK; ++key) {
      T p_col[ROWS], v_row[COLS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) p_col[i] = p_tile[(group * ROWS + i) * (BK + 1) + key];
#pragma unroll
      for (int c = 0; c < COLS; ++c) v_row[c] = kv_tile[key * STRIDE + lane + kLanes * c];
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int c = 0; c < COLS; ++c) acc[i][c] += p_col[i] * v_row[c];
    }
  }

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = q0 + group * ROWS + i;
    const T total = group_sum(row_sum[i]);  // every lane calls the shuffle, in range or not
    if (row < n_queries) {
#pragma unroll
      for (int c = 0; c < COLS; ++c) out[(long long)row * D + lane + kLanes * c] = acc[i][c] / total;
      if (lane == 0) lse[row] = row_max[i] + logarithm(total);
    }
  }
}

// Dvec = rowsum(dO * O) over the n_rows = BH * Tq rows, kGroups rows per block.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1)
attention_backward_dvec(const T* __restrict__ dout, const T* __restrict__ out, T* __restrict__ dvec, int n_rows) {
  constexpr int COLS = D / kLanes;
  const int lane = threadIdx.x % kLanes;
  const long long row = (long long)blockIdx.x * kGroups + threadIdx.x / kLanes;
  T partial = T(0);
  if (row < n_rows) {
#pragma unroll
    for (int c = 0; c < COLS; ++c) partial += dout[row * D + lane + kLanes * c] * out[row * D + lane + kLanes * c];
  }
  const T total = group_sum(partial);
  if (row < n_rows && lane == 0) dvec[row] = total;
}

// dK and dV for the BK keys of tile blockIdx.x of key/value head blockIdx.y, over every query that
// sees them in each of the group_size query heads that share the head.
template <typename T, int D, int BQ, int BK>
__global__ void __launch_bounds__(kThreads, 1)
attention_backward_dkdv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const T* __restrict__ lse, const T* __restrict__ dvec,
                        T* __restrict__ dk, T* __restrict__ dv, int n_queries, int n_keys, int group_size,
                        T scale) {
  constexpr int ROWS = BK / kGroups;     // keys per thread: rows of dK and dV
  constexpr int QUERIES = BQ / kLanes;   // queries per thread in a score tile
  constexpr int COLS = D / kLanes;
  constexpr int STRIDE = D + 1;
  static_assert(BK % kGroups == 0 && BQ % kLanes == 0 && D % kLanes == 0, "tiles must split evenly");
  NPLLAMA_DYNAMIC_SHARED(shared);
  T* k_tile = reinterpret_cast<T*>(shared);  // BK x STRIDE
  T* v_tile = k_tile + BK * STRIDE;          // BK x STRIDE
  T* q_tile = v_tile + BK * STRIDE;          // BQ x STRIDE, times the scale
  T* dout_tile = q_tile + BQ * STRIDE;       // BQ x STRIDE
  T* p_tile = dout_tile + BQ * STRIDE;       // BK x (BQ + 1): P^T
  T* ds_tile = p_tile + BK * (BQ + 1);       // BK x (BQ + 1): dS^T
  T* lse_tile = ds_tile + BK * (BQ + 1);     // BQ
  T* dvec_tile = lse_tile + BQ;              // BQ

  const int lane = threadIdx.x % kLanes, group = threadIdx.x / kLanes;
  const long long kv_head = blockIdx.y;
  const int k0 = blockIdx.x * BK;
  const int offset = n_keys - n_queries;
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;
  dk += kv_head * n_keys * D;
  dv += kv_head * n_keys * D;
  load_rows<T, D>(k_tile, k, k0, BK, n_keys, T(1));
  load_rows<T, D>(v_tile, v, k0, BK, n_keys, T(1));

  T dk_acc[ROWS][COLS], dv_acc[ROWS][COLS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i)
#pragma unroll
    for (int c = 0; c < COLS; ++c) dk_acc[i][c] = dv_acc[i][c] = T(0);

  // The query tiles that see key k0: from the one holding the first query that sees it to the last.
  const int first_query = k0 - offset > 0 ? k0 - offset : 0;
  const int first_tile = first_query / BQ, n_tiles = (n_queries + BQ - 1) / BQ - first_tile;
  // forward was: the G query heads kv_head * G + g (g < G) all read this K and V, so dK and dV
  // are sums over them: one walk over (query head of the group, query tile), the heads in turn
  for (int step = 0; step < group_size * n_tiles; ++step) {
    const long long head = kv_head * group_size + step / n_tiles;  // query head step / n_tiles of the group
    const int q0 = (first_tile + step % n_tiles) * BQ;
    const T* head_lse = lse + head * n_queries;
    const T* head_dvec = dvec + head * n_queries;
    __syncthreads();  // every thread is done with the previous query tile (and K, V are loaded)
    load_rows<T, D>(q_tile, q + head * n_queries * D, q0, BQ, n_queries, scale);
    load_rows<T, D>(dout_tile, dout + head * n_queries * D, q0, BQ, n_queries, T(1));
    for (int r = threadIdx.x; r < BQ; r += kThreads) {
      lse_tile[r] = q0 + r < n_queries ? head_lse[q0 + r] : T(0);
      dvec_tile[r] = q0 + r < n_queries ? head_dvec[q0 + r] : T(0);
    }
    __syncthreads();

    // S^T = K (s Q)^T and dP^T = V dO^T for this thread's keys (group * ROWS + i) and queries (lane + kLanes * j)
    T score[ROWS][QUERIES], dprob[ROWS][QUERIES];
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
      for (int j = 0; j < QUERIES; ++j) score[i][j] = dprob[i][j] = T(0);
    for (int d = 0; d < D; ++d) {
      T k_col[ROWS], v_col[ROWS], q_col[QUERIES], dout_col[QUERIES];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        k_col[i] = k_tile[(group * ROWS + i) * STRIDE + d];
        v_col[i] = v_tile[(group * ROWS + i) * STRIDE + d];
      }
#pragma unroll
      for (int j = 0; j < QUERIES; ++j) {
        q_col[j] = q_tile[(lane + kLanes * j) * STRIDE + d];
        dout_col[j] = dout_tile[(lane + kLanes * j) * STRIDE + d];
      }
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int j = 0; j < QUERIES; ++j) {
          score[i][j] += k_col[i] * q_col[j];
          dprob[i][j] += v_col[i] * dout_col[j];
        }
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
      for (int j = 0; j < QUERIES; ++j) {
        const int key = k0 + group * ROWS + i, query = lane + kLanes * j;
        const bool seen = key <= offset + q0 + query && key < n_keys && q0 + query < n_queries;
        // forward was: P = exp(S - L), zero where the key lies in the query's future
        const T prob = seen ? exponential(score[i][j] - lse_tile[query]) : T(0);
        // forward was: O = P V with P = softmax(S) per row, so dS = P * (dP - Dvec)
        p_tile[(group * ROWS + i) * (BQ + 1) + query] = prob;
        ds_tile[(group * ROWS + i) * (BQ + 1) + query] = prob * (dprob[i][j] - dvec_tile[query]);
      }
    __syncthreads();  // the whole P^T and dS^T tiles are written

    // dV += P^T dO and dK += dS^T (s Q) for this thread's keys and columns (lane + kLanes * c)
    for (int query = 0; query < BQ; ++query) {
      T p_col[ROWS], ds_col[ROWS], dout_row[COLS], q_row[COLS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        p_col[i] = p_tile[(group * ROWS + i) * (BQ + 1) + query];
        ds_col[i] = ds_tile[(group * ROWS + i) * (BQ + 1) + query];
      }
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        dout_row[c] = dout_tile[query * STRIDE + lane + kLanes * c];
        q_row[c] = q_tile[query * STRIDE + lane + kLanes * c];
      }
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
          dv_acc[i][c] += p_col[i] * dout_row[c];
          dk_acc[i][c] += ds_col[i] * q_row[c];
        }
    }
  }

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int key = k0 + group * ROWS + i;
    if (key < n_keys) {
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        dk[(long long)key * D + lane + kLanes * c] = dk_acc[i][c];
        dv[(long long)key * D + lane + kLanes * c] = dv_acc[i][c];
      }
    }
  }
}

// dQ for the BQ queries of tile blockIdx.x of query head blockIdx.y, over every key they see (of
// key/value head blockIdx.y / group_size).
template <typename T, int D, int BQ, int BK>
__global__ void __launch_bounds__(kThreads, 1)
attention_backward_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ dout, const T* __restrict__ lse, const T* __restrict__ dvec,
                      T* __restrict__ dq, int n_queries, int n_keys, int group_size, T scale) {
  constexpr int ROWS = BQ / kGroups;  // queries per thread: rows of dQ
  constexpr int KEYS = BK / kLanes;   // keys per thread in a score tile
  constexpr int COLS = D / kLanes;
  constexpr int STRIDE = D + 1;
  static_assert(BQ % kGroups == 0 && BK % kLanes == 0 && D % kLanes == 0, "tiles must split evenly");
  NPLLAMA_DYNAMIC_SHARED(shared);
  T* q_tile = reinterpret_cast<T*>(shared);  // BQ x STRIDE, times the scale
  T* dout_tile = q_tile + BQ * STRIDE;       // BQ x STRIDE
  T* k_tile = dout_tile + BQ * STRIDE;       // BK x STRIDE
  T* v_tile = k_tile + BK * STRIDE;          // BK x STRIDE
  T* ds_tile = v_tile + BK * STRIDE;         // BQ x (BK + 1)

  const int lane = threadIdx.x % kLanes, group = threadIdx.x / kLanes;
  const long long head = blockIdx.y, kv_head = static_cast<int>(blockIdx.y) / group_size;
  const int q0 = blockIdx.x * BQ;
  const int offset = n_keys - n_queries;
  q += head * n_queries * D;
  dout += head * n_queries * D;
  dq += head * n_queries * D;
  lse += head * n_queries;
  dvec += head * n_queries;
  k += kv_head * n_keys * D;
  v += kv_head * n_keys * D;
  load_rows<T, D>(q_tile, q, q0, BQ, n_queries, scale);
  load_rows<T, D>(dout_tile, dout, q0, BQ, n_queries, T(1));

  T row_lse[ROWS], row_dvec[ROWS], dq_acc[ROWS][COLS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = q0 + group * ROWS + i;
    row_lse[i] = row < n_queries ? lse[row] : T(0);
    row_dvec[i] = row < n_queries ? dvec[row] : T(0);
#pragma unroll
    for (int c = 0; c < COLS; ++c) dq_acc[i][c] = T(0);
  }
  const int last_key = smaller(offset + q0 + BQ - 1, n_keys - 1);
  for (int k0 = 0; k0 <= last_key; k0 += BK) {
    __syncthreads();  // every thread is done with the previous K, V and dS tiles (and Q, dO are loaded)
    load_rows<T, D>(k_tile, k, k0, BK, n_keys, T(1));
    load_rows<T, D>(v_tile, v, k0, BK, n_keys, T(1));
    __syncthreads();

    // S = (s Q) K^T and dP = dO V^T for this thread's queries (group * ROWS + i) and keys (lane + kLanes * j)
    T score[ROWS][KEYS], dprob[ROWS][KEYS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
      for (int j = 0; j < KEYS; ++j) score[i][j] = dprob[i][j] = T(0);
    for (int d = 0; d < D; ++d) {
      T q_col[ROWS], dout_col[ROWS], k_col[KEYS], v_col[KEYS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) {
        q_col[i] = q_tile[(group * ROWS + i) * STRIDE + d];
        dout_col[i] = dout_tile[(group * ROWS + i) * STRIDE + d];
      }
#pragma unroll
      for (int j = 0; j < KEYS; ++j) {
        k_col[j] = k_tile[(lane + kLanes * j) * STRIDE + d];
        v_col[j] = v_tile[(lane + kLanes * j) * STRIDE + d];
      }
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int j = 0; j < KEYS; ++j) {
          score[i][j] += q_col[i] * k_col[j];
          dprob[i][j] += dout_col[i] * v_col[j];
        }
    }
#pragma unroll
    for (int i = 0; i < ROWS; ++i)
#pragma unroll
      for (int j = 0; j < KEYS; ++j) {
        const int query = q0 + group * ROWS + i, key = k0 + lane + kLanes * j;
        const bool seen = key <= offset + query && key < n_keys && query < n_queries;
        // forward was: P = exp(S - L); then dS = P * (dP - Dvec)
        const T prob = seen ? exponential(score[i][j] - row_lse[i]) : T(0);
        ds_tile[(group * ROWS + i) * (BK + 1) + lane + kLanes * j] = prob * (dprob[i][j] - row_dvec[i]);
      }
    __syncthreads();  // the whole dS tile is written

    // dQ += dS K for this thread's queries and columns (lane + kLanes * c); the scale comes at the end
    for (int key = 0; key < BK; ++key) {
      T ds_col[ROWS], k_row[COLS];
#pragma unroll
      for (int i = 0; i < ROWS; ++i) ds_col[i] = ds_tile[(group * ROWS + i) * (BK + 1) + key];
#pragma unroll
      for (int c = 0; c < COLS; ++c) k_row[c] = k_tile[key * STRIDE + lane + kLanes * c];
#pragma unroll
      for (int i = 0; i < ROWS; ++i)
#pragma unroll
        for (int c = 0; c < COLS; ++c) dq_acc[i][c] += ds_col[i] * k_row[c];
    }
  }

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int row = q0 + group * ROWS + i;
    if (row < n_queries) {
      // forward was: S = s Q K^T, so dQ = s dS K
#pragma unroll
      for (int c = 0; c < COLS; ++c) dq[(long long)row * D + lane + kLanes * c] = scale * dq_acc[i][c];
    }
  }
}

}  // namespace npllama
