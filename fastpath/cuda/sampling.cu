// Choosing the next token on the device, so that a captured decode step feeds its own next input: greedy decoding
// (the argmax, the lowest index on ties as numpy.argmax) in two passes, or sampling (sample_rows, below), then the
// step's bookkeeping.
#include "common.cuh"

__device__ __forceinline__ void keep_better(float& best, int& best_i, float v, int i) {
    if (v > best || (v == best && i < best_i)) best = v, best_i = i;
}

__device__ __forceinline__ void warp_argmax(float& best, int& best_i) {
    for (int offset = 16; offset > 0; offset >>= 1)
        keep_better(best, best_i, __shfl_xor_sync(0xffffffffu, best, offset),
                    __shfl_xor_sync(0xffffffffu, best_i, offset));
}

// Each block: the best of its contiguous share of one row's vocabulary (row blockIdx.y of ``logits``, V wide). A
// NaN or +Inf logit sets non_finite[0] = 1 (the host refuses the tokens then, as the reference sampler does).
// ``first_id``: the token id of a row's first logit (a rank of a split model scores the rows of lm_head from
// first_id on).                                                         grid (blocks <= 1024, rows), block 256
__global__ void argmax_partial(const float* __restrict__ logits, int V, int first_id, float* __restrict__ best_val,
                               int* __restrict__ best_idx, int* __restrict__ non_finite) {
    __shared__ float vals[8];
    __shared__ int idxs[8];
    begin_after_previous();
    const float* row = logits + static_cast<long long>(blockIdx.y) * V;
    const int per_block = (V + gridDim.x - 1) / gridDim.x;
    const int begin = blockIdx.x * per_block, end = min(V, begin + per_block);
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float v = row[i];
        if (isnan(v) || v == INFINITY) non_finite[0] = 1;
        keep_better(best, best_i, v, i);
    }
    warp_argmax(best, best_i);
    if (threadIdx.x % 32 == 0) vals[threadIdx.x / 32] = best, idxs[threadIdx.x / 32] = best_i;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = threadIdx.x < blockDim.x / 32 ? vals[threadIdx.x] : -INFINITY;
        best_i = threadIdx.x < blockDim.x / 32 ? idxs[threadIdx.x] : 0x7fffffff;
        warp_argmax(best, best_i);
        const int at = blockIdx.y * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) best_val[at] = best, best_idx[at] = best_i == 0x7fffffff ? best_i : best_i + first_id;
    }
}

// Row blockIdx.x: the winner of its partial results -- ``blocks`` per row from each of ``ranks`` ranks, laid out
// (ranks, rows, blocks) -- becomes the row's next input token; its position moves on by one.
//                                                                       grid (rows), block 32
__global__ void greedy_advance(const float* __restrict__ best_val, const int* __restrict__ best_idx, int blocks,
                               int rows, int ranks, long long* __restrict__ next_id, int* __restrict__ tok_pos,
                               int* __restrict__ sampled) {
    begin_after_previous();
    const int row = blockIdx.x;
    float best = -INFINITY;
    int best_i = 0x7fffffff;
    for (int i = threadIdx.x; i < ranks * blocks; i += 32) {
        const int at = (i / blocks * rows + row) * blocks + i % blocks;
        keep_better(best, best_i, best_val[at], best_idx[at]);
    }
    warp_argmax(best, best_i);
    if (threadIdx.x == 0) {
        next_id[row] = best_i;
        sampled[row] = best_i;
        tok_pos[row] += 1;
    }
}

// ---- sampling: temperature -> top-k -> top-p -> draw, in the reference's order (qwen3moe/sampling.py) ---------------
//
// The reference sorts the vocabulary (larger logit first, lower id on ties) and walks it. Here the kernels find
// elements by their place in that order without sorting the row: the k-th for top-k, the one where the running
// probability reaches top_p, the one where it passes the drawn number u. They do so with a radix select: a histogram
// of counts (top-k) or of probability mass (the others) over 8 bits of the ordering key at a time narrows the key down
// to one value in four passes over the row; only if several ids share that value, three more passes over their ids
// pick one. With top-k of at most 64 (Qwen3 samples with top_k = 20) the row is read once: topk_candidates (below)
// has 64 blocks each find the first k of its part, and sample_rows sorts those candidates. Other rows (top-k of every
// token, or of more than 64) are read by a team of blocks that shares every pass (RowTeam, below).
// Probabilities are computed in float64, as the reference does, and the histograms add them as integers in units of
// 2^-45 for Qwen3's vocabulary: exact sums in any order, so that any number of blocks draws the same token (with a
// hundred thousand tokens in play, float32 sums would move the drawn token by one now and then). The row (600 KB for
// Qwen3's vocabulary) stays in the L2 cache between passes.

