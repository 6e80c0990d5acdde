// Hopper's warpgroup product (wgmma.mma_async, sm_90a only) as wgmma_tiles.cu and its ladder step
// (ladder/prefill_wgmma.cu) issue it: a 64 x 256 x 16 bf16 product of the four warps of a warpgroup, A from registers
// (float32 activations split into bf16 hi + lo, mma.cuh) or from shared memory (bf16 activations), B from shared
// memory through a descriptor, float32 accumulators that stay in registers while the product runs.
#pragma once
#include "mma.cuh"

// d (64 x 256, f32) += a (64 x 16 bf16, from registers: each warp its 16 rows in mma.m16n8k16's A layout) x the
// 16 x 256 bf16 weights the descriptor points to. Asynchronous: the caller fences, commits and waits.
// d's layout per warp: d[4j .. 4j+3] = rows g, g, g+8, g+8 x columns 8j + c, 8j + c + 1 (as mma.m16n8k16).
#define WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])
#define WG_D WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56), WG_D8(64), \
             WG_D8(72), WG_D8(80), WG_D8(88), WG_D8(96), WG_D8(104), WG_D8(112), WG_D8(120)  // d's 128 operands
#define WG_D_OPERANDS /* the 128 accumulators' operands, %0 .. %127 */ \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                          \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                                \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                                \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "                                \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                                \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                                \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                    \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
__device__ __forceinline__ void wgmma_256(float (&d)[128], const unsigned (&a)[4], unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        WG_D_OPERANDS
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : WG_D
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
}
// The same product with the activations (A) also read from shared memory through a descriptor: bf16 activations
// (precision "bf16"), staged in the weights' swizzled layout, which need no registers and no split.
__device__ __forceinline__ void wgmma_256_shared(float (&d)[128], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        WG_D_OPERANDS
        "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : WG_D
        : "l"(a), "l"(b), "r"(1));
}
#undef WG_D_OPERANDS
#undef WG_D
#undef WG_D8

// The descriptor of a staged tile of rows x 16 k starting at ``tile``, rows of 64 bf16 (128 bytes) in the 128-byte
// swizzle (PTX ISA, "Matrix Descriptor"): start address and SBO (the next 8 rows, 1024 bytes) in 16-byte units,
// layout 128-byte swizzle (1 in bits 62-63). K-major with the 16 k inside one swizzled 128-byte row, the LBO is
// unused; each next 16 k of a row start 32 bytes further (descriptor + 2). The weights of wgmma_tiles.cu, and its
// bf16 activations.
__device__ __forceinline__ unsigned long long swizzled_descriptor(const unsigned char* tile) {
    const unsigned long long address = static_cast<unsigned>(__cvta_generic_to_shared(tile));
    return ((address & 0x3FFFF) >> 4) | (1ull << 16) | (static_cast<unsigned long long>(1024 >> 4) << 32) |
           (1ull << 62);
}

// Before a warpgroup's first wgmma after its registers were written; after issuing, to close a group; and to wait
// for this warp's groups.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int PENDING>  // wait until at most PENDING committed groups of this warp's products are still running
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory");
}
// Pins the accumulators where they are: without it the compiler may move their zeroing or a copy of them in between
// two wgmma still running on them, and ptxas then serializes every wgmma (its advisory C7515).
__device__ __forceinline__ void pin(float (&d)[128]) {
#pragma unroll
    for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

