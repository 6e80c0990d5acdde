// Tensor-core products for steps with many tokens (prefill, large batches), where the GEMV kernels would re-read
// every weight once per 8 tokens: here a 64 x 64 tile of outputs reads each weight once per 64 tokens.
//
// bf16 weights and float32 accumulation on the tensor cores (mma.cuh); the float32 activations are split into bf16
// hi + lo as they are staged, and both halves are multiplied.
// One block (4 warps) computes a 64 (rows) x 64 (outputs) tile, each warp a 32 x 32 quarter, stepping through K 32 at
// a time. Three kinds of product share the kernel (MODE):
//   LINEAR   out[t, n] = residual[t, n] + x[t] . W[n]                     rows: tokens 0..T, tiles in blockIdx.y order
//   GATE_UP  act[q, n] = silu(xn[tok(q)] . gate_e[n]) * (xn[tok(q)] . up_e[n])      rows: the pairs of one slot
//   DOWN     out[src(q), n] = weight(q) * act[q] . down_e[n]                          rows: the pairs of one slot
// For the grouped modes group_by_expert (moe.cu) lists the tiles: tile_slot[i] and tile_row[i], at most 64 pairs of
// one slot each.                                     grid (ceil(N / 64), tiles), block 128
#include "mma.cuh"

constexpr int TM = 64, TN = 64, TK = 32;
constexpr int LD = TK + 8;   // shared-memory row of a staged tile, in bf16 (padded against bank conflicts)
constexpr int LDC = TN + 4;  // row of the staged float32 results

// Two adjacent bf16 of a staged tile as one 32-bit register.
__device__ __forceinline__ unsigned pair_at(const bf16_t* tile, int row, int col) {
    return *reinterpret_cast<const unsigned*>(tile + row * LD + col);
}

// 64 rows x 32 columns of weights (rows n0.., columns k0..) into shared memory; rows past N are zeros.
__device__ __forceinline__ void stage_weights(const bf16_t* w, int K, int N, int n0, int k0, bf16_t* dst) {
    const int row = threadIdx.x / 2, half = threadIdx.x % 2 * 16;
    uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
    if (n0 + row < N) {
        const uint4* src = reinterpret_cast<const uint4*>(w + static_cast<long long>(n0 + row) * K + k0 + half);
        lo = __ldg(src), hi = __ldg(src + 1);
    }
    uint4* d = reinterpret_cast<uint4*>(dst + row * LD + half);
    d[0] = lo, d[1] = hi;
}

