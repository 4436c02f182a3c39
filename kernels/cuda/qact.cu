// Activations quantized to int8 per 32-column block on the device, as the CPU's `ActQ8::quantize`
// (kernels/src/cpu/act.rs) does it: d = max|x| / 127, q = round half away from zero of x · (1/d),
// s = d · Σq, and up to 16 outliers per row (|x| beyond 10× the row's mean magnitude without them,
// the largest kept, in column order) set aside exactly and taken as zeros in their blocks. The
// int8 GEMV (`gemvq_*` in linear.cu) consumes the result.
//
// Output layout for row r (KB = ceil(K / 32) blocks per row):
//   codes u32 [m][KB][8]: byte e of word w is column 4·w + e of the block (natural order);
//   ds    float2 [m][KB]: (d, s);
//   cnt   u32 [m]: outliers kept; ocol u32 [m][16], oval f32 [m][16]: their columns and values.
//
// One block per row; each thread quantizes whole blocks of 32 (a first version summed the row in
// the CPU's lane order on one warp and quantized a block per warp with shuffles: 9 µs for 4096
// columns and 26 µs for 14336 on an H100). The row's sums are tree sums here, so the outlier
// limit can differ from the CPU's in its last bits; a value within that rounding of the limit may
// then be classified differently. The fused kernels below quantize the row their op just wrote
// (RMSNorm, residual add + RMSNorm, SwiGLU), saving a launch per projection input: decode is
// host-bound, and a launch costs the host a few µs. Everything else — the outliers chosen
// for a given limit, every block's d, codes and s — is the CPU's arithmetic bit for bit
// (__fmul_rn / __fadd_rn / __fdiv_rn keep --fmad from contracting what the CPU rounds twice).

#define MAX_OUTLIERS 16
#define OUTLIER_FACTOR 10.0f

// Block-wide reduction of two values (every thread gets both): the sum of `a` and, with MAX, the
// maximum of `b`, else its sum. blockDim.x a multiple of 32.
template <bool MAX>
__device__ __forceinline__ float2 block_reduce2(float a, float b) {
    __shared__ float red[64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    a = warp_sum(a);
    b = MAX ? warp_max(b) : warp_sum(b);
    __syncthreads();  // red may still be read from a previous call
    if (lane == 0) {
        red[warp] = a;
        red[32 + warp] = b;
    }
    __syncthreads();
    a = lane < nw ? red[lane] : 0.f;
    b = lane < nw ? red[32 + lane] : 0.f;
    return make_float2(warp_sum(a), MAX ? warp_max(b) : warp_sum(b));
}

// A selection key: larger |x| first, then the earlier column (positive float bits order as
// unsigned integers).
__device__ __forceinline__ unsigned long long outlier_key(float v, int c) {
    return ((unsigned long long)__float_as_uint(fabsf(v)) << 32) | (unsigned long long)(0xFFFFFFFFu - (u32)c);
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long t = __shfl_xor_sync(0xffffffffu, v, o);
        v = t > v ? t : v;
    }
    return v;
}

