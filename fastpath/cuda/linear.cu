// Embedding lookup and the projection kernel used for q/k/v, o_proj and lm_head.
#include "common.cuh"

// x[t, :] = table[ids[t], :] widened to float32.                         grid (T), block 256
template <typename W>
__global__ void embed(const long long* __restrict__ ids, const W* __restrict__ table, int H, float* __restrict__ x) {
    begin_after_previous();
    const W* row = table + ids[blockIdx.x] * H;
    for (int k = threadIdx.x; k < H; k += blockDim.x) x[static_cast<long long>(blockIdx.x) * H + k] = widen(row[k]);
}

// y[t, :] = weight * x[t, :] / rms(x[t, :]): the norm before a dense MLP (whose input several kernels read), or
// before a tile product; O = bf16_t: rounded for one that takes bf16 activations.     grid (T), block 256
template <typename O>
__global__ void rms_norm(const float* __restrict__ x, int H, const float* __restrict__ weight, float eps,
                         O* __restrict__ y) {
    begin_after_previous();
    const long long row = static_cast<long long>(blockIdx.x) * H;
    const float inv = block_inv_rms(x + row, H, eps);
    for (int k = threadIdx.x; k < H; k += blockDim.x) store(y + row + k, weight[k] * (x[row + k] * inv));
}

constexpr int WARPS = 8;  // every GEMV block is 256 threads

// y[t, n] = residual[t, n] + sum_k W[n, k] * xin[t, k]     for t < T, n < N
// with xin = x * norm_weight / rms(x) when ``norm_weight`` is given (the RMSNorm before a projection, fused: each warp
// sums the squares of its tokens' activations while it multiplies its first row, so the normalised activations never
// go through memory, no barrier holds the weight loads back and x is read once) and x otherwise; ``residual`` may be
// null (then y = the projection) and may equal y (in-place residual add).
//
// One warp per weight row, ``rows_per_block`` rows per block; blockIdx.y takes MAXT tokens at a time, so at
// decode (T <= MAXT) every weight byte is read once.                 grid (ceil(N / rows_per_block), ceil(T / MAXT))
template <typename W, int MAXT>
__global__ void __launch_bounds__(256) linear(const float* __restrict__ x, int T, int K,
                                              const float* __restrict__ norm_weight, float eps,
                                              const W* __restrict__ w, int N, int rows_per_block,
                                              const float* residual, float* y) {
    if (blockIdx.y == 0)  // the weights do not depend on the kernel ahead: ask for them while it runs
        prefetch_rows(w, K, blockIdx.x * rows_per_block, min(N, (blockIdx.x + 1) * rows_per_block));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row_end = min(N, (blockIdx.x + 1) * rows_per_block);
    // At batch-1 decode a lane's first HEAD packs of its warp's first row (a whole 4 KB row of hidden 2048) are even
    // loaded into registers before the wait, so they are at hand, not just in L2, when the kernel ahead finishes.
    constexpr int HEAD = 8, PACK = Pack<W>::N;  // HEAD: warp_dot_rows' packs in flight at MAXT 1
    Pack<W> head[HEAD];
    const int first = blockIdx.x * rows_per_block + warp;
    const bool preload = MAXT == 1 && first < row_end && K % PACK == 0 && K / PACK >= 32 * HEAD;
    if (preload)
#pragma unroll
        for (int u = 0; u < HEAD; ++u) head[u].load(w + static_cast<long long>(first) * K + (lane + 32 * u) * PACK);
    begin_after_previous();
    const int t0 = blockIdx.y * MAXT, nt = min(MAXT, T - t0);
    const float* xt[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; ++t) xt[t] = x + static_cast<long long>(t0 + min(t, nt - 1)) * K;

    float inv_rms[MAXT];
    bool have_inv_rms = false;
    for (int n = blockIdx.x * rows_per_block + warp; n < row_end; n += WARPS) {
        float acc[MAXT] = {}, squares[MAXT] = {};
        // Which products also sum squares or take the head is decided by template flags: with a head pointer chosen
        // at run time, nvcc kept the head in local memory instead of registers.
        if (preload && n == first) {
            if (norm_weight)
                warp_dot_rows<W, MAXT, true, true>(w + static_cast<long long>(n) * K, K, xt, nt, norm_weight, acc,
                                                   squares, head);
            else
                warp_dot_rows<W, MAXT, false, true>(w + static_cast<long long>(n) * K, K, xt, nt, norm_weight, acc,
                                                    squares, head);
        } else if (norm_weight && !have_inv_rms)
            warp_dot_rows<W, MAXT, true>(w + static_cast<long long>(n) * K, K, xt, nt, norm_weight, acc, squares);
        else
            warp_dot_rows<W, MAXT>(w + static_cast<long long>(n) * K, K, xt, nt, norm_weight, acc);
        if (!have_inv_rms) {
#pragma unroll
            for (int t = 0; t < MAXT; ++t)
                inv_rms[t] = norm_weight && t < nt ? 1.0f / sqrtf(warp_sum(squares[t]) / K + eps) : 1.0f;
            have_inv_rms = true;
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            if (t >= nt) break;
            const float sum = warp_sum(acc[t]) * inv_rms[t];
            const long long at = static_cast<long long>(t0 + t) * N + n;
            if (lane == 0) y[at] = residual ? residual[at] + sum : sum;
        }
    }
}
