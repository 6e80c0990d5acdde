// Prefill attention on the tensor cores, in the manner of FlashAttention-2: the scores and the weighted sum of
// values are mma.m16n8k16 products, the softmax is computed online over blocks of 32 keys, and neither the scores nor
// the probabilities ever go through memory.
//
// Block (tile, group of query heads): a tile is up to 64 consecutive query tokens of one sequence, 16 rows per warp,
// four warps per query head; the block's heads (blockDim.x / 128 of them) share one kv head. Each iteration takes
// 32 keys and values of that kv head, copied from the float32 cache by cp.async while the previous 32 were being
// multiplied, and splits them into bf16 hi + lo halves (mma.cuh) -- once for all the block's heads: loading and
// splitting cost about as much as the products of one head -- then
//   S = Q K^T       (16 x 32 per warp)  three products: q_hi k_hi + q_hi k_lo + q_lo k_hi (q_lo k_lo is ~2^-18);
//                   Q was scaled by scale * log2(e) once, so the softmax takes exp2 of S as it comes
//   online softmax  running max m and sum l per row, the output rescaled only when some row's m grew (most blocks
//                   after the first few leave every m as it was); keys after a row's position are masked (causal),
//                   which only the blocks on the diagonal need
//   O += P V        P taken straight from S's accumulator registers (the m16n8 result layout of two 8-key tiles is
//                   the m16k16 operand layout of the next product), again split into hi + lo: three products; V's
//                   operand is read transposed from its (key, d) rows by ldmatrix.trans.
// Q's fragments stay in registers for the whole key loop. The three-product split keeps the result within ~1e-5 of
// the float32 reference (plain bf16 would be ~1e-3). The output is written normalised: no merge step follows.
// SPLIT false (precision "bf16"): q, k, v and p are rounded to bf16 and each product is one mma, as in bf16 engines;
// the softmax and the sums stay float32. O: the output's type, float32 or (for an o_proj that takes bf16
// activations) bf16.
// D: head_dim, a multiple of 16 (64 and 128 are compiled).
// grid (tiles, Hq / heads), block 128 x heads (heads divides Hq / Hkv); dynamic shared memory: two buffers of 32 keys
// and values as float32 and as bf16 hi/lo, 2 * 2 * 32 * D * 4 + 2 * 4 * 32 * (D + 8) * 2 bytes (132 KB at D = 128)
#include "mma.cuh"

constexpr int BN = 32;  // keys per iteration

// Two adjacent bf16 of a shared-memory row as one 32-bit register (an mma operand fragment).
__device__ __forceinline__ unsigned pair_at(const bf16_t* row, int col) {
    return *reinterpret_cast<const unsigned*>(row + col);
}

// The k16 x n8 operand of an mma from a row-major (k, n) tile in shared memory: ``row`` is this lane's row (k0 +
// lane % 16) at column n0. Lanes 0-7 address the first 8 rows, lanes 8-15 the next 8; ".trans" hands each lane the
// column-wise pairs the instruction wants.
__device__ __forceinline__ void load_b_transposed(unsigned (&b)[2], const bf16_t* row) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                 : "=r"(b[0]), "=r"(b[1])
                 : "r"(address));
}

// 4 floats as bf16 hi and lo halves (SPLIT) or hi alone, 4 of each packed in 8 bytes.
template <bool SPLIT>
__device__ __forceinline__ void split4(const float4& x, uint2* hi, uint2* lo) {
    uint2 h, l;
    to_operand<SPLIT>(x.x, x.y, h.x, l.x);
    to_operand<SPLIT>(x.z, x.w, h.y, l.y);
    *hi = h;
    if (SPLIT) *lo = l;
}

// d += a_hi b_hi + a_hi b_lo + a_lo b_hi, the small terms first (SPLIT), or d += a_hi b_hi.
template <bool SPLIT>
__device__ __forceinline__ void mma3(float (&d)[4], const unsigned (&a_hi)[4], const unsigned (&a_lo)[4],
                                     const unsigned (&b_hi)[2], const unsigned (&b_lo)[2]) {
    if (SPLIT) {
        mma_bf16(d, a_lo, b_hi);
        mma_bf16(d, a_hi, b_lo);
    }
    mma_bf16(d, a_hi, b_hi);
}

