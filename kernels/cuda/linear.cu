// Linear layers: out[m × N] = x[m × K] · Wᵀ with W in INT4 (both Q4Kind variants), Q8_0 or f32,
// dequantized exactly as the CPU reference does, plus the embedding gather.
//
// Device layout (written by linear.rs, the same for every format): a row's K columns are padded
// to S = ceil(K / 1024) "steps" of 1024 columns, and rows to a multiple of GEMV_ROWS; padding
// holds zeros (zero scale, so it dequantizes to 0, and activations past K are never read). Inside
// a step, lane L (0..32) of a warp owns the columns 128·w + 4·L + e (window w = 0..8, e = 0..4):
// at every window the 32 lanes cover 128 consecutive columns, so the activation loads are one
// coalesced 512-byte float4 access and each lane's weights are one contiguous chunk.
//   * INT4 codes: u32 words [rowpad][S][32 lanes][4 words]; word j holds windows 2j and 2j+1,
//     nibble (w % 2)·4 + e of word w / 2 is column 128·w + 4·L + e (16 bytes per lane per step).
//   * INT4 metadata: u32 [rowpad][S][4][8]: entry [g][w] is block 4·w + g of the step
//     (lanes 8·g .. 8·g + 8 of window w are that block), low half the f16 scale d, high half the
//     zero point (ZeroPoint) or the f16 offset (Affine), i.e. BlockQ4's (d, m).
//   * Q8 codes: u32 words [rowpad][S][2 halves][32 lanes][4 words]: word j of half h holds the
//     four signed bytes of window 4·h + j (two coalesced 16-byte loads per lane per step).
//   * Q8 scales: u16 [rowpad][S][4][8], indexed as the INT4 metadata.
//   * f32: row-major [rowpad][S·1024].

#define STEP 1024
#define GEMV_ROWS 4
#define GEMV_WARPS 4

#define FMT_Q4ZP 0
#define FMT_Q4AF 1
#define FMT_Q8 2
#define FMT_F32 3

#define GM_BM 64
#define GM_BN 128
#define GM_BK 32

