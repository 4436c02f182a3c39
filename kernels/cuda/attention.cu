// Paged KV cache and decode/prefill attention (launchers: src/cuda/kv.rs and src/cuda/attention.rs).
//
// Storage mirrors cpu/kv.rs exactly: every per-page array is [page][layer][kv_head][slot][channel];
// a tile is one (page, layer, kv_head), index tile = (page * n_layers + layer) * n_kv + kv_head.
//   f32 / f16: K and V elements.
//   INT4 (sealed pages): packed codes [tile][slot][d/2] (byte j = channel j low nibble, channel
//   j + d/2 high nibble), key scale/min f16 per (tile, channel), value scale/min f16 per
//   (tile, slot). Open INT4 pages live in an f32 staging slot laid out like the CPU's staging copy:
//   [K|V][kv_head][slot][channel], slot index `stage` (-1: none).
//   Key bounds: f32 min/max per (tile, channel), +inf / -inf when empty.
//   Staging table: int per (page, layer) = staging slot + 1 (0: none), kept in stream order by
//   kv_write_rows / kv_seal_int4 / kv_reopen_int4 (and zeroed by the pool's free), so attention
//   looks staging up on the device at run time.
//
// Arithmetic that must be bit-identical to the CPU (quantization, dequantization, page bounds)
// uses the explicit __fmul_rn / __fadd_rn / __fdiv_rn intrinsics, which NVRTC never contracts
// into FMAs (the module is compiled with --fmad=true).

#define KV_F32 0
#define KV_F16 1
#define KV_INT4 2

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

// Per-row record of the attention meta array (see attention.rs), in ints.
#define ROW_INTS 8
#define SPARSE_INTS 8
#define WORK_INTS 3

struct KvStore {
    const float* kf;
    const float* vf;
    const u16* kh;
    const u16* vh;
    const u8* kq;
    const u8* vq;
    const u16* ksc;
    const u16* kmn;
    const u16* vsc;
    const u16* vmn;
    const float* stg;
    int dtype, n_layers, n_kv, ps, d;
};

__device__ __forceinline__ long long tile_index(int page, int layer, int kvh, int n_layers, int n_kv) {
    return ((long long)page * n_layers + layer) * n_kv + kvh;
}

__device__ __forceinline__ float dq4(u32 code, float scale, float min) {
    return __fadd_rn(__fmul_rn((float)code, scale), min);
}

// Channels j and j + d/2 (j < d/2) of token `slot` of (tile, kv head `kvh`), keys and values,
// decoded to f32 exactly as KvPool::rows_f32 does.
__device__ __forceinline__ void load_pair(const KvStore& s, long long tile, int kvh, int stage,
                                          int slot, int j, float& k0, float& k1, float& v0,
                                          float& v1) {
    const int d = s.d, half = d >> 1;
    if (s.dtype == KV_INT4) {
        if (stage >= 0) {
            const long long tile_len = (long long)s.n_kv * s.ps * d;
            const float* kr = s.stg + (long long)stage * 2 * tile_len + ((long long)kvh * s.ps + slot) * d;
            const float* vr = kr + tile_len;
            k0 = kr[j];
            k1 = kr[j + half];
            v0 = vr[j];
            v1 = vr[j + half];
        } else {
            const long long e = (tile * s.ps + slot) * half + j;
            const u32 kb = s.kq[e], vb = s.vq[e];
            const long long m = tile * d + j;
            k0 = dq4(kb & 15u, h2f(s.ksc[m]), h2f(s.kmn[m]));
            k1 = dq4(kb >> 4, h2f(s.ksc[m + half]), h2f(s.kmn[m + half]));
            const long long t = tile * s.ps + slot;
            const float vs = h2f(s.vsc[t]), vm = h2f(s.vmn[t]);
            v0 = dq4(vb & 15u, vs, vm);
            v1 = dq4(vb >> 4, vs, vm);
        }
    } else if (s.dtype == KV_F16) {
        const long long e = (tile * s.ps + slot) * d + j;
        k0 = h2f(s.kh[e]);
        k1 = h2f(s.kh[e + half]);
        v0 = h2f(s.vh[e]);
        v1 = h2f(s.vh[e + half]);
    } else {
        const long long e = (tile * s.ps + slot) * d + j;
        k0 = s.kf[e];
        k1 = s.kf[e + half];
        v0 = s.vf[e];
        v1 = s.vf[e + half];
    }
}

// ---------------------------------------------------------------------------------------------
// Pool maintenance

// Float min / max as integer atomics: order-independent, so the result equals the CPU's
// sequential min / max. The sign bit (not `v >= 0`) picks the path so -0.0 is handled.
__device__ __forceinline__ void atomic_min_f32(float* addr, float v) {
    if (__float_as_int(v) >= 0)
        atomicMin((int*)addr, __float_as_int(v));
    else
        atomicMax((unsigned int*)addr, __float_as_uint(v));
}

__device__ __forceinline__ void atomic_max_f32(float* addr, float v) {
    if (__float_as_int(v) >= 0)
        atomicMax((int*)addr, __float_as_int(v));
    else
        atomicMin((unsigned int*)addr, __float_as_uint(v));
}

// bmin[i] = +inf, bmax[i] = -inf for i < n (empty key bounds).
extern "C" __global__ void kv_fill_bounds(float* bmin, float* bmax, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        bmin[i] = __int_as_float(0x7f800000);
        bmax[i] = NEG_INF;
    }
}

