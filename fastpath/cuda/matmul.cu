// Tensor-core products for steps with many tokens (prefill, large batches), where the GEMV kernels would re-read
// every weight once per 8 tokens: here a block's tile of outputs reads each weight once per 64 tokens.
//
// bf16 weights and float32 accumulation on the tensor cores (mma.cuh); the float32 activations are split into bf16
// hi + lo as each warp loads its fragments, and both halves are multiplied (SPLIT; precision "bf16": hi alone). Three kinds of product share the kernel:
//   LINEAR   out[t, n] = residual[t, n] + x[t] . W[n]                     rows: tokens 0..T, tiles in blockIdx.y order
//   GATE_UP  act[q, n] = silu(xn[tok(q)] . gate_e[n]) * (xn[tok(q)] . up_e[n])      rows: the pairs of one slot
//   DOWN     out[src(q), n] = weight(q) * act[q] . down_e[n]                          rows: the pairs of one slot
// For the grouped modes group_by_expert (moe.cu) lists the tiles: tile_slot[i] and tile_row[i], at most 64 pairs of
// one slot each.
//
// What bounds a tile is the traffic that feeds it: per 32-wide step of K it stages rows x 32 float32 activations and
// cols x 32 bf16 weights from L2 for rows x cols x 32 products (twice that many mma, hi and lo). 64 x 64 tiles moved
// ~2 GB through L2 for one 2048-token q/k/v projection and ran at a quarter of the tensor pipe. So the tiles are wide:
// 64 rows, and each of the four warps computes all of them for 64 columns (GATE_UP: 32 gate and the same 32 up
// columns). Measured on an H200 against 128-row tiles (two rows of warps): as fast for the grouped modes, whose
// experts have ~128 pairs at a 2048-token prefill, and 16 % faster for q/k/v, since two blocks fit a multiprocessor
// and one's barrier leaves the other running.
//   64 x Tile<MODE>::N outputs a block               grid (ceil(N / Tile::N), tiles, splits), block 128
// LINEAR may split K over ``splits`` blocks (blockIdx.z) where there are too few tiles to fill the GPU, as in batched
// decoding: 64 tokens of a 5120 x 2048 q/k/v projection are 20 tiles for 132 multiprocessors. Each split then writes
// its partial sums to partial[split], and add_split_sums adds them up in split order (a kernel of its own: with the
// last split of each tile adding them alone, a 64-token q/k/v projection took twice as long as unsplit).
// The K loop is a pipeline of STAGES buffers in shared memory filled by cp.async: while the warps multiply one step,
// the next STAGES - 1 are in flight; one barrier per step. Dynamic shared memory: Tile<MODE>::SHARED bytes.
#include "mma.cuh"

constexpr int TK = 32, STAGES = 3;
constexpr int LDA = TK + 8;  // a staged activation row, in floats (padded: a half-warp's 8-byte loads hit 32 banks)
constexpr int LDB = TK + 8;  // a staged weight row, in bf16 (padded against bank conflicts)

template <int MODE>
struct Tile {
    static constexpr int SLOTS = MODE == GATE_UP ? 2 : 1;     // weight matrices multiplied (gate and up)
    static constexpr int WN = MODE == GATE_UP ? 32 : 64;      // columns of each matrix a warp computes
    static constexpr int M = 64, N = 4 * WN, THREADS = 128;
    static constexpr int A_BYTES = M * LDA * 4, STAGE_BYTES = A_BYTES + SLOTS * N * LDB * 2;
    static constexpr int SHARED = STAGES * STAGE_BYTES;  // (cupy_backend.tiles computes the same)
};
static_assert(2 * Tile<GATE_UP>::SHARED <= 227 * 1024, "two blocks must fit a multiprocessor's shared memory");

// Two adjacent bf16 of a staged weight tile as one 32-bit register.
__device__ __forceinline__ unsigned pair_at(const bf16_t* tile, int row, int col) {
    return *reinterpret_cast<const unsigned*>(tile + row * LDB + col);
}
// Two adjacent activations of a staged tile, split into bf16 hi and lo pairs (SPLIT) or rounded (hi).
template <bool SPLIT>
__device__ __forceinline__ void split_at(const float* tile, int row, int col, unsigned& hi, unsigned& lo) {
    const float2 x = *reinterpret_cast<const float2*>(tile + row * LDA + col);
    to_operand<SPLIT>(x.x, x.y, hi, lo);
}