__device__ __forceinline__ u32 u4c(uint4 v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// 2^23 + q as a float: exact for q < 2^23, so subtracting 2^23 (+ z) gives q (- z) exactly.
__device__ __forceinline__ float magic_u(u32 q) { return __uint_as_float(0x4B000000u | q); }

// One INT4 weight: code q with the block's metadata word (d | m << 16).
template <int FMT>
__device__ __forceinline__ float deq4(u32 q, u32 dm) {
    const float d = h2f((u16)(dm & 0xFFFFu));
    if (FMT == FMT_Q4ZP) {
        // (q - z) * d: q - z is exact, so this is the reference's single rounding.
        const float zb = 8388608.0f + (float)(dm >> 16);
        return (magic_u(q) - zb) * d;
    } else {
        // d * q + m, unfused, as gguf-py and the CPU reference compute it.
        const float mo = h2f((u16)(dm >> 16));
        return __fadd_rn(__fmul_rn(d, magic_u(q) - 8388608.0f), mo);
    }
}

__device__ __forceinline__ float deq8(u32 word, int e, float d) {
    return (float)(int)(signed char)((word >> (8 * e)) & 0xFFu) * d;
}

// Four activations x[k .. k + 4] of one row, zero past K. `vec`: K % 4 == 0 and x 16-byte aligned.
__device__ __forceinline__ float4 load_x4(const float* __restrict__ xr, int k, int K, int vec) {
    float4 v;
    if (vec) {
        if (k < K) return *reinterpret_cast<const float4*>(xr + k);
        v.x = 0.f; v.y = 0.f; v.z = 0.f; v.w = 0.f;
        return v;
    }
    v.x = k < K ? xr[k] : 0.f;
    v.y = k + 1 < K ? xr[k + 1] : 0.f;
    v.z = k + 2 < K ? xr[k + 2] : 0.f;
    v.w = k + 3 < K ? xr[k + 3] : 0.f;
    return v;
}

// ---- GEMV (m ≤ 8): every weight byte read once for all m rows (MAXM bounds m) ----
// Block = GEMV_WARPS warps on GEMV_ROWS consecutive output rows; the warps split the steps, lanes
// the columns of a step; partial sums meet in shared memory. grid.x = rowpad / GEMV_ROWS.
template <int FMT, int MAXM>
__device__ __forceinline__ void gemv_impl(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                          const float* __restrict__ x, float* __restrict__ out,
                                          int N, int K, int S, int m, int xvec) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n0 = blockIdx.x * GEMV_ROWS;
    const int g = lane >> 3;
    float acc[MAXM][GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < MAXM; r++)
#pragma unroll
        for (int rr = 0; rr < GEMV_ROWS; rr++) acc[r][rr] = 0.f;

    for (int s = warp; s < S; s += GEMV_WARPS) {
        uint4 qa[GEMV_ROWS], qb[GEMV_ROWS], sa[GEMV_ROWS], sb[GEMV_ROWS];
#pragma unroll
        for (int rr = 0; rr < GEMV_ROWS; rr++) {
            const size_t rs = (size_t)(n0 + rr) * S + s;
            if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
                const uint4* qs = (const uint4*)wq_;
                const uint4* dm = (const uint4*)ws_;
                qa[rr] = __ldg(qs + rs * 32 + lane);
                sa[rr] = __ldg(dm + (rs * 4 + g) * 2);
                sb[rr] = __ldg(dm + (rs * 4 + g) * 2 + 1);
            } else if (FMT == FMT_Q8) {
                const uint4* qs = (const uint4*)wq_;
                const uint4* ds = (const uint4*)ws_;
                qa[rr] = __ldg(qs + (rs * 2) * 32 + lane);
                qb[rr] = __ldg(qs + (rs * 2 + 1) * 32 + lane);
                sa[rr] = __ldg(ds + rs * 4 + g);
            }
        }
#pragma unroll
        for (int w = 0; w < 8; w++) {
            float wv[GEMV_ROWS][4];
#pragma unroll
            for (int rr = 0; rr < GEMV_ROWS; rr++) {
                if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
                    const u32 word = u4c(qa[rr], w >> 1) >> ((w & 1) * 16);
                    const u32 dm = u4c(w < 4 ? sa[rr] : sb[rr], w & 3);
#pragma unroll
                    for (int e = 0; e < 4; e++) wv[rr][e] = deq4<FMT>((word >> (4 * e)) & 0xFu, dm);
                } else if (FMT == FMT_Q8) {
                    const u32 word = u4c(w < 4 ? qa[rr] : qb[rr], w & 3);
                    const u32 dw = u4c(sa[rr], w >> 1);
                    const float d = h2f((u16)((w & 1) ? (dw >> 16) : (dw & 0xFFFFu)));
#pragma unroll
                    for (int e = 0; e < 4; e++) wv[rr][e] = deq8(word, e, d);
                } else {
                    const float4* wf = (const float4*)wq_;
                    const float4 v =
                        __ldg(wf + (((size_t)(n0 + rr) * S + s) * STEP + w * 128) / 4 + lane);
                    wv[rr][0] = v.x;
                    wv[rr][1] = v.y;
                    wv[rr][2] = v.z;
                    wv[rr][3] = v.w;
                }
            }
            const int k = s * STEP + w * 128 + lane * 4;
#pragma unroll
            for (int r = 0; r < MAXM; r++) {
                if (r < m) {
                    const float4 xv = load_x4(x + (size_t)r * K, k, K, xvec);
#pragma unroll
                    for (int rr = 0; rr < GEMV_ROWS; rr++) {
                        float a = acc[r][rr];
                        a = fmaf(wv[rr][0], xv.x, a);
                        a = fmaf(wv[rr][1], xv.y, a);
                        a = fmaf(wv[rr][2], xv.z, a);
                        a = fmaf(wv[rr][3], xv.w, a);
                        acc[r][rr] = a;
                    }
                }
            }
        }
    }

    __shared__ float red[GEMV_WARPS][MAXM][GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < MAXM; r++) {
        if (r < m) {
#pragma unroll
            for (int rr = 0; rr < GEMV_ROWS; rr++) {
                const float v = warp_sum(acc[r][rr]);
                if (lane == 0) red[warp][r][rr] = v;
            }
        }
    }
    __syncthreads();
    const int t = threadIdx.x;
    if (t < MAXM * GEMV_ROWS) {
        const int r = t / GEMV_ROWS, rr = t % GEMV_ROWS, n = n0 + rr;
        if (r < m && n < N) {
            float v = red[0][r][rr];
#pragma unroll
            for (int w = 1; w < GEMV_WARPS; w++) v += red[w][r][rr];
            out[(size_t)r * N + n] = v;
        }
    }
}

// One kernel per format and per bound on m (1, 2, 4, 8): the accumulators are registers, and a
// smaller bound leaves room for more resident warps.
#define GEMV_Q(NAME, FMT, MT, ST)                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                   \
    NAME(const u32* qs, const ST* sc, const float* x, float* out, int N, int K, int S, int m,     \
         int xvec) {                                                                                \
        gemv_impl<FMT, MT>(qs, sc, x, out, N, K, S, m, xvec);                                       \
    }
