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

// One head vector by one warp: dst = RoPE(norm_weight * src / rms(src)), the NeoX "rotate_half" layout (element d
// pairs with d + D/2) at the angles whose cosines and sines are cos_a[0, D/2) and sin_a[0, D/2). ``scratch``: D
// floats of this warp's own (it may be dst, when dst is too).
__device__ __forceinline__ void norm_rope_head(const float* src, int D, const float* norm_weight, float eps,
                                               const float* cos_a, const float* sin_a, float* scratch, float* dst) {
    const int lane = threadIdx.x % 32, half = D / 2;
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
        if (d < D) scratch[d] = norm_weight[d] * (v[j] * inv);
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < D_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        if (d >= D) break;
        const float rotated = d < half ? -scratch[d + half] : scratch[d - half];
        v[j] = scratch[d] * cos_a[d % half] + rotated * sin_a[d % half];
    }
    __syncwarp();  // every lane has read scratch before dst (perhaps the same memory) is written
#pragma unroll
    for (int j = 0; j < D_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        if (d < D) dst[d] = v[j];
    }
}

// Per token (one block): RMSNorm each q and k head over head_dim (q_norm, k_norm), rotate q and k by RoPE, write q to
// q_out and k, v into the token's cache row. cos/sin come from angle = position * inv_freq[i mod D/2], in float32 as
// the reference computes it. For prefill chunks; a decoding step does this inside ``attention`` (NORM_ROPE).
// One warp per head.                         grid (T, ceil((Hq + 2 Hkv) / 8)), block 256, dynamic smem WARPS * D floats
__global__ void __launch_bounds__(256) qk_norm_rope_cache(const float* __restrict__ qkv, int Hq, int Hkv, int D,
                                                          const float* __restrict__ q_norm,
                                                          const float* __restrict__ k_norm, float eps,
                                                          const float* __restrict__ inv_freq,
                                                          const int* __restrict__ tok_pos,
                                                          const int* __restrict__ tok_seq, float* const* k_caches,
                                                          float* const* v_caches, float* __restrict__ q_out) {
    extern __shared__ float scratch[];  // one head vector per warp
    __shared__ float cos_s[MAX_D / 2], sin_s[MAX_D / 2];  // the token's D / 2 angles, shared by the block's heads
    const int t = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // The rotation needs only the position, written kernels ahead (see common.cuh): computed while the q/k/v
    // projection ahead still runs, once per block (a prefill runs this T x 5 times a layer; sincosf is ~40
    // instructions, and each lane computing its own elements' took 16 times as many).
    const int pos = tok_pos[t], seq = tok_seq[t];
    for (int i = threadIdx.x; i < D / 2; i += blockDim.x)
        sincosf(static_cast<float>(pos) * inv_freq[i], &sin_s[i], &cos_s[i]);
    __syncthreads();
    begin_after_previous();
    const float* row = qkv + static_cast<long long>(t) * (Hq + 2 * Hkv) * D;
    for (int h = blockIdx.y * WARPS + warp; h < min(Hq + 2 * Hkv, (blockIdx.y + 1) * WARPS); h += WARPS) {
        const float* src = row + h * D;
        if (h >= Hq + Hkv) {  // a value head: straight into the cache
            float* dst = v_caches[seq] + (static_cast<long long>(pos) * Hkv + (h - Hq - Hkv)) * D;
            for (int d = lane; d < D; d += 32) dst[d] = src[d];
            continue;
        }
        const bool is_q = h < Hq;
        float* dst = is_q ? q_out + (static_cast<long long>(t) * Hq + h) * D
                          : k_caches[seq] + (static_cast<long long>(pos) * Hkv + (h - Hq)) * D;
        norm_rope_head(src, D, is_q ? q_norm : k_norm, eps, cos_s, sin_s, scratch + warp * D, dst);
    }
}

// Four floats of a head vector at dst/src, of which only the first n exist when D is not a multiple of 4 (then the
// address is not 16-byte aligned either, and the elements go one at a time).
__device__ __forceinline__ void store4(float* dst, float4 v, int n) {
    if (n >= 4 && reinterpret_cast<unsigned long long>(dst) % 16 == 0) {
        *reinterpret_cast<float4*>(dst) = v;
        return;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c)
        if (c < n) dst[c] = (&v.x)[c];
}
__device__ __forceinline__ float4 load4_cg(const float* src, int n) {  // from L2 (written by other blocks)
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int c = 0; c < 4; ++c)
        if (c < n) (&v.x)[c] = __ldcg(src + c);
    return v;
}

constexpr int KEYS = 32;           // keys per stage: one per lane when scoring
constexpr int ROWS_PER_WARP = 4;   // a tile has R <= 32 = WARPS * ROWS_PER_WARP (query token, head) rows
constexpr int SHORT_MERGE = 4;     // the merge of this many splits or fewer loads them all at once