constexpr int RADIX = 256;  // bins of one 8-bit digit
constexpr int COPIES = 16;  // copies of the histogram, so that the lanes of a warp seldom add into the same bin
constexpr int FEW = 1024;   // threads of sample_rows: the sorted places draw_sorted walks, one a thread
constexpr int UNROLL = 8;   // logits each thread has in flight per pass
constexpr int CANDIDATE_BLOCKS = 64;  // blocks of topk_candidates a row (each takes 1/64 of the vocabulary)
constexpr int CANDIDATES = 4096;      // candidates of a row at most (CANDIDATE_BLOCKS x top-k): top-k <= 64

// top_p is reached when the kept mass is within TOP_P_SLACK of it, as in the reference.
constexpr double TOP_P_SLACK = 1e-6;

// A logit's place in the order as an unsigned key: a smaller key for a larger logit; -0.0 counts as +0.0 (they tie in
// the reference's comparisons).
__device__ __forceinline__ unsigned order_key(float v) {
    unsigned b = __float_as_uint(v);
    if (b << 1 == 0) b = 0;
    return (b & 0x80000000u) ? b : ~b & 0x7fffffffu;
}

__device__ __forceinline__ float key_value(unsigned key) {  // order_key's inverse
    return __uint_as_float((key & 0x80000000u) ? key : ~key & 0x7fffffffu);
}

// (key, id) as one number: comparing two of them compares places in the order.
__device__ __forceinline__ unsigned long long place(unsigned key, int id) {
    return static_cast<unsigned long long>(key) << 32 | static_cast<unsigned>(id);
}

// f(i, row[i]) for every i < V, shared by the block; each thread loads UNROLL logits before using them, so that
// enough loads are in flight to hide the memory's latency.
template <class F>
__device__ __forceinline__ void for_each(const float* __restrict__ row, int V, F f) {
    for (int base = threadIdx.x; base < V; base += UNROLL * blockDim.x) {
        float v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int i = base + u * blockDim.x;
            v[u] = i < V ? row[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
            if (base + u * blockDim.x < V) f(base + u * blockDim.x, v[u]);
    }
}

__device__ __forceinline__ unsigned long long block_min(unsigned long long v) {
    return block_reduce(v, [](unsigned long long a, unsigned long long b) { return min(a, b); }, ~0ull);
}

__device__ __forceinline__ unsigned long long block_total(unsigned long long v) {
    return block_reduce(v, [](unsigned long long a, unsigned long long b) { return a + b; }, 0ull);
}

// Running sum over the block, thread order: thread j gets v_0 + ... + v_j.
__device__ __forceinline__ double block_inclusive_sum(double v) {
    __shared__ double warp_total[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += y;
    }
    __syncthreads();  // warp_total[] may still be read by an earlier call
    if (lane == 31) warp_total[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < blockDim.x / 32 ? warp_total[lane] : 0.0;
        for (int offset = 1; offset < 32; offset <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, w, offset);
            if (lane >= offset) w += y;
        }
        warp_total[lane] = w;
    }
    __syncthreads();
    return warp > 0 ? v + warp_total[warp - 1] : v;
}

struct SampleScratch {  // one per block, in shared memory; the radix histograms and the sorted places take turns
    union {
        struct {
            unsigned long long hist[RADIX][COPIES];
            unsigned long long total[RADIX];
        } radix;
        struct {
            unsigned long long place[FEW];  // sorted
            double running[FEW];
        } few;
        unsigned long long candidates[CANDIDATES];  // (sample_rows) the blocks' candidates, sorted in place: the
        // first FEW of them are then few.place
    };
    unsigned chosen_bin;
    unsigned long long chosen_before, chosen_weight;
    int n_few;
};