// One 32-wide step of a tile's weights into shared memory: rows n0.. of each matrix, 16-byte chunks taken by
// consecutive threads along a row. Rows past N become zeros.
template <int MODE>
__device__ __forceinline__ void stage_weights(const bf16_t* const (&W)[Tile<MODE>::SLOTS], int K, int N, int n0,
                                              int k0, bf16_t* dst) {
    using T = Tile<MODE>;
#pragma unroll
    for (int j = 0; j < T::SLOTS; ++j)
#pragma unroll
        for (int r = 0; r < T::N * 4 / T::THREADS; ++r) {
            const int i = threadIdx.x + r * T::THREADS, row = i / 4, col = i % 4 * 8;
            const bool valid = n0 + row < N;
            copy_async16(dst + (j * T::N + row) * LDB + col,
                         W[j] + static_cast<long long>(valid ? n0 + row : 0) * K + k0 + col, valid);
        }
}

template <int MODE, bool SPLIT>
__global__ void __launch_bounds__(Tile<MODE>::THREADS) mma_tiles(
    const float* __restrict__ a, int K, const bf16_t* __restrict__ w, const bf16_t* __restrict__ w2,
    long long expert_stride, int N, int T, const int* __restrict__ tile_slot, const int* __restrict__ tile_row,
    const int* __restrict__ n_tiles, const int* __restrict__ slot_expert, const int* __restrict__ slot_offset,
    const int* __restrict__ pair_token, const int* __restrict__ pair_src, const float* __restrict__ pair_weight,
    const float* residual, float* out, float* __restrict__ partial) {
    using Tl = Tile<MODE>;
    constexpr int SLOTS = Tl::SLOTS, WN = Tl::WN;
    extern __shared__ __align__(16) unsigned char smem[];
    // stage s: activations (M, LDA) float32, then SLOTS x (N, LDB) bf16 weights
    auto As = [&](int s) { return reinterpret_cast<float*>(smem + s * Tl::STAGE_BYTES); };
    auto Bs = [&](int s) { return reinterpret_cast<bf16_t*>(smem + s * Tl::STAGE_BYTES + Tl::A_BYTES); };
    // this block's k-steps: [first, first + steps) of K / TK, its split's share
    const int n0 = blockIdx.x * Tl::N, per_split = (K / TK + gridDim.z - 1) / gridDim.z;
    const int first = blockIdx.z * per_split, steps = min(K / TK - first, per_split);

    int row0, row_end;
    const bf16_t* W[SLOTS];
    if (MODE == LINEAR) {  // weights do not depend on the kernel ahead: the first steps' copies start while it ends
        W[0] = w;
        for (int s = 0; s < STAGES - 1 && s < steps; ++s) stage_weights<MODE>(W, K, N, n0, (first + s) * TK, Bs(s));
    }
    begin_after_previous();
    if (MODE == LINEAR) {
        row0 = blockIdx.y * Tl::M, row_end = min(T, row0 + Tl::M);
    } else {
        if (blockIdx.y >= n_tiles[0]) return;
        const int s = tile_slot[blockIdx.y];
        row0 = tile_row[blockIdx.y], row_end = min(slot_offset[s + 1], row0 + Tl::M);
        const long long e = slot_expert[s];
        W[0] = w + e * expert_stride;
        if (MODE == GATE_UP) W[SLOTS - 1] = w2 + e * expert_stride;
    }
    const ActivationRow<MODE, TK, LDA> activations(a, K, row0, row_end, pair_token);
    // one commit group per step (empty past the end), so "all but STAGES - 2 groups landed" means "this step landed"
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < steps) {
            if (MODE != LINEAR) stage_weights<MODE>(W, K, N, n0, (first + s) * TK, Bs(s));
            activations.stage((first + s) * TK, As(s));
        }
        copies_issued();
    }

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wc = warp * WN;                   // this warp's WN columns of each matrix, for all 64 rows
    const int g = lane / 4, c = lane % 4 * 2;          // its place in the mma fragments
    float acc[SLOTS][4][WN / 8][4] = {};  // [matrix][16-row block][8-column block][fragment]
    for (int step = 0, s = 0; step < steps; ++step, s = s + 1 == STAGES ? 0 : s + 1) {
        copies_landed<STAGES - 2>();
        __syncthreads();  // this step's copies from every thread are in; the buffer refilled below is free
        if (step + STAGES - 1 < steps) {
            const int refill = s == 0 ? STAGES - 1 : s - 1, k0 = (first + step + STAGES - 1) * TK;
            stage_weights<MODE>(W, K, N, n0, k0, Bs(refill));
            activations.stage(k0, As(refill));
        }
        copies_issued();
        const float* A = As(s);
        const bf16_t* B = Bs(s);
#pragma unroll
        for (int kk = 0; kk < TK; kk += 16) {
            unsigned fb[SLOTS][WN / 8][2];
#pragma unroll
            for (int j = 0; j < SLOTS; ++j)
#pragma unroll
                for (int n = 0; n < WN / 8; ++n) {
                    const int row = j * Tl::N + wc + 8 * n + g;
                    fb[j][n][0] = pair_at(B, row, kk + c), fb[j][n][1] = pair_at(B, row, kk + c + 8);
                }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                unsigned hi[4], lo[4];
                const int row = 16 * i + g;
                split_at<SPLIT>(A, row, kk + c, hi[0], lo[0]), split_at<SPLIT>(A, row + 8, kk + c, hi[1], lo[1]);
                split_at<SPLIT>(A, row, kk + c + 8, hi[2], lo[2]);
                split_at<SPLIT>(A, row + 8, kk + c + 8, hi[3], lo[3]);
#pragma unroll
                for (int j = 0; j < SLOTS; ++j)
#pragma unroll
                    for (int n = 0; n < WN / 8; ++n) {
                        if (SPLIT) mma_bf16(acc[j][i][n], lo, fb[j][n]);  // the small half first
                        mma_bf16(acc[j][i][n], hi, fb[j][n]);
                    }
            }
        }
    }
    copies_landed<0>();  // (only empty groups are left; nothing may be in flight when the block exits)
    if (MODE == LINEAR && gridDim.z > 1) {  // this split's sums, for add_split_sums
        out = partial + static_cast<long long>(blockIdx.z) * T * N;
        residual = nullptr;
    }

    // each lane holds rows g and g + 8 x columns c and c + 1 of every 16 x 8 block: written straight from registers
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row0 + 16 * i + g + 8 * h;
            if (row >= row_end) continue;
            const OutputRow<MODE> o(row, N, out, residual, pair_src, pair_weight);