// One block per row r: token r's keys and values (k, v: [rows][n_kv * d]) go to
// (rowinfo[3r] = page, rowinfo[3r+1] = slot) of `layer`; INT4 rows go to staging slot
// rowinfo[3r+2]. Widens the page's key bounds.
extern "C" __global__ void kv_write_rows(const float* k, const float* v, const int* rowinfo,
                                         float* kf, float* vf, u16* kh, u16* vh, float* stg,
                                         int* stage_tab, float* bmin, float* bmax, int dtype,
                                         int layer, int n_layers, int n_kv, int ps, int d) {
    const int r = blockIdx.x;
    const int page = rowinfo[3 * r], slot = rowinfo[3 * r + 1], stage = rowinfo[3 * r + 2];
    // Rows of one page write the same value.
    if (dtype == KV_INT4 && threadIdx.x == 0)
        stage_tab[(long long)page * n_layers + layer] = stage + 1;
    const int w = n_kv * d;
    for (int e = threadIdx.x; e < w; e += blockDim.x) {
        const int hd = e / d, c = e - hd * d;
        const float kx = k[(long long)r * w + e], vx = v[(long long)r * w + e];
        const long long tile = tile_index(page, layer, hd, n_layers, n_kv);
        atomic_min_f32(&bmin[tile * d + c], kx);
        atomic_max_f32(&bmax[tile * d + c], kx);
        if (dtype == KV_INT4) {
            const long long tile_len = (long long)n_kv * ps * d;
            float* base = stg + (long long)stage * 2 * tile_len;
            const long long off = ((long long)hd * ps + slot) * d + c;
            base[off] = kx;
            base[tile_len + off] = vx;
        } else if (dtype == KV_F16) {
            const long long o = (tile * ps + slot) * d + c;
            kh[o] = f2h(kx);
            vh[o] = f2h(vx);
        } else {
            const long long o = (tile * ps + slot) * d + c;
            kf[o] = kx;
            vf[o] = vx;
        }
    }
}

// Rounds x to f16 toward +inf (up) or -inf, saturating at the finite f16 range (kv.rs f16_round).
__device__ __forceinline__ u16 f16_round_dir(float x, bool up) {
    x = fminf(fmaxf(x, -65504.0f), 65504.0f);
    const u16 h = f2h(x);
    const float y = h2f(h);
    const bool neg = (h & 0x8000u) != 0;
    if (up && y < x) return neg ? (u16)(h - 1) : (u16)(h + 1);
    if (!up && y > x) {
        if (!neg) return (h & 0x7fffu) == 0 ? (u16)0x8001u : (u16)(h - 1);
        return (u16)(h + 1);
    }
    return h;
}

// kv.rs affine_params: f16 (min, scale) covering [lo, hi].
__device__ __forceinline__ void affine_params(float lo, float hi, u16& m, u16& s) {
    m = f16_round_dir(lo, false);
    s = f16_round_dir(__fdiv_rn(__fsub_rn(hi, h2f(m)), 15.0f), true);
}

// kv.rs quant: 4-bit code of x for x ~ code * s + m (NaN saturates to 0).
__device__ __forceinline__ u32 quant4(float x, float s, float m) {
    if (s > 0.0f) {
        float q = roundf(__fdiv_rn(__fsub_rn(x, m), s));
        q = fminf(fmaxf(q, 0.0f), 15.0f);  // fmaxf(NaN, 0) = 0
        return (u32)q;
    }
    return 0u;
}

// Seals one INT4 (page, layer): quantizes slots 0..n of staging slot `stage` (Int4Store::quantize).
// Grid: n_kv blocks (one kv head each). Dynamic shared memory: (2 d + 2 ps) floats.
extern "C" __global__ void kv_seal_int4(const float* stg, int stage, int* stage_tab, u8* kq,
                                        u8* vq, u16* ksc, u16* kmn, u16* vsc, u16* vmn, int page,
                                        int layer, int n_layers, int n_kv, int ps, int d, int n) {
    extern __shared__ float seal_sm[];
    // Only this launch reads `stage` (by argument): the page is sealed for later kernels.
    if (blockIdx.x == 0 && threadIdx.x == 0) stage_tab[(long long)page * n_layers + layer] = 0;
    if (n <= 0) return;
    const int hd = blockIdx.x;
    const int half = d >> 1;
    const long long tile = tile_index(page, layer, hd, n_layers, n_kv);
    const long long tile_len = (long long)n_kv * ps * d;
    const float* ks = stg + (long long)stage * 2 * tile_len + (long long)hd * ps * d;
    const float* vs = ks + tile_len;
    float* s_ksc = seal_sm;
    float* s_kmn = seal_sm + d;
    float* s_vsc = seal_sm + 2 * d;
    float* s_vmn = s_vsc + ps;
    // Keys: per-channel range across the page's tokens.
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float lo = ks[c], hi = ks[c];
        for (int r = 1; r < n; ++r) {
            const float x = ks[(long long)r * d + c];
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        u16 m, s;
        affine_params(lo, hi, m, s);
        kmn[tile * d + c] = m;
        ksc[tile * d + c] = s;
        s_kmn[c] = h2f(m);
        s_ksc[c] = h2f(s);
    }
    // Values: per-token range across the head's channels.
    for (int r = threadIdx.x; r < n; r += blockDim.x) {
        float lo = __int_as_float(0x7f800000), hi = NEG_INF;
        for (int c = 0; c < d; ++c) {
            const float x = vs[(long long)r * d + c];
            lo = fminf(lo, x);
            hi = fmaxf(hi, x);
        }
        u16 m, s;
        affine_params(lo, hi, m, s);
        vmn[tile * ps + r] = m;
        vsc[tile * ps + r] = s;
        s_vmn[r] = h2f(m);
        s_vsc[r] = h2f(s);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < n * half; idx += blockDim.x) {
        const int r = idx / half, j = idx - r * half;
        const float* kr = ks + (long long)r * d;
        const float* vr = vs + (long long)r * d;
        const u32 kb = quant4(kr[j], s_ksc[j], s_kmn[j]) |
                       (quant4(kr[j + half], s_ksc[j + half], s_kmn[j + half]) << 4);
        const u32 vb = quant4(vr[j], s_vsc[r], s_vmn[r]) | (quant4(vr[j + half], s_vsc[r], s_vmn[r]) << 4);
        const long long e = (tile * ps + r) * half + j;
        kq[e] = (u8)kb;
        vq[e] = (u8)vb;
    }
}

