// mbarriers and the copy engine (TMA), sm_90: copies into shared memory that a thread issues and no thread waits
// for until it needs the bytes (PTX ISA: "mbarrier", "cp.async.bulk", "cp.async.bulk.tensor").
//
// An mbarrier is a 64-bit counter in shared memory that completes a phase once its expected arrivals have arrived and
// the bytes announced to it (``barrier_expect``) have landed; a waiter names the phase by its parity (0, 1, 0, ...).
// Used by wgmma_tiles.cu (weights staged through a tensor map) and linear.cu's ``linear_streamed`` (whole rows).
#pragma once

__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void barrier_init(unsigned long long* bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals) : "memory");
}
// After a thread's barrier_init calls, before it (or the threads it then meets at a __syncthreads) uses them: makes
// the initialised barriers visible to the copy engine, which completes them.
__device__ __forceinline__ void barriers_initialised() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// One arrival that also announces ``bytes`` of copies that will complete on the barrier.
__device__ __forceinline__ void barrier_expect(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void barrier_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
}
// Wait until the barrier's phase of parity ``parity`` has completed.
__device__ __forceinline__ void barrier_wait(unsigned long long* bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(shared_address(bar)), "r"(parity)
        : "memory");
}
// One arrival on ``bar`` once every cp.async this thread has issued so far has landed (counted in the barrier's
// arrivals: ``noinc``).
__device__ __forceinline__ void barrier_arrive_on_copies(unsigned long long* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(shared_address(bar)) : "memory");
}
// ``bytes`` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory, completing on ``bar``.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(shared_address(dst)), "l"(src), "r"(bytes), "r"(shared_address(bar)) : "memory");
}
// Before the copy engine writes shared memory that this thread's ordinary loads read last (a slot refilled): those
// reads are ordered before the copy's writes.
__device__ __forceinline__ void before_copy_overwrites() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// The box of the tensor map ``map`` at (k, row) to shared memory, completing on ``bar``; rows past the tensor: zeros.
__device__ __forceinline__ void tensor_copy(void* dst, const void* map, int k, int row, unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
        ::"r"(shared_address(dst)), "l"(map), "r"(k), "r"(row), "r"(shared_address(bar)) : "memory");
}
