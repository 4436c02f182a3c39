// Multi-LoRA SGMV (Punica / S-LoRA style): every segment of every adapter in one shrink launch
// and one expand launch. The host cuts each segment into work items of at most LORA_ROWS
// consecutive rows; an item is four u64 words:
//   [0] A, f32 [rank × cols] (device pointer)
//   [1] Bᵀ, f32 [rank × out_dim] (device pointer; B transposed so the expand reads coalesce)
//   [2] first row | (end row << 32)
//   [3] rank | (f32 bits of scaling << 32)
// t is scratch [items × LORA_ROWS × t_stride]: item i's row r at (i · LORA_ROWS + r) · t_stride.

#define LORA_ROWS 8
#define LORA_WARPS 8
#define LORA_MAX_RANK 512
#define LORA_EXPAND_THREADS 256

// t[item, r, j] = A[j] · x[row0 + r]: one warp per (item, j), the lanes striding the columns.
// grid = (items, ceil(max_rank / LORA_WARPS)), LORA_WARPS · 32 threads.
extern "C" __global__ void __launch_bounds__(LORA_WARPS * 32)
lora_shrink(const unsigned long long* __restrict__ items, const float* __restrict__ x,
            float* __restrict__ t, int cols, int t_stride) {
    const unsigned long long* it = items + 4 * (size_t)blockIdx.x;
    const int rank = (int)(u32)it[3];
    const int j = blockIdx.y * LORA_WARPS + (threadIdx.x >> 5);
    if (j >= rank) return;
    const int lane = threadIdx.x & 31;
    const float* a = (const float*)it[0] + (size_t)j * cols;
    const int row0 = (int)(u32)it[2];
    const int nrows = (int)(u32)(it[2] >> 32) - row0;
    const float* xb = x + (size_t)row0 * cols;
    float acc[LORA_ROWS];
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) acc[r] = 0.f;
    for (int k = lane; k < cols; k += 32) {
        const float av = __ldg(a + k);
#pragma unroll
        for (int r = 0; r < LORA_ROWS; r++)
            if (r < nrows) acc[r] = fmaf(av, xb[(size_t)r * cols + k], acc[r]);
    }
    float* tb = t + (size_t)blockIdx.x * LORA_ROWS * t_stride + j;
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) {
        if (r < nrows) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) tb[(size_t)r * t_stride] = v;
        }
    }
}

// out[row0 + r, n] += scaling · Σ_j B[n, j] · t[item, r, j]: one thread per output column n.
// grid = (ceil(out_dim / 256), items), 256 threads.
extern "C" __global__ void __launch_bounds__(LORA_EXPAND_THREADS)
lora_expand(const unsigned long long* __restrict__ items, const float* __restrict__ t,
            float* __restrict__ out, int out_dim, int t_stride) {
    __shared__ float ts[LORA_ROWS][LORA_MAX_RANK];
    const unsigned long long* it = items + 4 * (size_t)blockIdx.y;
    const int rank = (int)(u32)it[3];
    const float scaling = __uint_as_float((u32)(it[3] >> 32));
    const int row0 = (int)(u32)it[2];
    const int nrows = (int)(u32)(it[2] >> 32) - row0;
    const float* tb = t + (size_t)blockIdx.y * LORA_ROWS * t_stride;
    for (int i = threadIdx.x; i < nrows * rank; i += blockDim.x) {
        const int r = i / rank, j = i - r * rank;
        ts[r][j] = tb[(size_t)r * t_stride + j];
    }
    __syncthreads();
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= out_dim) return;
    const float* bt = (const float*)it[1];
    float acc[LORA_ROWS];
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) acc[r] = 0.f;
    for (int j = 0; j < rank; j++) {
        const float bv = __ldg(bt + (size_t)j * out_dim + n);
#pragma unroll
        for (int r = 0; r < LORA_ROWS; r++)
            if (r < nrows) acc[r] = fmaf(bv, ts[r][j], acc[r]);
    }
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) {
        if (r < nrows) {
            float* o = out + (size_t)(row0 + r) * out_dim + n;
            *o = __fadd_rn(*o, __fmul_rn(acc[r], scaling));
        }
    }
}