// Reopens a sealed INT4 (page, layer): slots 0..n of every kv head are dequantized into staging
// slot `stage` (KvPool::reopen). Grid: n_kv blocks.
extern "C" __global__ void kv_reopen_int4(const u8* kq, const u8* vq, const u16* ksc,
                                          const u16* kmn, const u16* vsc, const u16* vmn,
                                          float* stg, int* stage_tab, int stage, int page,
                                          int layer, int n_layers, int n_kv, int ps, int d, int n) {
    if (blockIdx.x == 0 && threadIdx.x == 0)
        stage_tab[(long long)page * n_layers + layer] = stage + 1;
    KvStore s;
    s.kf = 0; s.vf = 0; s.kh = 0; s.vh = 0;
    s.kq = kq; s.vq = vq; s.ksc = ksc; s.kmn = kmn; s.vsc = vsc; s.vmn = vmn;
    s.stg = stg;
    s.dtype = KV_INT4; s.n_layers = n_layers; s.n_kv = n_kv; s.ps = ps; s.d = d;
    const int hd = blockIdx.x, half = d >> 1;
    const long long tile = tile_index(page, layer, hd, n_layers, n_kv);
    const long long tile_len = (long long)n_kv * ps * d;
    float* kd = stg + (long long)stage * 2 * tile_len + (long long)hd * ps * d;
    float* vd = kd + tile_len;
    for (int idx = threadIdx.x; idx < n * half; idx += blockDim.x) {
        const int r = idx / half, j = idx - r * half;
        float k0, k1, v0, v1;
        load_pair(s, tile, hd, -1, r, j, k0, k1, v0, v1);
        kd[(long long)r * d + j] = k0;
        kd[(long long)r * d + j + half] = k1;
        vd[(long long)r * d + j] = v0;
        vd[(long long)r * d + j + half] = v1;
    }
}

// Reads token `slot` of (page, layer), every kv head, decoded to f32 (KvPool::read_token).
// One block; kout / vout: n_kv * d.
extern "C" __global__ void kv_read_token(const float* kf, const float* vf, const u16* kh,
                                         const u16* vh, const u8* kq, const u8* vq,
                                         const u16* ksc, const u16* kmn, const u16* vsc,
                                         const u16* vmn, const float* stg, int dtype, int page,
                                         int stage, int layer, int slot, int n_layers, int n_kv,
                                         int ps, int d, float* kout, float* vout) {
    KvStore s;
    s.kf = kf; s.vf = vf; s.kh = kh; s.vh = vh;
    s.kq = kq; s.vq = vq; s.ksc = ksc; s.kmn = kmn; s.vsc = vsc; s.vmn = vmn;
    s.stg = stg;
    s.dtype = dtype; s.n_layers = n_layers; s.n_kv = n_kv; s.ps = ps; s.d = d;
    const int half = d >> 1;
    for (int idx = threadIdx.x; idx < n_kv * half; idx += blockDim.x) {
        const int hd = idx / half, j = idx - hd * half;
        float k0, k1, v0, v1;
        load_pair(s, tile_index(page, layer, hd, n_layers, n_kv), hd, stage, slot, j, k0, k1, v0, v1);
        kout[hd * d + j] = k0;
        kout[hd * d + j + half] = k1;
        vout[hd * d + j] = v0;
        vout[hd * d + j + half] = v1;
    }
}

// ---------------------------------------------------------------------------------------------
// Query-aware page selection (cpu/attention.rs select_into), for the rows whose visible pages
// exceed the budget. Sparse record (SPARSE_INTS): row, C (candidates = pages 1..recent_start),
// k (candidates to keep), recent_start, bounds_off, mask_off, list_off, cap.
// A row's entries (meta + rows[0]) are its visible page ids, one int each.

#define BOUND_WARPS 8
#define BOUND_PAGES 32

