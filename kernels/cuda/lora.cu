// Multi-LoRA SGMV (Punica / S-LoRA style): every segment of every adapter in one shrink launch
// and one expand launch. The host cuts each segment into work items of at most LORA_ROWS
// consecutive rows; an item is four u64 words:
//   [0] A, f32 [rank × cols] (device pointer)
//   [1] B, f32 [out_dim × rank] (device pointer; row n is output n's rank values, read by one
//       thread with 16-byte loads when rank % 4 == 0: no transpose on upload)
//   [2] first row | (end row << 32)
//   [3] rank | (f32 bits of scaling << 32)
// t is scratch [items × LORA_ROWS × t_stride]: item i's row r at (i · LORA_ROWS + r) · t_stride.

#define LORA_ROWS 8
#define LORA_WARPS 8
#define LORA_MAX_RANK 512
#define LORA_EXPAND_THREADS 256

// t[item, r, j] = A[j] · x[row0 + r]: one block per (item, j), its LORA_WARPS warps splitting the
// columns (16-byte loads when cols % 4 == 0), then a block reduction in a fixed order. A decode
// step's shrink is a few hundred short dot products: spreading each over a block keeps its latency
// to one pass over the columns (one warp per dot product left a 4096-column shrink 128 dependent
// loads deep and the GPU nearly empty).
// grid = (items, max_rank), LORA_WARPS · 32 threads.
extern "C" __global__ void __launch_bounds__(LORA_WARPS * 32)
lora_shrink(const unsigned long long* __restrict__ items, const float* __restrict__ x,
            float* __restrict__ t, int cols, int t_stride) {
    __shared__ float red[LORA_ROWS][LORA_WARPS];
    const unsigned long long* it = items + 4 * (size_t)blockIdx.x;
    const int rank = (int)(u32)it[3];
    const int j = blockIdx.y;
    if (j >= rank) return;  // block-uniform
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* a = (const float*)it[0] + (size_t)j * cols;
    const int row0 = (int)(u32)it[2];
    const int nrows = (int)(u32)(it[2] >> 32) - row0;
    const float* xb = x + (size_t)row0 * cols;
    float acc[LORA_ROWS];
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) acc[r] = 0.f;
    if ((cols & 3) == 0 && ((((size_t)x) | ((size_t)it[0])) & 15) == 0) {
        // Rows of A and x start at multiples of cols floats from aligned bases: 16-byte aligned.
        const int c4 = cols >> 2;
        const float4* a4 = (const float4*)a;
        for (int k = threadIdx.x; k < c4; k += LORA_WARPS * 32) {
            const float4 av = __ldg(a4 + k);
#pragma unroll
            for (int r = 0; r < LORA_ROWS; r++) {
                if (r < nrows) {
                    const float4 xv = *((const float4*)(xb + (size_t)r * cols) + k);
                    float v = acc[r];
                    v = fmaf(av.x, xv.x, v);
                    v = fmaf(av.y, xv.y, v);
                    v = fmaf(av.z, xv.z, v);
                    v = fmaf(av.w, xv.w, v);
                    acc[r] = v;
                }
            }
        }
    } else {
        for (int k = threadIdx.x; k < cols; k += LORA_WARPS * 32) {
            const float av = __ldg(a + k);
#pragma unroll
            for (int r = 0; r < LORA_ROWS; r++)
                if (r < nrows) acc[r] = fmaf(av, xb[(size_t)r * cols + k], acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) {
        if (r < nrows) {  // block-uniform: every lane shuffles
            const float v = warp_sum(acc[r]);
            if (lane == 0) red[r][warp] = v;
        }
    }
    __syncthreads();
    if (threadIdx.x < nrows) {
        const int r = threadIdx.x;
        float v = red[r][0];
        for (int w = 1; w < LORA_WARPS; w++) v += red[r][w];
        t[((size_t)blockIdx.x * LORA_ROWS + r) * t_stride + j] = v;
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
    const float* bn = (const float*)it[1] + (size_t)n * rank;
    float acc[LORA_ROWS];
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) acc[r] = 0.f;
    if ((rank & 3) == 0 && (((size_t)bn) & 15) == 0) {
        for (int j = 0; j < rank; j += 4) {
            const float4 b4 = __ldg((const float4*)(bn + j));
#pragma unroll
            for (int r = 0; r < LORA_ROWS; r++) {
                if (r < nrows) {
                    float a = acc[r];
                    a = fmaf(b4.x, ts[r][j], a);
                    a = fmaf(b4.y, ts[r][j + 1], a);
                    a = fmaf(b4.z, ts[r][j + 2], a);
                    a = fmaf(b4.w, ts[r][j + 3], a);
                    acc[r] = a;
                }
            }
        }
    } else {
        for (int j = 0; j < rank; j++) {
            const float bv = __ldg(bn + j);
#pragma unroll
            for (int r = 0; r < LORA_ROWS; r++)
                if (r < nrows) acc[r] = fmaf(bv, ts[r][j], acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < LORA_ROWS; r++) {
        if (r < nrows) {
            float* o = out + (size_t)(row0 + r) * out_dim + n;
            *o = __fadd_rn(*o, __fmul_rn(acc[r], scaling));
        }
    }
}
