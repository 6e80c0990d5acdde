// The MoE block: router, grouping of tokens by expert, SwiGLU experts over the chosen experts only, and the
// weighted sum. A dense MLP layer runs through the same expert kernels as one expert that every token chose.
//
// Vocabulary: a *pair* is (token t, slot k), one of the T*K expert picks of a step, numbered t*K + k. Pairs are grouped
// by expert into *slots*: slot s is the s-th distinct chosen expert, its pairs are pair_src[slot_offset[s] ..
// slot_offset[s+1]). Grids are sized for the most slots a step can have; blocks of slots past n_slots exit at once.
#include "common.cuh"

constexpr int WARPS = 8;  // every block is 256 threads

// One token's routing, by one warp: mask ``disabled`` experts; softmax over all E experts' logits in float32; the
// top_k experts, ties to the lower id, into chosen_id and their weights, renormalised if norm_topk_prob, into
// chosen_weight (top_k each, shared memory). ``probs`` (may be null) gets the probabilities; ``stat_*`` (may be null)
// accumulate router statistics on the device: picks and the sum of probabilities per expert, and the entropy sum,
// so that a captured decode step never needs the host to count.
// It is a chain of dependent steps (a batch-1 step waits for it), so it is kept short: CHUNKS = ceil(E / 32) rounded
// up to 4, 8 or 16 sizes its unrolled loops to the experts there are.
template <int CHUNKS>
__device__ __forceinline__ void route_token(const float* __restrict__ logits, int E, int top_k, int norm_topk_prob,
                                            const unsigned char* __restrict__ disabled, float* __restrict__ probs,
                                            unsigned long long* stat_counts, double* stat_prob_sum,
                                            double* stat_entropy_sum, int* chosen_id, float* chosen_weight) {
    const int lane = threadIdx.x % 32;
    // lane holds experts lane, lane + 32, ...: every loop over i below is unrolled, so p stays in registers
    float p[CHUNKS];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
        const int e = lane + 32 * i;
        p[i] = e < E && !(disabled && disabled[e]) ? logits[e] : -INFINITY;
        m = fmaxf(m, p[i]);
    }
    m = warp_max(m);
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) s += lane + 32 * i < E ? expf(p[i] - m) : 0.0f;
    s = warp_sum(s);
    float entropy = 0.0f;
#pragma unroll
    for (int i = 0; i < CHUNKS; ++i) {
        const int e = lane + 32 * i;
        if (e >= E) {
            p[i] = -2.0f;  // no such expert: never chosen
            continue;
        }
        const float prob = expf(p[i] - m) / s;
        if (probs) probs[e] = prob;
        if (stat_prob_sum) atomicAdd(stat_prob_sum + e, static_cast<double>(prob));
        entropy -= prob * logf(fmaxf(prob, 1e-30f));
        p[i] = disabled && disabled[e] ? -1.0f : prob;  // disabled experts are never chosen, even at p = 0
    }
    entropy = warp_sum(entropy);
    if (stat_entropy_sum && lane == 0) atomicAdd(stat_entropy_sum, static_cast<double>(entropy));

    float total = 0.0f;
    // The j-th best: the largest probability not yet taken, lowest id on ties. A probability's bits read as an
    // unsigned integer keep its order (it is not negative), so the warp's largest is one integer max over the lanes
    // (redux.sync, sm_80 and later) and its lowest id one integer min: two instructions where a float max with ties
    // took 10 dependent shuffles. Key 0: taken, disabled or no such expert (p < 0), never chosen.
    for (int j = 0; j < top_k; ++j) {
        unsigned key = 0;
        int lane_e = E;
#pragma unroll
        for (int i = 0; i < CHUNKS; ++i) {  // increasing ids: ">" keeps the lowest of equals
            const unsigned k = p[i] >= 0.0f ? __float_as_uint(p[i]) + 1u : 0u;
            if (k > key) key = k, lane_e = lane + 32 * i;
        }
        const unsigned top = __reduce_max_sync(0xffffffffu, key);
        const int best_e = __reduce_min_sync(0xffffffffu, key == top ? lane_e : E);
        const float best = top ? __uint_as_float(top - 1u) : -1.0f;
#pragma unroll
        for (int i = 0; i < CHUNKS; ++i)
            if (lane + 32 * i == best_e) p[i] = -1.0f;  // taken
        if (lane == 0) {
            chosen_id[j] = best_e, chosen_weight[j] = best;
            if (stat_counts) atomicAdd(stat_counts + best_e, 1ull);
        }
        total += best;
    }
    __syncwarp();
    for (int j = lane; j < top_k; j += 32)
        if (norm_topk_prob) chosen_weight[j] /= total;
    __syncwarp();
}

