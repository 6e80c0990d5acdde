// matmul.cu's tiles on Hopper's warpgroup instruction (wgmma.mma_async, sm_90a only): the same three products,
// arguments and outputs, for prefill-sized steps on H100 / H200.
//
// Why: matmul.cu's mma.sync tiles issue one 16 x 8 x 16 product per warp instruction and wait for every operand in
// registers; at 2048 tokens they keep the tensor pipe ~40 % busy. One wgmma is a 64 x 256 x 16 product by the four
// warps of a warpgroup, issued asynchronously, its weights (the B operand) read by the tensor cores straight from
// shared memory through a descriptor. The activations (A) still come from registers, split into bf16 hi + lo as in
// every kernel here (mma.cuh), so the results keep float32-like accuracy: two wgmma per 16-wide step of K.
//
// A block holds WG warpgroups (64 rows each) x 256 weight rows: LINEAR and DOWN 256 output columns, GATE_UP 128
// gate and the same 128 up rows (the product's columns 0-127 and 128-255, paired in the epilogue).
//   grid (ceil(N / Tile::N), tiles, splits), block 128 WG, dynamic shared memory Tile::SHARED
// A pipeline of STAGES buffers filled by cp.async as in matmul.cu, except that a step's products are issued before
// the previous step's have finished (wgmma.wait_group 1): the tensor cores always have the next step queued, and a
// buffer is refilled two steps after its products were issued. Measured on an H200 (2048-token prefill shapes):
// waiting for each step's products instead, q/k/v took 400 us against 338, and 357-370 on matmul.cu; one warpgroup
// a block (64 rows, two blocks a multiprocessor) 449. Weights are staged in wgmma's no-swizzle
// K-major layout: "core matrices" of 8 rows x 8 k (16 bytes a row, 128 contiguous bytes), a k-chunk of 8 holding
// the 32 core matrices of the 256 rows one after the other (stride 128 bytes: the descriptor's SBO) and the chunks
// CHUNK bytes apart (its LBO). CHUNK is 32 bytes more than the 4 KB of a chunk so that the 8 threads of one
// cp.async phase (2 rows x 4 chunks, TK = 32) write 8 different 16-byte bank groups.
#include "mma.cuh"

namespace wg {
constexpr int TK = 32, STAGES = 4;
constexpr int LDA = TK + 8;             // a staged activation row, in floats (as matmul.cu)
constexpr int ROWS = 256;               // weight rows staged a step
constexpr int CHUNK = ROWS * 16 + 32;   // bytes between two 8-wide k-chunks of the staged weights
}  // namespace wg

template <int MODE, int WG>
struct WgTile {
    static constexpr int M = 64 * WG, THREADS = 128 * WG;
    static constexpr int N = MODE == GATE_UP ? wg::ROWS / 2 : wg::ROWS;  // output columns of a block
    static constexpr int A_BYTES = M * wg::LDA * 4, STAGE_BYTES = A_BYTES + wg::TK / 8 * wg::CHUNK;
    static constexpr int SHARED = wg::STAGES * STAGE_BYTES;  // (cupy_backend.tiles computes the same)
};
static_assert(WgTile<GATE_UP, 2>::SHARED <= 227 * 1024, "a block must fit a multiprocessor's shared memory");

// The descriptor of a staged weight tile's 256 rows x 16 k starting at ``tile`` (PTX ISA, "Matrix Descriptor"):
// start address, LBO (next 8 k) and SBO (next 8 rows), all in 16-byte units; swizzle bits 0 (none).
__device__ __forceinline__ unsigned long long weights_descriptor(const unsigned char* tile) {
    const unsigned long long address = static_cast<unsigned>(__cvta_generic_to_shared(tile));
    return ((address & 0x3FFFF) >> 4) | (static_cast<unsigned long long>(wg::CHUNK >> 4) << 16) |
           (static_cast<unsigned long long>(128 >> 4) << 32);
}

