// Linear layers: out[m × N] = x[m × K] · Wᵀ with W in INT4 (both Q4Kind variants), Q8_0 or f32,
// dequantized exactly as the CPU reference does, plus the embedding gather.
//
// Device layout (written by linear.rs, the same shape for every format): rows are grouped in
// tiles of 32 (rows padded to a multiple of 32), columns in the 32-column blocks of the formats
// (K padded to KB = ceil(K / 32) blocks, no further padding). Inside a tile, lane L of a warp owns
// row 32·tile + L, and for each block the 32 lanes' data is contiguous, so a warp reading one
// block of its 32 rows issues fully coalesced 16-byte-per-lane loads. With tb = tile·KB + kb:
//   * INT4 codes: u32 [rowpad/32][KB][32 lanes][4 words]: nibble i of word j is column 8·j + i
//     of the block (one uint4 per lane per block).
//   * INT4 metadata: u32 [rowpad/32][KB][32 lanes]: d (f16) | zero point or f16 offset << 16.
//   * Q8 codes: u32 [rowpad/32][KB][2 halves][32 lanes][4 words]: byte e of word j of half h is
//     column 16·h + 4·j + e (two uint4 per lane per block).
//   * Q8 scales: u16 [rowpad/32][KB][32 lanes].
//   * f32: [rowpad/32][KB][8 quads][32 lanes][4]: quad c holds columns 4·c .. 4·c + 4.
// Padding rows hold zeros (zero scale and offset: they dequantize to 0). A partial last block keeps
// the format's codes past K (finite weights); the kernels read x there as 0, never from memory.

#define TILE_N 32

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

// One block (32 columns) of one row as loaded from the device layout.
struct WBlk {
    uint4 a, b;  // INT4: a = codes; Q8: a, b = halves 0 and 1
    u32 meta;    // INT4 metadata word, or the Q8 f16 scale
    float4 f[8]; // f32: the eight quads
};

template <int FMT>
__device__ __forceinline__ void load_blk(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                         size_t tb, int lane, WBlk& w) {
    if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
        w.a = __ldg((const uint4*)wq_ + tb * 32 + lane);
        w.meta = __ldg((const u32*)ws_ + tb * 32 + lane);
    } else if (FMT == FMT_Q8) {
        w.a = __ldg((const uint4*)wq_ + (tb * 2) * 32 + lane);
        w.b = __ldg((const uint4*)wq_ + (tb * 2 + 1) * 32 + lane);
        w.meta = (u32)__ldg((const u16*)ws_ + tb * 32 + lane);
    } else {
#pragma unroll
        for (int c = 0; c < 8; c++) w.f[c] = __ldg((const float4*)wq_ + (tb * 8 + c) * 32 + lane);
    }
}

// The four weights of quad c (columns 4·c .. 4·c + 4) of a loaded block.
template <int FMT>
__device__ __forceinline__ void deq_quad(const WBlk& w, int c, float v[4]) {
    if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
        const u32 word = u4c(w.a, c >> 1) >> ((c & 1) * 16);
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] = deq4<FMT>((word >> (4 * e)) & 0xFu, w.meta);
    } else if (FMT == FMT_Q8) {
        const u32 word = u4c(c < 4 ? w.a : w.b, c & 3);
        const float d = h2f((u16)w.meta);
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] = deq8(word, e, d);
    } else {
        v[0] = w.f[c].x;
        v[1] = w.f[c].y;
        v[2] = w.f[c].z;
        v[3] = w.f[c].w;
    }
}