// ---- who reads the row: one block, or a team of blocks --------------------------------------------------------------
//
// A pass reads logits and reduces something over them: a histogram, a sum, a minimum. OneBlock does it all in one
// block (topk_candidates, on its 1/64 of a row). A single block reads a row of 151,936 logits at only ~10 GB/s,
// bound by its own instructions (~40-60 us a pass on an H200), and a draw over every token takes 7-18 passes. RowTeam
// gives a row gridDim.y blocks: each reduces its own contiguous part in shared memory and adds the result into a
// buffer in global memory; they meet at a barrier and read the sums back, so every block goes on with the same
// numbers and takes the same branches. Barriers count arrivals in global memory, so all blocks of a team must be
// resident at once: the host gives sample_rows at most one block per multiprocessor (cupy_backend.sample_team).

struct OneBlock {
    template <class F> __device__ void for_each(const float* row, int n, F f) { ::for_each(row, n, f); }
    __device__ void add_up(unsigned long long*, int) {}  // one block's sums are already the whole's
    __device__ unsigned long long total(unsigned long long v) { return block_total(v); }
    __device__ unsigned long long lowest(unsigned long long v) { return block_min(v); }
};

// The team's merges take TEAM_BUFFERS buffers in turn: while blocks add into one, block 0 clears the one before the
// previous, which every block has read by then.
constexpr int TEAM_BUFFERS = 3;
constexpr int TEAM_WORDS = 2 + TEAM_BUFFERS * RADIX;  // a row's: arrivals at barriers, blocks done, the buffers

struct RowTeam {
    unsigned long long* words;  // the row's TEAM_WORDS: all 0 when the kernel starts, and again when it ends
    int blocks, block;
    unsigned long long barriers = 0;  // passed so far
    int merges = 0;

    __device__ explicit RowTeam(unsigned long long* row_words)
        : words(row_words), blocks(gridDim.y), block(blockIdx.y) {}

    __device__ unsigned long long* buffer(int merge) { return words + 2 + merge % TEAM_BUFFERS * RADIX; }

    template <class F> __device__ void for_each(const float* row, int n, F f) {  // over this block's part of row[0..n)
        const int width = (n + blocks - 1) / blocks, first = block * width;
        ::for_each(row + first, max(0, min(width, n - first)), [&](int i, float v) { f(first + i, v); });
    }

    __device__ void barrier() {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();  // this block's adds are seen before its arrival
            atomicAdd(words, 1ull);
            const unsigned long long everyone = ++barriers * blocks;
            unsigned long long arrived;
            do asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(arrived) : "l"(words) : "memory");
            while (arrived < everyone);
        }
        __syncthreads();
    }

    // v[0..n) (shared memory, n <= RADIX) becomes its sum over the team's blocks, or with ``maximum`` its largest.
    __device__ void merge(unsigned long long* v, int n, bool maximum) {
        if (blocks == 1) return;
        unsigned long long* into = buffer(merges);
        for (int j = threadIdx.x; j < n; j += blockDim.x)
            if (v[j]) maximum ? atomicMax(into + j, v[j]) : atomicAdd(into + j, v[j]);
        barrier();
        for (int j = threadIdx.x; j < n; j += blockDim.x) v[j] = __ldcg(into + j);  // (from L2: L1 may hold old words)
        if (block == 0)
            for (int j = threadIdx.x; j < RADIX; j += blockDim.x) buffer(merges + 2)[j] = 0;
        ++merges;
        __syncthreads();
    }

    __device__ unsigned long long merged(unsigned long long v, bool maximum) {  // one value of every block
        __shared__ unsigned long long word;
        if (blocks == 1) return v;
        if (threadIdx.x == 0) word = v;  // (thread 0 also adds it in merge)
        merge(&word, 1, maximum);
        v = word;
        __syncthreads();  // every thread has read word before the next call writes it
        return v;
    }

    __device__ void add_up(unsigned long long* v, int n) { merge(v, n, false); }
    __device__ unsigned long long total(unsigned long long v) { return merged(block_total(v), false); }
    // (the buffers start at 0, so the smallest is merged as the largest complement)
    __device__ unsigned long long lowest(unsigned long long v) { return ~merged(~block_min(v), true); }

    // The last block out leaves the row's words at 0 for the next launch: the last merge's buffer (block 0 has
    // cleared the others) and the two counters.
    __device__ void finish() {
        __syncthreads();
        if (blocks > 1 && threadIdx.x == 0) {
            __threadfence();
            if (atomicAdd(words + 1, 1ull) == blocks - 1ull) {
                __threadfence();
                if (merges > 0)
                    for (int j = 0; j < RADIX; ++j) buffer(merges - 1)[j] = 0;
                words[0] = 0, words[1] = 0;
            }
        }
    }
};

