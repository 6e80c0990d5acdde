// matmul.cu's tiles on Hopper's warpgroup instruction (wgmma.mma_async, sm_90a only), fed by a producer warpgroup
// and the copy engine (TMA): the same three products, arguments and outputs, for prefill-sized steps on H100 / H200.
//
// Why wgmma: matmul.cu's mma.sync tiles issue one 16 x 8 x 16 product per warp instruction and wait for every operand
// in registers. One wgmma is a 64 x 256 x 16 product by the four warps of a warpgroup, issued asynchronously, its
// weights (the B operand) read by the tensor cores straight from shared memory through a descriptor. The activations
// (A) still come from registers, split into bf16 hi + lo as in every kernel here (mma.cuh), so the results keep
// float32-like accuracy: two wgmma per 16-wide step of K.
//
// Why a producer: when every thread copied its share with cp.async and the block met at a barrier each step, the
// tensor pipe was busy 28 % of the time (Nsight Compute, q/k/v of a 2048-token prefill on an H200): the warps stalled
// on their own copies (long scoreboard, LG throttle). Here one warpgroup copies and the others only multiply:
//   - the weights of a step, a 64-wide k range of 256 rows, are one TMA copy (cp.async.bulk.tensor) by one thread,
//     through a tensor map made on the host (cuda_build.tensor_map), which writes them in the 128-byte swizzled
//     layout that wgmma reads without bank conflicts;
//   - the activations of a step (128 rows x 64 floats) are cp.async copies by the producer's 128 threads, 16 threads
//     a row: the rows of GATE_UP are the picks' tokens, scattered, which a tensor map cannot gather (and one bulk
//     copy per row measured 2.4x slower than this whole kernel: the copy engine is slow at 128-byte copies). They
//     are written swizzled too (16-byte chunk j of row r at chunk j ^ r % 8), so that the fragment loads of 8 rows
//     hit 8 different banks;
//   - both complete on the stage's "full" mbarrier (the TMA bytes, and one arrival per producer thread when its
//     copies have landed); the math warps wait on it, multiply, and arrive on the stage's "empty" mbarrier once
//     their products have read it, which lets the producer refill it.
// No block-wide barrier in the loop: a warpgroup waits only for its data.
//
// Precision "bf16" (cupy_backend.State.precision) passes the activations as bf16 (A = bf16_t, rounded by to_bf16 in
// matmul.cu): a step stages half the bytes of activations, in the weights' swizzled layout, and the tensor cores read
// them from shared memory too (wgmma_256_shared) -- one product per 16-wide step, no fragments, no split. GATE_UP then
// writes its output as bf16 too: it is DOWN's input, which takes it as it is.
//
// A block is WG math warpgroups (64 rows each) and the producer warpgroup: WG x 64 rows x 256 weight rows. LINEAR and
// DOWN: 256 output columns; GATE_UP: 128 gate and the same 128 up rows (the product's columns 0-127 and 128-255,
// paired in the epilogue). The producer gives registers to the math warpgroups (setmaxnreg): their 128 accumulators
// and two steps of fragments need ~230 registers a thread.
//   grid (ceil(N / Tile::N), tiles, splits), block 128 (WG + 1), dynamic shared memory WgTile::SHARED
#include "bulk_copy.cuh"
#include "wgmma.cuh"

namespace wg {
constexpr int TK = 64, STAGES = 3;          // k of a step (measured against 32-wide steps in 6 stages: q/k/v
                                             // 183 -> 177 us), and the steps staged at once (192 KB)
constexpr int ROWS = 256;                    // weight rows staged a step
constexpr int ROW_BYTES = TK * 2;            // a staged weight row: 128 bytes, the span of the 128-byte swizzle
constexpr int SWIZZLE_ATOM = 8 * ROW_BYTES;  // 8 rows: the distance between two 8-row groups (the descriptor's SBO)
}  // namespace wg

