// Attention: q/k-norm + RoPE + KV-cache write, then grouped-query attention over the caches, split along the keys
// (flash-decoding) and merged.
//
// Each sequence s of a step has its own cache, (capacity, Hkv, D) float32 per layer, reached through k_caches[s] and
// v_caches[s]. Token t of the step belongs to sequence tok_seq[t] and sits at position tok_pos[t]. Both live in
// device memory, so a captured decode step reads the position of the moment.
#include "common.cuh"

constexpr int MAX_D = 256;                // head_dim supported (Qwen3 uses 128)
constexpr int D_PER_LANE = MAX_D / 32;  // a lane holds elements lane, lane + 32, ... of a head vector
constexpr int WARPS = 8;

// Per token (one block): RMSNorm each q and k head over head_dim (q_norm, k_norm), rotate q and k by RoPE (the NeoX
// "rotate_half" layout: element i pairs with i + D/2), write q to q_out and k, v into the token's cache row.
// cos/sin come from angle = position * inv_freq[i mod D/2], in float32 as the reference computes it.
// One warp per head.                           grid (T, ceil((Hq + 2 Hkv) / 8)), block 256, dynamic smem WARPS * D floats
__global__ void __launch_bounds__(256) qk_norm_rope_cache(const float* __restrict__ qkv, int Hq, int Hkv, int D,
                                                          const float* __restrict__ q_norm,
                                                          const float* __restrict__ k_norm, float eps,
                                                          const float* __restrict__ inv_freq,
                                                          const int* __restrict__ tok_pos,
                                                          const int* __restrict__ tok_seq, float* const* k_caches,
                                                          float* const* v_caches, float* __restrict__ q_out) {
    extern __shared__ float scratch[];  // one head vector per warp
    begin_after_previous();
    const int t = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32, half = D / 2;
    const int pos = tok_pos[t], seq = tok_seq[t];
    const float* row = qkv + static_cast<long long>(t) * (Hq + 2 * Hkv) * D;
    float* head_vec = scratch + warp * D;
    for (int h = blockIdx.y * WARPS + warp; h < min(Hq + 2 * Hkv, (blockIdx.y + 1) * WARPS); h += WARPS) {
        const float* src = row + h * D;
        if (h >= Hq + Hkv) {  // a value head: straight into the cache
            float* dst = v_caches[seq] + (static_cast<long long>(pos) * Hkv + (h - Hq - Hkv)) * D;
            for (int d = lane; d < D; d += 32) dst[d] = src[d];
            continue;
        }
        const bool is_q = h < Hq;
        const float* norm = is_q ? q_norm : k_norm;
        float v[D_PER_LANE], ss = 0.0f;
#pragma unroll
        for (int j = 0; j < D_PER_LANE; ++j) {
            const int d = lane + 32 * j;
            v[j] = d < D ? src[d] : 0.0f;
            ss += v[j] * v[j];
        }
        const float inv = 1.0f / sqrtf(warp_sum(ss) / D + eps);
#pragma unroll
        for (int j = 0; j < D_PER_LANE; ++j) {
            const int d = lane + 32 * j;
            if (d < D) head_vec[d] = norm[d] * (v[j] * inv);
        }
        __syncwarp();
        float* dst = is_q ? q_out + (static_cast<long long>(t) * Hq + h) * D
                          : k_caches[seq] + (static_cast<long long>(pos) * Hkv + (h - Hq)) * D;
#pragma unroll
        for (int j = 0; j < D_PER_LANE; ++j) {
            const int d = lane + 32 * j;
            if (d >= D) break;
            const float angle = static_cast<float>(pos) * inv_freq[d % half];
            const float rotated = d < half ? -head_vec[d + half] : head_vec[d - half];
            dst[d] = head_vec[d] * cosf(angle) + rotated * sinf(angle);
        }
        __syncwarp();
    }
}