// Radix select. Among the ids i < n with in_set(i, v) (v = row[i]), taken in ascending order of digits(i, v), finds
// the element where the running sum of weight(v) (an integer) passes t: the sum before it <= t < the sum through it
// (or the last element of nonzero weight, when t is past the end). Returns its digits, reading 8 bits at a time
// from bit top_shift + 7 down to bit 0; t becomes what is left of it inside the elements that share those digits, and
// sh.chosen_weight the weight of those elements.
template <class Team, class InSet, class Digits, class Weight>
__device__ unsigned radix_select(SampleScratch& sh, Team& team, const float* row, int n, int top_shift, InSet in_set,
                                 Digits digits, Weight weight, unsigned long long& t) {
    auto& hist = sh.radix.hist;
    auto& total = sh.radix.total;
    const int copy = threadIdx.x % COPIES;
    unsigned prefix = 0, mask = 0;
    for (int shift = top_shift; shift >= 0; shift -= 8) {
        for (int j = threadIdx.x; j < RADIX * COPIES; j += blockDim.x) (&hist[0][0])[j] = 0;
        __syncthreads();
        team.for_each(row, n, [&](int i, float v) {
            const unsigned d = digits(i, v);
            if ((d & mask) == prefix && in_set(i, v)) atomicAdd(&hist[(d >> shift) & (RADIX - 1)][copy], weight(v));
        });
        __syncthreads();
        for (int b = threadIdx.x; b < RADIX; b += blockDim.x) {
            unsigned long long s = 0;
            for (int c = 0; c < COPIES; ++c) s += hist[b][(c + b) % COPIES];  // rotated: fewer bank conflicts
            total[b] = s;
        }
        __syncthreads();
        team.add_up(total, RADIX);
        if (threadIdx.x < 32) {  // lane l owns bins 8l .. 8l + 7: scan the lanes' sums, then walk the owner's bins
            const int lane = threadIdx.x;
            unsigned long long own = 0;
            for (int q = 0; q < 8; ++q) own += total[8 * lane + q];
            unsigned long long through = own;
            for (int offset = 1; offset < 32; offset <<= 1) {
                const unsigned long long y = __shfl_up_sync(0xffffffffu, through, offset);
                if (lane >= offset) through += y;
            }
            const unsigned passes = __ballot_sync(0xffffffffu, own > 0 && through > t);
            const unsigned filled = __ballot_sync(0xffffffffu, own > 0);
            const int owner = passes ? __ffs(passes) - 1 : 31 - __clz(filled);
            if (lane == owner) {
                unsigned long long before = through - own, bin_before = 0;
                int bin = 0;
                for (int q = 0; q < 8; ++q) {
                    const unsigned long long w = total[8 * lane + q];
                    if (w == 0) continue;
                    bin = 8 * lane + q, bin_before = before;
                    if (before + w > t) break;
                    before += w;
                }
                sh.chosen_bin = bin, sh.chosen_before = bin_before, sh.chosen_weight = total[bin];
            }
        }
        __syncthreads();
        prefix |= sh.chosen_bin << shift, mask |= (RADIX - 1u) << shift;
        t -= sh.chosen_before;
        __syncthreads();  // everyone has read chosen_*
    }
    return prefix;
}

