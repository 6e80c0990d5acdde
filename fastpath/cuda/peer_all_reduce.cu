// The all-reduce of a decode step's hidden state between the GPUs of one machine, through their peer memory (NVLink)
// in one kernel (fastpath/peer_all_reduce.py sets the buffers up).
//
// Every rank owns a buffer that the other ranks have mapped: flags, then two sets of slots, one slot per rank. Block b
// of each rank writes its rows of the rank's part into its own slot of every rank's buffer (stores over NVLink are
// posted: the block does not wait for them), tells every rank it has (a release store of its epoch into their
// flags), waits until every rank has told it the same (acquire loads), then reads its rows of every slot of its own
// buffer -- local memory only -- and sums them in rank order 0, 1, ... -- so every rank gets the same bits. A block
// only reads what the same block of the other ranks wrote, so blocks never wait for each other, only for their
// twins. (Each rank writing only its own buffer and reading the others' over NVLink after the wait was 0.5-1 us
// slower per all-reduce at batch 1 on two H200s: those reads are round trips, the writes are not.)
//
// Because a block holds whole rows, the kernel also does the row-wise work on either side of the sum: the MoE
// block's weighted sum of its picks before (instead of moe_combine), the next block's RMSNorm after (instead of
// rms_norm or the projection's fused norm).
//
// Why two sets: rank r writes into set (epoch % 2) only after passing the barrier of epoch - 1, which each twin joins
// only after its previous all-reduce (epoch - 2, the same set) has finished reading. The kernel is launched the
// ordinary way (no programmatic launch): it starts after all the work ahead of it in the stream has finished.
#include "common.cuh"

constexpr int PEER_MAX_RANKS = 8;
constexpr int PEER_MAX_BLOCKS = 64;
constexpr int PEER_SLOTS_OFFSET = 4096;  // bytes of flags at the start of each rank's buffer

struct PeerFlags {
    unsigned arrived[PEER_MAX_BLOCKS][PEER_MAX_RANKS];  // written by the other ranks: the last epoch each has reached
    unsigned epoch[PEER_MAX_BLOCKS];                     // this rank's count of all-reduces, for each block
};
static_assert(sizeof(PeerFlags) <= PEER_SLOTS_OFFSET, "the flags must fit before the slots");

__device__ __forceinline__ void store_release(unsigned* p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// One rank's part of row t of the hidden state at float4 h: x itself, or, after an MoE block whose weighted sum is
// left to the all-reduce (``picks`` non-null, (T*K, H)), moe_combine's sum: the row's picks of this rank's experts
// [expert_lo, expert_hi) in slot order (``topk_ids`` (T, K); null: every pick counts, as for a dense MLP's one or on
// a rank that holds every expert), after x on the rank that carries the residual.
__device__ __forceinline__ float4 rank_part(const float4* x4, const float4* picks4, const int* topk_ids, int K,
                                            int expert_lo, int expert_hi, int residual, long long t, int H4, int h) {
    const float4 x = x4[t * H4 + h];
    if (!picks4) return x;
    float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int k = 0; k < K; ++k) {
        if (topk_ids && (topk_ids[t * K + k] < expert_lo || topk_ids[t * K + k] >= expert_hi)) continue;
        const float4 p = picks4[(t * K + k) * H4 + h];
        sum = make_float4(sum.x + p.x, sum.y + p.y, sum.z + p.z, sum.w + p.w);
    }
    return residual ? make_float4(x.x + sum.x, x.y + sum.y, x.z + sum.z, x.w + sum.w) : sum;
}