// d (64 x 256, f32) += a (64 x 16 bf16, from registers: each warp its 16 rows in mma.m16n8k16's A layout) x the
// 16 x 256 bf16 weights the descriptor points to. Asynchronous: the caller fences, commits and waits.
// d's layout per warp: d[4j .. 4j+3] = rows g, g, g+8, g+8 x columns 8j + c, 8j + c + 1 (as mma.m16n8k16).
#define WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
__device__ __forceinline__ void wgmma_256(float (&d)[128], const unsigned (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56), WG_D8(64),
          WG_D8(72), WG_D8(80), WG_D8(88), WG_D8(96), WG_D8(104), WG_D8(112), WG_D8(120)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
#undef WG_D8

// Before a warpgroup's first wgmma after its registers were written; after issuing, to close a group; and to wait
// for this warp's groups. The proxy fence makes this thread's cp.async writes (generic proxy) visible to the
// tensor cores' reads of shared memory (async proxy).
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int PENDING>  // wait until at most PENDING committed groups of this warp's products are still running
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory"); }
// Pins the accumulators where they are: without it the compiler may move their zeroing or a copy of them in between
// two wgmma still running on them, and ptxas then serializes every wgmma (its advisory C7515).
__device__ __forceinline__ void pin(float (&d)[128]) {
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void async_proxy_fence() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// One 32-wide step of the block's 256 weight rows into shared memory in the layout above. Row r of the stage is
// row n0 + r of W[0] (GATE_UP: rows 0-127 gate, 128-255 up, both from n0). Rows past N become zeros.
template <int MODE, int WG>
__device__ __forceinline__ void stage_weights(const bf16_t* const (&W)[MODE == GATE_UP ? 2 : 1], int K, int N, int n0,
                                              int k0, unsigned char* dst) {
    constexpr int THREADS = 128 * WG;
    constexpr int CHUNKS = wg::TK / 8;  // 16-byte copies a row: consecutive threads take a row's in one go
#pragma unroll
    for (int u = 0; u < wg::ROWS * CHUNKS / THREADS; ++u) {
        const int i = threadIdx.x + u * THREADS, r = i / CHUNKS, q = i % CHUNKS;
        const int j = MODE == GATE_UP ? r / (wg::ROWS / 2) : 0, n = n0 + (MODE == GATE_UP ? r % (wg::ROWS / 2) : r);
        const bool valid = n < N;
        copy_async16(dst + q * wg::CHUNK + r / 8 * 128 + r % 8 * 16,
                     W[j] + static_cast<long long>(valid ? n : 0) * K + k0 + q * 8, valid);
    }
}

template <int MODE, int WG>
__global__ void __launch_bounds__(128 * WG) wgmma_tiles(
    const float* __restrict__ a, int K, const bf16_t* __restrict__ w, const bf16_t* __restrict__ w2,
    long long expert_stride, int N, int T, const int* __restrict__ tile_slot, const int* __restrict__ tile_row,
    const int* __restrict__ n_tiles, const int* __restrict__ slot_expert, const int* __restrict__ slot_offset,
    const int* __restrict__ pair_token, const int* __restrict__ pair_src, const float* __restrict__ pair_weight,
    const float* residual, float* out, float* __restrict__ partial) {
    using Tl = WgTile<MODE, WG>;
    constexpr int SLOTS = MODE == GATE_UP ? 2 : 1, STAGES = wg::STAGES, TK = wg::TK;
    // one commit group per step (empty past the end): while step t is multiplied, the copies of the next AHEAD
    // steps are in flight, and the tensor cores may still be reading step t - 1's buffer
    constexpr int AHEAD = STAGES - 2;
    extern __shared__ __align__(128) unsigned char smem[];
    auto As = [&](int s) { return reinterpret_cast<float*>(smem + s * Tl::STAGE_BYTES); };
    auto Bs = [&](int s) { return smem + s * Tl::STAGE_BYTES + Tl::A_BYTES; };
    const int n0 = blockIdx.x * Tl::N, per_split = (K / TK + gridDim.z - 1) / gridDim.z;
    const int first = blockIdx.z * per_split, steps = min(K / TK - first, per_split);

    int row0, row_end;
    const bf16_t* W[SLOTS];
    if (MODE == LINEAR) {
        W[0] = w;
        for (int s = 0; s < AHEAD && s < steps; ++s)
            stage_weights<MODE, WG>(W, K, N, n0, (first + s) * TK, Bs(s));
        begin_after_previous();
        row0 = blockIdx.y * Tl::M, row_end = min(T, row0 + Tl::M);
    } else {
        begin_after_previous();
        if (blockIdx.y >= n_tiles[0]) return;
        const int s = tile_slot[blockIdx.y];
        row0 = tile_row[blockIdx.y], row_end = min(slot_offset[s + 1], row0 + Tl::M);
        const long long e = slot_expert[s];
        W[0] = w + e * expert_stride;
        if (MODE == GATE_UP) W[SLOTS - 1] = w2 + e * expert_stride;
    }
    const ActivationRow<MODE, TK, wg::LDA> activations(a, K, row0, row_end, pair_token);
    for (int s = 0; s < AHEAD; ++s) {
        if (s < steps) {
            if (MODE != LINEAR) stage_weights<MODE, WG>(W, K, N, n0, (first + s) * TK, Bs(s));
            activations.stage((first + s) * TK, As(s));
        }
        copies_issued();
    }

    const int group = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4 * 2;
    const int wrow = 64 * group + 16 * warp;                  // the first of this warp's 16 rows in the tile
    const bool group_has_rows = row0 + 64 * group < row_end;  // the same for the four warps of a warpgroup
    float acc[128] = {};
    pin(acc);
    // the A fragments (hi and lo) of two steps: those of the step before may still be read by the tensor cores
    unsigned frag[2][TK / 16][2][4];
    auto one_step = [&](int step, unsigned (&f)[TK / 16][2][4]) {  // f: frag[step % 2]
        const int s = step % STAGES;
        copies_landed<AHEAD - 1>();
        async_proxy_fence();
        __syncthreads();  // step's copies from every thread are in; every warp has seen step - 2's products done
        if (step + AHEAD < steps) {  // so step - 2's buffer takes step + AHEAD
            const int k0 = (first + step + AHEAD) * TK, refill = (step + AHEAD) % STAGES;
            stage_weights<MODE, WG>(W, K, N, n0, k0, Bs(refill));
            activations.stage(k0, As(refill));
        }
        copies_issued();
        if (!group_has_rows) return;
        const float* A = As(s);
#pragma unroll
        for (int kk = 0; kk < TK / 16; ++kk) {
            const float* r0 = A + (wrow + g) * wg::LDA + 16 * kk + c;
            const float* r8 = r0 + 8 * wg::LDA;
            const float2 x0 = *reinterpret_cast<const float2*>(r0), x1 = *reinterpret_cast<const float2*>(r8);
            const float2 x2 = *reinterpret_cast<const float2*>(r0 + 8), x3 = *reinterpret_cast<const float2*>(r8 + 8);
            unsigned (&hi)[4] = f[kk][1], (&lo)[4] = f[kk][0];
            split2(x0.x, x0.y, hi[0], lo[0]), split2(x1.x, x1.y, hi[1], lo[1]);
            split2(x2.x, x2.y, hi[2], lo[2]), split2(x3.x, x3.y, hi[3], lo[3]);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TK / 16; ++kk) {
            const unsigned long long b = weights_descriptor(Bs(s) + 2 * kk * wg::CHUNK);
            wgmma_256(acc, f[kk][0], b);  // the small half first
            wgmma_256(acc, f[kk][1], b);
        }
        wgmma_commit();
        wgmma_wait<1>();  // step - 1's products are done: its fragments and its buffer are free
    };
    for (int step = 0; step < steps; step += 2) {  // two at a time, so that each step's fragments have registers
        one_step(step, frag[0]);
        if (step + 1 < steps) one_step(step + 1, frag[1]);
    }
    wgmma_wait<0>();
    pin(acc);
    copies_landed<0>();
    if (MODE == LINEAR && gridDim.z > 1) {
        out = partial + static_cast<long long>(blockIdx.z) * T * N;
        residual = nullptr;
    }

    // each lane holds rows g and g + 8 of its warp's 16 x columns 8j + c, 8j + c + 1 for every j
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + wrow + g + 8 * h;
        if (row >= row_end) continue;
        const OutputRow<MODE> o(row, N, out, residual, pair_src, pair_weight);
#pragma unroll
        for (int j = 0; j < Tl::N / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int col = n0 + 8 * j + c + e;
                float up = 0.0f;
                if constexpr (MODE == GATE_UP) up = acc[4 * (j + Tl::N / 8) + 2 * h + e];  // the up rows' columns
                if (col < N) o.write(col, acc[4 * j + 2 * h + e], up);
            }
    }
}