// bounds[bounds_off + h * C + i] = page_bound(q_h, kmin, kmax) of candidate page 1 + i, with the
// CPU's summation order: lane (g, u) of a warp sums channels u, u + 8, ... of head g in order (the
// CPU's lane u), the three xor shuffles add lanes exactly as reduce8 pairs them (IEEE addition is
// commutative), then the tail. One warp per page, BOUND_PAGES / BOUND_WARPS pages per warp.
// The warp stages a page's key min / max in shared memory with 16-byte loads, one per lane and
// array (512 bytes per load instruction where lanes reading their own channels would bring 32),
// and when a page fits one chunk (d <= BOUND_CHUNK) it loads the next page's into registers
// while it sums the current one, so every warp keeps a page in flight.
// Grid: (S, ceil(Cmax / BOUND_PAGES), n_kv), 32 * BOUND_WARPS threads.
// Dynamic shared memory: G * (d + 8) + BOUND_WARPS * 2 * BOUND_CHUNK floats.
#define BOUND_CHUNK 128
#define BOUND_PER_WARP (BOUND_PAGES / BOUND_WARPS)
extern "C" __global__ void __launch_bounds__(32 * BOUND_WARPS)
attn_page_bounds(const float* q, const int* meta, int sp_off, const float* bmin, const float* bmax,
                 float* bounds, int layer, int n_layers, int n_kv, int d, int n_heads) {
    extern __shared__ float bq[];
    const int* sp = meta + sp_off + blockIdx.x * SPARSE_INTS;
    const int row = sp[0], C = sp[1];
    const int kv = blockIdx.z;
    const int G = n_heads / n_kv;
    const int qs = d + 8;
    const int i0 = blockIdx.y * BOUND_PAGES;
    if (i0 >= C) return;  // block-uniform, before the barrier
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int* ent = meta + meta[row * ROW_INTS];
    // Lane t < BOUND_PER_WARP holds the page id of the warp's t-th candidate (-1: none).
    int my_page = -1;
    {
        const int it = i0 + warp + BOUND_WARPS * lane;
        if (lane < BOUND_PER_WARP && it < C) my_page = ent[1 + it];
    }
    const float* qg = q + ((long long)row * n_heads + (long long)kv * G) * d;
    for (int e = threadIdx.x; e < G * d; e += blockDim.x) {
        const int g = e / d;
        bq[g * qs + (e - g * d)] = qg[e];
    }
    float* slo = bq + G * qs + warp * 2 * BOUND_CHUNK;  // this warp's staged min / max
    float* shi = slo + BOUND_CHUNK;
    const int d8 = d & ~7;
    const bool vec = (d & 3) == 0;          // rows 16-byte aligned
    const bool one = vec && d <= BOUND_CHUNK;  // a page is one chunk: prefetch whole pages
    const bool lv = 4 * lane < d;            // this lane loads in the one-chunk path
    float4 nlo = make_float4(0.f, 0.f, 0.f, 0.f), nhi = nlo;
    if (one && i0 + warp < C) {
        const int page = __shfl_sync(FULL_MASK, my_page, 0);
        const long long tile = tile_index(page, layer, kv, n_layers, n_kv);
        if (lv) {
            nlo = __ldg((const float4*)(bmin + tile * d) + lane);
            nhi = __ldg((const float4*)(bmax + tile * d) + lane);
        }
    }
    __syncthreads();  // the queries are staged
    float* outb = bounds + sp[4] + (long long)kv * G * C;
    for (int t = 0; t < BOUND_PER_WARP; ++t) {
        const int i = i0 + warp + BOUND_WARPS * t;
        if (i >= C) break;  // warp-uniform
        const int page = __shfl_sync(FULL_MASK, my_page, t);
        const long long tile = tile_index(page, layer, kv, n_layers, n_kv);
        const float* lo = bmin + tile * d;
        const float* hi = bmax + tile * d;
        if (one) {
            __syncwarp();  // the previous page's readers are done
            if (lv) {
                *(float4*)(slo + 4 * lane) = nlo;
                *(float4*)(shi + 4 * lane) = nhi;
            }
            __syncwarp();
            if (t + 1 < BOUND_PER_WARP && i + BOUND_WARPS < C) {  // warp-uniform
                const int np = __shfl_sync(FULL_MASK, my_page, t + 1);
                const long long nt = tile_index(np, layer, kv, n_layers, n_kv);
                if (lv) {
                    nlo = __ldg((const float4*)(bmin + nt * d) + lane);
                    nhi = __ldg((const float4*)(bmax + nt * d) + lane);
                }
            }
        }
        // Lane (g, u) of chain slot `base`: head g = (base + lane) / 8 (one slot for G <= 4).
        for (int base = 0; base < G * 8; base += 32) {  // warp-uniform
            const int chain = base + lane, g = chain >> 3, u = chain & 7;
            const bool valid = g < G;
            const float* qh = bq + (valid ? g : 0) * qs;
            float l = 0.0f;
            if (one) {
                if (valid) {
#pragma unroll 4
                    for (int c = u; c < d8; c += 8)
                        l = __fadd_rn(l, fmaxf(__fmul_rn(qh[c], slo[c]), __fmul_rn(qh[c], shi[c])));
                }
            } else {
                // Channels in increasing order, chunk by chunk: lane u's chain is c = u, u + 8, ...
                for (int c0 = 0; c0 < d8; c0 += BOUND_CHUNK) {
                    const int n = min(BOUND_CHUNK, d - c0);
                    __syncwarp();  // the previous chunk's readers are done
                    if (vec) {
                        if (4 * lane < n) {
                            *(float4*)(slo + 4 * lane) = __ldg((const float4*)(lo + c0) + lane);
                            *(float4*)(shi + 4 * lane) = __ldg((const float4*)(hi + c0) + lane);
                        }
                    } else {
                        for (int c = lane; c < n; c += 32) {
                            slo[c] = __ldg(lo + c0 + c);
                            shi[c] = __ldg(hi + c0 + c);
                        }
                    }
                    __syncwarp();
                    if (valid) {
                        const int cend = min(n, d8 - c0);
#pragma unroll 4
                        for (int c = u; c < cend; c += 8)
                            l = __fadd_rn(l, fmaxf(__fmul_rn(qh[c0 + c], slo[c]),
                                                   __fmul_rn(qh[c0 + c], shi[c])));
                    }
                }
            }
            l = __fadd_rn(l, __shfl_xor_sync(FULL_MASK, l, 4));
            l = __fadd_rn(l, __shfl_xor_sync(FULL_MASK, l, 1));
            l = __fadd_rn(l, __shfl_xor_sync(FULL_MASK, l, 2));
            if (valid && u == 0) {
                // Rust's f32 Sum starts from -0.0.
                float tail = -0.0f;
                for (int c = d8; c < d; ++c)
                    tail = __fadd_rn(tail, fmaxf(__fmul_rn(qh[c], lo[c]), __fmul_rn(qh[c], hi[c])));
                outb[(long long)g * C + i] = __fadd_rn(l, tail);
            }
        }
    }
}

// Orders floats as f32::total_cmp does.
__device__ __forceinline__ u32 ord_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

#define SEL_THREADS 1024

// cpu::attention::fmax_sel: the larger of a and b, b when a is NaN.
__device__ __forceinline__ float fmax_sel(float a, float b) { return (b > a || a != a) ? b : a; }

// The selection key of candidate i: its bound (nb = 1), or the group's bounds folded by fmax_sel in
// head order (nb = G heads, rows C apart: cpu::attention::group_bound).
__device__ __forceinline__ u32 sel_key(const float* b, int i, int C, int nb) {
    float v = b[i];
    for (int g = 1; g < nb; ++g) v = fmax_sel(v, b[(long long)g * C + i]);
    return ord_key(v);
}