// Per token (one block each), after the router logits (T, E) were computed by the projection kernel (linear.cu, with
// the RMSNorm fused): the routing (route_token) into probs, topk_ids and topk_weights. Also writes xn = RMSNorm(x),
// the experts' input (unless ``norm_weight`` is null: then xn holds it already): warp 0 routes at once while the
// other warps compute xn. ``stat_*`` (may be null): route_token's statistics.
// With one token (``slots`` non-null) the K picks are already grouped -- each is its own slot -- and written as such,
// which saves the grouping kernel. On a rank of a split model that holds experts [expert_lo, expert_hi) (expert
// parallelism), only the picks of those experts become slots, numbered from expert_lo. (A batch-1 decode step,
// which sums its picks in expert_down_sum, takes route_gate_up instead; this serves one token whose picks are left
// apart, and the router's kernel ladder.)
//                                                     grid (T), block 256, dynamic smem 2 top_k words
template <int CHUNKS>
__global__ void __launch_bounds__(256) route_topk(const float* __restrict__ logits, const float* __restrict__ x, int H,
                                                  const float* __restrict__ norm_weight, float eps, int E, int top_k,
                                                  int norm_topk_prob, const unsigned char* __restrict__ disabled,
                                                  float* __restrict__ xn, float* __restrict__ probs,
                                                  int* __restrict__ topk_ids, float* __restrict__ topk_weights,
                                                  unsigned long long* stat_counts, double* stat_prob_sum,
                                                  double* stat_entropy_sum, int* slot_expert, int* slot_offset,
                                                  int* pair_src, int* pair_token, int* n_slots, int expert_lo,
                                                  int expert_hi) {
    extern __shared__ float chosen_weight[];  // (top_k,), then chosen_id (top_k,)
    int* chosen_id = reinterpret_cast<int*>(chosen_weight + top_k);
    __shared__ float partial[32];
    begin_after_previous();
    const long long t = blockIdx.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    if (warp != 0) {  // warps 1, 2, ...: xn = RMSNorm(x), synchronised among themselves only (barrier 1)
        if (!norm_weight) return;  // xn was written already (by the all-reduce ahead)
        const int threads = blockDim.x - 32;
        float ss = 0.0f;
        for (int k = threadIdx.x - 32; k < H; k += threads) ss += x[t * H + k] * x[t * H + k];
        ss = warp_sum(ss);
        if (lane == 0) partial[warp] = ss;
        asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
        ss = 0.0f;
        for (int w = 1; w < blockDim.x / 32; ++w) ss += partial[w];
        const float inv = 1.0f / sqrtf(ss / H + eps);
        for (int k = threadIdx.x - 32; k < H; k += threads) xn[t * H + k] = norm_weight[k] * (x[t * H + k] * inv);
        return;
    }
    route_token<CHUNKS>(logits + t * E, E, top_k, norm_topk_prob, disabled, probs + t * E, stat_counts, stat_prob_sum,
                        stat_entropy_sum, chosen_id, chosen_weight);
    for (int j = lane; j < top_k; j += 32)
        topk_ids[t * top_k + j] = chosen_id[j], topk_weights[t * top_k + j] = chosen_weight[j];
    if (slot_expert && lane == 0) {
        int held = 0;  // slots written: the picks of this rank's experts
        for (int j = 0; j < top_k; ++j) {
            if (chosen_id[j] < expert_lo || chosen_id[j] >= expert_hi) continue;
            slot_expert[held] = chosen_id[j] - expert_lo, slot_offset[held] = held, pair_src[held] = j;
            pair_token[held++] = 0;
        }
        slot_offset[held] = held, n_slots[0] = held;
    }
}