// The element of the set where the running weight, taken in the order, passes t (as in radix_select): its place.
template <class Team, class InSet, class Weight>
__device__ unsigned long long select_in_order(SampleScratch& sh, Team& team, const float* row, int V, InSet in_set,
                                              Weight weight, unsigned long long t) {
    const unsigned key =
        radix_select(sh, team, row, V, 24, in_set, [](int, float v) { return order_key(v); }, weight, t);
    // the ids that share the key weigh the same, w (> 0: radix_select picks weight), so there are chosen_weight / w
    const unsigned long long w = weight(key_value(key)), count = sh.chosen_weight / w;
    if (count == 1) {
        unsigned long long id = ~0ull;
        team.for_each(row, V, [&](int i, float v) {
            if (order_key(v) == key && in_set(i, v)) id = i;
        });
        return place(key, static_cast<int>(team.lowest(id)));
    }
    // ties: the pick is the n-th of them in id order, n = t / w
    unsigned long long n = min(t / w, count - 1);
    const unsigned id = radix_select(
        sh, team, row, V, 16, [&](int i, float v) { return order_key(v) == key && in_set(i, v); },
        [](int i, float) { return static_cast<unsigned>(i); }, [](float) { return 1ull; }, n);
    return place(key, static_cast<int>(id));
}

template <class Team, class InSet, class Weight>
__device__ unsigned long long set_weight(Team& team, const float* row, int V, InSet in_set, Weight weight) {
    unsigned long long s = 0;
    team.for_each(row, V, [&](int i, float v) {
        if (in_set(i, v)) s += weight(v);
    });
    return team.total(s);
}

// a[0..n) in ascending order, n a power of two, by the whole block (bitonic; each thread takes the pairs
// j = threadIdx.x + m * blockDim.x).
__device__ void block_sort(unsigned long long* a, int n) {
    for (int size = 2; size <= n; size <<= 1) {
        for (int stride = size / 2; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int j = threadIdx.x; j < n; j += blockDim.x) {
                const int partner = j ^ stride;
                if (partner > j) {
                    const unsigned long long x = a[j], y = a[partner];
                    if ((x > y) == ((j & size) == 0)) a[j] = y, a[partner] = x;
                }
            }
        }
    }
    __syncthreads();
}

// Top-p and the draw over the n places in sh.few.place[0..n) (sorted; n <= FEW, the first k of the order), exactly
// as the reference walks its sorted list: running sums of their weights; keep the first ones whose sum reaches
// top_p, then the first whose sum passes u times the kept sum. Needs blockDim.x == FEW.
template <class Weight>
__device__ unsigned long long draw_sorted(SampleScratch& sh, int n, Weight probability, float topp, float u) {
    const int j = threadIdx.x;
    const unsigned key = static_cast<unsigned>(sh.few.place[j] >> 32);
    const double running = block_inclusive_sum(j < n ? probability(key_value(key)) : 0.0);
    sh.few.running[j] = running;
    __syncthreads();
    int keep = n;
    if (topp < 1.0f) {
        const double reach = (topp - TOP_P_SLACK) * sh.few.running[n - 1];
        keep = 1 + static_cast<int>(min(block_min(j < n && running >= reach ? j : ~0ull), n - 1ull));
    }
    const double target = u * sh.few.running[keep - 1];
    const int at = static_cast<int>(min(block_min(j < keep && running > target ? j : ~0ull), keep - 1ull));
    return sh.few.place[at];
}

// ---- sampling with top-k <= 64: candidates from 64 blocks -----------------------------------------------------------
//
// When a row keeps at most 64 tokens (Qwen3 samples with top_k = 20) or is greedy, topk_candidates first has
// CANDIDATE_BLOCKS blocks each find the first k places of its 1/64 of the row (the row's first k are among those
// 64 k), and sample_rows then sorts those candidates instead of reading the row: one pass over the row in all.

// How many places each block of topk_candidates keeps for a row: its top-k (1 where greedy), or 0 where the row takes
// sample_rows' team of blocks reads the whole row instead (top-k of every token, or of more than 64).
__device__ __forceinline__ int candidates_per_block(float temperature, int topk, int V) {
    const int k = temperature == 0.0f || topk == 1 ? 1 : (topk > 0 && topk < V ? topk : 0);
    return k > 0 && k * CANDIDATE_BLOCKS <= CANDIDATES ? k : 0;
}

