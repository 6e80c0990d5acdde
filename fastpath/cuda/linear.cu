// Embedding lookup and the projection kernel used for q/k/v, o_proj and lm_head.
#include "common.cuh"

// x[t, :] = table[ids[t], :] widened to float32.                         grid (T), block 256
template <typename W>
__global__ void embed(const long long* __restrict__ ids, const W* __restrict__ table, int H, float* __restrict__ x) {
    begin_after_previous();
    const W* row = table + ids[blockIdx.x] * H;
    for (int k = threadIdx.x; k < H; k += blockDim.x) x[static_cast<long long>(blockIdx.x) * H + k] = widen(row[k]);
}

// y[t, :] = weight * x[t, :] / rms(x[t, :]): the norm before a dense MLP (whose input several kernels read).
//                                                                        grid (T), block 256
__global__ void rms_norm(const float* __restrict__ x, int H, const float* __restrict__ weight, float eps,
                         float* __restrict__ y) {
    begin_after_previous();
    const long long row = static_cast<long long>(blockIdx.x) * H;
    const float inv = block_inv_rms(x + row, H, eps);
    for (int k = threadIdx.x; k < H; k += blockDim.x) y[row + k] = weight[k] * (x[row + k] * inv);
}

constexpr int WARPS = 8;  // every GEMV block is 256 threads

// y[t, n] = residual[t, n] + sum_k W[n, k] * xin[t, k]     for t < T, n < N
// with xin = x * norm_weight / rms(x) when ``norm_weight`` is given (the RMSNorm before a projection, fused: each warp
// computes the norm factor of its tokens itself, after its first row's weights are on their way, so the normalised
// activations never go through memory and no barrier holds the weight loads back) and x otherwise; ``residual`` may be null (then y = the projection) and may equal y (in-place residual add).
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
    begin_after_previous();
    const int t0 = blockIdx.y * MAXT, nt = min(MAXT, T - t0);
    const float* xt[MAXT];
#pragma unroll
    for (int t = 0; t < MAXT; ++t) xt[t] = x + static_cast<long long>(t0 + min(t, nt - 1)) * K;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row_end = min(N, (blockIdx.x + 1) * rows_per_block);
    float inv_rms[MAXT];
    bool have_inv_rms = false;
    for (int n = blockIdx.x * rows_per_block + warp; n < row_end; n += WARPS) {
        float acc[MAXT] = {};
        warp_dot_rows<W, MAXT>(w + static_cast<long long>(n) * K, K, xt, nt, norm_weight, acc);
        if (!have_inv_rms) {
#pragma unroll
            for (int t = 0; t < MAXT; ++t) inv_rms[t] = norm_weight && t < nt ? warp_inv_rms(xt[t], K, eps) : 1.0f;
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