// ---- GEMV (m ≤ 32): every weight byte read once for all m rows, in one launch ----
// Block = a tile of 32 output rows (lane L: row 32·blockIdx.x + L) and `blockDim.x / 32` ≤ GW
// warps splitting the KB column blocks round-robin. Per block each warp stages x[0..MAXM][32
// columns] in its slice of shared memory (zeros for rows ≥ m and columns ≥ K), then every lane
// dequantizes its row's 32 weights four at a time and multiplies them with the staged x
// (a broadcast read: all lanes load the same float4), accumulating MAXM sums in registers: each
// x value loaded serves the 32 rows of the warp, each weight the MAXM activation rows. The next
// block's weights are loaded before the current one is used. At the end the warps' partial sums
// meet in the same shared memory. grid.x = rowpad / 32.
template <int FMT, int MAXM, int GW>
__device__ __forceinline__ void gemv_impl(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                          const float* __restrict__ x, float* __restrict__ out,
                                          int N, int K, int KB, int m) {
    __shared__ __align__(16) float xs[GW][MAXM][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const size_t tile = blockIdx.x;
    float acc[MAXM];
#pragma unroll
    for (int r = 0; r < MAXM; r++) acc[r] = 0.f;
    float(*xw)[32] = xs[warp];

    // f32 blocks (32 registers each) are not prefetched: two would spill at 512 threads.
    WBlk cur;
    int kb = warp;
    if (FMT != FMT_F32 && kb < KB) load_blk<FMT>(wq_, ws_, tile * KB + kb, lane, cur);
    for (; kb < KB; kb += nw) {
        WBlk nxt;
        const int kn = kb + nw;
        if (FMT == FMT_F32) load_blk<FMT>(wq_, ws_, tile * KB + kb, lane, cur);
        else if (kn < KB) load_blk<FMT>(wq_, ws_, tile * KB + kn, lane, nxt);
        const int k = kb * 32 + lane;
#pragma unroll
        for (int r = 0; r < MAXM; r++) xw[r][lane] = (r < m && k < K) ? x[(size_t)r * K + k] : 0.f;
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 8; c++) {
            float wv[4];
            deq_quad<FMT>(cur, c, wv);
#pragma unroll
            for (int r = 0; r < MAXM; r++) {
                const float4 xv = *reinterpret_cast<const float4*>(&xw[r][4 * c]);
                float a = acc[r];
                a = fmaf(wv[0], xv.x, a);
                a = fmaf(wv[1], xv.y, a);
                a = fmaf(wv[2], xv.z, a);
                a = fmaf(wv[3], xv.w, a);
                acc[r] = a;
            }
        }
        __syncwarp();
        if (FMT != FMT_F32) cur = nxt;
    }

#pragma unroll
    for (int r = 0; r < MAXM; r++) xw[r][lane] = acc[r];
    __syncthreads();
    for (int t = threadIdx.x; t < MAXM * 32; t += blockDim.x) {
        const int r = t >> 5, l = t & 31;
        const int n = (int)tile * 32 + l;
        if (r < m && n < N) {
            float v = xs[0][r][l];
            for (int w = 1; w < nw; w++) v += xs[w][r][l];
            out[(size_t)r * N + n] = v;
        }
    }
}

// One kernel per format and per bound on m (1, 2, 4, 8, 12, 16, 24, 32): the accumulators are
// registers, and a smaller bound wastes no multiply on rows past m. GW (warps per block at most)
// is 16 up to 16 rows and 8 above (the shared memory holds GW · MAXM · 32 floats, ≤ 32 KB).
#define GEMV_Q(NAME, FMT, MT, GWN, ST)                                                             \
    extern "C" __global__ void __launch_bounds__(GWN * 32)                                         \
    NAME(const u32* qs, const ST* sc, const float* x, float* out, int N, int K, int KB, int m) {  \
        gemv_impl<FMT, MT, GWN>(qs, sc, x, out, N, K, KB, m);                                      \
    }
#define GEMV_F(NAME, MT, GWN)                                                                      \
    extern "C" __global__ void __launch_bounds__(GWN * 32)                                         \
    NAME(const float* w, const float* x, float* out, int N, int K, int KB, int m) {               \
        gemv_impl<FMT_F32, MT, GWN>(w, nullptr, x, out, N, K, KB, m);                              \
    }