// Row blockIdx.x, its 1/CANDIDATE_BLOCKS part blockIdx.y: the part's first k places in the order (k from
// candidates_per_block; ids over the whole row), into candidates[row, blockIdx.y * k ...], ~0ull after the part's
// last where it holds fewer than k. A NaN or +Inf logit sets non_finite_rows[row] = 1.
//                                                          grid (rows, CANDIDATE_BLOCKS), block 256
__global__ void __launch_bounds__(256) topk_candidates(const float* __restrict__ logits, int V, int stride,
                                                     const float* __restrict__ temperature,
                                                     const int* __restrict__ topk,
                                                     unsigned long long* __restrict__ candidates,
                                                     int* __restrict__ non_finite_rows) {
    __shared__ SampleScratch sh;
    begin_after_previous();
    const int r = blockIdx.x, k = candidates_per_block(temperature[r], topk[r], V);
    if (k == 0) return;
    const int width = (V + CANDIDATE_BLOCKS - 1) / CANDIDATE_BLOCKS, first_id = blockIdx.y * width;
    const int n = max(0, min(width, V - first_id));
    const float* part = logits + static_cast<long long>(r) * stride + first_id;
    bool bad = false;
    for_each(part, n, [&](int, float v) { bad |= isnan(v) || v == INFINITY; });
    if (__syncthreads_or(bad) && threadIdx.x == 0) non_finite_rows[r] = 1;
    unsigned long long last = ~0ull;  // every place of the part up to it is kept (places within the part)
    OneBlock block;
    if (k < n) last = select_in_order(sh, block, part, n, [](int, float) { return true; }, [](float) { return 1ull; },
                                      k - 1ull);
    if (threadIdx.x == 0) sh.n_few = 0;
    __syncthreads();
    unsigned long long* out = candidates + static_cast<long long>(r) * CANDIDATES + blockIdx.y * k;
    for_each(part, n, [&](int i, float v) {
        if (place(order_key(v), i) <= last) out[atomicAdd(&sh.n_few, 1)] = place(order_key(v), first_id + i);
    });
    __syncthreads();
    for (int slot = sh.n_few + threadIdx.x; slot < k; slot += blockDim.x) out[slot] = ~0ull;
}

// ---- sample_rows: every row's draw ----------------------------------------------------------------------------------

// A row's draw from topk_candidates' candidates (the row's CANDIDATE_BLOCKS x kc places): sorted, their first kc are
// the row's top-k; greedy rows (kc 1) take the first. A row that topk_candidates flagged non-finite sets
// non_finite[0], and its flag is cleared for the next step.
__device__ unsigned long long draw_from_candidates(SampleScratch& sh, const unsigned long long* candidates, int kc,
                                                   float temperature, float topp, float u, int* non_finite_row,
                                                   int* non_finite) {
    const int n = CANDIDATE_BLOCKS * kc;
    int size = FEW;  // a power of two for the sort
    while (size < n) size <<= 1;
    for (int j = threadIdx.x; j < size; j += blockDim.x) sh.candidates[j] = j < n ? candidates[j] : ~0ull;
    block_sort(sh.candidates, size);
    unsigned long long pick = sh.candidates[0];
    if (__syncthreads_or(*non_finite_row)) {  // (every thread has read the flag before it is cleared)
        if (threadIdx.x == 0) non_finite[0] = 1, *non_finite_row = 0;
    } else if (kc > 1) {
        // (the first k candidates are all tokens' places: the parts hold V > k tokens in all)
        const double top = key_value(static_cast<unsigned>(pick >> 32)), inv_t = 1.0 / temperature;
        pick = draw_sorted(sh, kc, [=](float v) { return exp((v - top) * inv_t); }, topp, u);
    }
    return pick;
}

