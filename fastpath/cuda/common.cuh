// Helpers shared by every qwen3moe CUDA kernel: weights widened in registers, warp and block reductions.
//
// Weights stay in their checkpoint dtype on the GPU. CuPy has no bfloat16 array type, so a bf16 weight is held as its
// raw 16 bits (bf16_t) and widened here: a bf16 is the upper half of a float32, so widening is a 16-bit shift.
#pragma once

typedef unsigned short bf16_t;

#ifndef INFINITY  // NVRTC compiles without the C library's math.h
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float widen(bf16_t w) { return __uint_as_float(static_cast<unsigned>(w) << 16); }
__device__ __forceinline__ float widen(float w) { return w; }

// (x0, x1) rounded to bf16 (to nearest even) as one 32-bit word, x0 in the lower half: one instruction
// (cvt.rn.bf16x2.f32) for two floats, which matters where a decode-sized product rounds every activation again in
// each block that reads it.
__device__ __forceinline__ unsigned to_bf16x2(float x0, float x1) {
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(x1), "f"(x0));  // the first source goes to the upper half
    return d;
}

// v stored as a float32, or rounded to bf16 (activations that a product takes as bf16: precision "bf16").
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16_t* p, float v) { *p = static_cast<bf16_t>(to_bf16x2(v, 0.0f) & 0xffffu); }

// 16 bytes of weights: one vector load per lane (a warp reads 512 contiguous bytes at once), widened on use.
template <typename W> struct Pack;

template <> struct Pack<bf16_t> {
    static constexpr int N = 8;  // weights per pack
    uint4 raw;
    __device__ __forceinline__ void load(const bf16_t* p) { raw = __ldg(reinterpret_cast<const uint4*>(p)); }
    __device__ __forceinline__ float operator[](int i) const {  // i must be a compile-time constant
        const unsigned word = (&raw.x)[i / 2];
        return __uint_as_float(i % 2 ? (word & 0xffff0000u) : (word << 16));
    }
};

template <> struct Pack<float> {
    static constexpr int N = 4;
    float4 raw;
    __device__ __forceinline__ void load(const float* p) { raw = __ldg(reinterpret_cast<const float4*>(p)); }
    __device__ __forceinline__ float operator[](int i) const { return (&raw.x)[i]; }
};

// Programmatic dependent launch (sm_90). Inside a captured decode graph the backend lets every kernel start before
// the kernel ahead of it has finished (fastpath/cuda_build.py: Kernel), so that a step's hundreds of short kernels do
// not each wait for the previous one to drain and the next one to be scheduled. Every kernel therefore begins with
// ``begin_after_previous()``: it waits there until the kernel ahead has finished and its writes are visible, then
// lets the kernel behind it be scheduled. Code before that call may only do what needs no result of the kernel
// ahead: load the weights it multiplies first into registers, or read what kernels two or more places ahead wrote
// (the kernel ahead had passed its own wait, so they had finished, before this kernel could start). Launched the
// ordinary way the two instructions do nothing.
// What it should not do there: ask for many bytes ahead of need (cp.async.bulk.prefetch.L2 of its weight rows or of
// cached keys, as earlier versions did). The kernel ahead is on the step's critical path and reads memory too, and
// the requests delayed it by more than they saved: without them an H200 decodes a batch-1 step 3.377 -> 3.271 ms a
// token and batch 8 at 740 -> 773 tokens/s (docs/benchmarks.md). A few kilobytes a warp into registers, the first
// round of cached keys of the decoding attention kernels, did pay (1-5 % a token, attention.cu).
__device__ __forceinline__ void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void let_next_start() {  // (a kernel's blocks may also let it later than at once)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void begin_after_previous() {
    wait_for_previous();
    let_next_start();
}
#ifdef QWEN3MOE_TIMELINE  // each block also records when it started, waited and ended (timeline.cuh)
#include "timeline.cuh"
#endif

