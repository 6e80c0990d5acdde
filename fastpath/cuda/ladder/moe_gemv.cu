// Kernel ladder, step by step to the MoE expert GEMV of batch-1 decode (moe.cu: expert_gate_up<bf16_t, 1>).
//
// The function: for the K experts one token chose, act[k, r] = silu(gate_e[r] . x) * (up_e[r] . x), e = experts[k],
// with gate_e and up_e rows of H bf16 weights (expert e's gate rows at gate + e * stride, up rows at up + e * stride).
// It reads K * 2 * I * H * 2 bytes (8 experts of Qwen3-30B-A3B: 50 MB) and does almost no arithmetic per byte, so the
// only question is how close each version gets to the memory bandwidth. Run: python -m fastpath.ladder moe_gemv
#include "../common.cuh"

__device__ __forceinline__ float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// v1: one thread per output row. Simple, but the 32 threads of a warp read 32 different rows: every load touches a
// different 32-byte sector, most of each sector is wasted.                  grid (ceil(I / 256), K), block 256
__global__ void moe_gemv_v1(const float* x, const bf16_t* gate, const bf16_t* up, long long stride,
                            const int* experts, int H, int I, float* act) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x, k = blockIdx.y;
    if (r >= I) return;
    const long long row = experts[k] * stride + static_cast<long long>(r) * H;
    float g = 0.0f, u = 0.0f;
    for (int h = 0; h < H; ++h) g += widen(gate[row + h]) * x[h], u += widen(up[row + h]) * x[h];
    act[static_cast<long long>(k) * I + r] = silu_mul(g, u);
}

// v2: one warp per row, lanes take consecutive weights: a warp reads 64 contiguous bytes per load (coalesced), and
// the 32 partial sums meet in a warp shuffle reduction.                   grid (ceil(I / 8), K), block 256
__global__ void moe_gemv_v2(const float* x, const bf16_t* gate, const bf16_t* up, long long stride,
                            const int* experts, int H, int I, float* act) {
    const int r = blockIdx.x * 8 + threadIdx.x / 32, k = blockIdx.y, lane = threadIdx.x % 32;
    if (r >= I) return;
    const long long row = experts[k] * stride + static_cast<long long>(r) * H;
    float g = 0.0f, u = 0.0f;
    for (int h = lane; h < H; h += 32) g += widen(gate[row + h]) * x[h], u += widen(up[row + h]) * x[h];
    g = warp_sum(g), u = warp_sum(u);
    if (lane == 0) act[static_cast<long long>(k) * I + r] = silu_mul(g, u);
}

// v3: 16-byte loads: each lane reads 8 bf16 at once (a warp: 512 contiguous bytes per load instruction), 8x fewer
// load instructions than v2.                                               grid (ceil(I / 8), K), block 256
__global__ void moe_gemv_v3(const float* x, const bf16_t* gate, const bf16_t* up, long long stride,
                            const int* experts, int H, int I, float* act) {
    const int r = blockIdx.x * 8 + threadIdx.x / 32, k = blockIdx.y, lane = threadIdx.x % 32;
    if (r >= I) return;
    const long long row = experts[k] * stride + static_cast<long long>(r) * H;
    float g = 0.0f, u = 0.0f;
    for (int p = lane; p < H / 8; p += 32) {
        Pack<bf16_t> gp, upk;
        gp.load(gate + row + 8 * p), upk.load(up + row + 8 * p);
#pragma unroll
        for (int i = 0; i < 8; ++i) g += gp[i] * x[8 * p + i], u += upk[i] * x[8 * p + i];
    }
    g = warp_sum(g), u = warp_sum(u);
    if (lane == 0) act[static_cast<long long>(k) * I + r] = silu_mul(g, u);
}

// v4 is the production kernel, moe.cu's expert_gate_up<bf16_t, 1>: v3 with 4 packs of the gate row and 4 of the up row
// in flight per lane before the first is used, and x read as float4.
