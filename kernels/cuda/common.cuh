// Shared helpers, prepended to every module's source before NVRTC compiles it.
// NVRTC ships no headers, so f16 conversions are written as the PTX instructions themselves.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;

__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- Row operations shared by ops.cu and the fused int8 versions in qact.cu ----

// Sum over the block (blockDim.x a multiple of 32, ≤ 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = lane < nw ? part[lane] : 0.f;
    t = warp_sum(t);
    __syncthreads(); // part may be reused by a later call
    return t;
}

// out = x * rsqrt(mean(x^2) + eps) * w over one row of `cols`, by the whole block.
__device__ __forceinline__ void rms_norm_row(const float* __restrict__ xr, const float* __restrict__ w,
                                             float* __restrict__ orow, int cols, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) orow[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

// x += y, then out = x * rsqrt(mean(x^2) + eps) * w (the residual add and the next RMSNorm in one
// pass), by the whole block. Each thread re-reads only the elements of x it wrote itself, so no
// barrier is needed between the add and the scaling beyond block_sum's.
__device__ __forceinline__ void add_rms_norm_row(float* __restrict__ xr, const float* __restrict__ yr,
                                                 const float* __restrict__ w, float* __restrict__ orow,
                                                 int cols, float eps) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float v = __fadd_rn(xr[i], yr[i]);
        xr[i] = v;
        ss = fmaf(v, v, ss);
    }
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) orow[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

// silu(g) * u, silu(g) = g / (1 + exp(-g)).
__device__ __forceinline__ float silu_mul(float g, float u) {
    return __fmul_rn(g / (1.0f + expf(-g)), u);
}