// A row's draw over all of its V logits, by the team: the first place (the top token), then top-k by count, top-p by
// probability mass, and the draw by mass, each a select_in_order. Greedy rows never come here (topk_candidates takes
// them). A NaN or +Inf logit sets non_finite[0].
__device__ unsigned long long draw_over_row(SampleScratch& sh, RowTeam& team, const float* row, int V,
                                            float temperature, int topk, float topp, float u, int* non_finite) {
    unsigned long long first = ~0ull;
    bool bad = false;
    team.for_each(row, V, [&](int i, float v) {
        bad |= isnan(v) || v == INFINITY;
        first = min(first, place(order_key(v), i));
    });
    // one merge for both: no finite logit's place is 0, so a block that saw a NaN or +Inf offers 0
    first = team.lowest(__syncthreads_or(bad) ? 0ull : first);
    if (first == 0) {
        if (team.block == 0 && threadIdx.x == 0) non_finite[0] = 1;
        return first;
    }
    const double top = key_value(static_cast<unsigned>(first >> 32)), inv_t = 1.0 / temperature;
    const auto probability = [=](float v) { return exp((v - top) * inv_t); };  // relative to the top token's
    // the histograms' unit of probability: as fine as V weights of at most 1 (the top token's) can sum in 63 bits
    const double unit = ldexp(1.0, 63 - (32 - __clz(V)));
    const auto mass = [=](float v) { return __double2ull_rn(probability(v) * unit); };
    const auto part = [](double fraction, unsigned long long whole) {
        return static_cast<unsigned long long>(fraction * static_cast<double>(whole));
    };
    unsigned long long last = ~0ull;  // the last kept place: every token up to it in the order is kept
    const auto kept = [&](int i, float v) { return place(order_key(v), i) <= last; };
    if (topk > 0 && topk < V) last = select_in_order(sh, team, row, V, kept, [](float) { return 1ull; }, topk - 1ull);
    if (topp < 1.0f) {
        const unsigned long long reach = part(topp - TOP_P_SLACK, set_weight(team, row, V, kept, mass));
        last = select_in_order(sh, team, row, V, kept, mass, reach);
    }
    return select_in_order(sh, team, row, V, kept, mass, part(u, set_weight(team, row, V, kept, mass)));
}

// Row blockIdx.x of the logits (V of them, rows ``stride`` apart): its next token, drawn as the reference sampler
// draws it from the same uniform number u = uniform[row]. Greedy where temperature == 0 or topk == 1; otherwise among
// the tokens kept by top-k (0: all) and then top-p (1: all), each with probability exp((logit - max) / temperature)
// / (their sum). The token becomes the row's next input, as in greedy_advance. Ids must be below 2^24. A NaN or +Inf
// logit sets non_finite[0] = 1 (the host refuses the step). Where candidates_per_block takes the row, the row's
// first block draws from topk_candidates' candidates (launched just before; ``candidates`` and ``non_finite_rows``
// its outputs). Otherwise the row's gridDim.y blocks read it as a RowTeam, with the row's TEAM_WORDS of
// ``team_words`` (0 between launches).                                   grid (rows, blocks a row), block FEW (1024)
__global__ void __launch_bounds__(FEW) sample_rows(const float* __restrict__ logits, int V, int stride,
                                                 const float* __restrict__ temperature, const int* __restrict__ topk,
                                                 const float* __restrict__ topp, const float* __restrict__ uniform,
                                                 const unsigned long long* __restrict__ candidates,
                                                 int* __restrict__ non_finite_rows,
                                                 unsigned long long* __restrict__ team_words,
                                                 long long* __restrict__ next_id, int* __restrict__ tok_pos,
                                                 int* __restrict__ sampled, int* __restrict__ non_finite) {
    __shared__ SampleScratch sh;
    begin_after_previous();
    const int r = blockIdx.x;
    const int kc = candidates_per_block(temperature[r], topk[r], V);
    unsigned long long pick;
    if (kc) {
        if (blockIdx.y > 0) return;
        pick = draw_from_candidates(sh, candidates + static_cast<long long>(r) * CANDIDATES, kc, temperature[r],
                                    topp[r], uniform[r], non_finite_rows + r, non_finite);
    } else {
        RowTeam team(team_words + static_cast<long long>(r) * TEAM_WORDS);
        pick = draw_over_row(sh, team, logits + static_cast<long long>(r) * stride, V, temperature[r], topk[r],
                             topp[r], uniform[r], non_finite);
        team.finish();
        if (blockIdx.y > 0) return;
    }
    if (threadIdx.x == 0) {
        const int id = static_cast<int>(pick & 0xffffffffu);
        next_id[r] = id, sampled[r] = id, tok_pos[r] += 1;
    }
}
