// Kernel ladder, the step before matmul.cu's tiles: a prefill projection out = x @ W^T (T tokens x K float32
// activations, N x K bf16 weights) on the tensor cores. Run: python -m fastpath.ladder prefill_projection
//
// v1 is what matmul.cu was until it measured what bounds a tile. v2, the production kernel (matmul.cu), differs in
// two ways: wide tiles (64 x 256 outputs a block, 64 x 64 a warp), so that each staged byte feeds twice the products,
// and a 3-stage cp.async pipeline. The pipeline alone, on v1's 64 x 64 tiles, measured no faster: v1 is bound by the
// L1/shared-memory traffic of its small tiles (Nsight Compute: 94 % of L1 throughput, the tensor pipe 23 % busy).
#include "../mma.cuh"

constexpr int TM = 64, TN = 64, TK = 32;
constexpr int LD = TK + 8;  // a staged row, in bf16 (padded against bank conflicts)

__device__ __forceinline__ unsigned pair_at(const bf16_t* tile, int row, int col) {
    return *reinterpret_cast<const unsigned*>(tile + row * LD + col);
}

// v1: a 64 x 64 tile a block of 4 warps, each warp a 32 x 32 quarter. Per 32-wide step of K every thread loads its
// half-row of activations (float4 loads, split into bf16 hi/lo in registers) and of weights, stores them to shared
// memory, and the block waits at a barrier: each load's latency is paid in full, and the two 64-row tiles feed only
// 64 x 64 x 32 products.                                                  grid (ceil(N / 64), ceil(T / 64)), block 128
__global__ void __launch_bounds__(128) prefill_tiles_v1(const float* __restrict__ x, int T, int K,
                                                        const bf16_t* __restrict__ w, int N, float* __restrict__ out) {
    __shared__ __align__(16) bf16_t As[2][TM * LD];  // hi, lo
    __shared__ __align__(16) bf16_t Bs[TN * LD];
    const int n0 = blockIdx.x * TN, t0 = blockIdx.y * TM, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp / 2 * 32, wc = warp % 2 * 32, g = lane / 4, c = lane % 4 * 2;
    const int r = threadIdx.x / 2, half = threadIdx.x % 2 * 16;  // the half-row this thread stages
    const float* x_row = t0 + r < T ? x + static_cast<long long>(t0 + r) * K : nullptr;
    const bf16_t* w_row = n0 + r < N ? w + static_cast<long long>(n0 + r) * K : nullptr;
    float acc[2][4][4] = {};
    for (int k0 = 0; k0 < K; k0 += TK) {
        __align__(16) unsigned hi[8], lo[8];
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const float4 a = x_row ? *reinterpret_cast<const float4*>(x_row + k0 + half + 4 * v) : float4{};
            split2(a.x, a.y, hi[2 * v], lo[2 * v]), split2(a.z, a.w, hi[2 * v + 1], lo[2 * v + 1]);
        }
        const uint4* wsrc = reinterpret_cast<const uint4*>(w_row + k0 + half);
        const uint4 w0 = w_row ? wsrc[0] : uint4{}, w1 = w_row ? wsrc[1] : uint4{};
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            reinterpret_cast<uint4*>(As[0] + r * LD + half)[i] = reinterpret_cast<const uint4*>(hi)[i];
            reinterpret_cast<uint4*>(As[1] + r * LD + half)[i] = reinterpret_cast<const uint4*>(lo)[i];
        }
        reinterpret_cast<uint4*>(Bs + r * LD + half)[0] = w0, reinterpret_cast<uint4*>(Bs + r * LD + half)[1] = w1;
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; kk += 16) {
            unsigned fa[2][2][4];  // [hi/lo][16-row block][register]
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const int row = wr + 16 * i + g;
                    fa[h][i][0] = pair_at(As[h], row, kk + c), fa[h][i][1] = pair_at(As[h], row + 8, kk + c);
                    fa[h][i][2] = pair_at(As[h], row, kk + c + 8), fa[h][i][3] = pair_at(As[h], row + 8, kk + c + 8);
                }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const unsigned fb[2] = {pair_at(Bs, wc + 8 * j + g, kk + c), pair_at(Bs, wc + 8 * j + g, kk + c + 8)};
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    mma_bf16(acc[i][j], fa[1][i], fb);  // the small half first
                    mma_bf16(acc[i][j], fa[0][i], fb);
                }
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int t = t0 + wr + 16 * i + g + 8 * (e / 2), n = n0 + wc + 8 * j + c + e % 2;
                if (t < T && n < N) out[static_cast<long long>(t) * N + n] = acc[i][j][e];
            }
}