template <bool C, class T, class F> struct Pick { using type = T; };  // (std::conditional, which NVRTC lacks)
template <class T, class F> struct Pick<false, T, F> { using type = F; };

// The CUtensorMap of the weights, passed by value (cuda_build.tensor_map): 128 opaque bytes.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

template <int MODE, int WG, typename A>
struct WgTile {
    static constexpr int M = 64 * WG, THREADS = 128 * (WG + 1);
    static constexpr int N = MODE == GATE_UP ? wg::ROWS / 2 : wg::ROWS;  // output columns of a block
    static constexpr bool SPLIT = sizeof(A) == 4;  // float32 activations: split into hi + lo in registers
    using Out = typename Pick<MODE == GATE_UP, A, float>::type;  // what ``out`` holds
    // a staged activation row: 256 bytes (float32) or 128 (bf16) in 16-byte chunks; the producer's 128 threads copy
    // A_PASS rows a pass
    static constexpr int A_ROW_BYTES = wg::TK * sizeof(A), A_CHUNKS = A_ROW_BYTES / 16, A_PASS = 128 / A_CHUNKS;
    static constexpr int B_BYTES = wg::ROWS * wg::ROW_BYTES, A_BYTES = M * A_ROW_BYTES;
    static constexpr int STAGE_BYTES = B_BYTES + A_BYTES;  // a multiple of 1024: every stage stays aligned
    // the stages, 1024 bytes to align them (the copy engine's 128-byte swizzle follows address bits 4-9), 2 mbarriers
    // a stage and the tile's rows (their tokens, for GATE_UP)
    static constexpr int SHARED = wg::STAGES * STAGE_BYTES + 1024 + 2 * wg::STAGES * 8 + M * 4;  // (= cupy_backend)
};
static_assert(WgTile<GATE_UP, 2, bf16_t>::STAGE_BYTES % 1024 == 0, "stages must stay 1024-byte aligned");
static_assert(WgTile<GATE_UP, 2, float>::SHARED <= 227 * 1024, "a block must fit a multiprocessor's shared memory");
static_assert(wg::SWIZZLE_ATOM == 1024, "swizzled_descriptor (wgmma.cuh) takes 8 rows of 128 bytes");

// The weights of one step: rows n0 .. n0 + 255 of the map (GATE_UP: 128 gate rows, then the same 128 up rows,
// ``up`` rows further), k0 .. k0 + 63, swizzled.
template <int MODE>
__device__ __forceinline__ void stage_weights(const void* map, int row, int up, int k0, unsigned char* dst,
                                              unsigned long long* bar) {
    tensor_copy(dst, map, k0, row, bar);
    if (MODE == GATE_UP) tensor_copy(dst + wg::ROWS / 2 * wg::ROW_BYTES, map, k0, row + up, bar);
}