// Grouped-query attention of a tile of query tokens against one key range of their sequence's cache, and the merge
// of the key ranges (flash-decoding).
//
// Block (split, kv head, tile): the tile's tokens (consecutive rows of one sequence) times the G = Hq / Hkv query
// heads that share kv head h make R <= 32 rows; every key and value is read from the cache once for all of them.
// Keys [split * chunk, (split + 1) * chunk) that the rows may see (key <= position) are staged in shared memory 32
// at a time, in two stages: while the block computes on one, cp.async fills the other. Scores: lane j takes key j,
// reading its key row as float4 (rows padded by 4 floats, so the 8 lanes of each 16-byte phase hit distinct banks).
// Each row keeps an online softmax (running max m, sum l, unnormalised output acc).
// Many splits keep the GPU busy at decode, when a step has one query token per sequence. The grid is sized for the
// longest cache; splits past the tile's last position exit at once. Each other block writes its m, l and acc; the
// last of a (tile, kv head) to finish -- counted in ``arrivals``, which it resets -- merges them into ``out``, so no
// second kernel (and no second wait) is needed. When one split holds all the keys, that block writes ``out``.
// D up to MAX_D; a D that is not a multiple of 4 (tiny test models) is staged with plain loads, zero-padded.
// With NORM_ROPE (a decoding step, where every sequence's tokens fit in one tile) the block also does what
// qk_norm_rope_cache does for its rows, one kernel fewer a layer (see cupy_backend.NORM_ROPE_INSIDE_MAX_KEYS): each
// block normalises and rotates its own rows' queries from the projection's output (``q`` is not read), and the block
// whose split holds a token's position writes that token's key and value into the cache before it stages its keys.
// No block needs a key that another block writes, since no other tile of the sequence is in the step.
// VEC_PER_LANE: 1 for D up to 128, 2 up to MAX_D (as few registers for the outputs as D allows). Without NORM_ROPE
// (qkv, q_norm, k_norm, inv_freq unused) the kernel is compiled without that code.
//                         grid (splits, Hkv, tiles), block 256, dynamic smem: see AttentionPlan.shared_bytes
template <int VEC_PER_LANE, bool NORM_ROPE>  // a lane holds dims 4 (lane + 32 i) .. + 3 of its rows' outputs, i < VEC
__global__ void __launch_bounds__(256, 2) attention(const float* __restrict__ q, int Hq, int Hkv, int D,
                                                    float* const* k_caches, float* const* v_caches,
                                                    const int* __restrict__ tile_seq, const int* __restrict__ tile_row,
                                                    const int* __restrict__ tile_rows, const int* __restrict__ tok_pos,
                                                    int T, int chunk, float scale, float* __restrict__ part_acc,
                                                    float* __restrict__ part_m, float* __restrict__ part_l,
                                                    unsigned* __restrict__ arrivals, float* __restrict__ out,
                                                    const float* __restrict__ qkv, const float* __restrict__ q_norm,
                                                    const float* __restrict__ k_norm, float eps,
                                                    const float* __restrict__ inv_freq) {
    extern __shared__ __align__(16) float smem[];
    // Before the wait: the plan and the positions (written by earlier steps, not by the kernel ahead). This takes the
    // chain of dependent loads off the critical path. (The cached keys are not asked for here: see common.cuh.)
    const int split = blockIdx.x, h = blockIdx.y, tile = blockIdx.z, splits = gridDim.x;
    const int G = Hq / Hkv, row0 = tile_row[tile], ntok = tile_rows[tile], R = ntok * G;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, DP = (D + 3) / 4 * 4;
    float* kc = k_caches[tile_seq[tile]];
    float* vc = v_caches[tile_seq[tile]];
    const int last_pos = tok_pos[row0 + ntok - 1];  // the tile's last token sees most
    const int used = min(splits, last_pos / chunk + 1);  // the splits that hold keys this tile may see
    if (split >= used) return;  // past the sequence's length (the grid is sized for the longest cache)
    const int key_begin = split * chunk, key_end = min(key_begin + chunk, last_pos + 1);
    const int stages = key_end > key_begin ? (key_end - key_begin + KEYS - 1) / KEYS : 0;
    float* qs = smem;                          // (R, DP), zero past D
    float* ks = qs + R * DP;                   // 2 stages of (KEYS, DP + 4)
    float* vs = ks + 2 * KEYS * (DP + 4);      // 2 stages of (KEYS, DP)
    float* angles = ks + max(2 * KEYS * (2 * DP + 4), R * (splits + 1));  // with NORM_ROPE: (ntok, D) cosines, sines
    float* scratch = angles + ntok * D;        // with NORM_ROPE: (WARPS, D), a head vector per warp
    const int half = D / 2, qkv_row = (Hq + 2 * Hkv) * D;
    if (NORM_ROPE) {  // the rotation's angles need only the positions: computed while the kernel ahead runs
        for (int i = threadIdx.x; i < ntok * half; i += blockDim.x) {
            const int t = i / half, j = i % half;
            sincosf(static_cast<float>(tok_pos[row0 + t]) * inv_freq[j], &angles[t * D + half + j], &angles[t * D + j]);
        }
        __syncthreads();
    }
    wait_for_previous();  // the kernel behind is let start once the first keys are in (below)
    if (NORM_ROPE && tok_pos[row0] + ntok > key_begin && tok_pos[row0] < key_end) {  // this split holds new keys
        for (int job = warp; job < 2 * ntok; job += WARPS) {  // a warp per (token, key or value)
            const int t = job / 2, pos = tok_pos[row0 + t];
            if (pos < key_begin || pos >= key_end) continue;
            const float* src = qkv + (row0 + t) * static_cast<long long>(qkv_row) + (Hq + h) * D;
            float* dst = (job % 2 ? vc : kc) + (static_cast<long long>(pos) * Hkv + h) * D;
            if (job % 2)
                for (int d = lane; d < D; d += 32) dst[d] = src[Hkv * D + d];
            else
                norm_rope_head(src, D, k_norm, eps, angles + t * D, angles + t * D + half, scratch + warp * D, dst);
        }
        __syncthreads();  // written before the stages below copy them
    }

    auto stage = [&](int s) {  // keys key_begin + s * KEYS + [0, KEYS) into stage s % 2; keys past key_end as zeros
        float* kd = ks + s % 2 * KEYS * (DP + 4);
        float* vd = vs + s % 2 * KEYS * DP;
        const int k0 = key_begin + s * KEYS;
        if (D % 4 == 0) {
            for (int i = threadIdx.x; i < KEYS * (D / 4); i += blockDim.x) {
                const int j = i / (D / 4), d = i % (D / 4) * 4, key = k0 + j;
                const long long at = (static_cast<long long>(key < key_end ? key : 0) * Hkv + h) * D + d;
                copy_async16(kd + j * (DP + 4) + d, kc + at, key < key_end);
                copy_async16(vd + j * DP + d, vc + at, key < key_end);
            }
        } else {
            for (int i = threadIdx.x; i < KEYS * DP; i += blockDim.x) {
                const int j = i / DP, d = i % DP, key = k0 + j;
                const bool valid = key < key_end && d < D;
                const long long at = (static_cast<long long>(key) * Hkv + h) * D + d;
                kd[j * (DP + 4) + d] = valid ? kc[at] : 0.0f;
                vd[j * DP + d] = valid ? vc[at] : 0.0f;
            }
        }
        copies_issued();
    };
    if (stages > 0) stage(0);
    if (NORM_ROPE) {  // a warp per row r = (token r / G, head h * G + r % G), normalised and rotated in place
        for (int r = warp; r < R; r += WARPS) {
            float* row = qs + r * DP;
            norm_rope_head(qkv + (row0 + r / G) * static_cast<long long>(qkv_row) + (h * G + r % G) * D, D, q_norm,
                           eps, angles + r / G * D, angles + r / G * D + half, row, row);
            for (int d = D + lane; d < DP; d += 32) row[d] = 0.0f;
        }
    } else {
        for (int i = threadIdx.x; i < R * DP; i += blockDim.x) {  // row r = (token r / G, head h * G + r % G)
            const int r = i / DP, d = i % DP;
            qs[i] = d < D ? q[(static_cast<long long>(row0 + r / G) * Hq + h * G + r % G) * D + d] : 0.0f;
        }
    }

    float m[ROWS_PER_WARP], l[ROWS_PER_WARP];
    float4 acc[ROWS_PER_WARP][VEC_PER_LANE];
    int row_pos[ROWS_PER_WARP];  // the position of row warp + WARPS j's token: it sees keys up to there
#pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j) {
        m[j] = -INFINITY, l[j] = 0.0f;
        row_pos[j] = warp + WARPS * j < R ? tok_pos[row0 + (warp + WARPS * j) / G] : 0;
#pragma unroll
        for (int i = 0; i < VEC_PER_LANE; ++i) acc[j][i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    for (int s = 0; s < stages; ++s) {
        if (s + 1 < stages) {
            stage(s + 1);  // its buffer was last read in iteration s - 1, which ended with a barrier
            copies_landed<1>();
        } else {
            copies_landed<0>();
        }
        __syncthreads();  // stage s (and the queries) written by every thread
        // The kernel behind (o_proj) loads its first rows before its wait: let it start only now, so that those
        // loads do not delay this block's first keys (H200, the batch-1 step at 2048 cached positions: -1.0 %).
        if (s == 0) let_next_start();
        const float* kt = ks + s % 2 * KEYS * (DP + 4);
        const float* vt = vs + s % 2 * KEYS * DP;
        const int key = key_begin + s * KEYS + lane;
#pragma unroll
        for (int j = 0; j < ROWS_PER_WARP; ++j) {  // a warp's rows r = warp + WARPS j (one at decode, G <= 8)
            const int r = warp + WARPS * j;
            if (r >= R) break;  // the same for the whole warp: a branch, not predicated copies of the loop
            float dot[4] = {};  // four sums: a quarter of the chain of dependent adds
#pragma unroll 8
            for (int d = 0; d < DP; d += 4) {  // unrolled: eight keys' and queries' float4 loads in flight
                const float4 k4 = *reinterpret_cast<const float4*>(kt + lane * (DP + 4) + d);
                const float4 q4 = *reinterpret_cast<const float4*>(qs + r * DP + d);  // the same for every lane
                dot[0] += q4.x * k4.x, dot[1] += q4.y * k4.y, dot[2] += q4.z * k4.z, dot[3] += q4.w * k4.w;
            }
            const bool visible = key < key_end && key <= row_pos[j];
            const float score = visible ? ((dot[0] + dot[1]) + (dot[2] + dot[3])) * scale : -INFINITY;
            const float m_new = fmaxf(m[j], warp_max(score));
            if (m_new == -INFINITY) continue;  // nothing visible yet
            const float p = visible ? expf(score - m_new) : 0.0f;
            const float alpha = expf(m[j] - m_new);
            l[j] = l[j] * alpha + warp_sum(p);
            m[j] = m_new;
#pragma unroll
            for (int i = 0; i < VEC_PER_LANE; ++i)
                acc[j][i].x *= alpha, acc[j][i].y *= alpha, acc[j][i].z *= alpha, acc[j][i].w *= alpha;
#pragma unroll 8
            for (int kj = 0; kj < KEYS; ++kj) {  // unrolled: eight values' loads in flight
                const float pj = __shfl_sync(0xffffffffu, p, kj);
#pragma unroll
                for (int i = 0; i < VEC_PER_LANE; ++i) {
                    const int d = 4 * (lane + 32 * i);
                    if (d >= DP) continue;
                    const float4 v4 = *reinterpret_cast<const float4*>(vt + kj * DP + d);
                    acc[j][i].x += pj * v4.x, acc[j][i].y += pj * v4.y, acc[j][i].z += pj * v4.z,
                        acc[j][i].w += pj * v4.w;
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    // Row r's result: with one split the output (acc / l), otherwise this split's partial (m, l, acc).
    const bool alone = used == 1;
    const long long stride = static_cast<long long>(T) * Hq;  // between splits of the partial results
#pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j) {
        const int r = warp + WARPS * j;
        if (r >= R) break;
        const long long th = static_cast<long long>(row0 + r / G) * Hq + h * G + r % G;
        const long long at = alone ? th : split * stride + th;
        if (!alone && lane == 0) part_m[at] = m[j], part_l[at] = l[j];
        float* dst = (alone ? out : part_acc) + at * D;
        const float div = alone ? l[j] : 1.0f;
#pragma unroll
        for (int i = 0; i < VEC_PER_LANE; ++i) {
            const int d = 4 * (lane + 32 * i);
            if (d < D)
                store4(dst + d, make_float4(acc[j][i].x / div, acc[j][i].y / div, acc[j][i].z / div,
                                            acc[j][i].w / div), D - d);
        }
    }
    if (alone) return;

    // The last block of this (tile, kv head) to arrive merges the splits that saw any key:
    // out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M the largest m_s.
    __shared__ bool is_last;
    __threadfence();  // this block's partial results are visible to the block that merges
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(arrivals + tile * Hkv + h, 1u) == used - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // A few splits (a short context): a thread per 4 outputs of a row loads every split's m, l and 4 outputs at once,
    // one trip to L2 where the warp per row below makes three (~1.5 us each while the next kernel's weights stream in;
    // H200, the captured batch-1 step at 32 cached positions: 3.380 -> 3.338 ms a token). Many splits keep the warp
    // per row: this way with 33 splits a thread was slower (2048 cached: 4.02 against 3.65 ms).
    if (used <= SHORT_MERGE) {
        for (int i = threadIdx.x; i < R * DP / 4; i += blockDim.x) {  // a thread per 4 outputs of a row
            const int r = i / (DP / 4), d = i % (DP / 4) * 4;
            const long long th = static_cast<long long>(row0 + r / G) * Hq + h * G + r % G;
            const float* part = part_acc + th * D + d;
            float ms[SHORT_MERGE], ls[SHORT_MERGE];
            float4 a[SHORT_MERGE];
#pragma unroll
            for (int s = 0; s < SHORT_MERGE; ++s) {  // every split's m, l and 4 outputs in flight at once
                const int at = min(s, used - 1);
                ms[s] = __ldcg(part_m + at * stride + th), ls[s] = __ldcg(part_l + at * stride + th);
                a[s] = D % 4 == 0 ? __ldcg(reinterpret_cast<const float4*>(part + at * stride * D))
                                  : load4_cg(part + at * stride * D, D - d);
            }
            float M = -INFINITY, sum = 0.0f;
#pragma unroll
            for (int s = 0; s < SHORT_MERGE; ++s) M = s < used ? fmaxf(M, ms[s]) : M;
            float4 num = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
            for (int s = 0; s < SHORT_MERGE; ++s) {
                const float w = s >= used || ms[s] == -INFINITY ? 0.0f : expf(ms[s] - M);  // no key: no weight
                sum += w * ls[s];
                num.x += w * a[s].x, num.y += w * a[s].y, num.z += w * a[s].z, num.w += w * a[s].w;
            }
            store4(out + th * D + d, make_float4(num.x / sum, num.y / sum, num.z / sum, num.w / sum), D - d);
        }
        if (threadIdx.x == 0) arrivals[tile * Hkv + h] = 0;  // ready for the next launch
        return;
    }
    // many splits: a warp per row finds M and the weights, then the block sums the outputs
    float* weight = smem + R * DP;  // (R, used), in the stages' memory
    float* den = weight + R * used;  // (R,)
    for (int r = warp; r < R; r += WARPS) {  // a warp per row, its lanes over the splits
        const long long th = static_cast<long long>(row0 + r / G) * Hq + h * G + r % G;
        float M = -INFINITY;
        for (int s = lane; s < used; s += 32) M = fmaxf(M, __ldcg(part_m + s * stride + th));
        M = warp_max(M);
        float sum = 0.0f;
        for (int s = lane; s < used; s += 32) {
            const float ms = __ldcg(part_m + s * stride + th);
            const float w = ms == -INFINITY ? 0.0f : expf(ms - M);  // a split that saw no key of this row
            weight[r * used + s] = w;
            sum += w * __ldcg(part_l + s * stride + th);
        }
        sum = warp_sum(sum);
        if (lane == 0) den[r] = sum;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < R * DP / 4; i += blockDim.x) {  // a thread per 4 outputs, 8 splits in flight
        const int r = i / (DP / 4), d = i % (DP / 4) * 4;
        const long long th = static_cast<long long>(row0 + r / G) * Hq + h * G + r % G;
        const float* part = part_acc + th * D + d;
        const long long split_stride = stride * D;
        float4 num = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (D % 4 == 0) {  // aligned float4 loads, none of them waiting on another
#pragma unroll 8
            for (int s = 0; s < used; ++s) {
                const float w = weight[r * used + s];
                const float4 a = __ldcg(reinterpret_cast<const float4*>(part + s * split_stride));
                num.x += w * a.x, num.y += w * a.y, num.z += w * a.z, num.w += w * a.w;
            }
        } else {
            for (int s = 0; s < used; ++s) {
                const float w = weight[r * used + s];
                const float4 a = load4_cg(part + s * split_stride, D - d);
                num.x += w * a.x, num.y += w * a.y, num.z += w * a.z, num.w += w * a.w;
            }
        }
        const float sum = den[r];
        store4(out + th * D + d, make_float4(num.x / sum, num.y / sum, num.z / sum, num.w / sum), D - d);
    }
    if (threadIdx.x == 0) arrivals[tile * Hkv + h] = 0;  // ready for the next launch
}

// A decoding step over short caches: a block per (key split, query head, token), where ``attention`` has a block per
// (key split, kv head, tile).
// With one token per sequence and a short cache, ``attention`` has few blocks (8 at 32 cached positions of
// Qwen3-30B-A3B: 2 splits x 4 kv heads), and in each a warp scores one query head's row with a whole D-long dot
// product per lane and key: a long chain of dependent steps on a few multiprocessors (H200, Nsight Compute: one
// instruction issued every ~9 cycles a warp). Here the G query heads of a kv head take G blocks, which read the same
// keys and values (the G - 1 after the first from L2), and each key's dot product is spread over LANES_PER_KEY lanes:
// G times the blocks, each with an eighth of the chain. A warp scores WARP_KEYS keys at once and keeps its own online
// softmax over its keys (running max m, sum l, unnormalised output acc: a lane holds D / 32 of the outputs); the
// block's warps are merged through shared memory, its splits by the last block of the (token, head) to finish, as in
// ``attention``. The next round's keys and values are loaded into registers while the warp computes on this round's.
// Every block normalises and rotates its own query from the projection's output. The token's new key and value: the
// blocks of the split that holds its position compute them from qkv themselves, into shared memory, instead of
// waiting for one block to write them into the cache; the block of the kv head's first query head writes them there
// for the steps to come. No block reads that row of the cache in this step.
// D: 64 or 128 (a lane's share of a key row is whole float4s); the cache capacity is up to the plan
// (cupy_backend.QUERY_HEADS_MAX_KEYS): past it the G-fold reads of the keys from L2 cost more than the chains.
//                                                              grid (splits, Hq, T), block 256
constexpr int LANES_PER_KEY = 8;
constexpr int WARP_KEYS = 32 / LANES_PER_KEY;  // keys a warp scores at once
constexpr int ROUND_KEYS = WARPS * WARP_KEYS;  // keys a block scores at once

template <int N>  // N consecutive floats at p (N * 4 bytes aligned) as float4s, float2s or floats
__device__ __forceinline__ void load_floats(const float* p, float (&v)[N]) {
#pragma unroll
    for (int i = 0; i < N; i += N % 4 == 0 ? 4 : N % 2 == 0 ? 2 : 1) {
        if (N % 4 == 0) {
            const float4 f = *reinterpret_cast<const float4*>(p + i);
            v[i] = f.x, v[i + 1] = f.y, v[i + 2] = f.z, v[i + 3] = f.w;
        } else if (N % 2 == 0) {
            const float2 f = *reinterpret_cast<const float2*>(p + i);
            v[i] = f.x, v[i + 1] = f.y;
        } else {
            v[i] = p[i];
        }
    }
}

// What a one-token decoding block (attention_heads, attention_group) knows before its wait, none of it written by the
// kernel ahead: its token's position, how many splits that token's keys fill, the keys of this split, the sequence's
// caches, and RoPE's angles at the position (angles[0, D/2): cosines, then sines) for the new query and key.
struct SplitKeys {
    int pos, used, begin, end;  // the token's position, its splits, this split's keys [begin, end)
    bool holds_new;             // the split ends with the new key (at pos): its block norms, rotates and caches it
    float *kc, *vc;             // the sequence's key and value caches
};

// false: the split is past its token's keys (the grid is sized for the longest cache), and the block has no work.
// Blocks of split blockIdx.x, token blockIdx.z.
template <int D>
__device__ __forceinline__ bool split_keys(SplitKeys& keys, float* const* k_caches, float* const* v_caches,
                                           const int* tok_seq, const int* tok_pos, int chunk, const float* inv_freq,
                                           float* angles) {
    const int split = blockIdx.x, t = blockIdx.z;
    keys.pos = tok_pos[t], keys.used = min(static_cast<int>(gridDim.x), keys.pos / chunk + 1);
    if (split >= keys.used) return false;
    keys.begin = split * chunk, keys.end = min(keys.begin + chunk, keys.pos + 1);
    keys.holds_new = keys.end == keys.pos + 1;
    keys.kc = k_caches[tok_seq[t]], keys.vc = v_caches[tok_seq[t]];
    for (int i = threadIdx.x; i < D / 2; i += blockDim.x)
        sincosf(static_cast<float>(keys.pos) * inv_freq[i], &angles[D / 2 + i], &angles[i]);
    __syncthreads();
    return true;
}

template <int D>
struct RoundRows {  // what a lane loads for a round: its part of its key's row, and its outputs' part of the 4 values
    float4 k[D / (4 * LANES_PER_KEY)];
    float v[WARP_KEYS][D / 32];
};

template <int D>
__global__ void __launch_bounds__(256) attention_heads(const float* __restrict__ qkv, int Hq, int Hkv,
                                                       float* const* k_caches, float* const* v_caches,
                                                       const int* __restrict__ tok_seq, const int* __restrict__ tok_pos,
                                                       int chunk, float scale, const float* __restrict__ q_norm,
                                                       const float* __restrict__ k_norm, float eps,
                                                       const float* __restrict__ inv_freq, float* __restrict__ part_acc,
                                                       float* __restrict__ part_m, float* __restrict__ part_l,
                                                       unsigned* __restrict__ arrivals, float* __restrict__ out) {
    constexpr int K4 = D / (4 * LANES_PER_KEY), VD = D / 32, half = D / 2;
    __shared__ __align__(16) float q_s[D], new_k[D], new_v[D], angles[D];  // angles: cosines, then sines
    __shared__ __align__(16) float warp_acc[WARPS][D];
    __shared__ float warp_m[WARPS], warp_l[WARPS];
    __shared__ bool is_last;
    // Before the wait (split_keys): the position, the keys, the caches and the rotation's angles.
    const int split = blockIdx.x, head = blockIdx.y, t = blockIdx.z, T = gridDim.z;
    const int h = head / (Hq / Hkv), warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    SplitKeys keys;
    if (!split_keys<D>(keys, k_caches, v_caches, tok_seq, tok_pos, chunk, inv_freq, angles)) return;
    // A lane takes key (lane / LANES_PER_KEY) of its warp's WARP_KEYS in a round, and of its row the float4s
    // sub, sub + LANES_PER_KEY, ... (the key's LANES_PER_KEY lanes read 128 contiguous bytes at a time).
    const int group = lane / LANES_PER_KEY, sub = lane % LANES_PER_KEY;
    auto load = [&](int k0, RoundRows<D>& rows) {  // the round whose warp's first key is k0
        const int key = min(k0 + group, keys.end - 1);  // (past the split's keys: a key that is there, masked below)
        const float* k_row = key == keys.pos ? new_k : keys.kc + (static_cast<long long>(key) * Hkv + h) * D;
#pragma unroll
        for (int i = 0; i < K4; ++i)
            rows.k[i] = *reinterpret_cast<const float4*>(k_row + 4 * (sub + LANES_PER_KEY * i));
#pragma unroll
        for (int g = 0; g < WARP_KEYS; ++g) {
            const int key_g = min(k0 + g, keys.end - 1);
            const float* v_row = key_g == keys.pos ? new_v : keys.vc + (static_cast<long long>(key_g) * Hkv + h) * D;
            load_floats<VD>(v_row + lane * VD, rows.v[g]);
        }
    };
    // The first round's keys and values are loaded before the wait: earlier steps wrote them, not the kernel ahead
    // (a round that holds the new key is loaded again once that is computed). H200, captured batch-1 step, ms a
    // token: 144 cached positions 2.82 -> 2.78, 2160 3.24 -> 3.20.
    RoundRows<D> cur, next;
    const int first = keys.begin + warp * WARP_KEYS;
    if (first < keys.end) load(first, cur);
    wait_for_previous();
    const float* row = qkv + static_cast<long long>(t) * (Hq + 2 * Hkv) * D;
    if (warp == 0) norm_rope_head(row + head * D, D, q_norm, eps, angles, angles + half, q_s, q_s);
    if (keys.holds_new && warp == 1)
        norm_rope_head(row + (Hq + h) * D, D, k_norm, eps, angles, angles + half, new_k, new_k);
    if (keys.holds_new && warp == 2)
        for (int d = lane; d < D; d += 32) new_v[d] = row[(Hq + Hkv + h) * D + d];
    __syncthreads();
    if (keys.holds_new && head % (Hq / Hkv) == 0 && warp < 2) {  // the first query head's block caches them
        float* dst = (warp ? keys.vc : keys.kc) + (static_cast<long long>(keys.pos) * Hkv + h) * D;
        for (int d = lane; d < D; d += 32) dst[d] = warp ? new_v[d] : new_k[d];
    }

    float4 q4[K4];
#pragma unroll
    for (int i = 0; i < K4; ++i) q4[i] = *reinterpret_cast<const float4*>(q_s + 4 * (sub + LANES_PER_KEY * i));
    float m = -INFINITY, l = 0.0f, acc[VD] = {};
    if (keys.holds_new && first < keys.end && first + WARP_KEYS > keys.pos) load(first, cur);  // (new key's round)
    if (first >= keys.end) let_next_start();  // (as the warps with keys do after their first round, below)
    for (int k0 = first; k0 < keys.end; k0 += ROUND_KEYS) {
        if (k0 + ROUND_KEYS < keys.end) load(k0 + ROUND_KEYS, next);  // in flight while this round is computed
        float dot[4] = {};
#pragma unroll
        for (int i = 0; i < K4; ++i)
            dot[0] += q4[i].x * cur.k[i].x, dot[1] += q4[i].y * cur.k[i].y, dot[2] += q4[i].z * cur.k[i].z,
                dot[3] += q4[i].w * cur.k[i].w;
        float score = (dot[0] + dot[1]) + (dot[2] + dot[3]);
#pragma unroll
        for (int offset = LANES_PER_KEY / 2; offset > 0; offset >>= 1)  // over the key's lanes
            score += __shfl_xor_sync(0xffffffffu, score, offset);
        const bool visible = k0 + group < keys.end;
        score = visible ? score * scale : -INFINITY;
        float round_max = score;
#pragma unroll
        for (int offset = LANES_PER_KEY; offset < 32; offset <<= 1)  // over the warp's keys
            round_max = fmaxf(round_max, __shfl_xor_sync(0xffffffffu, round_max, offset));
        const float m_new = fmaxf(m, round_max);  // finite: the round's first key is visible
        const float p = visible ? expf(score - m_new) : 0.0f, alpha = expf(m - m_new);
        float p_sum = p;
#pragma unroll
        for (int offset = LANES_PER_KEY; offset < 32; offset <<= 1)
            p_sum += __shfl_xor_sync(0xffffffffu, p_sum, offset);
        l = l * alpha + p_sum;
        m = m_new;
#pragma unroll
        for (int d = 0; d < VD; ++d) acc[d] *= alpha;
#pragma unroll
        for (int g = 0; g < WARP_KEYS; ++g) {
            const float p_g = __shfl_sync(0xffffffffu, p, g * LANES_PER_KEY);
#pragma unroll
            for (int d = 0; d < VD; ++d) acc[d] += p_g * cur.v[g][d];
        }
        cur = next;
        // The kernel behind (o_proj) loads its first rows before its wait: let it start once this block's first
        // keys are in, so that those loads do not delay them (as ``attention`` does).
        if (k0 == first) let_next_start();
    }

    // The block's warps merged: out = sum_w exp(m_w - M) acc_w / sum_w exp(m_w - M) l_w; a warp without keys has
    // m_w = -inf and weighs nothing. With one split that is the output, otherwise this split's partial result.
    if (lane == 0) warp_m[warp] = m, warp_l[warp] = l;
#pragma unroll
    for (int d = 0; d < VD; ++d) warp_acc[warp][lane * VD + d] = acc[d];
    __syncthreads();
    const long long th = static_cast<long long>(t) * Hq + head, stride = static_cast<long long>(T) * Hq;
    if (threadIdx.x < D) {
        float M = -INFINITY, sum = 0.0f, num = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, warp_m[w]);
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float weight = warp_m[w] == -INFINITY ? 0.0f : expf(warp_m[w] - M);
            sum += weight * warp_l[w], num += weight * warp_acc[w][threadIdx.x];
        }
        if (keys.used == 1) {
            out[th * D + threadIdx.x] = num / sum;
        } else {
            part_acc[(split * stride + th) * D + threadIdx.x] = num;
            if (threadIdx.x == 0) part_m[split * stride + th] = M, part_l[split * stride + th] = sum;
        }
    }
    if (keys.used == 1) return;

    // The last block of this (token, head) to arrive merges the splits, in split order, one pass: each split's m, l
    // and output are loaded at once, the running maximum rescales what came before (every split has keys: m finite).
    __threadfence();  // this block's partial result is visible to the block that merges
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(arrivals + th, 1u) == keys.used - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    if (threadIdx.x < D) {
        float M = -INFINITY, sum = 0.0f, num = 0.0f;
#pragma unroll 4
        for (int s = 0; s < keys.used; ++s) {
            const float m_s = __ldcg(part_m + s * stride + th), l_s = __ldcg(part_l + s * stride + th);
            const float a_s = __ldcg(part_acc + (s * stride + th) * D + threadIdx.x);
            const float M_new = fmaxf(M, m_s), rescale = expf(M - M_new), weight = expf(m_s - M_new);
            sum = sum * rescale + weight * l_s, num = num * rescale + weight * a_s, M = M_new;
        }
        out[th * D + threadIdx.x] = num / sum;
    }
    if (threadIdx.x == 0) arrivals[th] = 0;  // ready for the next launch
}

// Reduce-scatter over a warp, the steps after the first: each lane holds 2 O partial sums s[0, 2 O) (the first
// step, over lane bit 16, has already halved 32 of them), and at each step keeps the half that its lane bit O selects
// and adds its partner's share of them; at the end lane L holds the whole of sum L in s[0]. 31 shuffles for 32 sums.
template <int O>
__device__ __forceinline__ void reduce_scatter(float* s, int lane) {
    const bool upper = lane & O;
#pragma unroll
    for (int i = 0; i < O; ++i) {
        const float send = upper ? s[i] : s[i + O], keep = upper ? s[i + O] : s[i];
        s[i] = keep + __shfl_xor_sync(0xffffffffu, send, O);
    }
    if constexpr (O > 1) reduce_scatter<O / 2>(s, lane);
}

// A decoding step over long caches: a block per (key split, kv head, token) that scores each key for the kv head's
// whole group of G query heads at once, so the cache is read once, where ``attention_heads`` reads it G times.
// Over a cache of a few thousand positions those G-fold reads (from L2 after the first) cost more than its short
// chains save: H200, 8192 positions of Qwen3-30B-A3B (``python -m fastpath.ladder attention_long``), attention_heads
// 47.7 us, this kernel 25.4 (over 1024 positions 11.4 against 13.3: there a block's fixed chain of the norms, the
// first loads and the merge is most of it). Here a warp takes
// R = 32 / G keys a round, a lane DL = D / 32 consecutive elements of every key and query row (the warp reads each
// 512-byte key row in one go), and each lane sums its elements' share of all R x G (key, head) dot products; one
// reduce-scatter over the warp (31 shuffles for 32 sums) then leaves lane L the whole dot product of key L / G with
// head L % G. Each warp keeps an online softmax per head over its keys, merged across the warps at the end and
// across the splits by the last block of the (token, kv head) to finish. The new key and value, and the writing of
// the cache, as in ``attention_heads``; every block normalises and rotates its group's G queries (a warp each).
// D: 64 or 128; G: 4, 8 or 16 (G x R = 32). Dynamic shared memory: WARPS x G x D floats (the warps' outputs).
//                                                              grid (splits, Hkv, T), block 256
template <int D, int G>
__global__ void __launch_bounds__(256) attention_group(const float* __restrict__ qkv, int Hq, int Hkv,
                                                       float* const* k_caches, float* const* v_caches,
                                                       const int* __restrict__ tok_seq, const int* __restrict__ tok_pos,
                                                       int chunk, float scale, const float* __restrict__ q_norm,
                                                       const float* __restrict__ k_norm, float eps,
                                                       const float* __restrict__ inv_freq, float* __restrict__ part_acc,
                                                       float* __restrict__ part_m, float* __restrict__ part_l,
                                                       unsigned* __restrict__ arrivals, float* __restrict__ out) {
    constexpr int R = 32 / G, DL = D / 32, half = D / 2;
    static_assert(G * R == 32 && (DL == 2 || DL == 4), "G divides 32; D is 64 or 128");
    extern __shared__ __align__(16) float warp_acc[];  // (WARPS, G, D)
    __shared__ __align__(16) float q_s[G][D], new_k[D], new_v[D], angles[D];  // angles: cosines, then sines
    __shared__ __align__(16) float warp_p[WARPS][32], warp_alpha[WARPS][G];
    __shared__ float warp_m[WARPS][G], warp_l[WARPS][G];
    __shared__ bool is_last;
    // Before the wait (split_keys): the position, the keys, the caches and the rotation's angles.
    const int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z, T = gridDim.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    SplitKeys keys;
    if (!split_keys<D>(keys, k_caches, v_caches, tok_seq, tok_pos, chunk, inv_freq, angles)) return;
    struct Round {  // this lane's elements of the warp's R keys and values
        float k[R][DL], v[R][DL];
    };
    auto load = [&](int k0, Round& rows) {  // (past the split's keys: a key that is there, masked below)
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int key = min(k0 + j, keys.end - 1);
            const long long at = (static_cast<long long>(key) * Hkv + h) * D + lane * DL;
            load_floats<DL>(key == keys.pos ? new_k + lane * DL : keys.kc + at, rows.k[j]);
            load_floats<DL>(key == keys.pos ? new_v + lane * DL : keys.vc + at, rows.v[j]);
        }
    };
    // The first round's keys and values are loaded before the wait: earlier steps wrote them, not the kernel ahead
    // (a round that holds the new key is loaded again once that is computed). H200, captured batch-1 step, ms a token:
    // 3112 cached positions 3.27 -> 3.19, 8304 3.65 -> 3.46.
    Round cur, next;
    const int first = keys.begin + warp * R;
    if (first < keys.end) load(first, cur);
    wait_for_previous();
    const float* row = qkv + static_cast<long long>(t) * (Hq + 2 * Hkv) * D;
    for (int g = warp; g < G; g += WARPS)
        norm_rope_head(row + (h * G + g) * D, D, q_norm, eps, angles, angles + half, q_s[g], q_s[g]);
    if (keys.holds_new && warp == WARPS - 1)
        norm_rope_head(row + (Hq + h) * D, D, k_norm, eps, angles, angles + half, new_k, new_k);
    if (keys.holds_new && warp == WARPS - 2)
        for (int d = lane; d < D; d += 32) new_v[d] = row[(Hq + Hkv + h) * D + d];
    __syncthreads();
    if (keys.holds_new && warp < 2) {  // kept for the steps to come
        float* dst = (warp ? keys.vc : keys.kc) + (static_cast<long long>(keys.pos) * Hkv + h) * D;
        for (int d = lane; d < D; d += 32) dst[d] = warp ? new_v[d] : new_k[d];
    }

    constexpr int ROUND_KEYS_G = WARPS * R;  // keys a block scores at once
    float m = -INFINITY, l = 0.0f, acc[G][DL] = {};  // m, l: of head lane % G (the same in its R lanes)
    if (keys.holds_new && first < keys.end && first + R > keys.pos) load(first, cur);  // (new key's round)
    if (first >= keys.end) let_next_start();  // (as the warps with keys do after their first round, below)
    for (int k0 = first; k0 < keys.end; k0 += ROUND_KEYS_G) {
        if (k0 + ROUND_KEYS_G < keys.end) load(k0 + ROUND_KEYS_G, next);  // in flight while this round is computed
        // Sum j G + g: key j's dot product with query g. This lane's shares of sums i and i + 16 (keys j and
        // j + R / 2, the same query) are computed together and go straight into the reduce-scatter's first step,
        // so that only 16 sums are held at once; the queries come from shared memory.
        float s[16];
        const bool upper = lane & 16;
#pragma unroll
        for (int g = 0; g < G; ++g) {
            float q[DL];
            load_floats<DL>(q_s[g] + lane * DL, q);
#pragma unroll
            for (int j = 0; j < R / 2; ++j) {
                float lo = 0.0f, hi = 0.0f;
#pragma unroll
                for (int d = 0; d < DL; ++d) lo += q[d] * cur.k[j][d], hi += q[d] * cur.k[j + R / 2][d];
                s[j * G + g] = (upper ? hi : lo) + __shfl_xor_sync(0xffffffffu, upper ? lo : hi, 16);
            }
        }
        reduce_scatter<8>(s, lane);  // lane L: the whole of sum L
        const bool visible = k0 + lane / G < keys.end;
        const float score = visible ? s[0] * scale : -INFINITY;
        float round_max = score;
#pragma unroll
        for (int o = G; o < 32; o <<= 1) round_max = fmaxf(round_max, __shfl_xor_sync(0xffffffffu, round_max, o));
        const float m_new = fmaxf(m, round_max);  // finite: the round's first key is visible
        const float p = visible ? expf(score - m_new) : 0.0f, alpha = expf(m - m_new);
        float p_sum = p;
#pragma unroll
        for (int o = G; o < 32; o <<= 1) p_sum += __shfl_xor_sync(0xffffffffu, p_sum, o);
        l = l * alpha + p_sum;
        m = m_new;
        warp_p[warp][lane] = p;
        if (lane < G) warp_alpha[warp][lane] = alpha;
        __syncwarp();
#pragma unroll
        for (int g = 0; g < G; ++g) {
            const float a = warp_alpha[warp][g];
#pragma unroll
            for (int d = 0; d < DL; ++d) acc[g][d] *= a;
        }
#pragma unroll
        for (int j = 0; j < R; ++j)
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const float p_jg = warp_p[warp][j * G + g];
#pragma unroll
                for (int d = 0; d < DL; ++d) acc[g][d] += p_jg * cur.v[j][d];
            }
        __syncwarp();  // warp_p read before the next round writes it
        cur = next;
        if (k0 == first) let_next_start();  // (as in attention_heads)
    }

    // The block's warps merged per head, as in attention_heads; then this split's partial result, or the output.
    if (lane < G) warp_m[warp][lane] = m, warp_l[warp][lane] = l;
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
        for (int d = 0; d < DL; ++d) warp_acc[(warp * G + g) * D + lane * DL + d] = acc[g][d];
    __syncthreads();
    const long long stride = static_cast<long long>(T) * Hq, th0 = static_cast<long long>(t) * Hq + h * G;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int g = i / D;
        float M = -INFINITY, sum = 0.0f, num = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) M = fmaxf(M, warp_m[w][g]);
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float weight = warp_m[w][g] == -INFINITY ? 0.0f : expf(warp_m[w][g] - M);
            sum += weight * warp_l[w][g], num += weight * warp_acc[w * G * D + i];
        }
        if (keys.used == 1) {
            out[th0 * D + i] = num / sum;
        } else {
            part_acc[(split * stride + th0) * D + i] = num;
            if (i % D == 0) part_m[split * stride + th0 + g] = M, part_l[split * stride + th0 + g] = sum;
        }
    }
    if (keys.used == 1) return;

    // The last block of this (token, kv head) merges the splits in one pass, as attention_heads does: each thread 4
    // outputs of one head, every split's m, l and outputs loaded at once (16 splits' loads in flight), the running
    // maximum rescaling what came before (every split has keys: m finite).
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(arrivals + th0, 1u) == keys.used - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int i = threadIdx.x; i < G * D / 4; i += blockDim.x) {
        const long long th = th0 + 4 * i / D;
        float M = -INFINITY, sum = 0.0f;
        float4 num = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 16
        for (int s = 0; s < keys.used; ++s) {
            const float m_s = __ldcg(part_m + s * stride + th), l_s = __ldcg(part_l + s * stride + th);
            const float4 a = __ldcg(reinterpret_cast<const float4*>(part_acc + (s * stride + th0) * D + 4 * i));
            const float M_new = fmaxf(M, m_s), rescale = expf(M - M_new), w = expf(m_s - M_new);
            sum = sum * rescale + w * l_s, M = M_new;
            num.x = num.x * rescale + w * a.x, num.y = num.y * rescale + w * a.y;
            num.z = num.z * rescale + w * a.z, num.w = num.w * rescale + w * a.w;
        }
        *reinterpret_cast<float4*>(out + th0 * D + 4 * i) = make_float4(num.x / sum, num.y / sum, num.z / sum,
                                                                         num.w / sum);
    }
    if (threadIdx.x == 0) arrivals[th0] = 0;  // ready for the next launch
}
