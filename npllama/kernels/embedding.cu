// The embedding backward without atomics: dweight[v, c] = the sum, in position order, of dy[p, c]
// over the positions p with ids[p] == v. (A scatter-add with atomics would add them in whatever
// order the threads arrive, so two runs could differ in the last bits.)
//
// The caller sorts the positions by (id, position): sorted_ids[r] is the id of the r-th position in
// that order and order[r] the position itself. One thread per (r, column c) where r starts its id's
// run: it sums the run's rows of dy in order and writes dweight[id, c] once. dweight starts at zero
// (ids that never occur keep a zero gradient). Shapes: sorted_ids, order (N,); dy (N, C); dweight (V, C).

namespace npllama {

template <typename T>
__global__ void embedding_backward(const long long* __restrict__ sorted_ids, const long long* __restrict__ order,
                                   const T* __restrict__ dy, T* __restrict__ dweight, int n_positions, int dim) {
  const long long index = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (index >= (long long)n_positions * dim) return;
  const int first = static_cast<int>(index / dim), c = static_cast<int>(index % dim);
  if (first > 0 && sorted_ids[first] == sorted_ids[first - 1]) return;  // not the start of its id's run
  const long long id = sorted_ids[first];
  // forward was: y[p] = weight[ids[p]], so dweight[id] = sum of dy[p] over the positions that read row id
  T total = dy[order[first] * dim + c];
  for (int r = first + 1; r < n_positions && sorted_ids[r] == id; ++r) total += dy[order[r] * dim + c];
  dweight[id * dim + c] = total;
}

}  // namespace npllama