// One block per (sparse row, query head h): sets bit (h % G) of masks[mask_off + kv * npages + p]
// for every page p the head keeps: page 0, pages recent_start.., and the k candidates with the
// largest bounds (ties: lower page index), found by an MSB radix select over total_cmp keys
// (shared-memory histograms, one warp-aggregated atomic per distinct digit per warp).
// With `shared` (SparseConfig::group_shared) one block per (sparse row, kv head) selects for the
// whole group by its heads' largest bound, and, since no other block adds pages to its kv head,
// writes the kept-page list itself (what attn_compact_pages does for per-head selection: page 0,
// the kept candidates in page order, the recent pages, each with all G bits; the count to
// counts[s * n_kv + kv]) without touching the masks.
// Grid: (S, shared ? n_kv : n_heads), SEL_THREADS threads. Dynamic shared memory: key_cap u32
// (keys cached when C <= key_cap, else recomputed from `bounds`).
extern "C" __global__ void attn_select_pages(const int* meta, int sp_off, const float* bounds,
                                             u32* masks, int* lists, int* counts, int n_heads,
                                             int n_kv, int key_cap, int shared) {
    extern __shared__ u32 skeys[];
    // Double-buffered: a pass clears the next pass's histogram while warp 0 scans its own, so a
    // pass needs two barriers.
    __shared__ u32 hist2[2][256];
    __shared__ u32 s_digit[2];
    __shared__ int s_rem[2];
    __shared__ int warp_cnt[SEL_THREADS / 32];
    __shared__ int warp_sel[SEL_THREADS / 32];
    const int* sp = meta + sp_off + blockIdx.x * SPARSE_INTS;
    const int row = sp[0], C = sp[1], k = sp[2], rs = sp[3], cap = sp[7];
    const int G = n_heads / n_kv;
    const int kv = shared ? (int)blockIdx.y : (int)blockIdx.y / G;
    const int h = shared ? kv * G : (int)blockIdx.y;  // the first head whose bounds are read
    const int nb = shared ? G : 1;
    const u32 bit = shared ? (G >= 32 ? FULL_MASK : (1u << G) - 1u) : 1u << (h - kv * G);
    const int npages = meta[row * ROW_INTS + 1];
    u32* mask = masks + sp[5] + (long long)kv * npages;
    const float* b = bounds + sp[4] + (long long)h * C;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kk = k > 0 ? k : 0;  // candidates kept (C > k: the row has more pages than its budget)
    int* list = lists + sp[6] + (long long)kv * cap * 2;
    if (shared) {
        // List: page 0, the kk kept candidates (written below), pages rs.. .
        if (tid == 0) {
            list[0] = 0;
            list[1] = (int)bit;
            const int n = 1 + kk + (npages - rs);
            counts[blockIdx.x * n_kv + kv] = n < cap ? n : cap;
        }
        for (int p = rs + tid; p < npages; p += SEL_THREADS) {
            const int pos = 1 + kk + (p - rs);
            if (pos < cap) {
                list[2 * pos] = p;
                list[2 * pos + 1] = (int)bit;
            }
        }
    } else {
        if (tid == 0) atomicOr(&mask[0], bit);
        for (int p = rs + tid; p < npages; p += SEL_THREADS) atomicOr(&mask[p], bit);
    }
    if (k <= 0) return;
    const bool cached = C <= key_cap;
    if (cached)
        for (int i = tid; i < C; i += SEL_THREADS) skeys[i] = sel_key(b, i, C, nb);

    u32 prefix = 0, pmask = 0;
    int rem = k;
    for (int i = tid; i < 256; i += SEL_THREADS) hist2[0][i] = 0;
    __syncthreads();  // hist2[0] clear, the cached keys written
    for (int shift = 24, pass = 0; shift >= 0; shift -= 8, ++pass) {
        u32* hist = hist2[pass & 1];
        for (int base = 0; base < C; base += SEL_THREADS) {  // block-uniform trip count
            const int i = base + tid;
            u32 dg = 256u;  // no digit
            if (i < C) {
                const u32 key = cached ? skeys[i] : sel_key(b, i, C, nb);
                if ((key & pmask) == prefix) dg = (key >> shift) & 255u;
            }
            const u32 peers = __match_any_sync(FULL_MASK, dg);
            if (dg < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[dg], (u32)__popc(peers));
        }
        __syncthreads();
        if (warp != 0) {
            // The next pass's histogram (last read by the previous pass's scan).
            for (int i = tid - 32; i < 256; i += SEL_THREADS - 32) hist2[(pass + 1) & 1][i] = 0;
        } else {
            // Lane L holds digits 255 - 8L down to 248 - 8L: lanes in descending digit order.
            u32 cnt[8];
            u32 tot = 0;
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                cnt[u] = hist[255 - 8 * lane - u];
                tot += cnt[u];
            }
            u32 inc = tot;
            for (int o = 1; o < 32; o <<= 1) {
                const u32 y = __shfl_up_sync(FULL_MASK, inc, o);
                if (lane >= o) inc += y;
            }
            const u32 exc = inc - tot;
            const bool hit = exc < (u32)rem && (u32)rem <= inc;
            const u32 ball = __ballot_sync(FULL_MASK, hit);
            if (lane == __ffs(ball) - 1) {
                u32 above = exc;
#pragma unroll
                for (int u = 0; u < 8; ++u) {
                    if (above + cnt[u] >= (u32)rem) {
                        s_digit[pass & 1] = 255u - 8u * lane - u;
                        s_rem[pass & 1] = rem - (int)above;
                        break;
                    }
                    above += cnt[u];
                }
            }
        }
        __syncthreads();
        prefix |= s_digit[pass & 1] << shift;
        pmask |= 255u << shift;
        rem = s_rem[pass & 1];
    }
    // Keys above the threshold `prefix` are all kept; of the keys equal to it, the first `rem` by
    // index (the CPU's tie order).
    // Shared: a kept candidate's list position is 1 + the kept candidates before it, i.e. the
    // keys above the threshold before it plus the first `rem` of the keys equal to it: both
    // block-wide prefix counts come from one barrier.
    const u32 below = (1u << lane) - 1u;
    int eq_seen = 0, gt_seen = 0;
    for (int base = 0; base < C; base += SEL_THREADS) {
        const int i = base + tid;
        const u32 key = i < C ? (cached ? skeys[i] : sel_key(b, i, C, nb)) : 0u;
        const bool gt = i < C && key > prefix;
        const bool eq = i < C && key == prefix;
        const u32 eb = __ballot_sync(FULL_MASK, eq), gb = __ballot_sync(FULL_MASK, gt);
        if (lane == 0) {
            warp_cnt[warp] = __popc(eb);
            warp_sel[warp] = __popc(gb);
        }
        __syncthreads();
        int eoff = 0, etot = 0, goff = 0, gtot = 0;
        for (int w = 0; w < SEL_THREADS / 32; ++w) {
            const int ce = warp_cnt[w], cg = warp_sel[w];
            if (w < warp) {
                eoff += ce;
                goff += cg;
            }
            etot += ce;
            gtot += cg;
        }
        const int eq_before = eq_seen + eoff + __popc(eb & below);
        const bool keep = gt || (eq && eq_before < rem);
        if (keep) {
            if (!shared) {
                atomicOr(&mask[1 + i], bit);
            } else {
                const int gt_before = gt_seen + goff + __popc(gb & below);
                const int pos = 1 + gt_before + min(eq_before, rem);
                if (pos < cap) {
                    list[2 * pos] = 1 + i;
                    list[2 * pos + 1] = (int)bit;
                }
            }
        }
        eq_seen += etot;
        gt_seen += gtot;
        __syncthreads();
    }
}

