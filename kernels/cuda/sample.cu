// Greedy and top-k selection over rows of logits, in the CPU sampler's order: descending by
// value, ties to the lower index, NaN ranked as -inf (so it never wins over a number).

#define ARGMAX_THREADS 1024
#define TOPK_THREADS 256
#define TOPK_PER_THREAD 16
#define TOPK_CHUNK (TOPK_THREADS * TOPK_PER_THREAD)
#define NO_INDEX 0xFFFFFFFFu

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float rank_key(float v) { return v != v ? neg_inf() : v; }

// Whether (v, i) ranks before (bv, bi).
__device__ __forceinline__ bool ranks_before(float v, u32 i, float bv, u32 bi) {
    return v > bv || (v == bv && i < bi);
}

// The best (v, i) of the block; every thread gets it. blockDim.x a multiple of 32, ≤ 1024.
__device__ __forceinline__ void block_best(float& v, u32& i) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ranks_before(ov, oi, v, i)) { v = ov; i = oi; }
    }
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = lane < nw ? sv[lane] : neg_inf();
    i = lane < nw ? si[lane] : NO_INDEX;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ranks_before(ov, oi, v, i)) { v = ov; i = oi; }
    }
    __syncthreads(); // sv / si are reused by the next call
}

// out[row] = index of the largest logit of the row (0 when nothing is above -inf, as the CPU).
// grid = rows, ARGMAX_THREADS threads.
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS)
argmax_rows(const float* __restrict__ logits, u32* __restrict__ out, int vocab) {
    const float* l = logits + (size_t)blockIdx.x * vocab;
    // (-inf, 0) loses to every number and, when the whole row is -inf / NaN, gives index 0.
    float bv = neg_inf();
    u32 bi = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = rank_key(l[i]);
        if (v > bv) { bv = v; bi = (u32)i; }
    }
    block_best(bv, bi);
    if (threadIdx.x == 0) out[blockIdx.x] = bi;
}

// One pass of top-k: block (c, row) takes candidates [c · CHUNK, (c + 1) · CHUNK) of the row —
// indices into the row's logits, the identity when cand_in is null, else cand_in[row × n_in + p]
// (NO_INDEX entries rank last) — and writes its k best, in rank order, to
// idx_out / val_out[(row × gridDim.x + c) × k + round]. Each round takes the best candidate that
// ranks after the previous round's pick. grid = (ceil(n_in / CHUNK), rows), TOPK_THREADS threads.
extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_chunk(const float* __restrict__ logits, int vocab, const u32* __restrict__ cand_in, int n_in,
           u32* __restrict__ idx_out, float* __restrict__ val_out, int k) {
    const float* l = logits + (size_t)blockIdx.y * vocab;
    float kv[TOPK_PER_THREAD];
    u32 ki[TOPK_PER_THREAD];
#pragma unroll
    for (int e = 0; e < TOPK_PER_THREAD; e++) {
        const int p = blockIdx.x * TOPK_CHUNK + e * TOPK_THREADS + threadIdx.x;
        u32 idx = NO_INDEX;
        if (p < n_in) idx = cand_in ? cand_in[(size_t)blockIdx.y * n_in + p] : (u32)p;
        ki[e] = idx;
        kv[e] = idx != NO_INDEX ? rank_key(l[idx]) : neg_inf();
    }
    float pv = 0.f;
    u32 pi = 0;
    u32* io = idx_out + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * k;
    float* vo = val_out + ((size_t)blockIdx.y * gridDim.x + blockIdx.x) * k;
    for (int round = 0; round < k; round++) {
        float bv = neg_inf();
        u32 bi = NO_INDEX;
#pragma unroll
        for (int e = 0; e < TOPK_PER_THREAD; e++) {
            const float v = kv[e];
            const u32 i = ki[e];
            const bool after = round == 0 || v < pv || (v == pv && i > pi);
            if (after && ranks_before(v, i, bv, bi)) { bv = v; bi = i; }
        }
        block_best(bv, bi);
        if (threadIdx.x == 0) {
            io[round] = bi;
            vo[round] = bi != NO_INDEX ? l[bi] : neg_inf();
        }
        pv = bv;
        pi = bi;
    }
}