#define GEMV_F(NAME, MT)                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                   \
    NAME(const float* w, const float* x, float* out, int N, int K, int S, int m, int xvec) {      \
        gemv_impl<FMT_F32, MT>(w, nullptr, x, out, N, K, S, m, xvec);                               \
    }
GEMV_Q(gemv_q4zp_m1, FMT_Q4ZP, 1, u32)
GEMV_Q(gemv_q4zp_m2, FMT_Q4ZP, 2, u32)
GEMV_Q(gemv_q4zp_m4, FMT_Q4ZP, 4, u32)
GEMV_Q(gemv_q4zp_m8, FMT_Q4ZP, 8, u32)
GEMV_Q(gemv_q4af_m1, FMT_Q4AF, 1, u32)
GEMV_Q(gemv_q4af_m2, FMT_Q4AF, 2, u32)
GEMV_Q(gemv_q4af_m4, FMT_Q4AF, 4, u32)
GEMV_Q(gemv_q4af_m8, FMT_Q4AF, 8, u32)
GEMV_Q(gemv_q8_m1, FMT_Q8, 1, u16)
GEMV_Q(gemv_q8_m2, FMT_Q8, 2, u16)
GEMV_Q(gemv_q8_m4, FMT_Q8, 4, u16)
GEMV_Q(gemv_q8_m8, FMT_Q8, 8, u16)
GEMV_F(gemv_f32_m1, 1)
GEMV_F(gemv_f32_m2, 2)
GEMV_F(gemv_f32_m4, 4)
GEMV_F(gemv_f32_m8, 8)

// ---- GEMM (larger m): 64 activation rows × 128 output rows per block, 32 columns per stage ----
// The weight tile is dequantized into shared memory once and used by all 64 rows. Thread
// (tx, ty) = (t % 16, t / 16) owns rows ty·4 .. +4 and output columns tx·4 .. +4, 64 + tx·4 .. +4.
// grid = (ceil(N / 128), ceil(m / 64)), 256 threads.

// 16 weights of output row n, block b (global), columns 32·b + 16·q .. +16.
template <int FMT>
__device__ __forceinline__ void gemm_wtile(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                           int n, int b, int q, int S, float v[16]) {
    const int s = b >> 5, bi = b & 31, w = bi >> 2, g = bi & 3;
    const size_t rs = (size_t)n * S + s;
    if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
        const u32* qs = (const u32*)wq_;
        const u32 dm = __ldg((const u32*)ws_ + (rs * 4 + g) * 8 + w);
#pragma unroll
        for (int l = 0; l < 4; l++) {
            const int L = 8 * g + 4 * q + l;
            const u32 word = __ldg(qs + (rs * 32 + L) * 4 + (w >> 1)) >> ((w & 1) * 16);
#pragma unroll
            for (int e = 0; e < 4; e++) v[4 * l + e] = deq4<FMT>((word >> (4 * e)) & 0xFu, dm);
        }
    } else if (FMT == FMT_Q8) {
        const u32* qs = (const u32*)wq_;
        const float d = h2f(__ldg((const u16*)ws_ + (rs * 4 + g) * 8 + w));
#pragma unroll
        for (int l = 0; l < 4; l++) {
            const int L = 8 * g + 4 * q + l;
            const u32 word = __ldg(qs + ((rs * 2 + (w >> 2)) * 32 + L) * 4 + (w & 3));
#pragma unroll
            for (int e = 0; e < 4; e++) v[4 * l + e] = deq8(word, e, d);
        }
    } else {
        const float4* wf = (const float4*)((const float*)wq_ + (size_t)n * S * STEP + b * 32 + q * 16);
#pragma unroll
        for (int l = 0; l < 4; l++) {
            const float4 f = __ldg(wf + l);
            v[4 * l] = f.x;
            v[4 * l + 1] = f.y;
            v[4 * l + 2] = f.z;
            v[4 * l + 3] = f.w;
        }
    }
}