// One block per (sparse row, kv head): the pages any head of the group keeps, ascending, as
// (page index, head mask) pairs at lists[list_off + kv * cap * 2]; their number in
// counts[s * n_kv + kv]. Clears the masks it reads, so the next layer's selection (same plan)
// starts from zero without a memset. Grid: (S, n_kv), SEL_THREADS threads.
extern "C" __global__ void attn_compact_pages(const int* meta, int sp_off, u32* masks,
                                              int* lists, int* counts, int n_kv) {
    __shared__ int warp_cnt[SEL_THREADS / 32];
    const int* sp = meta + sp_off + blockIdx.x * SPARSE_INTS;
    const int row = sp[0], cap = sp[7];
    const int npages = meta[row * ROW_INTS + 1];
    const int kv = blockIdx.y;
    u32* mask = masks + sp[5] + (long long)kv * npages;
    int* list = lists + sp[6] + (long long)kv * cap * 2;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int written = 0;
    for (int base = 0; base < npages; base += SEL_THREADS) {
        const int p = base + tid;
        const u32 m = p < npages ? mask[p] : 0u;
        if (m != 0u) mask[p] = 0u;
        const u32 ball = __ballot_sync(FULL_MASK, m != 0u);
        const int before = __popc(ball & ((1u << lane) - 1u));
        if (lane == 0) warp_cnt[warp] = __popc(ball);
        __syncthreads();
        int off = 0, total = 0;
        for (int w = 0; w < SEL_THREADS / 32; ++w) {
            const int c = warp_cnt[w];
            if (w < warp) off += c;
            total += c;
        }
        const int pos = written + off + before;
        if (m != 0u && pos < cap) {
            list[2 * pos] = p;
            list[2 * pos + 1] = (int)m;
        }
        written += total;
        __syncthreads();
    }
    if (tid == 0) counts[blockIdx.x * n_kv + kv] = written < cap ? written : cap;
}

// ---------------------------------------------------------------------------------------------
// Attention (flash-decoding with split-K).
//
// One block per (work item w, kv head): work item = (row, entries e0..e1). Entries are the row's
// visible page indices (dense) or its kv head's compacted kept-page list (sparse). The block
// decodes up to `ch` tokens at a time into shared memory (shared by every query head of the
// group); warp g < G owns query head kv * G + g and keeps its online-softmax state (max m, sum l,
// unnormalized accumulator; lane owns channels lane + 32 i). A row with one work item writes its
// output directly; otherwise partials go to `part` and attn_reduce merges them.
//
// INT4 decode (head_dim a multiple of 32): one thread per 16 code bytes of one token row (one
// 16-byte load: channels j..j+15 in the low nibbles, j+d/2.. in the high), scales by 16-byte
// loads; open pages' staging rows by float4. Everything else decodes pair by pair (load_pair).
// Staging slots come from the device table at run time.
//
// Rows of sK / sV are d + 4 floats: 16-byte aligned and, for d % 32 == 0, conflict-free float4
// reads by lane = token.
// Dynamic shared memory: 2 * ch * (d + 4) + G * d floats + 4 * ch + 4 * META_CAP ints.
#define ACC_MAX 8
// Entries of a work item whose page, staging slot, mask and length a block caches at a time.
#define META_CAP 64

// 8 f16 at p (16-byte aligned) to f32.
__device__ __forceinline__ void load_h8(const u16* p, float* f) {
    const uint4 r = *(const uint4*)p;
    const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = h2f((u16)(w[i] & 0xffffu));
        f[2 * i + 1] = h2f((u16)(w[i] >> 16));
    }
}

__device__ __forceinline__ void store16(float* dst, const float* v) {
#pragma unroll
    for (int m = 0; m < 4; ++m)
        *(float4*)(dst + 4 * m) = make_float4(v[4 * m], v[4 * m + 1], v[4 * m + 2], v[4 * m + 3]);
}