template <int D, bool SPLIT, typename O>
__global__ void __launch_bounds__(256) attention_mma(const float* __restrict__ q, int Hq, int Hkv,
                                                     const float* const* k_caches, const float* const* v_caches,
                                                     const int* __restrict__ tile_seq,
                                                     const int* __restrict__ tile_row,
                                                     const int* __restrict__ tile_rows,
                                                     const int* __restrict__ tok_pos, float scale,
                                                     O* __restrict__ out) {
    constexpr int KS = D + 8;  // padded rows (bf16): the 8 rows an operand load touches start in distinct banks
    extern __shared__ __align__(16) unsigned char smem[];
    // two buffers of each: the keys and values as copied (float32, (key, d)), and split into hi/lo (bf16, (key, d))
    auto staged = [&](int b) { return reinterpret_cast<float*>(smem) + b * 2 * BN * D; };  // keys, then values
    auto split_kv = [&](int b) { return reinterpret_cast<bf16_t*>(smem + 2 * 2 * BN * D * 4) + b * 4 * BN * KS; };
    begin_after_previous();
    const int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;  // warp of its head
    // the tiles in reverse: a prompt's last tiles see the most keys, and started first they leave no long tail
    const int tile = gridDim.x - 1 - blockIdx.x, head = blockIdx.y * (blockDim.x / 128) + threadIdx.x / 128;
    const int kv_head = head / (Hq / Hkv), row0 = tile_row[tile], ntok = tile_rows[tile];
    const float* kc = k_caches[tile_seq[tile]];
    const float* vc = v_caches[tile_seq[tile]];
    const int key_end = tok_pos[row0 + ntok - 1] + 1;  // the tile's last token sees the most keys

    // this lane's two rows of the warp's 16: r[0] = 16 warp + g and r[1] = r[0] + 8 (rows past the tile: every key,
    // of a query of zeros -- their outputs are never written)
    int r[2], pos[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        r[h] = 16 * warp + g + 8 * h;
        pos[h] = r[h] < ntok ? tok_pos[row0 + r[h]] : key_end;
    }
    // the scores in log2 units: exp(s scale - m) = exp2(s scale log2(e) - m'), the factor applied to q once
    const float scale_log2 = scale * 1.44269504088896340736f;
    // Q as operand fragments, hi and lo, for the D / 16 k-steps: register i holds row r[i % 2], columns
    // 16 s + 2c (+ 8 for i >= 2) and the next one
    unsigned q_hi[D / 16][4], q_lo[D / 16][4];
#pragma unroll
    for (int s = 0; s < D / 16; ++s)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 v = make_float2(0.0f, 0.0f);
            if (r[i % 2] < ntok)
                v = *reinterpret_cast<const float2*>(q + (static_cast<long long>(row0 + r[i % 2]) * Hq + head) * D +
                                                     16 * s + 2 * c + 8 * (i / 2));
            to_operand<SPLIT>(v.x * scale_log2, v.y * scale_log2, q_hi[s][i], q_lo[s][i]);
        }

    float o[D / 8][4] = {};  // output tile j (columns 8j..8j+7): [0], [1] row r[0]; [2], [3] row r[1]
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    // each thread copies, and later splits, the same float4 chunks of every block of keys: its own copies are
    // visible to it once landed, so the staging buffers need no barrier; the split ones need one
    auto stage = [&](int k0, int b) {
        for (int i = threadIdx.x; i < BN * D / 4; i += blockDim.x) {
            const int key = i / (D / 4), d = i % (D / 4) * 4;
            const bool valid = k0 + key < key_end;
            const long long at = valid ? (static_cast<long long>(k0 + key) * Hkv + kv_head) * D + d : 0;
            copy_async16(staged(b) + key * D + d, kc + at, valid);
            copy_async16(staged(b) + BN * D + key * D + d, vc + at, valid);
        }
        copies_issued();
    };
    stage(0, 0);
    for (int k0 = 0, b = 0; k0 < key_end; k0 += BN, b ^= 1) {
        copies_landed<0>();
        bf16_t* k_hi = split_kv(b), *k_lo = k_hi + BN * KS, *v_hi = k_lo + BN * KS, *v_lo = v_hi + BN * KS;
        for (int i = threadIdx.x; i < BN * D / 4; i += blockDim.x) {
            const int key = i / (D / 4), d = i % (D / 4) * 4, at = key * KS + d;
            const float4 kv = *reinterpret_cast<const float4*>(staged(b) + key * D + d);
            const float4 vv = *reinterpret_cast<const float4*>(staged(b) + BN * D + key * D + d);
            split4<SPLIT>(kv, reinterpret_cast<uint2*>(k_hi + at), reinterpret_cast<uint2*>(k_lo + at));
            split4<SPLIT>(vv, reinterpret_cast<uint2*>(v_hi + at), reinterpret_cast<uint2*>(v_lo + at));
        }
        __syncthreads();  // this block of keys is split; the other split buffer is no longer read
        if (k0 + BN < key_end) stage(k0 + BN, b ^ 1);

        float sc[BN / 8][4] = {};  // scores: key tile j (keys 8j..8j+7): [0], [1] row r[0]; [2], [3] row r[1]
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int s = 0; s < D / 16; ++s) {
                const bf16_t* kh = k_hi + (8 * j + g) * KS + 16 * s + 2 * c;
                const bf16_t* kl = k_lo + (8 * j + g) * KS + 16 * s + 2 * c;
                const unsigned b_hi[2] = {pair_at(kh, 0), pair_at(kh, 8)};
                const unsigned b_lo[2] = {SPLIT ? pair_at(kl, 0) : 0u, SPLIT ? pair_at(kl, 8) : 0u};
                mma3<SPLIT>(sc[j], q_hi[s], q_lo[s], b_hi, b_lo);
            }
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // online softmax of row r[h]: its values are sc[j][2h], sc[j][2h + 1]
            if (k0 + BN - 1 > pos[h])  // a block on the diagonal: the keys after the row's position are masked
