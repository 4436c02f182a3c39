// Element-wise and row-wise operations of the forward pass, in f32, rounding as the CPU
// reference does (cpu/ops.rs): products and sums that the reference rounds separately are written
// with __fmul_rn / __fadd_rn so that --fmad=true cannot fuse them.

#define OPS_THREADS 256

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

// out[row] = x[row] * rsqrt(mean(x[row]^2) + eps) * w; one block per row.
extern "C" __global__ void rms_norm_rows(const float* __restrict__ x, const float* __restrict__ w,
                                         float* __restrict__ out, int cols, float eps) {
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* orow = out + (size_t)blockIdx.x * cols;
    float ss = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) orow[i] = __fmul_rn(__fmul_rn(xr[i], inv), w[i]);
}

// x[row] += y[row], then out[row] = x[row] * rsqrt(mean(x[row]^2) + eps) * w (the residual add and
// the next RMSNorm in one pass); one block per row. Each thread re-reads only the elements of x it
// wrote itself, so no barrier is needed between the add and the scaling beyond block_sum's.
extern "C" __global__ void add_rms_norm_rows(float* __restrict__ x, const float* __restrict__ y,
                                             const float* __restrict__ w, float* __restrict__ out,
                                             int cols, float eps) {
    float* xr = x + (size_t)blockIdx.x * cols;
    const float* yr = y + (size_t)blockIdx.x * cols;
    float* orow = out + (size_t)blockIdx.x * cols;
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

// NeoX rotary embedding in place: row r (n_heads × head_dim) at position pos[r]; dim i pairs with
// i + head_dim / 2. grid = (rows, ceil(n_heads · head_dim / 2 / 256)).
extern "C" __global__ void rope_rows(float* __restrict__ x, const u32* __restrict__ pos,
                                     const float* __restrict__ inv_freq, int n_heads, int head_dim,
                                     float mscale) {
    const int half = head_dim >> 1;
    const int idx = blockIdx.y * blockDim.x + threadIdx.x;
    if (idx >= n_heads * half) return;
    const int h = idx / half, i = idx - h * half;
    const float angle = __fmul_rn((float)pos[blockIdx.x], inv_freq[i]);
    float s, c;
    sincosf(angle, &s, &c);
    c = __fmul_rn(c, mscale);
    s = __fmul_rn(s, mscale);
    float* p = x + ((size_t)blockIdx.x * n_heads + h) * head_dim;
    const float a = p[i], b = p[i + half];
    p[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    p[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// gate[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)).
extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = gate[i];
        gate[i] = __fmul_rn(g / (1.0f + expf(-g)), up[i]);
    }
}

extern "C" __global__ void add_assign(float* __restrict__ x, const float* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] = x[i] + y[i];
}

// x[r × cols + c] += bias[c] for n = rows · cols elements.
extern "C" __global__ void add_bias_rows(float* __restrict__ x, const float* __restrict__ bias, int n, int cols) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        x[i] = x[i] + bias[i % cols];
}