#pragma unroll
            for (int n = 0; n < WN / 8; ++n)
                o.write2(n0 + wc + 8 * n + c, N, acc[0][i][n][2 * h], acc[0][i][n][2 * h + 1],
                         acc[SLOTS - 1][i][n][2 * h], acc[SLOTS - 1][i][n][2 * h + 1]);
        }
}

// out[i] = residual[i] + the sum over splits of partial[split][i], in split order, for the T x N outputs of a LINEAR
// product whose K was split.                                        grid (ceil(T * N / (4 * 256))), block 256
__global__ void __launch_bounds__(256) add_split_sums(const float4* __restrict__ partial, int splits, int n4,
                                                       const float4* residual, float4* out) {
    begin_after_previous();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    float4 v = residual ? residual[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int z = 0; z < splits; ++z) {
        const float4 p = __ldcg(partial + static_cast<long long>(z) * n4 + i);
        v.x += p.x, v.y += p.y, v.z += p.z, v.w += p.w;
    }
    out[i] = v;
}

// y = x rounded to bf16 (to nearest even, as to_bf16x2), 4 values a thread: the activations that wgmma_tiles.cu
// reads as bf16 under precision "bf16" (half the bytes to stage of float32's).   grid (ceil(n4 / 256)), block 256
__global__ void __launch_bounds__(256) to_bf16(const float4* __restrict__ x, long long n4, uint2* __restrict__ y) {
    begin_after_previous();
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= n4) return;
    const float4 v = x[i];
    y[i] = make_uint2(to_bf16x2(v.x, v.y), to_bf16x2(v.z, v.w));
}