#define GEMV_ALL(SUF, FMT, ST)                                                                     \
    GEMV_Q(gemv_##SUF##_m1, FMT, 1, 16, ST)                                                        \
    GEMV_Q(gemv_##SUF##_m2, FMT, 2, 16, ST)                                                        \
    GEMV_Q(gemv_##SUF##_m4, FMT, 4, 16, ST)                                                        \
    GEMV_Q(gemv_##SUF##_m8, FMT, 8, 16, ST)                                                        \
    GEMV_Q(gemv_##SUF##_m12, FMT, 12, 16, ST)                                                      \
    GEMV_Q(gemv_##SUF##_m16, FMT, 16, 16, ST)                                                      \
    GEMV_Q(gemv_##SUF##_m24, FMT, 24, 8, ST)                                                       \
    GEMV_Q(gemv_##SUF##_m32, FMT, 32, 8, ST)
GEMV_ALL(q4zp, FMT_Q4ZP, u32)
GEMV_ALL(q4af, FMT_Q4AF, u32)
GEMV_ALL(q8, FMT_Q8, u16)
GEMV_F(gemv_f32_m1, 1, 16)
GEMV_F(gemv_f32_m2, 2, 16)
GEMV_F(gemv_f32_m4, 4, 16)
GEMV_F(gemv_f32_m8, 8, 16)
GEMV_F(gemv_f32_m12, 12, 16)
GEMV_F(gemv_f32_m16, 16, 16)
GEMV_F(gemv_f32_m24, 24, 8)
GEMV_F(gemv_f32_m32, 32, 8)

// ---- INT4 GEMV, block-scaled, with split-K (the default INT4 path for m ≤ 32) ----
// The same layout and staging as gemv_impl, but the block's scale leaves the inner loop: each lane
// sums (q - z)·x (zero-point kind) or q·x (affine kind) over its row's 32 columns of the block and
// applies d (and m·Σx) once per block. A code becomes an exact float in one byte permute:
// prmt(codes & 0x0F0F0F0F, 0x4B000000) = 2^23 + q, and one subtraction of 2^23 (+ z) leaves q (- z)
// exactly, so the inner loop is about 3.3 instructions per weight instead of 9 (the per-weight
// dequantization of gemv_impl made it instruction-bound on an H100).
//
// grid = (rowpad / 32, S): with S > 1 split y takes column blocks [y·KB/S, (y+1)·KB/S) and leaves its
// partial sums in ws[y][m][rowpad]; the last split of a tile to finish (counted in cnt[tile],
// which it resets to 0) adds the S partials in split order and writes out: deterministic, one launch.
__device__ __forceinline__ float code_f(u32 bytes, u32 sel) {
    return __uint_as_float(__byte_perm(bytes, 0x4B000000u, sel));
}

// One column block of one row tile: acc[r] += the block's 32 weights of the lane's row · x[r]
// (xw: the block's activations, [MAXM][32], zeros past m and K), scaled once per block.
template <int FMT, int MAXM>
__device__ __forceinline__ void block4(const uint4 cur, const u32 cur_m, const float (*xw)[32],
                                       int lane, float acc[MAXM]) {
    float sx[MAXM];
    if (FMT == FMT_Q4AF) {
#pragma unroll
        for (int r = 0; r < MAXM; r++) sx[r] = warp_sum(xw[r][lane]);
    }
    // 2^23 + z (zero-point kind) or 2^23: subtracting it leaves q - z or q exactly.
    const float base = FMT == FMT_Q4ZP ? 8388608.0f + (float)(cur_m >> 16) : 8388608.0f;
    float sum[MAXM];
#pragma unroll
    for (int r = 0; r < MAXM; r++) sum[r] = 0.f;
    const u32 words[4] = {cur.x, cur.y, cur.z, cur.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        // Nibble i of word j is column 8j + i: even nibbles are the low halves of its bytes.
        const u32 lo = words[j] & 0x0F0F0F0Fu, hi = (words[j] >> 4) & 0x0F0F0F0Fu;
        float wv[8];
#pragma unroll
        for (int b = 0; b < 4; b++) {
            wv[2 * b] = code_f(lo, 0x7440u | b) - base;
            wv[2 * b + 1] = code_f(hi, 0x7440u | b) - base;
        }
#pragma unroll
        for (int r = 0; r < MAXM; r++) {
            const float4 xa = *reinterpret_cast<const float4*>(&xw[r][8 * j]);
            const float4 xb = *reinterpret_cast<const float4*>(&xw[r][8 * j + 4]);
            float a = sum[r];
            a = fmaf(wv[0], xa.x, a);
            a = fmaf(wv[1], xa.y, a);
            a = fmaf(wv[2], xa.z, a);
            a = fmaf(wv[3], xa.w, a);
            a = fmaf(wv[4], xb.x, a);
            a = fmaf(wv[5], xb.y, a);
            a = fmaf(wv[6], xb.z, a);
            a = fmaf(wv[7], xb.w, a);
            sum[r] = a;
        }
    }
    const float d = h2f((u16)(cur_m & 0xFFFFu));
    if (FMT == FMT_Q4ZP) {
#pragma unroll
        for (int r = 0; r < MAXM; r++) acc[r] = fmaf(sum[r], d, acc[r]);
    } else {
        const float mo = h2f((u16)(cur_m >> 16));
#pragma unroll
        for (int r = 0; r < MAXM; r++) acc[r] = fmaf(sum[r], d, fmaf(mo, sx[r], acc[r]));
    }
}

// The end of a block-scaled GEMV block: the warps' sums meet in `xs` (the block's activation
// staging, [GW][MAXM][32], each warp writing its own slice), then out (one split) or the split-K
// partials, the last split of the tile adding them in split order.
template <int MAXM>
__device__ __forceinline__ void finish4(float (*xs)[MAXM][32], const float acc[MAXM],
                                        float* __restrict__ out, float* __restrict__ part,
                                        u32* __restrict__ cnt, int N, int m) {
    __shared__ int s_last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const size_t tile = blockIdx.x;
    const int S = gridDim.y, split = blockIdx.y;
#pragma unroll
    for (int r = 0; r < MAXM; r++) xs[warp][r][lane] = acc[r];  // the warp's own staging slice
    __syncthreads();
    const int rowpad = (int)gridDim.x * 32;
    for (int t = threadIdx.x; t < MAXM * 32; t += blockDim.x) {
        const int r = t >> 5, l = t & 31;
        const int n = (int)tile * 32 + l;
        if (r < m) {
            float v = xs[0][r][l];
            for (int w = 1; w < nw; w++) v += xs[w][r][l];
            if (S == 1) {
                if (n < N) out[(size_t)r * N + n] = v;
            } else {
                part[((size_t)split * m + r) * rowpad + n] = v;
            }
        }
    }
    if (S == 1) return;
    // Split-K: the last of the tile's S blocks adds the partials (in split order) and writes out.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const u32 done = atomicAdd(&cnt[tile], 1u);
        s_last = done == (u32)(S - 1);
        if (s_last) cnt[tile] = 0u;  // ready for the next launch (stream order)
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int t = threadIdx.x; t < m * 32; t += blockDim.x) {
        const int r = t >> 5, l = t & 31;
        const int n = (int)tile * 32 + l;
        if (n < N) {
            float v = __ldcg(part + (size_t)r * rowpad + n);
            for (int y = 1; y < S; y++) v += __ldcg(part + ((size_t)y * m + r) * rowpad + n);
            out[(size_t)r * N + n] = v;
        }
    }
}

// The column blocks [kb0, kb1) of split y = blockIdx.y of S = gridDim.y.
__device__ __forceinline__ void split_range(int KB, int& kb0, int& kb1) {
    const int S = gridDim.y, y = blockIdx.y;
    kb0 = (int)(((long long)KB * y) / S);
    kb1 = (int)(((long long)KB * (y + 1)) / S);
}

// Register-prefetch version: each warp loads its next block into registers while it computes
// the current one; x staged per block in the warp's slice of shared memory.
template <int FMT, int MAXM, int GW>
__device__ __forceinline__ void gemv4_impl(const u32* __restrict__ wq, const u32* __restrict__ ws,
                                           const float* __restrict__ x, float* __restrict__ out,
                                           float* __restrict__ part, u32* __restrict__ cnt,
                                           int N, int K, int KB, int m) {
    __shared__ __align__(16) float xs[GW][MAXM][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const size_t tile = blockIdx.x;
    int kb0, kb1;
    split_range(KB, kb0, kb1);
    float acc[MAXM];
#pragma unroll
    for (int r = 0; r < MAXM; r++) acc[r] = 0.f;
    float(*xw)[32] = xs[warp];

    const uint4* cq = (const uint4*)wq + tile * KB * 32 + lane;
    const u32* cm = ws + tile * KB * 32 + lane;
    int kb = kb0 + warp;
    uint4 cur = make_uint4(0, 0, 0, 0);
    u32 cur_m = 0;
    if (kb < kb1) {
        cur = __ldg(cq + (size_t)kb * 32);
        cur_m = __ldg(cm + (size_t)kb * 32);
    }
    for (; kb < kb1; kb += nw) {
        const int kn = kb + nw;
        uint4 nxt = make_uint4(0, 0, 0, 0);
        u32 nxt_m = 0;
        if (kn < kb1) {
            nxt = __ldg(cq + (size_t)kn * 32);
            nxt_m = __ldg(cm + (size_t)kn * 32);
        }
        const int k = kb * 32 + lane;
#pragma unroll
        for (int r = 0; r < MAXM; r++) xw[r][lane] = (r < m && k < K) ? x[(size_t)r * K + k] : 0.f;
        __syncwarp();
        block4<FMT, MAXM>(cur, cur_m, xw, lane, acc);
        __syncwarp();
        cur = nxt;
        cur_m = nxt_m;
    }
    finish4<MAXM>(xs, acc, out, part, cnt, N, m);
}

// MINB: resident blocks per SM asked of the register allocator (4 × 512 threads fill an SM, so
// the 448 blocks of a 14336-row matrix run in one wave; without it the m = 1 kernel took 40
// registers, 3 blocks per SM. Measured on an H200: no faster, no slower.)
#define GEMV4(NAME, FMT, MT, GWN, MINB)                                                            \
    extern "C" __global__ void __launch_bounds__(GWN * 32, MINB)                                   \
    NAME(const u32* qs, const u32* dm, const float* x, float* out, float* part, u32* cnt, int N,   \
         int K, int KB, int m) {                                                                   \
        gemv4_impl<FMT, MT, GWN>(qs, dm, x, out, part, cnt, N, K, KB, m);                          \
    }
#define GEMV4_ALL(SUF, FMT)                                                                        \
    GEMV4(gemv4_##SUF##_m1, FMT, 1, 16, 4)                                                         \
    GEMV4(gemv4_##SUF##_m2, FMT, 2, 16, 3)                                                         \
    GEMV4(gemv4_##SUF##_m4, FMT, 4, 16, 2)                                                         \
    GEMV4(gemv4_##SUF##_m8, FMT, 8, 16, 1)                                                         \
    GEMV4(gemv4_##SUF##_m12, FMT, 12, 16, 1)                                                       \
    GEMV4(gemv4_##SUF##_m16, FMT, 16, 16, 1)                                                       \
    GEMV4(gemv4_##SUF##_m24, FMT, 24, 8, 1)                                                        \
    GEMV4(gemv4_##SUF##_m32, FMT, 32, 8, 1)
GEMV4_ALL(q4zp, FMT_Q4ZP)
GEMV4_ALL(q4af, FMT_Q4AF)


// ---- int8-activation GEMV (the fast mode, `--act int8`): dp4a over INT4 or Q8 weights ----
// x comes quantized by quantize_rows (qact.cu): per row and block 32 int8 codes in natural column
// order (8 u32), (d, s), and up to 16 outliers per row kept exact. Per block and row the lane
// forms its 32 weight codes as 8 words of 4 bytes in natural column order (INT4: the nibbles of a
// code word spread by two byte permutes; Q8: the stored words), and 8 dp4a give the integer dot
// product c·q exactly; then, as the CPU's q4q8 / q8q8 kernels: acc += dw·dx·Σcq + o·s with
// o = -z·dw (zero point), m (affine) or 0 (Q8). About 0.6 instructions per weight at m = 1 (the f32
// block-scaled kernel takes about 3.3). Outliers: split 0's warp 0 adds w[n][c]·v for each, the
// weight dequantized as the CPU's tile accessor does. Same grid, split-K and epilogue as gemv4.
template <int FMT>
__device__ __forceinline__ void codes8(const uint4 a, const uint4 b, u32 wv[8]) {
    if (FMT == FMT_Q8) {
        wv[0] = a.x; wv[1] = a.y; wv[2] = a.z; wv[3] = a.w;
        wv[4] = b.x; wv[5] = b.y; wv[6] = b.z; wv[7] = b.w;
    } else {
        const u32 words[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Byte i of lo / hi: columns 8j + 2i and 8j + 2i + 1.
            const u32 lo = words[j] & 0x0F0F0F0Fu, hi = (words[j] >> 4) & 0x0F0F0F0Fu;
            wv[2 * j] = __byte_perm(lo, hi, 0x5140);      // columns 8j .. 8j + 3
            wv[2 * j + 1] = __byte_perm(lo, hi, 0x7362);  // columns 8j + 4 .. 8j + 7
        }
    }
}

// Weight of the lane's row (tile row `lane`) at column c, dequantized as the CPU reference.
template <int FMT>
__device__ __forceinline__ float weight_at(const u32* __restrict__ wq, const void* __restrict__ ws,
                                           size_t tile, int KB, int lane, int c) {
    const size_t tb = tile * KB + (c >> 5);
    const int i = c & 31;
    if (FMT == FMT_Q8) {
        const u32 word = __ldg(wq + ((tb * 2 + (i >> 4)) * 32 + lane) * 4 + ((i >> 2) & 3));
        return deq8(word, i & 3, h2f(__ldg((const u16*)ws + tb * 32 + lane)));
    } else {
        const u32 word = __ldg(wq + (tb * 32 + lane) * 4 + (i >> 3));
        return deq4<FMT>((word >> (4 * (i & 7))) & 0xFu, __ldg((const u32*)ws + tb * 32 + lane));
    }
}

template <int FMT>
__device__ __forceinline__ void load_codes(const u32* __restrict__ wq, const void* __restrict__ ws,
                                           size_t tb, int lane, uint4& a, uint4& b, u32& meta) {
    if (FMT == FMT_Q8) {
        a = __ldg((const uint4*)wq + (tb * 2) * 32 + lane);
        b = __ldg((const uint4*)wq + (tb * 2 + 1) * 32 + lane);
        meta = (u32)__ldg((const u16*)ws + tb * 32 + lane);
    } else {
        a = __ldg((const uint4*)wq + tb * 32 + lane);
        b = make_uint4(0, 0, 0, 0);
        meta = __ldg((const u32*)ws + tb * 32 + lane);
    }
}

template <int FMT, int MAXM, int GW>
__device__ __forceinline__ void gemvq_impl(const u32* __restrict__ wq, const void* __restrict__ ws,
                                           const uint4* __restrict__ xq, const float2* __restrict__ xds,
                                           const u32* __restrict__ ocnt, const u32* __restrict__ ocol,
                                           const float* __restrict__ oval, float* __restrict__ out,
                                           float* __restrict__ part, u32* __restrict__ cnt, int N,
                                           int KB, int m) {
    __shared__ __align__(16) float xs[GW][MAXM][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const size_t tile = blockIdx.x;
    int kb0, kb1;
    split_range(KB, kb0, kb1);
    float acc[MAXM];
#pragma unroll
    for (int r = 0; r < MAXM; r++) acc[r] = 0.f;

    int kb = kb0 + warp;
    uint4 ca = make_uint4(0, 0, 0, 0), cb = ca;
    u32 cm = 0;
    if (kb < kb1) load_codes<FMT>(wq, ws, tile * KB + kb, lane, ca, cb, cm);
    for (; kb < kb1; kb += nw) {
        const int kn = kb + nw;
        uint4 na = make_uint4(0, 0, 0, 0), nb = na;
        u32 nm = 0;
        if (kn < kb1) load_codes<FMT>(wq, ws, tile * KB + kn, lane, na, nb, nm);
        u32 wv[8];
        codes8<FMT>(ca, cb, wv);
        const float dw = h2f((u16)(cm & 0xFFFFu));
        const float o = FMT == FMT_Q4ZP ? -(float)(cm >> 16) * dw
                        : (FMT == FMT_Q4AF ? h2f((u16)(cm >> 16)) : 0.f);
#pragma unroll
        for (int r = 0; r < MAXM; r++) {
            if (r < m) {
                const size_t xb = (size_t)r * KB + kb;
                const uint4 x0 = __ldg(xq + xb * 2), x1 = __ldg(xq + xb * 2 + 1);
                const float2 dx = __ldg(xds + xb);
                int s = 0;
                s = __dp4a((int)wv[0], (int)x0.x, s);
                s = __dp4a((int)wv[1], (int)x0.y, s);
                s = __dp4a((int)wv[2], (int)x0.z, s);
                s = __dp4a((int)wv[3], (int)x0.w, s);
                s = __dp4a((int)wv[4], (int)x1.x, s);
                s = __dp4a((int)wv[5], (int)x1.y, s);
                s = __dp4a((int)wv[6], (int)x1.z, s);
                s = __dp4a((int)wv[7], (int)x1.w, s);
                float a = acc[r];
                if (FMT != FMT_Q8) a = fmaf(o, dx.y, a);
                acc[r] = fmaf(dw * dx.x, (float)s, a);
            }
        }
        ca = na;
        cb = nb;
        cm = nm;
    }
    if (blockIdx.y == 0 && warp == 0) {
#pragma unroll
        for (int r = 0; r < MAXM; r++) {
            if (r < m) {
                const int no = (int)ocnt[r];
                for (int i = 0; i < no; i++) {
                    const int c = (int)ocol[r * 16 + i];
                    acc[r] = fmaf(weight_at<FMT>(wq, ws, tile, KB, lane, c), oval[r * 16 + i], acc[r]);
                }
            }
        }
    }
    finish4<MAXM>(xs, acc, out, part, cnt, N, m);
}

#define GEMVQ(NAME, FMT, MT, GWN, MINB)                                                            \
    extern "C" __global__ void __launch_bounds__(GWN * 32, MINB)                                   \
    NAME(const u32* qs, const void* meta, const uint4* xq, const float2* xds, const u32* ocnt,     \
         const u32* ocol, const float* oval, float* out, float* part, u32* cnt, int N, int KB,     \
         int m) {                                                                                  \
        gemvq_impl<FMT, MT, GWN>(qs, meta, xq, xds, ocnt, ocol, oval, out, part, cnt, N, KB, m);   \
    }
// MINB1: resident blocks per SM asked for the m = 1 kernel (Q8 keeps two uint4 per block and its
// prefetch in registers: 4 blocks of 512 threads (32 registers) would spill).
#define GEMVQ_ALL(SUF, FMT, MINB1)                                                                 \
    GEMVQ(gemvq_##SUF##_m1, FMT, 1, 16, MINB1)                                                     \
    GEMVQ(gemvq_##SUF##_m2, FMT, 2, 16, 3)                                                         \
    GEMVQ(gemvq_##SUF##_m4, FMT, 4, 16, 2)                                                         \
    GEMVQ(gemvq_##SUF##_m8, FMT, 8, 16, 1)                                                         \
    GEMVQ(gemvq_##SUF##_m16, FMT, 16, 16, 1)                                                       \
    GEMVQ(gemvq_##SUF##_m32, FMT, 32, 8, 1)
GEMVQ_ALL(q4zp, FMT_Q4ZP, 4)
GEMVQ_ALL(q4af, FMT_Q4AF, 4)
GEMVQ_ALL(q8, FMT_Q8, 3)


// ---- GEMM (larger m): 64 activation rows × 128 output rows per block, 32 columns per stage ----
// The weight tile is dequantized into shared memory once and used by all 64 rows. Thread
// (tx, ty) = (t % 16, t / 16) owns rows ty·4 .. +4 and output columns tx·4 .. +4, 64 + tx·4 .. +4.
// grid = (ceil(N / 128), ceil(m / 64)), 256 threads.

// 16 weights of output row n, block b, columns 16·q .. +16 of the block.
template <int FMT>
__device__ __forceinline__ void gemm_wtile(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                           int n, int b, int q, int KB, float v[16]) {
    const size_t tb = (size_t)(n >> 5) * KB + b;
    const int lane = n & 31;
    if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
        const u32* qs = (const u32*)wq_ + (tb * 32 + lane) * 4;
        const u32 dm = __ldg((const u32*)ws_ + tb * 32 + lane);
#pragma unroll
        for (int jj = 0; jj < 2; jj++) {
            const u32 word = __ldg(qs + 2 * q + jj);
#pragma unroll
            for (int i = 0; i < 8; i++) v[8 * jj + i] = deq4<FMT>((word >> (4 * i)) & 0xFu, dm);
        }
    } else if (FMT == FMT_Q8) {
        const uint4 c = __ldg((const uint4*)wq_ + (tb * 2 + q) * 32 + lane);
        const float d = h2f(__ldg((const u16*)ws_ + tb * 32 + lane));
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) v[4 * j + e] = deq8(u4c(c, j), e, d);
    } else {
#pragma unroll
        for (int l = 0; l < 4; l++) {
            const float4 f = __ldg((const float4*)wq_ + (tb * 8 + 4 * q + l) * 32 + lane);
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
                                          int N, int K, int KB, int m) {
    __shared__ __align__(16) float xs[GM_BK][GM_BM + 4];
    __shared__ __align__(16) float wsm[GM_BK][GM_BN + 4];
    const int t = threadIdx.x, tx = t & 15, ty = t >> 4;
    const int n0 = blockIdx.x * GM_BN, m0 = blockIdx.y * GM_BM;
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[i][j] = 0.f;

    for (int b = 0; b < KB; b++) {
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
                gemm_wtile<FMT>(wq_, ws_, n, b, q, KB, v);
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
gemm_q4zp(const u32* qs, const u32* dm, const float* x, float* out, int N, int K, int KB, int m) {
    gemm_impl<FMT_Q4ZP>(qs, dm, x, out, N, K, KB, m);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_q4af(const u32* qs, const u32* dm, const float* x, float* out, int N, int K, int KB, int m) {
    gemm_impl<FMT_Q4AF>(qs, dm, x, out, N, K, KB, m);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_q8(const u32* qs, const u16* d, const float* x, float* out, int N, int K, int KB, int m) {
    gemm_impl<FMT_Q8>(qs, d, x, out, N, K, KB, m);
}
extern "C" __global__ void __launch_bounds__(256)
gemm_f32(const float* w, const float* x, float* out, int N, int K, int KB, int m) {
    gemm_impl<FMT_F32>(w, nullptr, x, out, N, K, KB, m);
}

// ---- Embedding gather: out[i × K] = row ids[i] dequantized (zeros for an id ≥ N) ----
// grid.x = n ids, block 256 threads striding the columns.
template <int FMT>
__device__ __forceinline__ float deq_at(const void* __restrict__ wq_, const void* __restrict__ ws_,
                                        size_t n, int c, int KB) {
    const int kb = c >> 5, kk = c & 31, lane = (int)(n & 31);
    const size_t tb = (n >> 5) * KB + kb;
    if (FMT == FMT_Q4ZP || FMT == FMT_Q4AF) {
        const u32 word = ((const u32*)wq_)[(tb * 32 + lane) * 4 + (kk >> 3)];
        const u32 q = (word >> (4 * (kk & 7))) & 0xFu;
        return deq4<FMT>(q, ((const u32*)ws_)[tb * 32 + lane]);
    } else if (FMT == FMT_Q8) {
        const int h = kk >> 4, j = (kk >> 2) & 3, e = kk & 3;
        const u32 word = ((const u32*)wq_)[((tb * 2 + h) * 32 + lane) * 4 + j];
        return deq8(word, e, h2f(((const u16*)ws_)[tb * 32 + lane]));
    } else {
        return ((const float*)wq_)[((tb * 8 + (kk >> 2)) * 32 + lane) * 4 + (kk & 3)];
    }
}

template <int FMT>
__device__ __forceinline__ void gather_impl(const void* wq_, const void* ws_, const u32* ids, float* out,
                                            int N, int K, int KB) {
    const u32 id = ids[blockIdx.x];
    float* o = out + (size_t)blockIdx.x * K;
    for (int c = threadIdx.x; c < K; c += blockDim.x)
        o[c] = id < (u32)N ? deq_at<FMT>(wq_, ws_, id, c, KB) : 0.f;
}

extern "C" __global__ void gather_q4zp(const u32* qs, const u32* dm, const u32* ids, float* out, int N, int K, int KB) {
    gather_impl<FMT_Q4ZP>(qs, dm, ids, out, N, K, KB);
}
extern "C" __global__ void gather_q4af(const u32* qs, const u32* dm, const u32* ids, float* out, int N, int K, int KB) {
    gather_impl<FMT_Q4AF>(qs, dm, ids, out, N, K, KB);
}
extern "C" __global__ void gather_q8(const u32* qs, const u16* d, const u32* ids, float* out, int N, int K, int KB) {
    gather_impl<FMT_Q8>(qs, d, ids, out, N, K, KB);
}
extern "C" __global__ void gather_f32(const float* w, const u32* ids, float* out, int N, int K, int KB) {
    gather_impl<FMT_F32>(w, nullptr, ids, out, N, K, KB);
}