// Blocks of 32 max(G, 8) threads, up to 1024 (G <= 32): the bounds cap registers at 64, as
// (256, 4) did (ptxas gives byte-identical code), without refusing groups of more than 8 heads.
extern "C" __global__ void __launch_bounds__(1024, 1) attn_paged(
    const float* q, float* out, float* part, const int* meta, int work_off, int sp_off,
    const int* lists, const int* counts, const int* stage_tab, const float* kf, const float* vf,
    const u16* kh, const u16* vh, const u8* kq, const u8* vq, const u16* ksc, const u16* kmn,
    const u16* vsc, const u16* vmn, const float* stg, int dtype, int layer, int n_layers,
    int n_kv, int ps, int d, int n_heads, float scale, int ch, int n_work) {
    extern __shared__ float att_sm[];
    KvStore s;
    s.kf = kf; s.vf = vf; s.kh = kh; s.vh = vh;
    s.kq = kq; s.vq = vq; s.ksc = ksc; s.kmn = kmn; s.vsc = vsc; s.vmn = vmn;
    s.stg = stg;
    s.dtype = dtype; s.n_layers = n_layers; s.n_kv = n_kv; s.ps = ps; s.d = d;

    const int w = blockIdx.x, kv = blockIdx.y;
    const int* wk = meta + work_off + w * WORK_INTS;
    const int row = wk[0], e0 = wk[1];
    int e1 = wk[2];
    const int* rw = meta + row * ROW_INTS;
    const int* ent = meta + rw[0];
    const int npages = rw[1], ntok = rw[2], nw = rw[4], spi = rw[5];
    const int G = n_heads / n_kv;
    const int half = d >> 1;
    const int stride = d + 4;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const bool vec4 = (d & 3) == 0;
    const bool vdec = dtype == KV_INT4 && (half & 15) == 0;
    const long long tile_len = (long long)n_kv * ps * d;

    float* sK = att_sm;
    float* sV = sK + ch * stride;
    float* sQ = sV + ch * stride;
    int* sTokMask = (int*)(sQ + G * d);
    int* sTokPage = sTokMask + ch;
    int* sTokStage = sTokPage + ch;
    int* sTokSlot = sTokStage + ch;
    // The work item's entries, META_CAP at a time: page, staging slot, head mask, tokens. Read
    // once per window instead of per chunk (two dependent global loads off each chunk's path).
    int* sEnt = sTokSlot + ch;
    int win = -META_CAP;  // first entry of the cached window (block-uniform)

    const int* list = 0;
    if (spi >= 0) {
        const int* sp = meta + sp_off + spi * SPARSE_INTS;
        list = lists + sp[6] + (long long)kv * sp[7] * 2;
        const int cnt = counts[spi * n_kv + kv];
        if (cnt < e1) e1 = cnt;
    }
    const u32 full = G >= 32 ? FULL_MASK : ((1u << G) - 1u);
    const int last_len = npages > 0 ? ntok - (npages - 1) * ps : 0;

    const float* qg = q + ((long long)row * n_heads + (long long)kv * G) * d;
    for (int e = tid; e < G * d; e += blockDim.x) sQ[e] = qg[e];

    const bool active = warp < G;
    float m = NEG_INF, l = 0.0f;
    float acc[ACC_MAX];
#pragma unroll
    for (int i = 0; i < ACC_MAX; ++i) acc[i] = 0.0f;

    const int sc = ps < ch ? ps : ch;           // slots per page per chunk
    const int epc = ps < ch ? ch / ps : 1;      // entries (pages) per chunk
    const int nt = epc * sc;                    // tokens per chunk (<= ch <= 32)
    for (int e = e0; e < e1; e += epc) {
        if (e + epc > win + META_CAP) {  // block-uniform: the chunk's entries are not all cached
            __syncthreads();             // the previous window's readers are done
            win = e;
            for (int i = tid; i < META_CAP; i += blockDim.x) {
                const int ei = win + i;
                int pg = 0, st = -1, mk = 0, len = 0;
                if (ei < e1) {
                    int pi;
                    if (list) {
                        pi = list[2 * ei];
                        mk = list[2 * ei + 1];
                    } else {
                        pi = ei;
                        mk = (int)full;
                    }
                    len = pi == npages - 1 ? last_len : ps;
                    pg = ent[pi];
                    if (dtype == KV_INT4) st = stage_tab[(long long)pg * n_layers + layer] - 1;
                }
                sEnt[4 * i] = pg;
                sEnt[4 * i + 1] = st;
                sEnt[4 * i + 2] = mk;
                sEnt[4 * i + 3] = len;
            }
        }
        for (int s0 = 0; s0 < ps; s0 += sc) {
            __syncthreads();  // the previous chunk's readers are done (sQ, the window are loaded)
            if (tid < nt) {
                const int ei = e + tid / sc, slot = s0 + tid % sc;
                u32 mk = 0;
                int pg = 0, st = -1;
                if (ei < e1) {
                    const int* c = sEnt + 4 * (ei - win);
                    if (slot < c[3]) {
                        pg = c[0];
                        st = c[1];
                        mk = (u32)c[2];
                    }
                }
                sTokMask[tid] = (int)mk;
                sTokPage[tid] = pg;
                sTokStage[tid] = st;
                sTokSlot[tid] = slot;
            }
            __syncthreads();
            if (vdec) {
                const int qpt = half >> 4;  // 16-byte code groups per token row
                const int items = nt * qpt;
                for (int idx = tid; idx < 2 * items; idx += blockDim.x) {
                    const bool isv = idx >= items;
                    const int r = isv ? idx - items : idx;
                    const int t = r / qpt;
                    const int j0 = (r - t * qpt) << 4;
                    float* dst = (isv ? sV : sK) + t * stride + j0;
                    float v16[16];
                    if (sTokMask[t] == 0) {
#pragma unroll
                        for (int b = 0; b < 16; ++b) v16[b] = 0.0f;
                        store16(dst, v16);
                        store16(dst + half, v16);
                        continue;
                    }
                    const int st = sTokStage[t], slot = sTokSlot[t];
                    const long long tile = tile_index(sTokPage[t], layer, kv, n_layers, n_kv);
                    if (st >= 0) {
                        const float* src = stg + (long long)st * 2 * tile_len +
                                           (isv ? tile_len : 0) + ((long long)kv * ps + slot) * d + j0;
#pragma unroll
                        for (int hs = 0; hs < 2; ++hs) {
#pragma unroll
                            for (int mm = 0; mm < 4; ++mm) {
                                const float4 a = *(const float4*)(src + hs * half + 4 * mm);
                                v16[4 * mm] = a.x;
                                v16[4 * mm + 1] = a.y;
                                v16[4 * mm + 2] = a.z;
                                v16[4 * mm + 3] = a.w;
                            }
                            store16(dst + hs * half, v16);
                        }
                        continue;
                    }
                    const long long ce = (tile * ps + slot) * half + j0;
                    const uint4 raw = *(const uint4*)((isv ? vq : kq) + ce);
                    const u32 cw[4] = {raw.x, raw.y, raw.z, raw.w};
                    if (isv) {
                        const long long tt = tile * ps + slot;
                        const float vs = h2f(vsc[tt]), vm = h2f(vmn[tt]);
#pragma unroll
                        for (int hs = 0; hs < 2; ++hs) {
#pragma unroll
                            for (int bb = 0; bb < 16; ++bb) {
                                const u32 byte = (cw[bb >> 2] >> (8 * (bb & 3))) & 255u;
                                v16[bb] = dq4(hs ? (byte >> 4) : (byte & 15u), vs, vm);
                            }
                            store16(dst + hs * half, v16);
                        }
                    } else {
#pragma unroll
                        for (int hs = 0; hs < 2; ++hs) {
                            const long long mo = tile * d + j0 + hs * half;
                            float scl[16], mnv[16];
                            load_h8(ksc + mo, scl);
                            load_h8(ksc + mo + 8, scl + 8);
                            load_h8(kmn + mo, mnv);
                            load_h8(kmn + mo + 8, mnv + 8);
#pragma unroll
                            for (int bb = 0; bb < 16; ++bb) {
                                const u32 byte = (cw[bb >> 2] >> (8 * (bb & 3))) & 255u;
                                v16[bb] = dq4(hs ? (byte >> 4) : (byte & 15u), scl[bb], mnv[bb]);
                            }
                            store16(dst + hs * half, v16);
                        }
                    }
                }
            } else {
                for (int idx = tid; idx < nt * half; idx += blockDim.x) {
                    const int t = idx / half, j = idx - t * half;
                    float k0 = 0.0f, k1 = 0.0f, v0 = 0.0f, v1 = 0.0f;
                    if (sTokMask[t] != 0)
                        load_pair(s, tile_index(sTokPage[t], layer, kv, n_layers, n_kv), kv,
                                  sTokStage[t], sTokSlot[t], j, k0, k1, v0, v1);
                    sK[t * stride + j] = k0;
                    sK[t * stride + j + half] = k1;
                    sV[t * stride + j] = v0;
                    sV[t * stride + j + half] = v1;
                }
            }
            __syncthreads();
            if (active) {
                float sc_t = NEG_INF;
                if (lane < nt && ((((u32)sTokMask[lane]) >> warp) & 1u)) {
                    const float* kr = sK + lane * stride;
                    const float* qh = sQ + warp * d;
                    float dot;
                    if (vec4) {
                        float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma unroll 4
                        for (int c = 0; c < d; c += 4) {
                            const float4 kk = *(const float4*)(kr + c);
                            const float4 qq = *(const float4*)(qh + c);
                            d0 = fmaf(qq.x, kk.x, d0);
                            d1 = fmaf(qq.y, kk.y, d1);
                            d2 = fmaf(qq.z, kk.z, d2);
                            d3 = fmaf(qq.w, kk.w, d3);
                        }
                        dot = (d0 + d1) + (d2 + d3);
                    } else {
                        dot = 0.0f;
                        for (int c = 0; c < d; ++c) dot = fmaf(qh[c], kr[c], dot);
                    }
                    sc_t = dot * scale;
                }
                const float m_new = fmaxf(m, warp_max(sc_t));
                if (m_new != NEG_INF) {
                    const float corr = m == NEG_INF ? 0.0f : expf(m - m_new);
                    const float p = sc_t == NEG_INF ? 0.0f : expf(sc_t - m_new);
                    l = l * corr + warp_sum(p);
#pragma unroll
                    for (int i = 0; i < ACC_MAX; ++i) acc[i] *= corr;
                    // No branch on p: a masked token's row is zeros (or, masked for this head
                    // only, finite values times p = 0), and the unrolled loads pipeline.
#pragma unroll 4
                    for (int t = 0; t < nt; ++t) {
                        const float pt = __shfl_sync(FULL_MASK, p, t);
                        const float* vr = sV + t * stride;
#pragma unroll
                        for (int i = 0; i < ACC_MAX; ++i) {
                            const int c = lane + 32 * i;
                            if (c < d) acc[i] = fmaf(pt, vr[c], acc[i]);
                        }
                    }
                    m = m_new;
                }
            }
        }
    }
    if (!active) return;
    const int h = kv * G + warp;
    if (nw == 1) {
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float* o = out + ((long long)row * n_heads + h) * d;
#pragma unroll
        for (int i = 0; i < ACC_MAX; ++i) {
            const int c = lane + 32 * i;
            if (c < d) o[c] = acc[i] * inv;
        }
    } else {
        const long long pi = (long long)w * n_heads + h;
        float* pa = part + pi * d;
#pragma unroll
        for (int i = 0; i < ACC_MAX; ++i) {
            const int c = lane + 32 * i;
            if (c < d) pa[c] = acc[i];
        }
        if (lane == 0) {
            float* pm = part + (long long)n_work * n_heads * d;
            pm[pi] = m;
            pm[(long long)n_work * n_heads + pi] = l;
        }
    }
}