template <int MODE>
__global__ void __launch_bounds__(128) mma_tiles(const float* __restrict__ a, int K, const bf16_t* __restrict__ w,
                                                 const bf16_t* __restrict__ w2, long long expert_stride, int N, int T,
                                                 const int* __restrict__ tile_slot, const int* __restrict__ tile_row,
                                                 const int* __restrict__ n_tiles,
                                                 const int* __restrict__ slot_expert,
                                                 const int* __restrict__ slot_offset,
                                                 const int* __restrict__ pair_token, const int* __restrict__ pair_src,
                                                 const float* __restrict__ pair_weight, const float* residual,
                                                 float* out) {
    constexpr int SLOTS = MODE == GATE_UP ? 2 : 1;  // gate/up: two products over the same input
    constexpr int STAGED = (2 * TM + SLOTS * TN) * LD * 2, RESULTS = SLOTS * TM * LDC * 4;
    __shared__ __align__(16) unsigned char smem[STAGED > RESULTS ? STAGED : RESULTS];
    bf16_t* As = reinterpret_cast<bf16_t*>(smem);  // 2 x (TM, LD): hi, lo
    bf16_t* Bs = As + 2 * TM * LD;                 // SLOTS x (TN, LD)
    float* Cs = reinterpret_cast<float*>(smem);    // SLOTS x (TM, LDC), after the K loop
    begin_after_previous();

    int row0, row_end;
    const bf16_t* W[SLOTS];
    if (MODE == LINEAR) {
        row0 = blockIdx.y * TM, row_end = min(T, row0 + TM);
        W[0] = w;
    } else {
        if (blockIdx.y >= n_tiles[0]) return;
        const int s = tile_slot[blockIdx.y];
        row0 = tile_row[blockIdx.y], row_end = min(slot_offset[s + 1], row0 + TM);
        const long long e = slot_expert[s];
        W[0] = w + e * expert_stride;
        if (MODE == GATE_UP) W[SLOTS - 1] = w2 + e * expert_stride;
    }
    const int n0 = blockIdx.x * TN, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp / 2 * 32, wc = warp % 2 * 32;  // this warp's quarter of the tile
    const int g = lane / 4, c = lane % 4 * 2;          // its place in the mma fragments

    // the input row this thread stages: row r of the tile, 16 of the 32 columns
    const int r = threadIdx.x / 2, half = threadIdx.x % 2 * 16, q = row0 + r;
    const float* a_row = nullptr;
    if (q < row_end) a_row = a + static_cast<long long>(MODE == GATE_UP ? pair_token[q] : q) * K;

    float acc[SLOTS][2][4][4] = {};  // [product][16-row block][8-column block][fragment]
    for (int k0 = 0; k0 < K; k0 += TK) {
        __align__(16) unsigned hi[8], lo[8];  // 16 columns as bf16 pairs
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const float4 x4 = a_row ? *reinterpret_cast<const float4*>(a_row + k0 + half + 4 * v)
                                    : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            split2(x4.x, x4.y, hi[2 * v], lo[2 * v]);
            split2(x4.z, x4.w, hi[2 * v + 1], lo[2 * v + 1]);
        }
        uint4* dst_hi = reinterpret_cast<uint4*>(As + r * LD + half);
        uint4* dst_lo = reinterpret_cast<uint4*>(As + TM * LD + r * LD + half);
        dst_hi[0] = reinterpret_cast<const uint4*>(hi)[0], dst_hi[1] = reinterpret_cast<const uint4*>(hi)[1];
        dst_lo[0] = reinterpret_cast<const uint4*>(lo)[0], dst_lo[1] = reinterpret_cast<const uint4*>(lo)[1];
#pragma unroll
        for (int s = 0; s < SLOTS; ++s) stage_weights(W[s], K, N, n0, k0, Bs + s * TN * LD);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TK; kk += 16) {
            unsigned fa[2][2][4];  // [hi/lo][16-row block][register]
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const bf16_t* tile = As + h * TM * LD;
                    const int row = wr + 16 * i + g;
                    fa[h][i][0] = pair_at(tile, row, kk + c), fa[h][i][1] = pair_at(tile, row + 8, kk + c);
                    fa[h][i][2] = pair_at(tile, row, kk + c + 8), fa[h][i][3] = pair_at(tile, row + 8, kk + c + 8);
                }
#pragma unroll
            for (int s = 0; s < SLOTS; ++s)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const bf16_t* tile = Bs + s * TN * LD;
                    const unsigned fb[2] = {pair_at(tile, wc + 8 * j + g, kk + c),
                                            pair_at(tile, wc + 8 * j + g, kk + c + 8)};
#pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        mma_bf16(acc[s][i][j], fa[1][i], fb);  // the small half first
                        mma_bf16(acc[s][i][j], fa[0][i], fb);
                    }
                }
        }
        __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < SLOTS; ++s)
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float* C = Cs + s * TM * LDC + (wr + 16 * i + g) * LDC + wc + 8 * j + c;
                C[0] = acc[s][i][j][0], C[1] = acc[s][i][j][1];
                C[8 * LDC] = acc[s][i][j][2], C[8 * LDC + 1] = acc[s][i][j][3];
            }
    __syncthreads();
    for (int idx = threadIdx.x; idx < TM * TN; idx += blockDim.x) {
        const int i = idx / TN, j = idx % TN, row = row0 + i, n = n0 + j;
        if (row >= row_end || n >= N) continue;
        const float v = Cs[i * LDC + j];
        if (MODE == LINEAR) {
            const long long at = static_cast<long long>(row) * N + n;
            out[at] = residual ? residual[at] + v : v;
        } else if (MODE == GATE_UP) {
            const float u = Cs[TM * LDC + i * LDC + j];
            out[static_cast<long long>(row) * N + n] = v / (1.0f + expf(-v)) * u;
        } else {
            const int src = pair_src[row];
            out[static_cast<long long>(src) * N + n] = (pair_weight ? pair_weight[src] : 1.0f) * v;
        }
    }
}