// Group the P = T*K pairs by expert (a counting sort in one block): slot_expert, slot_offset (n_slots + 1 entries),
// pair_src (pair numbers in slot order) and pair_token (their tokens); n_slots[0] = distinct experts chosen.
// The order of pairs inside a slot is not fixed, and need not be: each pair's result is computed on its own and the
// weighted sum (moe_combine) adds a token's K results in slot-number order.
// For the tensor-core kernels (matmul.cu) it also lists tiles of at most ``tile_rows`` pairs of one slot:
// tile_slot, tile_row (the first pair) and n_tiles[0]. Only experts [expert_lo, expert_hi) get slots (a rank's own
// experts under expert parallelism), numbered from expert_lo. Thread e places expert e: where its slot, pairs and
// tiles start are prefix sums over the experts before it, computed by the whole block at once.
//                                                                grid (1), block 1024 (at least E), smem 2E ints
__global__ void group_by_expert(const int* __restrict__ topk_ids, int P, int K, int E, int* __restrict__ slot_expert,
                                int* __restrict__ slot_offset, int* __restrict__ pair_src, int* __restrict__ pair_token,
                                int* __restrict__ n_slots, int tile_rows, int* __restrict__ tile_slot,
                                int* __restrict__ tile_row, int* __restrict__ n_tiles, int expert_lo, int expert_hi) {
    extern __shared__ int counts[];  // (E,) picks, then (E,) write cursors
    int* cursor = counts + E;
    __shared__ int3 warp_total[32];  // (slots, pairs, tiles) of each warp's experts
    begin_after_previous();
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) atomicAdd(&counts[topk_ids[p]], 1);
    __syncthreads();

    const int e = threadIdx.x, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int n = e >= expert_lo && e < expert_hi ? counts[e] : 0;  // this thread's expert's picks
    int3 mine = make_int3(n > 0, n, (n + tile_rows - 1) / tile_rows), before = mine;  // inclusive, then exclusive
    for (int offset = 1; offset < 32; offset <<= 1) {  // inclusive scan within the warp
        const int3 other = make_int3(__shfl_up_sync(0xffffffffu, before.x, offset),
                                     __shfl_up_sync(0xffffffffu, before.y, offset),
                                     __shfl_up_sync(0xffffffffu, before.z, offset));
        if (lane >= offset) before.x += other.x, before.y += other.y, before.z += other.z;
    }
    if (lane == 31) warp_total[warp] = before;
    __syncthreads();
    before.x -= mine.x, before.y -= mine.y, before.z -= mine.z;
    int3 all = make_int3(0, 0, 0);
    for (int w = 0; w < blockDim.x / 32; ++w) {
        if (w == warp) before.x += all.x, before.y += all.y, before.z += all.z;
        all.x += warp_total[w].x, all.y += warp_total[w].y, all.z += warp_total[w].z;
    }
    if (n > 0) {
        const int s = before.x, offset = before.y;
        cursor[e] = offset;
        slot_expert[s] = e - expert_lo;
        slot_offset[s] = offset;
        for (int r = 0, tile = before.z; r < n; r += tile_rows, ++tile)
            tile_slot[tile] = s, tile_row[tile] = offset + r;
    }
    if (threadIdx.x == 0) slot_offset[all.x] = all.y, n_slots[0] = all.x, n_tiles[0] = all.z;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        if (topk_ids[p] < expert_lo || topk_ids[p] >= expert_hi) continue;  // another rank's expert
        const int at = atomicAdd(&cursor[topk_ids[p]], 1);
        pair_src[at] = p;
        pair_token[at] = p / K;
    }
}