// Grouped-query attention of a tile of query tokens against one key range of their sequence's cache.
//
// Block (split, kv head, tile): the tile's tokens (consecutive rows of one sequence) times the G = Hq / Hkv query
// heads that share kv head h make R <= 32 rows; every key and value is read from the cache once for all of them
// (staged in shared memory 32 keys at a time). Each row keeps an online softmax (running max m, sum l and the
// unnormalised output acc) over keys [split * chunk, (split + 1) * chunk) that it may see (key <= its position); the
// partial results of the splits are merged by attention_combine. Many splits keep the GPU busy at decode, when a
// step has one query token per sequence; a prefill has enough tiles with one split.
//                                  grid (splits, Hkv, tiles), block 256, dynamic smem (R * D + 32 * (2D + 1)) floats
__global__ void __launch_bounds__(256) attention(const float* __restrict__ q, int Hq, int Hkv, int D,
                                                 const float* const* k_caches, const float* const* v_caches,
                                                 const int* __restrict__ tile_seq, const int* __restrict__ tile_row,
                                                 const int* __restrict__ tile_rows, const int* __restrict__ tok_pos,
                                                 int T, int chunk, float scale, float* __restrict__ part_acc,
                                                 float* __restrict__ part_m, float* __restrict__ part_l) {
    extern __shared__ float smem[];
    begin_after_previous();
    const int split = blockIdx.x, h = blockIdx.y, tile = blockIdx.z;
    const int G = Hq / Hkv, row0 = tile_row[tile], ntok = tile_rows[tile], R = ntok * G;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const float* kc = k_caches[tile_seq[tile]];
    const float* vc = v_caches[tile_seq[tile]];
    float* qs = smem;                // (R, D)
    float* ks = qs + R * D;          // (32, D + 1): padded so that lane j reading key j hits its own bank
    float* vs = ks + 32 * (D + 1);   // (32, D)

    for (int i = threadIdx.x; i < R * D; i += blockDim.x) {  // row r = (token r / G, head h * G + r % G)
        const int r = i / D, d = i % D;
        qs[i] = q[(static_cast<long long>(row0 + r / G) * Hq + h * G + r % G) * D + d];
    }
    const int key_begin = split * chunk;
    const int key_end = min(key_begin + chunk, tok_pos[row0 + ntok - 1] + 1);  // the tile's last token sees most

    constexpr int ROWS_PER_WARP = 4;  // R <= 32 = WARPS * ROWS_PER_WARP
    float m[ROWS_PER_WARP], l[ROWS_PER_WARP], acc[ROWS_PER_WARP][D_PER_LANE];
#pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j) {
        m[j] = -INFINITY, l[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc[j][i] = 0.0f;
    }
    for (int k0 = key_begin; k0 < key_end; k0 += 32) {
        __syncthreads();  // the previous keys are no longer read
        if (D % 4 == 0) {  // 16-byte loads
            for (int i = threadIdx.x; i < 8 * D; i += blockDim.x) {
                const int j = i / (D / 4), d = i % (D / 4) * 4, key = k0 + j;
                const long long at = (static_cast<long long>(key) * Hkv + h) * D + d;
                const float4 zero = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                const float4 k4 = key < key_end ? *reinterpret_cast<const float4*>(kc + at) : zero;
                const float4 v4 = key < key_end ? *reinterpret_cast<const float4*>(vc + at) : zero;
                float* kd = ks + j * (D + 1) + d;  // padded rows: not 16-byte aligned
                kd[0] = k4.x, kd[1] = k4.y, kd[2] = k4.z, kd[3] = k4.w;
                *reinterpret_cast<float4*>(vs + j * D + d) = v4;
            }
        } else {
            for (int i = threadIdx.x; i < 32 * D; i += blockDim.x) {
                const int j = i / D, d = i % D, key = k0 + j;
                const long long at = (static_cast<long long>(key) * Hkv + h) * D + d;
                ks[j * (D + 1) + d] = key < key_end ? kc[at] : 0.0f;
                vs[j * D + d] = key < key_end ? vc[at] : 0.0f;
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < ROWS_PER_WARP; ++j) {
            const int r = warp + WARPS * j;
            if (r >= R) break;
            const int key = k0 + lane;
            const bool visible = key < key_end && key <= tok_pos[row0 + r / G];
            float part[4] = {};  // four independent sums: a chain of D dependent additions would stall
            int d = 0;
            for (; d + 3 < D; d += 4)
#pragma unroll
                for (int i = 0; i < 4; ++i) part[i] += qs[r * D + d + i] * ks[lane * (D + 1) + d + i];
            for (; d < D; ++d) part[0] += qs[r * D + d] * ks[lane * (D + 1) + d];
            float score = (part[0] + part[1]) + (part[2] + part[3]);
            score = visible ? score * scale : -INFINITY;
            const float m_new = fmaxf(m[j], warp_max(score));
            if (m_new == -INFINITY) continue;  // nothing visible yet
            const float p = visible ? expf(score - m_new) : 0.0f;
            const float alpha = expf(m[j] - m_new);
            l[j] = l[j] * alpha + warp_sum(p);
            m[j] = m_new;
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) acc[j][i] *= alpha;
            for (int key_j = 0; key_j < 32; ++key_j) {
                const float pj = __shfl_sync(0xffffffffu, p, key_j);
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) {
                    const int d = lane + 32 * i;
                    if (d < D) acc[j][i] += pj * vs[key_j * D + d];
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j) {
        const int r = warp + WARPS * j;
        if (r >= R) break;
        const long long at = (static_cast<long long>(split) * T + row0 + r / G) * Hq + h * G + r % G;
        if (lane == 0) part_m[at] = m[j], part_l[at] = l[j];
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < D) part_acc[at * D + d] = acc[j][i];
        }
    }
}

// out[t, head, :] = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s over the splits s that saw any key.
// Splits with no visible key left m = -inf and l = 0 and drop out.      grid (T, Hq), block D rounded up to 32
__global__ void attention_combine(const float* __restrict__ part_acc, const float* __restrict__ part_m,
                                  const float* __restrict__ part_l, int splits, int T, int Hq, int D,
                                  float* __restrict__ out) {
    begin_after_previous();
    const long long th = static_cast<long long>(blockIdx.x) * Hq + blockIdx.y;
    const long long stride = static_cast<long long>(T) * Hq;
    float M = -INFINITY;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, part_m[s * stride + th]);
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float num = 0.0f, den = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float ms = part_m[s * stride + th];
            if (ms == -INFINITY) continue;
            const float w = expf(ms - M);
            num += w * part_acc[(s * stride + th) * D + d];
            den += w * part_l[s * stride + th];
        }
        out[th * D + d] = num / den;
    }
}
