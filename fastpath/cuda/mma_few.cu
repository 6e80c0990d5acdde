// Products on the tensor cores for steps with only a few tokens per weight matrix: the projections of a small batch
// and the experts of batched decoding (64 tokens x top-8 over 128 experts is ~4 tokens an expert).
//
// matmul.cu's 64 x 64 tiles put the tokens in the 16-row operand of mma.m16n8k16 and stage weights through shared
// memory: with 4 tokens in a 64-row tile, 60 of its rows are padding, and the weights stream at ~0.9 TB/s. Here the
// roles are swapped: the weights are the 16-row operand and up to 8 tokens the 8-column one, so at most 7 of 8
// columns are padding; and since each weight is used once per 8 tokens, a lane loads its weights from memory straight
// into the fragment registers -- no shared memory, no barrier in the loop -- with 4 k-steps of 16-byte loads in flight.
//
// The k order: an mma sums over k, so any assignment of k indices to fragment positions is correct as long as the
// weight and the token operand use the same one. Lane (g = lane / 4, c = lane % 4) reads the 8 consecutive k of its
// rows at k0 + 8c (one 16-byte load, a quad of lanes covering 64 contiguous bytes of a row) and feeds them to two
// mma instructions as their fragment columns {2c, 2c+1, 2c+8, 2c+9}; it reads the same 8 k of its token g.
//
// A block is 4 warps and owns 32 rows of a matrix (GATE_UP: 16 gate rows and the matching 16 up rows); its warps
// split K between them (k-steps warp, warp + 4, ...) and add their partial sums through shared memory. The
// activations are float32, split into bf16 hi + lo (mma.cuh). Tokens are taken 8 at a time.
//   LINEAR   out[t, r] = residual[t, r] + x[t] . W[r]           grid (ceil(T / 8), ceil(N / 32)): the 8-token groups
//                                                               of a row block run side by side and share it in L2
//   GATE_UP  act[q, r] = silu(xn[tok(q)] . gate_e[r]) * (xn[tok(q)] . up_e[r])     grid (ceil(N / 16), slots)
//   DOWN     out[src(q), r] = weight(q) * act[q] . down_e[r]                        grid (ceil(N / 32), slots)
// (q: the pairs of a slot, see moe.cu.) K must be a multiple of 32.                                       block 128
#include "mma.cuh"

constexpr int KSTEP = 32;  // k columns per pair of mma instructions
constexpr int UNROLL = 4;  // k-steps whose weights a lane has in flight: 4 x 4 x 16 bytes
constexpr int WARPS = 4;

// 8 consecutive floats as bf16 pairs, x = hi + lo: word i holds elements 2i (lower half) and 2i + 1.
__device__ __forceinline__ void split8(const float* p, unsigned (&hi)[4], unsigned (&lo)[4]) {
    float x[8] = {};
    if (p) {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) split2(x[2 * i], x[2 * i + 1], hi[i], lo[i]);
}

template <int MODE>
__global__ void __launch_bounds__(128) mma_few(const float* __restrict__ a, int K, const bf16_t* __restrict__ w,
                                               const bf16_t* __restrict__ w2, long long expert_stride, int N, int T,
                                               const int* __restrict__ slot_expert,
                                               const int* __restrict__ slot_offset,
                                               const int* __restrict__ pair_token, const int* __restrict__ pair_src,
                                               const float* __restrict__ pair_weight,
                                               const int* __restrict__ n_slots, const float* residual, float* out) {
    constexpr int ROWS = MODE == GATE_UP ? 16 : 32;  // output rows of a block
    __shared__ float partial[WARPS][2][32][4];       // each warp's accumulators: [tile][lane][fragment]
    const int s = blockIdx.y, r0 = (MODE == LINEAR ? blockIdx.y : blockIdx.x) * ROWS;
    begin_after_previous();

    int q_begin, q_end;  // the tokens (LINEAR) or pairs of the block
    const bf16_t* base[2];  // its two 16-row weight tiles: gate and up rows r0.. (GATE_UP), or rows r0.. and r0 + 16..
    if (MODE == LINEAR) {
        q_begin = blockIdx.x * 8, q_end = min(T, q_begin + 8);
        base[0] = w;
    } else {
        if (s >= n_slots[0]) return;
        q_begin = slot_offset[s], q_end = slot_offset[s + 1];
        base[0] = w + slot_expert[s] * expert_stride;
    }
    base[1] = MODE == GATE_UP ? w2 + (base[0] - w) : base[0];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
    const bf16_t* rows[2][2];  // [tile][g, g + 8]: rows past N are clamped to N - 1 (loaded, never stored)
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = min(N - 1, r0 + (MODE == GATE_UP ? 0 : 16 * t) + g + 8 * h);
            rows[t][h] = base[t] + static_cast<long long>(r) * K + 8 * c;
        }
    const int steps = K / KSTEP;
    for (int q0 = q_begin; q0 < q_end; q0 += 8) {
        const int nt = min(8, q_end - q0);
        const float* x = g < nt ? a + static_cast<long long>(MODE == GATE_UP ? pair_token[q0 + g] : q0 + g) * K +
                                      8 * c
                                : nullptr;  // this lane's token g: none past the last one (zero columns)
        float acc[2][4] = {};
        int i = warp;
        for (; i + WARPS * (UNROLL - 1) < steps; i += WARPS * UNROLL) {
            uint4 wv[UNROLL][2][2];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int t = 0; t < 2; ++t)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        wv[u][t][h] = __ldg(reinterpret_cast<const uint4*>(rows[t][h] + (i + WARPS * u) * KSTEP));
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                unsigned hi[4], lo[4];
                split8(x ? x + (i + WARPS * u) * KSTEP : nullptr, hi, lo);
#pragma unroll
                for (int t = 0; t < 2; ++t) mma_kstep(acc[t], wv[u][t], hi, lo);
            }
        }
        for (; i < steps; i += WARPS) {
            uint4 wv[2][2];
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h) wv[t][h] = __ldg(reinterpret_cast<const uint4*>(rows[t][h] + i * KSTEP));
            unsigned hi[4], lo[4];
            split8(x ? x + i * KSTEP : nullptr, hi, lo);
#pragma unroll
            for (int t = 0; t < 2; ++t) mma_kstep(acc[t], wv[t], hi, lo);
        }
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int f = 0; f < 4; ++f) partial[warp][t][lane][f] = acc[t][f];
        __syncthreads();
        if (warp == 0) {
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int f = 0; f < 4; ++f)
                    acc[t][f] = ((partial[0][t][lane][f] + partial[1][t][lane][f]) + partial[2][t][lane][f]) +
                                partial[3][t][lane][f];
#pragma unroll
            for (int f = 0; f < 4; ++f) {  // fragment f: row g + 8 * (f / 2) of each tile, token 2c + f % 2
                const int n = 2 * c + f % 2, r = r0 + g + 8 * (f / 2), q = q0 + n;
                if (n >= nt) continue;
                if (MODE == GATE_UP) {
                    const float gate = acc[0][f], up = acc[1][f];
                    if (r < N) out[static_cast<long long>(q) * N + r] = gate / (1.0f + expf(-gate)) * up;
                    continue;
                }
                const long long row = MODE == LINEAR ? q : pair_src[q];
                const float scale = MODE == DOWN && pair_weight ? pair_weight[row] : 1.0f;
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const long long at = row * N + r + 16 * t;
                    if (r + 16 * t < N) out[at] = (MODE == LINEAR && residual ? residual[at] : 0.0f) + scale * acc[t][f];
                }
            }
        }
        __syncthreads();  // partial[] is written again by the next pass
    }
}