// act[t, r] = silu(gate[r] . x_t) * (up[r] . x_t) for rows r = first, first + WARPS, ... < row_end of one expert
// (its rows at gate, up), by one warp each, for the nt inputs x_t.
template <typename W, int MAXT>
__device__ __forceinline__ void gate_up_rows(const W* gate, const W* up, int H, int I, int first, int row_end,
                                             const float* const (&xt)[MAXT], int nt, float* act) {
    const int lane = threadIdx.x % 32;
    for (int r = first; r < row_end; r += WARPS) {
        const W* rows[2] = {gate + static_cast<long long>(r) * H, up + static_cast<long long>(r) * H};
        float gu[2][MAXT] = {};  // gate and up rows read together: their loads are in flight at once
        warp_dot_rows_n<W, MAXT, 2>(rows, H, xt, nt, nullptr, gu);
#pragma unroll
        for (int t = 0; t < MAXT; ++t) {
            if (t >= nt) break;
            const float gs = warp_sum(gu[0][t]), us = warp_sum(gu[1][t]);
            if (lane == 0) act[static_cast<long long>(t) * I + r] = gs / (1.0f + expf(-gs)) * us;
        }
    }
}

// act[q, r] = silu(gate_e[r] . xn[tok]) * (up_e[r] . xn[tok]) for every pair q of slot s (expert e, token tok).
// Expert e's gate rows start at gate + e * expert_stride, its up rows at up + e * expert_stride. Pairs of a slot are
// taken MAXT at a time, so an expert's rows are read once per MAXT of its tokens.  grid (ceil(I / rows_per_block), slots)
template <typename W, int MAXT>
__global__ void __launch_bounds__(256) expert_gate_up(const float* __restrict__ xn, int H, const W* __restrict__ gate,
                                                      const W* __restrict__ up, long long expert_stride, int I,
                                                      int rows_per_block, const int* __restrict__ slot_expert,
                                                      const int* __restrict__ slot_offset,
                                                      const int* __restrict__ pair_token,
                                                      const int* __restrict__ n_slots, float* __restrict__ act) {
    begin_after_previous();
    const int s = blockIdx.y;
    if (s >= n_slots[0]) return;
    const long long e = slot_expert[s];
    const int warp = threadIdx.x / 32;
    const int row_end = min(I, (blockIdx.x + 1) * rows_per_block);
    for (int q0 = slot_offset[s]; q0 < slot_offset[s + 1]; q0 += MAXT) {
        const int nt = min(MAXT, slot_offset[s + 1] - q0);
        const float* xt[MAXT];
#pragma unroll
        for (int t = 0; t < MAXT; ++t) xt[t] = xn + static_cast<long long>(pair_token[q0 + min(t, nt - 1)]) * H;
        const int first = blockIdx.x * rows_per_block + warp;
        gate_up_rows<W, MAXT>(gate + e * expert_stride, up + e * expert_stride, H, I, first, row_end, xt, nt,
                              act + static_cast<long long>(q0) * I);
    }
}

