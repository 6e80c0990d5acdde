// Kernel ladder, step by step to the attention of batch-1 decode (attention.cu: attention).
//
// The function: one query token, Hq heads of D; head h attends over keys 0..L-1 of kv head h / G (G = Hq / Hkv),
// softmax(q . k / sqrt(D)) . v, with the cache laid out (L, Hkv, D) float32. It reads the cache, 2 * L * Hkv * D * 4
// bytes, once if done well. Run: python -m fastpath.ladder attention
#include "../common.cuh"

// v1: one block per query head, three passes: scores (a thread per key, serial over D), a block-wide softmax, then
// the output (a thread per dimension, serial over keys). Every query head re-reads its kv head's keys and values: G
// times the bytes, and the scores go through global memory.    grid (Hq), block 256, scores (Hq, L) in global memory
__global__ void attention_v1(const float* q, const float* kc, const float* vc, int Hq, int Hkv, int D, int L,
                             float* scores, float* out) {
    const int h = blockIdx.x, kvh = h / (Hq / Hkv);
    const float scale = rsqrtf(static_cast<float>(D));
    float* s = scores + static_cast<long long>(h) * L;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        float dot = 0.0f;
        for (int d = 0; d < D; ++d) dot += q[h * D + d] * kc[(static_cast<long long>(j) * Hkv + kvh) * D + d];
        s[j] = dot * scale;
    }
    __syncthreads();
    __shared__ float stat[2];
    if (threadIdx.x == 0) {
        float m = -INFINITY, sum = 0.0f;
        for (int j = 0; j < L; ++j) m = fmaxf(m, s[j]);
        for (int j = 0; j < L; ++j) sum += expf(s[j] - m);
        stat[0] = m, stat[1] = sum;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < L; ++j) acc += expf(s[j] - stat[0]) * vc[(static_cast<long long>(j) * Hkv + kvh) * D + d];
        out[h * D + d] = acc / stat[1];
    }
}

// v2: a block per kv head serves its G query heads from one read of the keys and values (staged in shared memory 32
// keys at a time), with an online softmax, so the scores never leave the chip. Launched with one split.
// v3: the same kernel with the keys split across blocks (flash-decoding), then a second kernel merging the splits:
// at decode there are only Hkv kv heads, far fewer blocks than the GPU has multiprocessors, unless the keys are split.
// v4 is attention.cu's kernel: the next 32 keys in flight through cp.async while the block computes on the current
// ones, key rows read as float4, the loop over a warp's rows a branch rather than predicated copies (which had issued
// 4x the instructions), and the merge done by the last block of each kv head to finish (the merge kernel's serial
// loop over the splits cost as much as the attention itself).
constexpr int WARPS = 8;
constexpr int MAX_D = 256;
constexpr int D_PER_LANE = MAX_D / 32;

// Grouped-query attention of a tile of query tokens against one key range of their sequence's cache.
//
// Block (split, kv head, tile): the tile's tokens (consecutive rows of one sequence) times the G = Hq / Hkv query
// heads that share kv head h make R <= 32 rows; every key and value is read from the cache once for all of them
// (staged in shared memory 32 keys at a time). Each row keeps an online softmax (running max m, sum l and the
// unnormalised output acc) over keys [split * chunk, (split + 1) * chunk) that it may see (key <= its position); the
// partial results of the splits are merged by attention_v3_combine. Many splits keep the GPU busy at decode, when a
// step has one query token per sequence; a prefill has enough tiles with one split.
//                                  grid (splits, Hkv, tiles), block 256, dynamic smem (R * D + 32 * (2D + 1)) floats
__global__ void __launch_bounds__(256) attention_v2(const float* __restrict__ q, int Hq, int Hkv, int D,
                                                    const float* const* k_caches, const float* const* v_caches,
                                                    const int* __restrict__ tile_seq, const int* __restrict__ tile_row,
                                                    const int* __restrict__ tile_rows, const int* __restrict__ tok_pos,
                                                    int T, int chunk, float scale, float* __restrict__ part_acc,
                                                    float* __restrict__ part_m, float* __restrict__ part_l){
    extern __shared__ float smem[];
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
__global__ void attention_v3_combine(const float* __restrict__ part_acc, const float* __restrict__ part_m,
                                     const float* __restrict__ part_l, int splits, int T, int Hq, int D,
                                     float* __restrict__ out) {
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
