// Embedding lookup and the projection kernels used for q/k/v, o_proj and lm_head on the CUDA cores: ``linear`` for up
// to MAXT tokens a pass, and ``linear_streamed`` for one token on Hopper.
#include "bulk_copy.cuh"
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
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row_end = min(N, (blockIdx.x + 1) * rows_per_block);
    // At batch-1 decode a lane's first HEAD packs of its warp's first row (a whole 4 KB row of hidden 2048) are
    // loaded into registers before the wait, so they are at hand when the kernel ahead finishes. (The block's other
    // rows are not asked for ahead: see begin_after_previous in common.cuh.)
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

// y = residual + W x_in at one token (T = 1), as ``linear`` (same arguments, x_in = the RMSNorm of x where
// ``norm_weight`` is given), with the weights streamed into shared memory by the copy engine (sm_90): for the lm_head.
//
// Why: in ``linear`` a warp loads a row (8 packs a lane in flight), waits for it, reduces it and only then loads the
// next, and a block asks for its rows only once it is resident. Here one block per multiprocessor holds its share of
// the rows, and each warp owns ``slots`` row buffers in shared memory: before the wait for the kernel ahead, lane 0
// asks the copy engine for the warp's first ``slots`` rows (one bulk copy each, completing on the slot's mbarrier);
// each row used is replaced by the warp's next, so every warp keeps ``slots`` rows (24 KB at hidden 2048) on their
// way. The input, normalised once per block, is staged in shared memory in the order the packs read it (float4 q of
// pack p at q * packs + p), so that the 32 lanes of a warp read 32 consecutive float4s.
// Measured on an H200 (cupy_backend.STREAM_SHARED): the lm_head of Qwen3-30B-A3B (622 MB) 207 -> 154 us alone, and
// the captured batch-1 step 3.452 -> 3.406 ms. A layer's q/k/v (21 MB), o_proj and router streamed so were no faster
// in the step, or slower (docs/benchmarks.md): a block that holds most of a multiprocessor's shared memory leaves no
// room for the next kernel's blocks to start early.
// The rows go to the warps in turn: warp w of the block takes rows first + w, first + w + WARPS, ...
//                   grid (ceil(N / rows_per_block)), block 256, shared memory: see cupy_backend.streamed
template <typename W>
__global__ void __launch_bounds__(256, 1) linear_streamed(const float* __restrict__ x, int K,
                                                          const float* __restrict__ norm_weight, float eps,
                                                          const W* __restrict__ w, int N, int rows_per_block,
                                                          int slots, const float* residual, float* y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int PACK = Pack<W>::N;  // K is a whole number of packs (a row a whole number of 16-byte units)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, packs = K / PACK;
    const unsigned row_bytes = K * sizeof(W);
    // shared memory: WARPS x slots barriers (rounded up to 16 bytes), the input (K floats), WARPS x slots rows
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(smem) + warp * slots;
    float4* xs = reinterpret_cast<float4*>(smem + (WARPS * slots * 8 + 15) / 16 * 16);
    unsigned char* ring = reinterpret_cast<unsigned char*>(xs + K / 4) + warp * slots * row_bytes;
    const int first = blockIdx.x * rows_per_block + warp, end = min(N, (blockIdx.x + 1) * rows_per_block);
    const int rows = first < end ? (end - first + WARPS - 1) / WARPS : 0;  // this warp's
    auto request = [&](int j) {  // (lane 0) the warp's row j into slot j % slots
        unsigned long long* b = bar + j % slots;
        barrier_expect(b, row_bytes);
        bulk_copy(ring + j % slots * row_bytes, w + static_cast<long long>(first + WARPS * j) * K, row_bytes, b);
    };
    if (lane == 0) {  // the weights do not depend on the kernel ahead: asked for before waiting for it
        for (int j = 0; j < slots; ++j) barrier_init(bar + j, 1);
        barriers_initialised();
        for (int j = 0; j < min(slots, rows); ++j) request(j);
    }
    begin_after_previous();
    const float inv_rms = norm_weight ? block_inv_rms(x, K, eps) : 1.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const int i = k % PACK;
        reinterpret_cast<float*>(xs + i / 4 * packs + k / PACK)[i % 4] =
            norm_weight ? norm_weight[k] * (x[k] * inv_rms) : x[k];
    }
    __syncthreads();
    for (int j = 0; j < rows; ++j) {
        barrier_wait(bar + j % slots, j / slots % 2);
        const auto* row = reinterpret_cast<const decltype(Pack<W>::raw)*>(ring + j % slots * row_bytes);
        float acc = 0.0f;
#pragma unroll 8
        for (int p = lane; p < packs; p += 32) {
            Pack<W> wp;
            wp.raw = row[p];
#pragma unroll
            for (int q = 0; q < PACK / 4; ++q) {
                const float4 v = xs[q * packs + p];
                acc += wp[4 * q] * v.x + wp[4 * q + 1] * v.y + wp[4 * q + 2] * v.z + wp[4 * q + 3] * v.w;
            }
        }
        acc = warp_sum(acc);  // every lane's reads of the slot are done: it may be refilled
        if (lane == 0) {
            const int n = first + WARPS * j;
            y[n] = residual ? residual[n] + acc : acc;
            if (j + slots < rows) {
                before_copy_overwrites();
                request(j + slots);
            }
        }
    }
#endif
}