// out = the tile products of matmul.cu (see there for what each mode writes), with the weights given by ``w_map``:
// a 2-D tensor map over all rows (every expert's, one after the other, ``expert_rows`` apart) x K, box 64 x 256
// (GATE_UP 64 x 128), 128-byte swizzle; A: the activations' type, float (split) or bf16_t.
template <int MODE, int WG, typename A>
__global__ void __launch_bounds__(128 * (WG + 1), 1) wgmma_tiles(
    const __grid_constant__ TensorMap w_map, const A* __restrict__ a, int K, int expert_rows, int N, int T,
    const int* __restrict__ tile_slot, const int* __restrict__ tile_row, const int* __restrict__ n_tiles,
    const int* __restrict__ slot_expert, const int* __restrict__ slot_offset, const int* __restrict__ pair_token,
    const int* __restrict__ pair_src, const float* __restrict__ pair_weight, const float* residual,
    typename WgTile<MODE, WG, A>::Out* out, float* __restrict__ partial) {
    using Tl = WgTile<MODE, WG, A>;
    constexpr int STAGES = wg::STAGES, TK = wg::TK;
    extern __shared__ unsigned char smem_raw[];
    unsigned char* smem = smem_raw + (1024 - shared_address(smem_raw) % 1024) % 1024;
    auto Bs = [&](int s) { return smem + s * Tl::STAGE_BYTES; };
    auto As = [&](int s) { return smem + s * Tl::STAGE_BYTES + Tl::B_BYTES; };
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + STAGES * Tl::STAGE_BYTES);
    unsigned long long* empty = full + STAGES;
    int* tile_src = reinterpret_cast<int*>(empty + STAGES);  // the activation row of each of the tile's rows
    // K's steps (the last one may be half a step: the weights past K are zeros, and so are the activations), split
    // over gridDim.z (a split left without steps writes zeros)
    const int n0 = blockIdx.x * Tl::N, all_steps = (K + TK - 1) / TK;
    const int per_split = (all_steps + gridDim.z - 1) / gridDim.z;
    const int first = blockIdx.z * per_split, steps = min(all_steps - first, per_split);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) barrier_init(full + s, 1 + 128), barrier_init(empty + s, 4 * WG);
        barriers_initialised();
    }
    // LINEAR's weights do not depend on the kernel ahead: its first stages' weights are asked for before waiting
    const int early = MODE == LINEAR ? min(STAGES, steps) : 0;
    if (threadIdx.x == 0)
        for (int s = 0; s < early; ++s) {
            barrier_expect(full + s, Tl::B_BYTES);
            stage_weights<MODE>(&w_map, n0, N, (first + s) * TK, Bs(s), full + s);
        }
    begin_after_previous();
    int row0, row_end, wrow0 = n0;  // the tile's rows, and the first weight row of the map the block reads
    if (MODE == LINEAR) {
        row0 = blockIdx.y * Tl::M, row_end = min(T, row0 + Tl::M);
    } else {
        if (blockIdx.y >= n_tiles[0]) return;
        const int s = tile_slot[blockIdx.y];
        row0 = tile_row[blockIdx.y], row_end = min(slot_offset[s + 1], row0 + Tl::M);
        wrow0 += slot_expert[s] * expert_rows;
    }
    if (threadIdx.x < Tl::M) {  // rows past the tile's end copy row0's (their products are never written)
        const int q = row0 + threadIdx.x < row_end ? row0 + threadIdx.x : row0;
        tile_src[threadIdx.x] = MODE == GATE_UP ? pair_token[q] : q;
    }
    __syncthreads();  // the barriers are initialised, the tile's rows listed

    if (warp < 4) {  // the producer warpgroup
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        const int chunk = threadIdx.x % Tl::A_CHUNKS, rows_of = threadIdx.x / Tl::A_CHUNKS;  // rows_of + A_PASS i
        for (int step = 0; step < steps; ++step) {
            const int s = step % STAGES, k0 = (first + step) * TK;
            if (step >= STAGES) barrier_wait(empty + s, (step / STAGES - 1) & 1);
            if (threadIdx.x == 0 && step >= early) {
                barrier_expect(full + s, Tl::B_BYTES);
                stage_weights<MODE>(&w_map, wrow0, N, k0, Bs(s), full + s);
            }
            unsigned char* dst = As(s);
            const int k = k0 + 16 / sizeof(A) * chunk;  // this thread's 16 bytes of each row; past K: zeros
#pragma unroll
            for (int i = 0; i < Tl::M / Tl::A_PASS; ++i) {
                const int r = rows_of + Tl::A_PASS * i;
                copy_async16(dst + r * Tl::A_ROW_BYTES + (chunk ^ r % 8) * 16,
                             a + static_cast<long long>(tile_src[r]) * K + (k < K ? k : 0), k < K);
            }
            barrier_arrive_on_copies(full + s);
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
    const int group = warp / 4 - 1, g = lane / 4, c = lane % 4 * 2;  // group: this math warpgroup
    const int wrow = 64 * group + 16 * (warp % 4);            // the first of this warp's 16 rows in the tile
    const bool group_has_rows = row0 + 64 * group < row_end;  // the same for the four warps of a warpgroup
    float acc[128] = {};
    pin(acc);
    // the A fragments (hi and lo) of two steps: those of the step before may still be read by the tensor cores
    unsigned frag[2][Tl::SPLIT ? TK / 16 : 1][2][4];
    // a float2 of row r at float f (f % 4 < 3) in the swizzled staging: chunk f / 4 of the row is at f / 4 ^ r % 8
    auto at = [&](const unsigned char* staged, int r, int f) {
        return *reinterpret_cast<const float2*>(staged + r * Tl::A_ROW_BYTES + ((f / 4) ^ (r % 8)) * 16 + f % 4 * 4);
    };
    auto one_step = [&](int step, unsigned (&f)[Tl::SPLIT ? TK / 16 : 1][2][4]) {  // f: frag[step % 2]
        const int s = step % STAGES;
        barrier_wait(full + s, (step / STAGES) & 1);
        if (group_has_rows) {
            if constexpr (Tl::SPLIT) {
                const unsigned char* staged = As(s);
#pragma unroll
                for (int kk = 0; kk < TK / 16; ++kk) {
                    const int r = wrow + g, k = 16 * kk + c;
                    const float2 x0 = at(staged, r, k), x1 = at(staged, r + 8, k), x2 = at(staged, r, k + 8),
                                 x3 = at(staged, r + 8, k + 8);
                    unsigned (&hi)[4] = f[kk][1], (&lo)[4] = f[kk][0];
                    split2(x0.x, x0.y, hi[0], lo[0]), split2(x1.x, x1.y, hi[1], lo[1]);
                    split2(x2.x, x2.y, hi[2], lo[2]), split2(x3.x, x3.y, hi[3], lo[3]);
                }
            }
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < TK / 16; ++kk) {
                const unsigned long long b = swizzled_descriptor(Bs(s)) + 2 * kk;  // + 32 bytes: the next 16 k
                if constexpr (Tl::SPLIT) {
                    wgmma_256(acc, f[kk][0], b);  // the small half first
                    wgmma_256(acc, f[kk][1], b);
                } else {  // the warpgroup's 64 rows of the staged bf16 activations
                    wgmma_256_shared(acc, swizzled_descriptor(As(s) + 64 * group * Tl::A_ROW_BYTES) + 2 * kk, b);
                }
            }
            wgmma_commit();
            wgmma_wait<1>();  // step - 1's products are done: its fragments and its buffer are free
        }
        if (step > 0 && lane == 0) barrier_arrive(empty + (step - 1) % STAGES);
    };
    for (int step = 0; step < steps; step += 2) {  // two at a time, so that each step's fragments have registers
        one_step(step, frag[0]);
        if (step + 1 < steps) one_step(step + 1, frag[1]);
    }
    wgmma_wait<0>();
    pin(acc);
    if (!group_has_rows) return;
    if constexpr (MODE == LINEAR) {
        if (gridDim.z > 1) {
            out = partial + static_cast<long long>(blockIdx.z) * T * N;
            residual = nullptr;
        }
    }

    // each lane holds rows g and g + 8 of its warp's 16 x columns 8j + c, 8j + c + 1 for every j
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + wrow + g + 8 * h;
        if (row >= row_end) continue;
        const OutputRow<MODE, typename Tl::Out> o(row, N, out, residual, pair_src, pair_weight);
#pragma unroll
        for (int j = 0; j < Tl::N / 8; ++j) {
            float up0 = 0.0f, up1 = 0.0f;
            if constexpr (MODE == GATE_UP)  // the up rows' columns
                up0 = acc[4 * (j + Tl::N / 8) + 2 * h], up1 = acc[4 * (j + Tl::N / 8) + 2 * h + 1];
            o.write2(n0 + 8 * j + c, N, acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1], up0, up1);
        }
    }
}
