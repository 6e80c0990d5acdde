// The tensor-core instruction of every tensor-core kernel (matmul.cu, mma_few.cu, mma_batch.cu, attention_mma.cu),
// and the float32 -> bf16 split that lets float32 activations through it at float32-like accuracy.
//
// mma.sync m16n8k16 bf16 with float32 accumulators, as inline PTX (the wmma headers are not part of every CUDA
// install that NVRTC sees). The activations are float32 and the weights bf16: x is split as x = hi + lo, both bf16
// (hi = x rounded, lo = the rounding error rounded), and both halves are multiplied, so the product is exact to ~2^-17
// relative instead of bf16's 2^-8 -- twice the tensor-core work, which memory- or latency-bound steps can afford, for
// results that match the float32 reference to ~1e-5.
#pragma once
#include "common.cuh"

// The products a tensor-core kernel computes (see matmul.cu for what each one writes).
enum Mode { LINEAR = 0, GATE_UP = 1, DOWN = 2 };

// The activations one thread of a tile product stages (matmul.cu, wgmma_tiles.cu): half of the tile's row
// threadIdx.x / 2 -- tokens in order for LINEAR and DOWN (the pairs' own rows), the pairs' tokens for GATE_UP --,
// TK / 2 floats a step in TK / 8 copies, into rows of LDA floats. A row past the tile's end gets zeros (its copies
// read nothing, from row 0's address).
template <int MODE, int TK, int LDA>
struct ActivationRow {
    const float* src;
    int half;
    bool has_row;
    __device__ __forceinline__ ActivationRow(const float* a, int K, int row0, int row_end,
                                             const int* __restrict__ pair_token) {
        const int q = row0 + threadIdx.x / 2;
        half = threadIdx.x % 2 * (TK / 2);
        has_row = q < row_end;
        src = a + (has_row ? static_cast<long long>(MODE == GATE_UP ? pair_token[q] : q) * K : 0) + half;
    }
    __device__ __forceinline__ void stage(int k0, float* dst) const {
#pragma unroll
        for (int v = 0; v < TK / 8; ++v)
            copy_async16(dst + threadIdx.x / 2 * LDA + half + 4 * v, src + k0 + 4 * v, has_row);
    }
};

// One output row of a tile product (matmul.cu, wgmma_tiles.cu): where row ``row`` of a tile goes -- out's row, or for
// DOWN its pair's row scaled by the routing weight -- and each of its values written as the mode asks, as float32 or
// (O = bf16_t: GATE_UP's output under precision "bf16", the next product's bf16 input) rounded to bf16.
template <int MODE, typename O = float>
struct OutputRow {
    O* dst;
    const float* residual_row = nullptr;  // LINEAR with a residual
    float scale = 1.0f;                   // DOWN with routing weights
    __device__ __forceinline__ OutputRow(int row, int N, O* out, const float* residual,
                                         const int* __restrict__ pair_src, const float* __restrict__ pair_weight) {
        long long r = row;
        if (MODE == DOWN) {
            r = pair_src[row];
            if (pair_weight) scale = pair_weight[r];
        }
        dst = out + r * N;
        if (MODE == LINEAR && residual) residual_row = residual + static_cast<long long>(row) * N;
    }
    // column col's value: v the product (GATE_UP: the gate's), up the up product (GATE_UP only)
    __device__ __forceinline__ float value(int col, float v, float up) const {
        if (MODE == LINEAR) return residual_row ? residual_row[col] + v : v;
        if (MODE == GATE_UP) return v / (1.0f + expf(-v)) * up;
        return scale * v;
    }
    // columns col and col + 1 (col even) of a row of N: one store of both where both exist and N is even (the row then
    // starts aligned), so that a warp's stores fill whole 32-byte sectors; else each column that exists.
    __device__ __forceinline__ void write2(int col, int N, float v0, float v1, float up0, float up1) const {
        const float a = value(col, v0, up0), b = value(col + 1, v1, up1);
        if (N % 2 == 0 && col + 1 < N) {
            if constexpr (sizeof(O) == 4) *reinterpret_cast<float2*>(dst + col) = make_float2(a, b);
            else *reinterpret_cast<unsigned*>(dst + col) = to_bf16x2(a, b);
        } else {
            if (col < N) store(dst + col, a);
            if (col + 1 < N) store(dst + col + 1, b);
        }
    }
};

// (x0, x1) as bf16 pairs x = hi + lo: hi = to_bf16x2(x0, x1), lo = the rounding errors rounded.
__device__ __forceinline__ void split2(float x0, float x1, unsigned& hi, unsigned& lo) {
    hi = to_bf16x2(x0, x1);
    lo = to_bf16x2(x0 - __uint_as_float(hi << 16), x1 - __uint_as_float(hi & 0xffff0000u));
}

// (x0, x1) as the operand words a product takes: with SPLIT, hi + lo (split2); without (precision "bf16"), the
// rounded hi alone (lo = 0, never multiplied).
template <bool SPLIT>
__device__ __forceinline__ void to_operand(float x0, float x1, unsigned& hi, unsigned& lo) {
    if (SPLIT) split2(x0, x1, hi, lo);
    else hi = to_bf16x2(x0, x1), lo = 0;
}

// d += a (16x16, row-major) * b (16x8, column-major), bf16 inputs, float32 accumulators. Fragment layout (PTX ISA,
// "mma.m16n8k16"): with g = lane / 4 and c = lane % 4 * 2, a holds rows g, g+8 x columns c, c+1, c+8, c+9; b holds
// rows (k) c, c+1, c+8, c+9 of column g; d holds rows g, g+8 x columns c, c+1. In each 32-bit register the lower
// 16 bits hold the lower column (a) or row (b).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One k-step of one 16-row weight tile in the k order of mma_few.cu and mma_batch.cu (lane g, c holds the 8
// consecutive k at 8c): w[0], w[1] are the lane's 8 weights of rows g and g + 8, hi/lo its token g's 8 activations;
// two mma instructions (words 0-1, then 2-3), each on the lo half and then the hi half.
__device__ __forceinline__ void mma_kstep(float (&acc)[4], const uint4 (&w)[2], const unsigned (&hi)[4],
                                          const unsigned (&lo)[4]) {
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        const unsigned a[4] = {(&w[0].x)[2 * m], (&w[1].x)[2 * m], (&w[0].x)[2 * m + 1], (&w[1].x)[2 * m + 1]};
        const unsigned b_lo[2] = {lo[2 * m], lo[2 * m + 1]}, b_hi[2] = {hi[2 * m], hi[2 * m + 1]};
        mma_bf16(acc, a, b_lo);  // the small half first
        mma_bf16(acc, a, b_hi);
    }
}
