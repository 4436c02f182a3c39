// Element-wise and row-wise operations of the forward pass, in f32, rounding as the CPU
// reference does (cpu/ops.rs): products and sums that the reference rounds separately are written
// with __fmul_rn / __fadd_rn so that --fmad=true cannot fuse them.

#define OPS_THREADS 256

// One block per row; the row arithmetic (rms_norm_row, add_rms_norm_row, silu_mul) lives in
// common.cuh, shared with the fused int8 versions in qact.cu.
extern "C" __global__ void rms_norm_rows(const float* __restrict__ x, const float* __restrict__ w,
                                         float* __restrict__ out, int cols, float eps) {
    rms_norm_row(x + (size_t)blockIdx.x * cols, w, out + (size_t)blockIdx.x * cols, cols, eps);
}

extern "C" __global__ void add_rms_norm_rows(float* __restrict__ x, const float* __restrict__ y,
                                             const float* __restrict__ w, float* __restrict__ out,
                                             int cols, float eps) {
    const size_t o = (size_t)blockIdx.x * cols;
    add_rms_norm_row(x + o, y + o, w, out + o, cols, eps);
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

// gate[i] = silu(gate[i]) * up[i].
extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        gate[i] = silu_mul(gate[i], up[i]);
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