// Quantizes row r (xr: its K values) by the whole block; every thread must call it. xr may have
// been written by this block just before (the first reduction's barrier orders it).
__device__ void quantize_row(const float* xr, int K, int KB, size_t r, u32* __restrict__ codes,
                             float2* __restrict__ ds, u32* __restrict__ cnt, u32* __restrict__ ocol,
                             float* __restrict__ oval) {
    __shared__ unsigned long long s_part[32];
    __shared__ unsigned long long s_pick;
    __shared__ int s_cols[MAX_OUTLIERS];
    __shared__ float s_vals[MAX_OUTLIERS];
    __shared__ int s_n;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    __syncthreads();  // the caller's writes of xr are visible to the whole block

    // The limit: the CPU's outlier_limit (its sums in tree order).
    float a = 0.f, mx = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float v = fabsf(xr[k]);
        a += v;
        mx = fmaxf(mx, v);
    }
    const float2 sm = block_reduce2<true>(a, mx);
    const float sum = sm.x;
    mx = sm.y;
    const float first = __fdiv_rn(__fmul_rn(OUTLIER_FACTOR, sum), (float)K);
    float limit = first;
    if (mx > first) {
        float b = 0.f, n = 0.f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            const float v = fabsf(xr[k]);
            if (v > first) {
                b += v;
                n += 1.f;
            }
        }
        // The count as a float sum: exact below 2^24 columns.
        const float2 bn = block_reduce2<false>(b, n);
        const int big_n = (int)bn.y;
        if (big_n > 0 && big_n < K)
            limit = __fdiv_rn(__fmul_rn(OUTLIER_FACTOR, fmaxf(__fadd_rn(sum, -bn.x), 0.f)),
                              (float)(K - big_n));
    }
    if (threadIdx.x == 0) s_n = 0;
    __syncthreads();

    // The (up to) 16 largest beyond the limit, one block-wide maximum per pick: keys are unique
    // and picked in decreasing order, so "not yet picked" is "below the last pick".
    if (limit > 0.f && mx > limit) {
        unsigned long long last = ~0ull;
        for (int i = 0; i < MAX_OUTLIERS; i++) {
            unsigned long long best = 0;
            for (int k = threadIdx.x; k < K; k += blockDim.x) {
                const float v = xr[k];
                if (fabsf(v) > limit) {
                    const unsigned long long key = outlier_key(v, k);
                    if (key < last && key > best) best = key;
                }
            }
            best = warp_max_u64(best);
            if (lane == 0) s_part[warp] = best;
            __syncthreads();
            if (threadIdx.x == 0) {
                unsigned long long b = 0;
                for (int w = 0; w < nw; w++) b = s_part[w] > b ? s_part[w] : b;
                s_pick = b;
                if (b != 0) {
                    const int c = (int)(0xFFFFFFFFu - (u32)(b & 0xFFFFFFFFull));
                    s_cols[s_n] = c;
                    s_vals[s_n] = xr[c];
                    s_n += 1;
                }
            }
            __syncthreads();
            last = s_pick;
            if (last == 0) break;
        }
        if (threadIdx.x == 0) {
            // Column order, as the CPU keeps them.
            for (int i = 1; i < s_n; i++) {
                const int c = s_cols[i];
                const float v = s_vals[i];
                int j = i - 1;
                while (j >= 0 && s_cols[j] > c) {
                    s_cols[j + 1] = s_cols[j];
                    s_vals[j + 1] = s_vals[j];
                    j--;
                }
                s_cols[j + 1] = c;
                s_vals[j + 1] = v;
            }
        }
        __syncthreads();
    }
    const int no = s_n;
    if (threadIdx.x < MAX_OUTLIERS) {
        const bool kept = (int)threadIdx.x < no;
        ocol[r * MAX_OUTLIERS + threadIdx.x] = kept ? (u32)s_cols[threadIdx.x] : 0u;
        oval[r * MAX_OUTLIERS + threadIdx.x] = kept ? s_vals[threadIdx.x] : 0.f;
    }
    if (threadIdx.x == 0) cnt[r] = (u32)no;

    // The blocks, one thread per block of 32: the CPU's quantize_block32 (no shuffles; the
    // outliers' columns taken as zeros).
    for (int kb = threadIdx.x; kb < KB; kb += blockDim.x) {
        const int k0 = kb * 32;
        float v[32];
        if (k0 + 32 <= K && (((size_t)(xr + k0)) & 15) == 0) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const float4 f = *reinterpret_cast<const float4*>(xr + k0 + 4 * j);
                v[4 * j] = f.x;
                v[4 * j + 1] = f.y;
                v[4 * j + 2] = f.z;
                v[4 * j + 3] = f.w;
            }
        } else {
#pragma unroll
            for (int j = 0; j < 32; j++) v[j] = k0 + j < K ? xr[k0 + j] : 0.f;
        }
        u32 zero = 0;
        for (int i = 0; i < no; i++) {
            const int c = s_cols[i] - k0;
            if (c >= 0 && c < 32) zero |= 1u << c;
        }
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 32; j++) {
            if (zero & (1u << j)) v[j] = 0.f;
            amax = fmaxf(amax, fabsf(v[j]));
        }
        const float d = __fdiv_rn(amax, 127.0f);
        const float id = d != 0.f ? fminf(__fdiv_rn(1.0f, d), 3.40282347e+38f) : 0.f;
        int isum = 0;
        u32 w[8];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            u32 word = 0;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float t = __fmul_rn(v[4 * j + e], id);
                const int qi = __float2int_rz(__fadd_rn(t, copysignf(0.5f, t)));
                isum += qi;
                word |= ((u32)qi & 0xFFu) << (8 * e);
            }
            w[j] = word;
        }
        const size_t blk = r * (size_t)KB + kb;
        uint4* cp = reinterpret_cast<uint4*>(codes + blk * 8);
        cp[0] = make_uint4(w[0], w[1], w[2], w[3]);
        cp[1] = make_uint4(w[4], w[5], w[6], w[7]);
        ds[blk] = make_float2(d, __fmul_rn(d, (float)isum));
    }
}

#define QA_OUT u32 *__restrict__ codes, float2 *__restrict__ ds, u32 *__restrict__ cnt, u32 *__restrict__ ocol, float *__restrict__ oval
#define QA_ARGS codes, ds, cnt, ocol, oval

// One block per row. x: [m][K].
extern "C" __global__ void quantize_rows(const float* __restrict__ x, int K, int KB, QA_OUT) {
    quantize_row(x + blockIdx.x * (size_t)K, K, KB, blockIdx.x, QA_ARGS);
}

// rms_norm_rows (ops.cu), then its output row quantized: one launch instead of two.
extern "C" __global__ void rms_norm_quantize(const float* __restrict__ x, const float* __restrict__ w,
                                             float* __restrict__ out, int cols, float eps, int KB,
                                             QA_OUT) {
    const size_t o = (size_t)blockIdx.x * cols;
    rms_norm_row(x + o, w, out + o, cols, eps);
    quantize_row(out + o, cols, KB, blockIdx.x, QA_ARGS);
}

// add_rms_norm_rows (ops.cu), then its output row quantized.
extern "C" __global__ void add_rms_norm_quantize(float* __restrict__ x, const float* __restrict__ y,
                                                 const float* __restrict__ w, float* __restrict__ out,
                                                 int cols, float eps, int KB, QA_OUT) {
    const size_t o = (size_t)blockIdx.x * cols;
    add_rms_norm_row(x + o, y + o, w, out + o, cols, eps);
    quantize_row(out + o, cols, KB, blockIdx.x, QA_ARGS);
}

// gate = silu(gate) · up over one row (ops.cu's swiglu, per row), then the row quantized.
extern "C" __global__ void swiglu_quantize(float* __restrict__ gate, const float* __restrict__ up,
                                           int cols, int KB, QA_OUT) {
    const size_t o = (size_t)blockIdx.x * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) gate[o + i] = silu_mul(gate[o + i], up[o + i]);
    quantize_row(gate + o, cols, KB, blockIdx.x, QA_ARGS);
}
