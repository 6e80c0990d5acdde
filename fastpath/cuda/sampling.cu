// Greedy decoding on the device, so that a captured decode step feeds its own next input: the argmax of the logits
// (the lowest index on ties, as numpy.argmax), in two passes, then the step's bookkeeping.
#include "common.cuh"

__device__ __forceinline__ void keep_better(float& best, int& best_i, float v, int i) {
    if (v > best || (v == best && i < best_i)) best = v, best_i = i;
}

__device__ __forceinline__ void warp_argmax(float& best, int& best_i) {
    for (int offset = 16; offset > 0; offset >>= 1)
        keep_better(best, best_i, __shfl_xor_sync(0xffffffffu, best, offset),
                    __shfl_xor_sync(0xffffffffu, best_i, offset));
}

// Each block: the best of its contiguous share of one row's vocabulary (row blockIdx.y of ``logits``, V wide). A
// NaN or +Inf logit sets non_finite[0] = 1 (the host refuses the tokens then, as the reference sampler does).
// ``first_id``: the token id of a row's first logit (a rank of a split model scores the rows of lm_head from
// first_id on).                                                         grid (blocks <= 1024, rows), block 256
__global__ void argmax_partial(const float* __restrict__ logits, int V, int first_id, float* __restrict__ best_val,
                               int* __restrict__ best_idx, int* __restrict__ non_finite) {
    __shared__ float vals[8];
    __shared__ int idxs[8];
    begin_after_previous();
    const float* row = logits + static_cast<long long>(blockIdx.y) * V;
    const int per_block = (V + gridDim.x - 1) / gridDim.x;
    const int begin = blockIdx.x * per_block, end = min(V, begin + per_block);
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float v = row[i];
        if (isnan(v) || v == INFINITY) non_finite[0] = 1;
        keep_better(best, best_i, v, i);
    }
    warp_argmax(best, best_i);
    if (threadIdx.x % 32 == 0) vals[threadIdx.x / 32] = best, idxs[threadIdx.x / 32] = best_i;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = threadIdx.x < blockDim.x / 32 ? vals[threadIdx.x] : -INFINITY;
        best_i = threadIdx.x < blockDim.x / 32 ? idxs[threadIdx.x] : 0x7fffffff;
        warp_argmax(best, best_i);
        const int at = blockIdx.y * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) best_val[at] = best, best_idx[at] = best_i == 0x7fffffff ? best_i : best_i + first_id;
    }
}

// Row blockIdx.x: the winner of its partial results -- ``blocks`` per row from each of ``ranks`` ranks, laid out
// (ranks, rows, blocks) -- becomes the row's next input token; its position moves on by one.
//                                                                       grid (rows), block 32
__global__ void greedy_advance(const float* __restrict__ best_val, const int* __restrict__ best_idx, int blocks,
                               int rows, int ranks, long long* __restrict__ next_id, int* __restrict__ tok_pos,
                               int* __restrict__ sampled) {
    begin_after_previous();
    const int row = blockIdx.x;
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < ranks * blocks; i += 32) {
        const int at = (i / blocks * rows + row) * blocks + i % blocks;
        keep_better(best, best_i, best_val[at], best_idx[at]);
    }
    warp_argmax(best, best_i);
    if (threadIdx.x == 0) {
        next_id[row] = best_i;
        sampled[row] = best_i;
        tok_pos[row] += 1;
    }
}
