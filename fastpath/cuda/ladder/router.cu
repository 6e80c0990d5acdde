// Kernel ladder, step by step to the router of batch-1 decode (linear.cu's GEMV + moe.cu's route_topk).
//
// The function: logits = gate @ RMSNorm(x) (E rows of H bf16), softmax over all E experts, the top-k (ties to the
// lower id) and their weights renormalised. It reads E * H * 2 bytes (0.5 MB for Qwen3-30B-A3B): small, so latency,
// not bandwidth, decides. Run: python -m fastpath.ladder router
#include "../common.cuh"

// v1: one block does everything; thread e computes logit e serially over H (uncoalesced, one multiprocessor),
// then thread 0 does the softmax and a k-pass selection.                  grid (1), block E (<= 1024), smem E floats
__global__ void router_v1(const float* x, const float* norm_weight, float eps, const bf16_t* gate, int H, int E,
                          int top_k, int* topk_ids, float* topk_weights) {
    extern __shared__ float p[];
    const float inv = block_inv_rms(x, H, eps);
    const int e = threadIdx.x;
    if (e < E) {
        float z = 0.0f;
        for (int h = 0; h < H; ++h) z += widen(gate[static_cast<long long>(e) * H + h]) * norm_weight[h] * x[h];
        p[e] = z * inv;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    float m = -INFINITY, sum = 0.0f, total = 0.0f;
    for (int i = 0; i < E; ++i) m = fmaxf(m, p[i]);
    for (int i = 0; i < E; ++i) sum += expf(p[i] - m);
    for (int i = 0; i < E; ++i) p[i] = expf(p[i] - m) / sum;
    for (int j = 0; j < top_k; ++j) {
        int best = 0;
        for (int i = 1; i < E; ++i) if (p[i] > p[best]) best = i;
        topk_ids[j] = best, topk_weights[j] = p[best], total += p[best];
        p[best] = -1.0f;
    }
    for (int j = 0; j < top_k; ++j) topk_weights[j] /= total;
}

// v2: still one block, but a warp per expert row with 16-byte loads (coalesced), and the softmax and top-k in one
// warp with shuffle reductions instead of one thread.   grid (1), block 256, smem E floats
__global__ void router_v2(const float* x, const float* norm_weight, float eps, const bf16_t* gate, int H, int E,
                          int top_k, int* topk_ids, float* topk_weights) {
    extern __shared__ float p[];
    const float inv = block_inv_rms(x, H, eps);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float* xr[1] = {x};
    for (int e = warp; e < E; e += blockDim.x / 32) {
        float acc[1] = {0.0f};
        warp_dot_rows<bf16_t, 1>(gate + static_cast<long long>(e) * H, H, xr, 1, norm_weight, acc);
        const float z = warp_sum(acc[0]) * inv;
        if (lane == 0) p[e] = z;
    }
    __syncthreads();
    if (warp != 0) return;
    float m = -INFINITY, sum = 0.0f, total = 0.0f;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, p[e]);
    m = warp_max(m);
    for (int e = lane; e < E; e += 32) sum += expf(p[e] - m);
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) p[e] = expf(p[e] - m) / sum;
    __syncwarp();
    for (int j = 0; j < top_k; ++j) {
        float best = -1.0f;
        int best_e = E;
        for (int e = lane; e < E; e += 32)
            if (p[e] > best) best = p[e], best_e = e;
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float other = __shfl_xor_sync(0xffffffffu, best, offset);
            const int other_e = __shfl_xor_sync(0xffffffffu, best_e, offset);
            if (other > best || (other == best && other_e < best_e)) best = other, best_e = other_e;
        }
        if (lane == 0) topk_ids[j] = best_e, topk_weights[j] = best, p[best_e] = -1.0f;
        total += best;
        __syncwarp();
    }
    for (int j = lane; j < top_k; j += 32) topk_weights[j] /= total;
}

// v3 is production: the logits by the projection kernel over E / 8 blocks (the whole GPU reads the 0.5 MB, not
// one multiprocessor), then route_topk for the softmax and top-k.
