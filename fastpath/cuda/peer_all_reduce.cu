// The all-reduce of a decode step's hidden state between the GPUs of one machine, through their peer memory (NVLink)
// in one kernel (fastpath/peer_all_reduce.py sets the buffers up).
//
// Every rank owns a buffer that the other ranks have mapped: flags, then two slots of data. Block b of each rank
// copies its share of x into its slot, tells every rank it has (a release store of its epoch into their flags),
// waits until every rank has told it the same (acquire loads), then reads its share of every rank's slot and sums
// them in rank order 0, 1, ... -- so every rank gets the same bits. A block only reads what the same block of the
// other ranks wrote, so blocks never wait for each other, only for their twins.
//
// Why two slots: rank r writes slot (epoch % 2) only after passing the barrier of epoch - 1, which each twin joins
// only after its previous all-reduce (epoch - 2, the same slot) has finished reading. The kernel is launched the
// ordinary way (no programmatic launch): it starts after all the work ahead of it in the stream has finished.
#include "common.cuh"

constexpr int PEER_MAX_RANKS = 8;
constexpr int PEER_MAX_BLOCKS = 32;
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

// x (n4 float4s) summed over the ndev ranks, in place. bases: every rank's buffer as mapped in this process.
// aborted: host memory the host sets when the group is torn down, so that a rank that has died cannot leave this
// kernel waiting for ever.
__global__ void __launch_bounds__(512)
peer_all_reduce(float* __restrict__ x, int n4, const unsigned long long* __restrict__ bases, int rank, int ndev,
                long long slot_bytes, const volatile int* aborted) {
    __shared__ unsigned shared_epoch;
    __shared__ const float4* slots[PEER_MAX_RANKS];
    PeerFlags* mine = reinterpret_cast<PeerFlags*>(bases[rank]);
    if (threadIdx.x == 0) shared_epoch = mine->epoch[blockIdx.x] + 1;
    __syncthreads();
    const unsigned epoch = shared_epoch;
    const long long offset = PEER_SLOTS_OFFSET + (epoch & 1) * slot_bytes;
    if (threadIdx.x < ndev) slots[threadIdx.x] = reinterpret_cast<const float4*>(bases[threadIdx.x] + offset);

    float4* x4 = reinterpret_cast<float4*>(x);
    float4* my_slot = reinterpret_cast<float4*>(bases[rank] + offset);
    const int first = blockIdx.x * blockDim.x + threadIdx.x, stride = gridDim.x * blockDim.x;
    for (int i = first; i < n4; i += stride) my_slot[i] = x4[i];
    __syncthreads();  // the block's copies happen before its release stores (release is cumulative)

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

    for (int i = first; i < n4; i += stride) {
        float4 parts[PEER_MAX_RANKS];
#pragma unroll
        for (int r = 0; r < PEER_MAX_RANKS; ++r)  // every load in flight before the first add
            if (r < ndev) parts[r] = __ldcg(slots[r] + i);
        float4 sum = parts[0];
#pragma unroll
        for (int r = 1; r < PEER_MAX_RANKS; ++r)
            if (r < ndev) sum = make_float4(sum.x + parts[r].x, sum.y + parts[r].y, sum.z + parts[r].z,
                                            sum.w + parts[r].w);
        x4[i] = sum;
    }
    if (threadIdx.x == 0) mine->epoch[blockIdx.x] = epoch;
}
