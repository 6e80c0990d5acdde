// Prefill projection, version 3 (fastpath/ladder.py prefill_projection): the step between matmul.cu's mma.sync tiles
// and the production wgmma_tiles.cu. out (T, N) = x (T, K) . W (N, K)^T on Hopper's warpgroup instruction, fed the
// way matmul.cu feeds its tiles: every thread copies its share of each step with cp.async, and the block meets at a
// barrier once per step.
//
// What it improves on matmul.cu: one wgmma is a 64 x 256 x 16 product by a warpgroup, issued asynchronously, its
// weights read by the tensor cores straight from shared memory through a descriptor; the next step's products are
// issued before the last one's have finished (wgmma.wait_group 1). What it leaves: the math warps also issue the
// copies and wait for them, and for each other at the barrier -- Nsight Compute counted the tensor pipe 28 % busy,
// the warps stalled on their copies (long scoreboard, LG throttle), which wgmma_tiles.cu's producer warpgroup removes.
//
// Weights are staged in wgmma's no-swizzle K-major layout: "core matrices" of 8 rows x 8 k (16 bytes a row, 128
// contiguous bytes), a k-chunk of 8 holding the 32 core matrices of the 256 rows one after the other (the
// descriptor's SBO: 128 bytes) and the chunks CHUNK bytes apart (its LBO), 32 bytes more than a chunk's 4 KB so that
// the 8 threads of one cp.async phase write 8 different 16-byte bank groups.
// T a multiple of 128, N of 256, K of 32.          grid (N / 256, T / 128), block 256, dynamic shared memory SHARED
#include "wgmma.cuh"

namespace v3 {
constexpr int TK = 32, STAGES = 4, AHEAD = STAGES - 2;  // AHEAD: steps copied ahead of the one being multiplied
constexpr int LDA = TK + 8;                             // a staged activation row, in floats
constexpr int ROWS = 256, M = 128;                      // weight rows and activation rows of a block
constexpr int CHUNK = ROWS * 16 + 32;                   // bytes between two 8-wide k-chunks of the staged weights
constexpr int A_BYTES = M * LDA * 4, STAGE_BYTES = A_BYTES + TK / 8 * CHUNK, SHARED = STAGES * STAGE_BYTES;
}  // namespace v3

__global__ void __launch_bounds__(256) prefill_wgmma_v3(const float* __restrict__ x, int K,
                                                        const bf16_t* __restrict__ w, float* __restrict__ out, int N) {
    using namespace v3;
    extern __shared__ __align__(128) unsigned char smem[];
    auto As = [&](int s) { return reinterpret_cast<float*>(smem + s * STAGE_BYTES); };
    auto Bs = [&](int s) { return smem + s * STAGE_BYTES + A_BYTES; };
    const int n0 = blockIdx.x * ROWS, row0 = blockIdx.y * M, steps = K / TK;
    auto stage = [&](int step, int s) {  // this thread's copies of one step: 4 x 16 bytes of weights, of activations
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int i = threadIdx.x + 256 * u, r = i / 4, q = i % 4;
            copy_async16(Bs(s) + q * CHUNK + r / 8 * 128 + r % 8 * 16,
                         w + static_cast<long long>(n0 + r) * K + step * TK + q * 8, true);
            copy_async16(As(s) + i / 8 * LDA + i % 8 * 4,
                         x + static_cast<long long>(row0 + i / 8) * K + step * TK + i % 8 * 4, true);
        }
        copies_issued();
    };
    for (int s = 0; s < AHEAD; ++s) {
        if (s < steps) stage(s, s);
        else copies_issued();  // an empty group, so that every step waits for the same count
    }

    const int group = threadIdx.x / 128, warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4 * 2, wrow = 64 * group + 16 * warp;  // this warp's 16 rows of the tile
    float acc[128] = {};
    pin(acc);
    unsigned frag[2][TK / 16][2][4];  // the A fragments (hi, lo) of two steps: the tensor cores may still read one
    auto one_step = [&](int step, unsigned (&f)[TK / 16][2][4]) {
        const int s = step % STAGES;
        copies_landed<AHEAD - 1>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async's writes, seen by the tensor cores
        __syncthreads();  // every thread's copies are in; step - 2's products are done, its buffer free
        if (step + AHEAD < steps) stage(step + AHEAD, (step + AHEAD) % STAGES);
        else copies_issued();
        const float* A = As(s);
#pragma unroll
        for (int kk = 0; kk < TK / 16; ++kk) {
            const float* r0 = A + (wrow + g) * LDA + 16 * kk + c;
            const float* r8 = r0 + 8 * LDA;
            const float2 x0 = *reinterpret_cast<const float2*>(r0), x1 = *reinterpret_cast<const float2*>(r8);
            const float2 x2 = *reinterpret_cast<const float2*>(r0 + 8), x3 = *reinterpret_cast<const float2*>(r8 + 8);
            split2(x0.x, x0.y, f[kk][1][0], f[kk][0][0]), split2(x1.x, x1.y, f[kk][1][1], f[kk][0][1]);
            split2(x2.x, x2.y, f[kk][1][2], f[kk][0][2]), split2(x3.x, x3.y, f[kk][1][3], f[kk][0][3]);
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TK / 16; ++kk) {  // descriptor: address, LBO (next 8 k), SBO (next 8 rows), /16
            const unsigned long long b =
                ((static_cast<unsigned>(__cvta_generic_to_shared(Bs(s) + 2 * kk * CHUNK)) & 0x3FFFF) >> 4) |
                (static_cast<unsigned long long>(CHUNK >> 4) << 16) | (static_cast<unsigned long long>(128 >> 4) << 32);
            wgmma_256(acc, f[kk][0], b);  // lo, then hi
            wgmma_256(acc, f[kk][1], b);
        }
        wgmma_commit();
        wgmma_wait<1>();
    };
    for (int step = 0; step < steps; step += 2) {
        one_step(step, frag[0]);
        if (step + 1 < steps) one_step(step + 1, frag[1]);
    }
    wgmma_wait<0>();
    pin(acc);
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // lane: rows g, g + 8 of its warp's 16 x columns 8j + c, 8j + c + 1
        float* dst = out + static_cast<long long>(row0 + wrow + g + 8 * h) * N + n0 + c;
#pragma unroll
        for (int j = 0; j < ROWS / 8; ++j)
            *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(acc[4 * j + 2 * h], acc[4 * j + 2 * h + 1]);
    }
}
