// The projections (q/k/v, o_proj, router logits) of a small decode batch: 2 to 16 tokens times a weight matrix, on
// the tensor cores, split along K.
//
// linear.cu's GEMV reads each weight row once for 8 tokens on the CUDA cores, and mma_few.cu takes 8 tokens a block
// with its warps splitting K, every block splitting its tokens' activations itself. Here a block holds *every* token
// of the step; the activations are read once per block into shared memory, split into bf16 hi + lo there once, and
// shared by the block's warps, which split the rows; and the weights are in flight before the kernel ahead has
// finished:
//
//   block (row block, split): rows r0 .. r0 + 63 (16 per warp, one mma tile), k in [256 split, 256 split + 256)
//   1. before waiting for the kernel ahead, each lane loads all its weights of the block's k range into registers
//      (8 k-steps x rows g and g + 8 x 16 bytes: the weights do not depend on the kernel ahead);
//   2. the tokens' k range goes to shared memory by cp.async, and is split into hi/lo in place;
//   3. each warp multiplies its 16 rows by every 8-token tile (mma.m16n8k16, the k order of mma_few.cu);
//   4. each split writes its partial sums to ``partial``; the last split of a row block to finish (counted by an
//      atomic in ``arrivals``, reset by that block) adds them up in split order and writes out[t, r] =
//      residual[t, r] + x[t] . W[r] -- the same sum whatever order the blocks ran in.
//
// At 64 tokens mma_few.cu stays faster (this kernel's 64 KB of activations a block leave 3 blocks a multiprocessor).
// T <= MAX_TOKENS; K a multiple of 32.       grid (ceil(N / 64), ceil(K / 256)), block 128, dynamic smem
//                                           8 ceil(T / 8) x (256 + 4) floats
#include "mma.cuh"

constexpr int WARPS = 4;
constexpr int ROWS = 16 * WARPS;      // rows of a block
constexpr int KSTEP = 32;             // k of one mma_kstep
constexpr int STEPS = 8;              // k-steps of a split
constexpr int KSPLIT = KSTEP * STEPS;  // k of a split
constexpr int STRIDE = KSPLIT + 4;    // floats per token in shared memory: padded so the fragment reads hit no
                                      // bank twice (token g's row starts 4 banks after token g - 1's)
constexpr int MAX_TOKENS = 16, NT = MAX_TOKENS / 8;  // tokens, and their 8-token tiles (the n of an mma)

__global__ void __launch_bounds__(128) mma_batch(const float* __restrict__ x, int T, int K,
                                                 const bf16_t* __restrict__ w, int N, const float* residual,
                                                 float* __restrict__ partial, unsigned* __restrict__ arrivals,
                                                 float* out) {
    extern __shared__ __align__(16) float xs[];  // (8 tiles tokens, STRIDE): the block's k range of every token
    __shared__ bool last;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const int r0 = blockIdx.x * ROWS, split = blockIdx.y, splits = gridDim.y, k0 = split * KSPLIT;
    const int steps = min(KSPLIT, K - k0) / KSTEP, tiles = (T + 7) / 8;

    uint4 wv[STEPS][2];  // 1. [k-step][row g, g + 8]; rows past N are clamped to N - 1 (loaded, never stored)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const bf16_t* row = w + static_cast<long long>(min(N - 1, r0 + 16 * warp + g + 8 * h)) * K + k0 + 8 * c;
#pragma unroll
        for (int i = 0; i < STEPS; ++i)
            if (i < steps) wv[i][h] = __ldg(reinterpret_cast<const uint4*>(row + i * KSTEP));
    }
    begin_after_previous();

    const int quads = steps * KSTEP / 4;  // 2. float4s of a token's k range; tokens past T are zeros
    for (int q = threadIdx.x; q < 8 * tiles * quads; q += blockDim.x) {
        const int t = q / quads, f = 4 * (q % quads);
        copy_async16(xs + t * STRIDE + f, x + static_cast<long long>(min(t, T - 1)) * K + k0 + f, t < T);
    }
    copies_issued();
    copies_landed<0>();
    __syncthreads();
    for (int q = threadIdx.x; q < 8 * tiles * quads / 2; q += blockDim.x) {  // 8 floats -> 4 hi words, 4 lo words
        const int t = q / (quads / 2), f = 8 * (q % (quads / 2));
        float4* p = reinterpret_cast<float4*>(xs + t * STRIDE + f);
        const float4 a = p[0], b = p[1];
        uint4 hi, lo;
        split2(a.x, a.y, hi.x, lo.x), split2(a.z, a.w, hi.y, lo.y);
        split2(b.x, b.y, hi.z, lo.z), split2(b.z, b.w, hi.w, lo.w);
        reinterpret_cast<uint4*>(p)[0] = hi, reinterpret_cast<uint4*>(p)[1] = lo;
    }
    __syncthreads();

    float acc[NT][4] = {};  // 3. [token tile][fragment]: rows g, g + 8 x tokens 2c, 2c + 1 of the tile
#pragma unroll
    for (int i = 0; i < STEPS; ++i) {
        if (i >= steps) break;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            if (j >= tiles) break;
            const uint4* b = reinterpret_cast<const uint4*>(xs + (8 * j + g) * STRIDE + i * KSTEP + 8 * c);
            const uint4 hi = b[0], lo = b[1];
            mma_kstep(acc[j], wv[i], reinterpret_cast<const unsigned (&)[4]>(hi),
                      reinterpret_cast<const unsigned (&)[4]>(lo));
        }
    }

    // 4. fragment f of tile j: row r0 + 16 warp + g + 8 (f / 2), token 8 j + 2 c + f % 2
    auto each_output = [&](auto&& use) {
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int f = 0; f < 4; ++f) {
                const int t = 8 * j + 2 * c + f % 2, r = r0 + 16 * warp + g + 8 * (f / 2);
                if (j < tiles && t < T && r < N) use(static_cast<long long>(t) * N + r, acc[j][f]);
            }
    };
    if (splits == 1) {
        each_output([&](long long at, float v) { out[at] = (residual ? residual[at] : 0.0f) + v; });
        return;
    }
    float* mine = partial + static_cast<long long>(split) * T * N;
    each_output([&](long long at, float v) { mine[at] = v; });
    __threadfence();  // this split's sums are visible before its arrival is counted
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(arrivals + blockIdx.x, 1u) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int rows = min(ROWS, N - r0);
    for (int q = threadIdx.x; q < T * rows; q += blockDim.x) {
        const long long at = static_cast<long long>(q / rows) * N + r0 + q % rows;
        float sum = 0.0f;
        for (int s0 = 0; s0 < splits; s0 += 8) {  // 8 splits' loads in flight, added in split order
            float v[8];
#pragma unroll
            for (int u = 0; u < 8; ++u)
                v[u] = s0 + u < splits ? __ldcg(partial + static_cast<long long>(s0 + u) * T * N + at) : 0.0f;
#pragma unroll
            for (int u = 0; u < 8; ++u) sum += v[u];
        }
        out[at] = (residual ? residual[at] : 0.0f) + sum;
    }
    if (threadIdx.x == 0) arrivals[blockIdx.x] = 0;  // ready for the next launch
}