// cp.async (sm_80+): 16 bytes from global to shared memory without passing through registers, so a thread can have
// all of its copies in flight at once and compute while they land. ``valid`` false writes 16 zero bytes instead.
__device__ __forceinline__ void copy_async16(void* shared_dst, const void* src, bool valid) {
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void copies_issued() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int PENDING>  // wait until at most PENDING committed groups of this thread's copies are still in flight
__device__ __forceinline__ void copies_landed() { asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory"); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// op(...) over the whole block (blockDim.x a multiple of 32, at most 1024), ``identity`` its neutral value; every
// thread gets the result.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity) {
    __shared__ T partial[32];
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();  // partial[] may still be read by an earlier call
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    v = threadIdx.x % 32 < blockDim.x / 32 ? partial[threadIdx.x % 32] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

__device__ __forceinline__ float block_sum(float v) {
    return block_reduce(v, [](float a, float b) { return a + b; }, 0.0f);
}

// 1 / rms(x) = 1 / sqrt(mean(x^2) + eps) of one row, computed by the whole block.
__device__ __forceinline__ float block_inv_rms(const float* x, int n, float eps) {
    float ss = 0.0f;
    for (int k = threadIdx.x; k < n; k += blockDim.x) ss += x[k] * x[k];
    return 1.0f / sqrtf(block_sum(ss) / n + eps);
}

// acc[r][t] += sum_k w[r][k] * scale[k] * x[t][k] for t < nt, for ROWS weight rows at once (an expert's gate and up
// rows share their input): the inner loop of every projection. With SQUARES, also squares[t] += x[t][k]^2 over the
// lane's share of k: the RMSNorm of x (warp_sum over the lanes), from the activations already loaded for the products.
// With HEAD (ROWS 1), ``head`` holds the lane's first UNROLL packs p = lane + 32 u, loaded by the caller ahead of time
// (before the wait for the kernel ahead, which weights never depend on).
//
// The 32 lanes of a warp split a weight row in 16-byte packs; each lane keeps UNROLL packs of every row in flight
// before using them, so that enough bytes are on their way to hide memory latency. ``scale`` (a norm's weight) may be
// null. Rows whose length is not a whole number of packs (only in tiny test models) take the scalar loop.
// UNROLL x ROWS = 8 packs per lane at batch-1 decode (a whole 4 KB bf16 row of hidden 2048, or half of two), 4 when
// registers also hold MAXT accumulators per token.
template <typename W, int MAXT, int ROWS, bool SQUARES = false, bool HEAD = false>
__device__ __forceinline__ void warp_dot_rows_n(const W* const (&w)[ROWS], int K, const float* const (&x)[MAXT],
                                                int nt, const float* __restrict__ scale, float (&acc)[ROWS][MAXT],
                                                float* squares = nullptr, const Pack<W>* head = nullptr) {
    constexpr int N = Pack<W>::N, UNROLL = MAXT == 1 ? 8 / ROWS : 4;
    const int lane = threadIdx.x % 32;
    const int packs = K % N == 0 ? K / N : 0;
    auto use = [&](const Pack<W>& wp, int p, float (&a)[MAXT], bool square) {
        float wk[N];
#pragma unroll
        for (int i = 0; i < N; ++i) wk[i] = wp[i];
        if (scale) {
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 s = __ldg(reinterpret_cast<const float4*>(scale + p * N) + q);
                wk[4 * q] *= s.x; wk[4 * q + 1] *= s.y; wk[4 * q + 2] *= s.z; wk[4 * q + 3] *= s.w;
            }
        }
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            if (t >= nt) break;
            const float4* xp = reinterpret_cast<const float4*>(x[t] + p * N);
#pragma unroll
            for (int q = 0; q < N / 4; ++q) {
                const float4 v = xp[q];
                a[t] += wk[4 * q] * v.x + wk[4 * q + 1] * v.y + wk[4 * q + 2] * v.z + wk[4 * q + 3] * v.w;
                if (square) squares[t] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
            }
        }
    };
    int p = lane;
    for (; p + 32 * (UNROLL - 1) < packs; p += 32 * UNROLL) {
        Pack<W> wp[UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                if (HEAD && p == lane) wp[u][r] = head[u];
                else wp[u][r].load(w[r] + static_cast<long long>(p + 32 * u) * N);
            }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) use(wp[u][r], p + 32 * u, acc[r], SQUARES && r == 0);
    }
    const bool from_head = HEAD && p == lane;  // the loop above never ran: the head holds these packs
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // fewer than UNROLL packs are left (unrolled: head[u] stays a register)
        if (p + 32 * u >= packs) break;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            Pack<W> wp;
            if (from_head) wp = head[u];
            else wp.load(w[r] + static_cast<long long>(p + 32 * u) * N);
            use(wp, p + 32 * u, acc[r], SQUARES && r == 0);
        }
    }
    for (int k = packs * N + lane; k < K; k += 32) {  // scalar tail
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float wk = widen(w[r][k]) * (scale ? scale[k] : 1.0f);
#pragma unroll
            for (int t = 0; t < MAXT; ++t)
                if (t < nt) acc[r][t] += wk * x[t][k];
            if (SQUARES && r == 0)
#pragma unroll
                for (int t = 0; t < MAXT; ++t)
                    if (t < nt) squares[t] += x[t][k] * x[t][k];
        }
    }
}

// One weight row: acc[t] += sum_k w[k] * scale[k] * x[t][k] (and the squares of x, as above).
template <typename W, int MAXT, bool SQUARES = false, bool HEAD = false>
__device__ __forceinline__ void warp_dot_rows(const W* w, int K, const float* const (&x)[MAXT], int nt,
                                              const float* __restrict__ scale, float (&acc)[MAXT],
                                              float* squares = nullptr, const Pack<W>* head = nullptr) {
    const W* rows[1] = {w};
    warp_dot_rows_n<W, MAXT, 1, SQUARES, HEAD>(rows, K, x, nt, scale, reinterpret_cast<float (&)[1][MAXT]>(acc),
                                               squares, head);
}