// x (T, 4 * H4) summed over the ndev ranks, in place; block b owns rows b, b + gridDim.x, ... Each rank's part is
// ``rank_part`` (so an MoE block needs no moe_combine of its own). With ``norm_weight`` non-null the block also writes
// xn = RMSNorm(x) of its rows, the next block's input, which then needs no norm kernel of its own.
// bases: every rank's buffer as mapped in this process. aborted: host memory the host sets when the group is torn
// down, so that a rank that has died cannot leave this kernel waiting for ever.
__global__ void __launch_bounds__(512)
peer_all_reduce(float* __restrict__ x, int T, int H4, const float* __restrict__ picks, const int* __restrict__ topk_ids,
                int K, int expert_lo, int expert_hi, int residual, const float* __restrict__ norm_weight, float eps,
                float* __restrict__ xn, const unsigned long long* __restrict__ bases, int rank, int ndev,
                long long slot_bytes, const volatile int* aborted) {
    __shared__ unsigned shared_epoch;
    __shared__ float4* sent[PEER_MAX_RANKS];           // this rank's slot in each rank's buffer
    __shared__ const float4* received[PEER_MAX_RANKS];  // each rank's slot in this rank's buffer
    PeerFlags* mine = reinterpret_cast<PeerFlags*>(bases[rank]);
    if (threadIdx.x == 0) shared_epoch = mine->epoch[blockIdx.x] + 1;
    __syncthreads();
    const unsigned epoch = shared_epoch;
    const long long set = PEER_SLOTS_OFFSET + (epoch & 1) * ndev * slot_bytes;
    if (threadIdx.x < ndev) {
        sent[threadIdx.x] = reinterpret_cast<float4*>(bases[threadIdx.x] + set + rank * slot_bytes);
        received[threadIdx.x] = reinterpret_cast<const float4*>(bases[rank] + set + threadIdx.x * slot_bytes);
    }
    __syncthreads();

    float4* x4 = reinterpret_cast<float4*>(x);
    const float4* picks4 = reinterpret_cast<const float4*>(picks);
    for (long long t = blockIdx.x; t < T; t += gridDim.x)
        for (int h = threadIdx.x; h < H4; h += blockDim.x) {
            const float4 part = rank_part(x4, picks4, topk_ids, K, expert_lo, expert_hi, residual, t, H4, h);
#pragma unroll
            for (int r = 0; r < PEER_MAX_RANKS; ++r)
                if (r < ndev) sent[r][t * H4 + h] = part;
        }
    __syncthreads();  // the block's stores happen before its release stores (release is cumulative)

    if (threadIdx.x < ndev) {  // thread r: tell rank r, then wait for rank r
        store_release(&reinterpret_cast<PeerFlags*>(bases[threadIdx.x])->arrived[blockIdx.x][rank], epoch);
        const unsigned* seen = &mine->arrived[blockIdx.x][threadIdx.x];
        for (unsigned spins = 1; static_cast<int>(load_acquire(seen) - epoch) < 0; ++spins)
            if (spins % 1024 == 0 && *aborted) break;
    }
    __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");  // the kernel behind may be scheduled now
#endif

    for (long long t = blockIdx.x; t < T; t += gridDim.x) {  // the same trip count in every thread of the block
        float squares = 0.0f;
        for (int h = threadIdx.x; h < H4; h += blockDim.x) {
            const long long i = t * H4 + h;
            float4 parts[PEER_MAX_RANKS];
#pragma unroll
            for (int r = 0; r < PEER_MAX_RANKS; ++r)  // every load in flight before the first add
                if (r < ndev) parts[r] = __ldcg(received[r] + i);
            float4 sum = parts[0];
#pragma unroll
            for (int r = 1; r < PEER_MAX_RANKS; ++r)
                if (r < ndev) sum = make_float4(sum.x + parts[r].x, sum.y + parts[r].y, sum.z + parts[r].z,
                                                sum.w + parts[r].w);
            x4[i] = sum;
            squares += sum.x * sum.x + sum.y * sum.y + sum.z * sum.z + sum.w * sum.w;
        }
        if (!norm_weight) continue;
        const float inv = 1.0f / sqrtf(block_sum(squares) / (4 * H4) + eps);
        for (int h = threadIdx.x; h < H4; h += blockDim.x) {  // x4[i] as this thread wrote it just above
            const long long i = t * H4 + h;
            const float4 v = x4[i], w = reinterpret_cast<const float4*>(norm_weight)[h];
            reinterpret_cast<float4*>(xn)[i] = make_float4(w.x * (v.x * inv), w.y * (v.y * inv), w.z * (v.z * inv),
                                                           w.w * (v.w * inv));
        }
    }
    if (threadIdx.x == 0) mine->epoch[blockIdx.x] = epoch;
}