// Batch-1 decode: route_topk and expert_gate_up in one kernel, one launch and one wait fewer a layer. Every block
// routes the token itself (route_token: a short chain in one warp, over E logits) and computes rows of the expert of
// its slot s = blockIdx.y, the token's s-th pick; block (0, 0) also writes what route_topk writes for the kernels
// after it and for the host (probs, topk_ids, the picks as slots and their weights, the statistics). It does not
// write n_slots, which expert_down_sum reads before its wait: a single token's buffers hold top_k there from the
// start (cupy_backend.Grouping.empty). The experts' input xn = RMSNorm(x) is computed by every block into shared
// memory before the wait (x was written two kernels ahead), so the products read it from there.
// On a rank of a split model that holds experts [expert_lo, expert_hi) (expert parallelism) slot s is still pick s,
// but a pick of another rank's expert gets slot_expert -1, which expert_down_sum skips, and its blocks stop after
// routing; the others' slot_expert are numbered from expert_lo.
//             grid (ceil(I / rows_per_block), top_k), block 256, dynamic smem H floats, then 2 top_k words
template <typename W, int CHUNKS>
__global__ void __launch_bounds__(256) route_gate_up(const float* __restrict__ logits, const float* __restrict__ x,
                                                     int H, const float* __restrict__ norm_weight, float eps, int E,
                                                     int top_k, int norm_topk_prob,
                                                     const unsigned char* __restrict__ disabled,
                                                     float* __restrict__ probs, int* __restrict__ topk_ids,
                                                     float* __restrict__ topk_weights, unsigned long long* stat_counts,
                                                     double* stat_prob_sum, double* stat_entropy_sum, int* slot_expert,
                                                     int* slot_offset, int* pair_src, int* pair_token,
                                                     const W* __restrict__ gate, const W* __restrict__ up,
                                                     long long expert_stride, int I, int rows_per_block,
                                                     float* __restrict__ act, int expert_lo, int expert_hi) {
    extern __shared__ __align__(16) float xn[];  // (H,), then chosen_weight (top_k,) and chosen_id (top_k,)
    float* chosen_weight = xn + H;
    int* chosen_id = reinterpret_cast<int*>(chosen_weight + top_k);
    const float inv = block_inv_rms(x, H, eps);
    for (int k = threadIdx.x; k < H; k += blockDim.x) xn[k] = norm_weight[k] * (x[k] * inv);
    begin_after_previous();
    const bool first = blockIdx.x == 0 && blockIdx.y == 0;  // the block that writes the routing out
    if (threadIdx.x < 32)
        route_token<CHUNKS>(logits, E, top_k, norm_topk_prob, disabled, first ? probs : nullptr,
                            first ? stat_counts : nullptr, first ? stat_prob_sum : nullptr,
                            first ? stat_entropy_sum : nullptr, chosen_id, chosen_weight);
    __syncthreads();  // (also: xn written by every thread)
    if (first) {
        for (int j = threadIdx.x; j < top_k; j += blockDim.x) {
            const int held = chosen_id[j] >= expert_lo && chosen_id[j] < expert_hi;
            topk_ids[j] = chosen_id[j], topk_weights[j] = chosen_weight[j];
            slot_expert[j] = held ? chosen_id[j] - expert_lo : -1, slot_offset[j] = j, pair_src[j] = j;
            pair_token[j] = 0;
        }
        if (threadIdx.x == 0) slot_offset[top_k] = top_k;
    }
    const long long e = chosen_id[blockIdx.y] - expert_lo;
    if (e < 0 || e >= expert_hi - expert_lo) return;  // another rank's expert
    const float* xt[1] = {xn};
    gate_up_rows<W, 1>(gate + e * expert_stride, up + e * expert_stride, H, I,
                       blockIdx.x * rows_per_block + threadIdx.x / 32, min(I, (blockIdx.x + 1) * rows_per_block), xt,
                       1, act + static_cast<long long>(blockIdx.y) * I);
}

// out[pair_src[q], n] = weight(pair) * (down_e[n] . act[q]): each pair's expert output already scaled by its routing
// weight (pair_weight null: 1, for a dense MLP).                      grid (ceil(H / rows_per_block), slots)
template <typename W, int MAXT>
__global__ void __launch_bounds__(256) expert_down(const float* __restrict__ act, int I, const W* __restrict__ down,
                                                   long long expert_stride, int H, int rows_per_block,
                                                   const int* __restrict__ slot_expert,
                                                   const int* __restrict__ slot_offset,
                                                   const int* __restrict__ pair_src,
                                                   const float* __restrict__ pair_weight,
                                                   const int* __restrict__ n_slots, float* __restrict__ out) {
    const int s = blockIdx.y;
    begin_after_previous();
    if (s >= n_slots[0]) return;
    const long long e = slot_expert[s];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row_end = min(H, (blockIdx.x + 1) * rows_per_block);
    for (int q0 = slot_offset[s]; q0 < slot_offset[s + 1]; q0 += MAXT) {
        const int nt = min(MAXT, slot_offset[s + 1] - q0);
        const float* xt[MAXT];
#pragma unroll
        for (int t = 0; t < MAXT; ++t) xt[t] = act + static_cast<long long>(q0 + min(t, nt - 1)) * I;
        for (int n = blockIdx.x * rows_per_block + warp; n < row_end; n += WARPS) {
            float acc[MAXT] = {};
            warp_dot_rows<W, MAXT>(down + e * expert_stride + static_cast<long long>(n) * I, I, xt, nt, nullptr, acc);
#pragma unroll
            for (int t = 0; t < MAXT; ++t) {
                if (t >= nt) break;
                const float sum = warp_sum(acc[t]);
                const int src = pair_src[q0 + t];
                if (lane == 0) out[static_cast<long long>(src) * H + n] = (pair_weight ? pair_weight[src] : 1.0f) * sum;
            }
        }
    }
}

