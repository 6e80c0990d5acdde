// Kernel ladder, step by step to the attention of batch-1 decode (attention.cu: attention + attention_combine).
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

// v2 is attention.cu's kernel with one split: a block per kv head serves its G query heads from one read of the
// keys and values (staged in shared memory 32 keys at a time), with an online softmax, so the scores never leave
// the chip. v3 is the same kernel with the keys split across blocks (flash-decoding) and attention_combine: at
// decode there are only Hkv kv heads, far fewer blocks than the GPU has multiprocessors, unless the keys are split.
