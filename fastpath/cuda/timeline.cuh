// The timeline of a captured step (``python -m qwen3moe bench --nvidia --timeline``; fastpath/timeline.py), compiled
// in only where QWEN3MOE_TIMELINE is defined (cuda_build.TIMELINE): included by common.cuh after the functions it
// wraps, never on its own.
//
// Why: inside a CUDA graph, with every kernel launched programmatically, the kernels of a step overlap, so timing each
// one alone (events around an eager launch) says little about what it adds to the step. Here every kernel's
// ``begin_after_previous()`` or ``wait_for_previous()`` also declares a BlockTimes, which records for each block (in
// thread 0) when the block started, when its wait for the kernel ahead ended and when it finished -- its destructor
// runs at whichever return the block takes -- from the GPU's global nanosecond timer (%globaltimer, 32 ns steps on an
// H200). The host tells the launches apart by the source line of that call and the grid.
#pragma once

// The host's record buffer (fastpath/timeline.py): word 0 counts the records, word 1 holds how many fit, and records
// of 4 words follow from word 2. Null (the default): nothing is recorded.
__device__ unsigned long long* qwen3moe_timeline;

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

struct BlockTimes {
    unsigned long long started, released;
    unsigned line;
    __device__ explicit BlockTimes(unsigned source_line) : started(global_ns()), released(0), line(source_line) {}
    __device__ void waited() { released = global_ns(); }
    __device__ ~BlockTimes() {
        unsigned long long* buffer = qwen3moe_timeline;
        if (buffer == nullptr || threadIdx.x != 0) return;
        const unsigned long long ended = global_ns(), i = atomicAdd(buffer, 1ull);
        if (i >= buffer[1]) return;  // full: the host sees the count past the room and says so
        unsigned long long* record = buffer + 2 + 4 * i;
        record[0] = line | static_cast<unsigned long long>(gridDim.x) << 16 | static_cast<unsigned long long>(gridDim.y)
                                                                                 << 40;
        record[1] = started, record[2] = released, record[3] = ended;
    }
};

// The calls the kernels make, now also timed. (A function-like macro is not expanded inside its own expansion, so the
// calls below are the functions of common.cuh.) Each expands to a declaration: it must stand at the kernel's
// outermost scope, so that the BlockTimes lives until the block ends.
#define begin_after_previous()               \
    BlockTimes block_times_(__LINE__);       \
    begin_after_previous();                  \
    block_times_.waited()
#define wait_for_previous()                  \
    BlockTimes block_times_(__LINE__);       \
    wait_for_previous();                     \
    block_times_.waited()