// Batch-1 decode: x[n] += sum over the slots s, in slot order, of weight(s) * (down_e(s)[n] . act[s]) --
// expert_down and moe_combine in one kernel, one launch and one wait fewer per layer. Each pick's product is rounded
// as expert_down rounds it (one float multiply, stored) and the picks are added in moe_combine's order (with one
// token, slot s is pair s, and the slots are its picks in pick order), so x gets the same bits as from the two.
// ``residual`` as moe_combine's. A warp takes one slot and ROWS output rows at once (they share the slot's
// activations, and ROWS of its rows' loads are in flight together). A slot of another rank's expert
// (slot_expert -1, from route_gate_up) adds nothing.
//                           grid (ceil(H / ROWS)), block 256, dynamic smem max_slots x ROWS floats
template <typename W, int ROWS>
__global__ void __launch_bounds__(256) expert_down_sum(const float* __restrict__ act, int I, const W* __restrict__ down,
                                                       long long expert_stride, int H,
                                                       const int* __restrict__ slot_expert,
                                                       const int* __restrict__ pair_src,
                                                       const float* __restrict__ pair_weight,
                                                       const int* __restrict__ n_slots, int residual,
                                                       float* __restrict__ x) {
    static_assert(ROWS <= 32, "a skipped slot's rows are zeroed by one warp");
    extern __shared__ float picked[];  // (slots, ROWS): each slot's weighted outputs of this block's rows
    const int n0 = blockIdx.x * ROWS, rows = min(ROWS, H - n0), slots = n_slots[0];  // (written two kernels ahead)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    begin_after_previous();
    for (int s = warp; s < slots; s += WARPS) {
        const long long e = slot_expert[s];
        if (e < 0) {
            if (lane < ROWS) picked[s * ROWS + lane] = 0.0f;
            continue;
        }
        const W* w[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            w[r] = down + e * expert_stride + static_cast<long long>(n0 + min(r, rows - 1)) * I;
        const float* xt[1] = {act + static_cast<long long>(s) * I};
        float acc[ROWS][1] = {};
        warp_dot_rows_n<W, 1, ROWS>(w, I, xt, 1, nullptr, acc);
        const float weight = pair_weight ? pair_weight[pair_src[s]] : 1.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            const float sum = warp_sum(acc[r][0]);
            if (lane == 0) picked[s * ROWS + r] = weight * sum;
        }
    }
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        float sum = 0.0f;
        for (int s = 0; s < slots; ++s) sum += picked[s * ROWS + r];
        x[n0 + r] = residual ? x[n0 + r] + sum : sum;
    }
}

// x[t, :] += sum_k out[t*K + k, :], the K picks added in slot order: the weighted sum and the residual add, in a fixed
// order so that results do not depend on scheduling. ``residual`` 0: x = the sum alone (every rank of a split model
// but the first: the all-reduce that follows adds the residual once). On a rank that holds experts [expert_lo,
// expert_hi) only the picks of those count (``topk_ids`` (T, K)); the others' rows of ``out`` were never written.
// ``topk_ids`` null: every pick counts (a dense MLP's one "expert", or a state that holds every expert).
//                                                                        grid (ceil(T * H / 256)), block 256
__global__ void moe_combine(float* __restrict__ x, const float* __restrict__ out, int T, int H, int K, int residual,
                            const int* __restrict__ topk_ids, int expert_lo, int expert_hi) {
    begin_after_previous();
    const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= static_cast<long long>(T) * H) return;
    const long long t = i / H, h = i % H;
    float sum = 0.0f;
    for (int k = 0; k < K; ++k)
        if (!topk_ids || (topk_ids[t * K + k] >= expert_lo && topk_ids[t * K + k] < expert_hi))
            sum += out[(t * K + k) * H + h];
    x[i] = residual ? x[i] + sum : sum;
}