#pragma unroll
                for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e)
                        if (k0 + 8 * j + 2 * c + e > pos[h]) sc[j][2 * h + e] = -INFINITY;
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[j][2 * h], sc[j][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the row is spread over the 4 lanes of a quad
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[h], mx);
            alpha[h] = m_new == -INFINITY ? 1.0f : exp2f(m[h] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& s = sc[j][2 * h + e];
                    s = m_new == -INFINITY ? 0.0f : exp2f(s - m_new);
                    sum += s;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l[h] = l[h] * alpha[h] + sum;
            m[h] = m_new;
        }
        if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f))  // a row's maximum grew: rescale
#pragma unroll
            for (int j = 0; j < D / 8; ++j)
                o[j][0] *= alpha[0], o[j][1] *= alpha[0], o[j][2] *= alpha[1], o[j][3] *= alpha[1];
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {  // keys 16 kk .. 16 kk + 15: score tiles 2 kk and 2 kk + 1
            unsigned p_hi[4], p_lo[4];
            to_operand<SPLIT>(sc[2 * kk][0], sc[2 * kk][1], p_hi[0], p_lo[0]);
            to_operand<SPLIT>(sc[2 * kk][2], sc[2 * kk][3], p_hi[1], p_lo[1]);
            to_operand<SPLIT>(sc[2 * kk + 1][0], sc[2 * kk + 1][1], p_hi[2], p_lo[2]);
            to_operand<SPLIT>(sc[2 * kk + 1][2], sc[2 * kk + 1][3], p_hi[3], p_lo[3]);
#pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                const int at = (16 * kk + lane % 16) * KS + 8 * j;
                unsigned b_hi[2], b_lo[2] = {0u, 0u};
                load_b_transposed(b_hi, v_hi + at);
                if (SPLIT) load_b_transposed(b_lo, v_lo + at);
                mma3<SPLIT>(o[j], p_hi, p_lo, b_hi, b_lo);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (r[h] >= ntok) continue;
        O* dst = out + (static_cast<long long>(row0 + r[h]) * Hq + head) * D + 2 * c;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const float a = o[j][2 * h] / l[h], b = o[j][2 * h + 1] / l[h];
            if constexpr (sizeof(O) == 4) *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(a, b);
            else *reinterpret_cast<unsigned*>(dst + 8 * j) = to_bf16x2(a, b);
        }
    }
}
