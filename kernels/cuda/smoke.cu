// The smallest kernel: proves the toolchain (NVRTC, PTX load, launch, copies) end to end.
extern "C" __global__ void axpy_f32(float a, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = fmaf(a, x[i], y[i]);
}

extern "C" __global__ void f16_roundtrip(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = h2f(f2h(x[i]));
}