// Merges the partials of rows with several work items. Grid: (rows, n_heads), RED_THREADS
// threads. The block finds the partials' max and weighted sum in parallel (block reductions), then
// RED_THREADS / d slices of d threads each sum a strided share of the work items' accumulators,
// chunk by chunk with the chunk's weights exp(m_w - M) in shared memory, and the slices' sums
// meet in shared memory (slice order fixed: the result does not depend on scheduling).
#define RED_THREADS 1024

__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red, float* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = is_max ? warp_max(v) : warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float a = lane < (int)(blockDim.x >> 5) ? red[lane] : (is_max ? NEG_INF : 0.0f);
        a = is_max ? warp_max(a) : warp_sum(a);
        if (lane == 0) *out = a;
    }
    __syncthreads();
    return *out;
}

extern "C" __global__ void __launch_bounds__(RED_THREADS)
attn_reduce(const float* part, float* out, const int* meta, int n_work, int n_heads, int d) {
    __shared__ float red[RED_THREADS / 32];
    __shared__ float s_val[2];
    __shared__ float wts[RED_THREADS];
    __shared__ float sums[RED_THREADS];
    const int row = blockIdx.x, h = blockIdx.y;
    const int* rw = meta + row * ROW_INTS;
    const int w0 = rw[3], nw = rw[4];
    if (nw <= 1) return;  // block-uniform, before any barrier
    const int tid = threadIdx.x;
    const float* pm = part + (long long)n_work * n_heads * d;
    const float* pl = pm + (long long)n_work * n_heads;
    float M = NEG_INF;
    for (int w = tid; w < nw; w += RED_THREADS) M = fmaxf(M, pm[(long long)(w0 + w) * n_heads + h]);
    M = block_reduce(M, true, red, &s_val[0]);
    float L = 0.0f;
    for (int w = tid; w < nw; w += RED_THREADS) {
        const long long pi = (long long)(w0 + w) * n_heads + h;
        const float mw = pm[pi];
        if (mw != NEG_INF) L += pl[pi] * expf(mw - M);
    }
    L = block_reduce(L, false, red, &s_val[1]);
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;

    int slices = RED_THREADS / d;
    if (slices > 32) slices = 32;
    const int sl = tid / d, c = tid - sl * d;
    const bool active = sl < slices;
    float a0 = 0.0f, a1 = 0.0f;
    for (int base = 0; base < nw; base += RED_THREADS) {
        const int n = min(RED_THREADS, nw - base);
        if (tid < n) {
            const float mw = pm[(long long)(w0 + base + tid) * n_heads + h];
            wts[tid] = mw != NEG_INF ? expf(mw - M) : 0.0f;
        }
        __syncthreads();
        if (active) {
            int j = sl;
            for (; j + slices < n; j += 2 * slices) {
                const float* p0 = part + ((long long)(w0 + base + j) * n_heads + h) * d;
                const float* p1 = part + ((long long)(w0 + base + j + slices) * n_heads + h) * d;
                const float e0 = wts[j], e1 = wts[j + slices];
                if (e0 != 0.0f) a0 = fmaf(p0[c], e0, a0);
                if (e1 != 0.0f) a1 = fmaf(p1[c], e1, a1);
            }
            if (j < n && wts[j] != 0.0f)
                a0 = fmaf(part[((long long)(w0 + base + j) * n_heads + h) * d + c], wts[j], a0);
        }
        __syncthreads();
    }
    if (active) sums[tid] = a0 + a1;
    __syncthreads();
    float* o = out + ((long long)row * n_heads + h) * d;
    for (int cc = tid; cc < d; cc += RED_THREADS) {
        float a = sums[cc];
        for (int s2 = 1; s2 < slices; ++s2) a += sums[s2 * d + cc];
        o[cc] = a * inv;
    }
}