template <int FMT>
__device__ __forceinline__ void gemm_impl(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                          const float* __restrict__ x, float* __restrict__ out,
                                          int N, int K, int S, int m) {
    __shared__ __align__(16) float xs[GM_BK][GM_BM + 4];
    __shared__ __align__(16) float wsm[GM_BK][GM_BN + 4];
    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int n0 = blockIdx.x * GM_BN, m0 = blockIdx.y * GM_BM;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.f;

    const int nb = (K + 31) >> 5;
    for (int b = 0; b < nb; b++) {
        {
            const int r = t >> 2, kq = (t & 3) * 8, row = m0 + r;
            const float* xr = x + (size_t)row * K;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int k = b * 32 + kq + j;
                xs[kq + j][r] = (row < m && k < K) ? xr[k] : 0.f;
            }
        }
        {
            const int rr = t >> 1, q = t & 1, n = n0 + rr;
            float v[16];
            if (n < N) {
                gemm_wtile<FMT>(wq_, ws_, n, b, q, S, v);
            } else {
#pragma unroll
                for (int i = 0; i < 16; i++) v[i] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < 16; i++) wsm[q * 16 + i][rr] = v[i];
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < GM_BK; kk++) {
            const float4 a = *reinterpret_cast<const float4*>(&xs[kk][ty * 4]);
            const float4 b0 = *reinterpret_cast<const float4*>(&wsm[kk][tx * 4]);
            const float4 b1 = *reinterpret_cast<const float4*>(&wsm[kk][64 + tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 8; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int row = m0 + ty * 4 + i;
        if (row < m) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int col = n0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + (j - 4));
                if (col < N) out[(size_t)row * N + col] = acc[i][j];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256)
gemm_q4zp(const u32* qs, const u32* dm, const float* x, float* out, int N, int K, int S, int m) {
    gemm_impl<FMT_Q4ZP>(qs, dm, x, out, N, K, S, m);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_q4af(const u32* qs, const u32* dm, const float* x, float* out, int N, int K, int S, int m) {
    gemm_impl<FMT_Q4AF>(qs, dm, x, out, N, K, S, m);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_q8(const u32* qs, const u16* d, const float* x, float* out, int N, int K, int S, int m) {
    gemm_impl<FMT_Q8>(qs, d, x, out, N, K, S, m);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_f32(const float* w, const float* x, float* out, int N, int K, int S, int m) {
    gemm_impl<FMT_F32>(w, nullptr, x, out, N, K, S, m);
}

// ---- Embedding gather: out[i × K] = row ids[i] dequantized (zeros for an id ≥ N) ----
// grid.x = n ids, block 256 threads striding the columns.
template <int FMT>
__device__ __forceinline__ float deq_at(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                        size_t n, int c, int S) {
    const int s = c >> 10, kk = c & 1023, w = kk >> 7, L = (kk & 127) >> 2, e = kk & 3, g = L >> 3;
    const size_t rs = n * S + s;
    if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
        const u32 word = ((const u32*)wq_)[(rs * 32 + L) * 4 + (w >> 1)];
        const u32 q = (word >> ((w & 1) * 16 + 4 * e)) & 0xFu;
        return deq4<FMT>(q, ((const u32*)ws_)[(rs * 4 + g) * 8 + w]);
    } else if (FMT == FMT_Q8) {
        const u32 word = ((const u32*)wq_)[((rs * 2 + (w >> 2)) * 32 + L) * 4 + (w & 3)];
        return deq8(word, e, h2f(((const u16*)ws_)[(rs * 4 + g) * 8 + w]));
    } else {
        return ((const float*)wq_)[n * S * STEP + c];
    }
}

template <int FMT>
__device__ __forceinline__ void gather_impl(const void* wq_, const void* ws_, const u32* ids, float* out,
                                            int N, int K, int S) {
    const u32 id = ids[blockIdx.x];
    float* o = out + (size_t)blockIdx.x * K;
    for (int c = threadIdx.x; c < K; c += blockDim.x)
        o[c] = id < (u32)N ? deq_at<FMT>(wq_, ws_, id, c, S) : 0.f;
}

extern "C" __global__ void gather_q4zp(const u32* qs, const u32* dm, const u32* ids, float* out, int N, int K, int S) {
    gather_impl<FMT_Q4ZP>(qs, dm, ids, out, N, K, S);
}
extern "C" __global__ void gather_q4af(const u32* qs, const u32* dm, const u32* ids, float* out, int N, int K, int S) {
    gather_impl<FMT_Q4AF>(qs, dm, ids, out, N, K, S);
}
extern "C" __global__ void gather_q8(const u32* qs, const u16* d, const u32* ids, float* out, int N, int K, int S) {
    gather_impl<FMT_Q8>(qs, d, ids, out, N, K, S);
}
extern "C" __global__ void gather_f32(const float* w, const u32* ids, float* out, int N, int K, int S) {
    gather_impl<FMT_F32>(w, nullptr, ids, out, N, K, S);
}
