// LayerNorm (sim/src/ops/layernorm.rs): one warp per row. Lane l sums chunks l, l+32,
// ... of the row sequentially (the contract's chunks of 32), the warp then runs the
// contract's tree over the chunk partials: the same bits as one thread doing it all.
// Each warp first copies its row(s) into shared memory (cp.async, 16 bytes a copy when
// the rows are 16-byte aligned), then every pass reads the staged row four elements at
// a time. Layout: chunk k keeps its 32 slots, rotated by whole groups of 4, so that both
// read patterns are free of bank conflicts: lane l reading group g of its chunk l (the
// sums: positions (g + l) mod 8 of 8 16-byte groups) and lanes reading consecutive groups
// (the output pass). f32 rows rotate by 4 k elements, BF16 rows (8-byte groups, 16 lanes
// a phase) by 4 (k / 2). The weights are staged once per block.
#define LN_EPS 1e-5f
#define LN_AT(i) (((i) & ~31u) | (((i) + 4u * ((i) >> 5)) & 31u))
#define LN16_AT(i) (((i) & ~31u) | (((i) + 4u * ((i) >> 6)) & 31u))

__device__ __forceinline__ float4 ln_ld4(const float* s, u32 i) { return *(const float4*)(s + LN_AT(i)); }
__device__ __forceinline__ float4 ln_ld4_bf16(const u16* s, u32 i) { return fp8train_bf16x4(*(const uint2*)(s + LN16_AT(i))); }

__device__ __forceinline__ void ln_cp_async(void* dst, const void* src, int bytes) {
    u32 d = (u32)__cvta_generic_to_shared(dst);
    if (bytes == 16) asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
    else if (bytes == 8) asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(d), "l"(src));
    else asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(d), "l"(src));
}
// Row `src` (c floats) into staged `dst` by `threads` threads from `t0`; `vec`: src is
// 16-byte aligned and c a multiple of 4. Every copy of the staged rows is in flight at
// once; ln_staged() waits for the calling thread's copies.
__device__ __forceinline__ void ln_stage(float* dst, const float* src, u32 c, u32 t0, u32 threads, bool vec) {
    if (vec) {
        for (u32 i = 4 * t0; i < c; i += 4 * threads) ln_cp_async(dst + LN_AT(i), src + i, 16);
    } else {
        for (u32 i = t0; i < c; i += threads) ln_cp_async(dst + LN_AT(i), src + i, 4);
    }
}
// A BF16 row by one warp: 8-byte copies when `vec`, else plain loads and stores.
__device__ __forceinline__ void ln_stage_bf16(u16* dst, const u16* src, u32 c, u32 lane, bool vec) {
    if (vec) {
        for (u32 i = 4 * lane; i < c; i += 128) ln_cp_async(dst + LN16_AT(i), src + i, 8);
    } else {
        for (u32 i = lane; i < c; i += 32) dst[LN16_AT(i)] = src[i];
    }
}
__device__ __forceinline__ void ln_staged() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// The contract's sums of chunk `ch` (elements ch * 32 up to c), in order: term4(i) gives
// the terms of elements i..i+3 (i a multiple of 4), term1(i) one term (a last chunk's
// tail when c is not a multiple of 4).
template <typename F4, typename F1>
__device__ __forceinline__ float ln_chunk_sum(u32 ch, u32 c, F4 term4, F1 term1) {
    float acc = 0.0f;
    u32 i = ch * 32, end = min(c, i + 32);
#pragma unroll 8
    for (; i + 4 <= end; i += 4) {
        float4 t = term4(i);
        acc = acc + t.x;
        acc = acc + t.y;
        acc = acc + t.z;
        acc = acc + t.w;
    }
    for (; i < end; i++) acc = acc + term1(i);
    return acc;
}
// The contract's sum over the row by the calling warp; `pa`/`pb`: this warp's shared
// scratch of (c + 31) / 32 floats each.
template <typename F4, typename F1>
__device__ float ln_warp_sum(u32 c, float* pa, float* pb, F4 term4, F1 term1) {
    u32 chunks = (c + 31) / 32;
    for (u32 ch = threadIdx.x & 31; ch < chunks; ch += 32) pa[ch] = ln_chunk_sum(ch, c, term4, term1);
    __syncwarp();
    return fp8train_warp_tree(pa, pb, (int)chunks);
}

// The dynamic shared memory of the layernorm kernels (one declaration for all of them:
// NVRTC warns when a template function declares it again).
extern __shared__ __align__(16) float ln_sh[];

// Dynamic shared memory, in floats (ln_cfg): the weights and the bias (32 chunks each)
// for the block, then per warp its staged row (32 chunks) and 2 chunks of scratch,
// rounded up to a multiple of 4. Nothing in the loops below waits on a global load.
// y is stored per `mode` (fp8train_act_store); amax collects max |y| for E4M3; xhat gets
// the normalized row in BF16 (what the backward pass reads). `vec`: x, w, b and y
// 16-byte aligned, xhat 8-byte aligned and c a multiple of 4.
extern "C" __global__ void layernorm_forward(void* y, int mode, const float* scale_p, unsigned long long* amax, u16* xhat,
                                             float* mean, float* rstd, const float* x, const float* w, const float* b,
                                             u32 n, u32 c, int vec) {
    float scale = fp8train_ld(scale_p);
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    u32 r = blockIdx.x * warps + warp;
    u32 chunks = (c + 31) / 32, per_warp = (34 * chunks + 3) & ~3u;
    float* sw = ln_sh;
    float* sb = sw + 32 * chunks;
    float* sx = sb + 32 * chunks + (size_t)warp * per_warp;
    float* pa = sx + 32 * chunks;
    float* pb = pa + chunks;
    bool live = r < n;
    ln_stage(sw, w, c, threadIdx.x, blockDim.x, vec);
    ln_stage(sb, b, c, threadIdx.x, blockDim.x, vec);
    if (live) ln_stage(sx, x + (size_t)r * c, c, lane, 32, vec);
    ln_staged();
    __syncthreads();
    if (!live) return;  // whole warps leave together: only warp-level syncs below
    float mu = ln_warp_sum(c, pa, pb, [&](u32 i) { return ln_ld4(sx, i); }, [&](u32 i) { return sx[LN_AT(i)]; }) /
               (float)c;
    auto sq = [&](float v) { float d = v - mu; return d * d; };
    float var = ln_warp_sum(
                    c, pa, pb,
                    [&](u32 i) {
                        float4 v = ln_ld4(sx, i);
                        return make_float4(sq(v.x), sq(v.y), sq(v.z), sq(v.w));
                    },
                    [&](u32 i) { return sq(sx[LN_AT(i)]); }) /
                (float)c;
    float s = 1.0f / sqrtf(var + LN_EPS);
    size_t row = (size_t)r * c;
    u32 am = 0;
    if (vec) {
#pragma unroll 2
        for (u32 i = 4 * lane; i < c; i += 128) {
            float4 xv = ln_ld4(sx, i), wv = ln_ld4(sw, i), bv = ln_ld4(sb, i);
            float4 h = make_float4((xv.x - mu) * s, (xv.y - mu) * s, (xv.z - mu) * s, (xv.w - mu) * s);
            float v[4] = {h.x * wv.x + bv.x, h.y * wv.y + bv.y, h.z * wv.z + bv.z, h.w * wv.w + bv.w};
            fp8train_act_store4(y, mode, scale, row + i, v, am);
            *(uint2*)(xhat + row + i) = fp8train_to_bf16x4(h.x, h.y, h.z, h.w);
        }
    } else {
        for (u32 i = lane; i < c; i += 32) {
            float h = (sx[LN_AT(i)] - mu) * s;
            fp8train_act_store(y, mode, scale, row + i, h * sw[LN_AT(i)] + sb[LN_AT(i)], am);
            xhat[row + i] = fp8train_to_bf16(h);
        }
    }
    if (mode == ACT_E4M3) fp8train_act_flush(am, amax);
    if (lane == 0) { mean[r] = mu; rstd[r] = s; }
}

// The weight gradient's term of one element (four): dy times the normalized x (the
// forward pass's BF16 xhat).
__device__ __forceinline__ float4 ln_dw_term(float4 g, float4 v) { return make_float4(g.x * v.x, g.y * v.y, g.z * v.z, g.w * v.w); }
__device__ __forceinline__ float ln_dw_term(float g, float v) { return g * v; }

// One row's dx (overwritten, or with `accumulate` dx = dx + grad) by the calling warp
// from its staged xhat and dy (both BF16: the forward pass's normalized row, the
// products' gradient as a layernorm's backward reads it) and the staged weights; the old
// dx is read in the output loop. Both sums (of w dy, and of w dy times xhat) in one pass
// over the staged row, each in the contract's order; pa, pb, qa, qb: the warp's scratch
// of `chunks` floats each.
__device__ __forceinline__ void ln_backward_row(float* __restrict__ dxr, int accumulate, const float* sw,
                                                const u16* sx, const u16* sdy, float* pa, float* pb, float* qa,
                                                float* qb, u32 c, float rs, bool vec) {
    u32 lane = threadIdx.x & 31, chunks = (c + 31) / 32;
    auto gy1 = [&](u32 i) { return fp8train_from_bf16(sdy[LN16_AT(i)]); };
    auto xh1 = [&](u32 i) { return fp8train_from_bf16(sx[LN16_AT(i)]); };
    // term1 = w dy, term2 = (w dy) * xhat: both chunk sums of a lane at once.
    for (u32 ch = lane; ch < chunks; ch += 32) {
        float a1 = 0.0f, a2 = 0.0f;
        u32 i = ch * 32, end = min(c, i + 32);
        auto add = [&](float wv, float g, float xv) {
            float t = wv * g;
            a1 = a1 + t;
            a2 = a2 + t * xv;
        };
#pragma unroll 8
        for (; i + 4 <= end; i += 4) {
            float4 wv = ln_ld4(sw, i), g = ln_ld4_bf16(sdy, i), xv = ln_ld4_bf16(sx, i);
            add(wv.x, g.x, xv.x);
            add(wv.y, g.y, xv.y);
            add(wv.z, g.z, xv.z);
            add(wv.w, g.w, xv.w);
        }
        for (; i < end; i++) add(sw[LN_AT(i)], gy1(i), xh1(i));
        pa[ch] = a1;
        qa[ch] = a2;
    }
    __syncwarp();
    float s1 = fp8train_warp_tree(pa, pb, (int)chunks) / (float)c;
    float s2 = fp8train_warp_tree(qa, qb, (int)chunks) / (float)c;
    auto grad = [&](float xv, float wv, float g) { return (((wv * g) - s1) - xv * s2) * rs; };
    if (vec) {
#pragma unroll 2
        for (u32 i = 4 * lane; i < c; i += 128) {
            float4 old = accumulate ? *(const float4*)(dxr + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            float4 xv = ln_ld4_bf16(sx, i), wv = ln_ld4(sw, i), g = ln_ld4_bf16(sdy, i);
            float4 d = make_float4(grad(xv.x, wv.x, g.x), grad(xv.y, wv.y, g.y), grad(xv.z, wv.z, g.z),
                                   grad(xv.w, wv.w, g.w));
            if (accumulate) d = make_float4(old.x + d.x, old.y + d.y, old.z + d.z, old.w + d.w);
            *(float4*)(dxr + i) = d;
        }
    } else {
        for (u32 i = lane; i < c; i += 32) {
            float d = grad(xh1(i), sw[LN_AT(i)], gy1(i));
            dxr[i] = accumulate ? dxr[i] + d : d;
        }
    }
}

// A warp per row: its dx (ln_backward_row); the weight and bias gradients are
// layernorm_param_sums' (below). Dynamic shared memory, in floats (ln_cfg): the weights
// (32 chunks), then per warp the staged xhat and dy (BF16, 16 chunks each) and 4 chunks
// of scratch, rounded up to a multiple of 4. `vec`: w, dx 16-byte and xhat, dy 8-byte
// aligned, c a multiple of 4.
#define LN_BWD_WARP_CHUNKS 36
extern "C" __global__ void layernorm_backward_rows(float* __restrict__ dx, int accumulate,
                                                   const u16* __restrict__ dy, const u16* __restrict__ xhat,
                                                   const float* __restrict__ w, const float* rstd, u32 n, u32 c,
                                                   int vec) {
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    u32 r = blockIdx.x * warps + warp;
    u32 chunks = (c + 31) / 32, per_warp = (LN_BWD_WARP_CHUNKS * chunks + 3) & ~3u;
    float* sw = ln_sh;
    float* mine = sw + 32 * chunks + (size_t)warp * per_warp;
    u16* sx = (u16*)mine;
    u16* sdy = (u16*)(mine + 16 * chunks);
    float* pa = mine + 32 * chunks;
    bool live = r < n;
    ln_stage(sw, w, c, threadIdx.x, blockDim.x, vec);
    if (live) {
        ln_stage_bf16(sx, xhat + (size_t)r * c, c, lane, vec);
        ln_stage_bf16(sdy, dy + (size_t)r * c, c, lane, vec);
    }
    ln_staged();
    __syncthreads();
    if (!live) return;
    ln_backward_row(dx + (size_t)r * c, accumulate, sw, sx, sdy, pa, pa + chunks, pa + 2 * chunks, pa + 3 * chunks, c,
                    rstd[r], vec);
}

// dx and the weight and bias gradients' column chunk partials in one kernel: a block is
// one of the contract's column chunks (rows 32 b .. 32 b + 31), its warps take `warps`
// rows at a time (ln_backward_row each), then the block adds those rows' terms to each
// column's partials in row order (dw: dy * xhat, db: dy, read from the staged rows, so
// xhat and dy are read from global memory once for all three results).
// Thread t keeps columns 4 (t + k blockDim) for k < COLS; the host launches this
// only when that covers c (c a multiple of 4, every buffer aligned: `vec`) and warps
// divides 32. Partials to pw / pbias[b * c + j] (column_tree after). Shared memory as
// layernorm_backward_rows.
template <int COLS>
__device__ __forceinline__ void ln_backward_chunk(float* __restrict__ dx, int accumulate, const u16* __restrict__ dy,
                                                  const u16* __restrict__ xhat, const float* __restrict__ w,
                                                  const float* rstd, u32 n, u32 c, float* pw, float* pbias) {
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    u32 chunks = (c + 31) / 32, per_warp = (LN_BWD_WARP_CHUNKS * chunks + 3) & ~3u;
    float* sw = ln_sh;
    float* rows = sw + 32 * chunks;  // warp k's staged rows at rows + k * per_warp
    float* mine = rows + (size_t)warp * per_warp;
    u16* sx = (u16*)mine;
    u16* sdy = (u16*)(mine + 16 * chunks);
    float* pa = mine + 32 * chunks;
    u32 r0 = blockIdx.x * 32, r_end = min(n, r0 + 32);
    ln_stage(sw, w, c, threadIdx.x, blockDim.x, true);
    float4 aw[COLS], ab[COLS];
#pragma unroll
    for (int k = 0; k < COLS; k++) aw[k] = ab[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (u32 base = r0; base < r_end; base += warps) {
        u32 r = base + warp;
        if (r < r_end) {
            ln_stage_bf16(sx, xhat + (size_t)r * c, c, lane, true);
            ln_stage_bf16(sdy, dy + (size_t)r * c, c, lane, true);
        }
        ln_staged();
        __syncthreads();
        if (r < r_end)
            ln_backward_row(dx + (size_t)r * c, accumulate, sw, sx, sdy, pa, pa + chunks, pa + 2 * chunks,
                            pa + 3 * chunks, c, rstd[r], true);
        // (ln_backward_row leaves the staged rows as they are; its scratch is its own.)
        u32 live = min(warps, r_end - base);
#pragma unroll
        for (int k = 0; k < COLS; k++) {
            u32 i = 4 * (threadIdx.x + k * blockDim.x);
            if (i >= c) break;
            for (u32 q = 0; q < live; q++) {
                const float* qx = rows + (size_t)q * per_warp;
                float4 g = ln_ld4_bf16((const u16*)(qx + 16 * chunks), i), v = ln_ld4_bf16((const u16*)qx, i);
                fp8train_add4(aw[k], ln_dw_term(g, v));
                fp8train_add4(ab[k], g);
            }
        }
        __syncthreads();  // (every thread is done with the staged rows before the next are staged)
    }
#pragma unroll
    for (int k = 0; k < COLS; k++) {
        u32 i = 4 * (threadIdx.x + k * blockDim.x);
        if (i >= c) break;
        *(float4*)(pw + (size_t)blockIdx.x * c + i) = aw[k];
        *(float4*)(pbias + (size_t)blockIdx.x * c + i) = ab[k];
    }
}
#define LN_CHUNKS_KERNEL(COLS)                                                                                 \
    extern "C" __global__ void layernorm_backward_chunks##COLS(float* dx, int accumulate, const u16* dy,        \
                                                               const u16* xhat, const float* w, const float* rstd, \
                                                               u32 n, u32 c, float* pw, float* pbias) {          \
        ln_backward_chunk<COLS>(dx, accumulate, dy, xhat, w, rstd, n, c, pw, pbias);                           \
    }
LN_CHUNKS_KERNEL(1)
LN_CHUNKS_KERNEL(2)
LN_CHUNKS_KERNEL(4)

// The weight and bias gradients' column chunk sums in one pass over xhat and dy (both
// BF16): dw's terms are dy * xhat, db's dy; chunk ch of 32 rows of column j into pw /
// pb[ch * cols + j] in the contract's column order (reduce.cu: column_chunk_sums), the
// trees per column after. W columns per thread: 4 (cols a multiple of 4, xhat and dy
// 8-byte aligned) or 1.
template <typename V>
__device__ __forceinline__ void ln_param_chunk_sums(float* pw, float* pb, const u16* xhat, const u16* dy, u32 rows,
                                                    u32 cols) {
    const u32 w = sizeof(V) / 4;
    u32 t = fp8train_tid();
    u32 chunks = (rows + 31) / 32, groups = cols / w;
    if (t >= chunks * groups) return;
    u32 ch = t / groups, j = w * (t % groups);
    V aw = {}, ab = {};
    struct Row { V g, v; };
    fp8train_column_walk(
        ch * 32, min(rows, (ch + 1) * 32),
        [&](u32 r) {
            size_t k = (size_t)r * cols + j;
            return Row{cs_value_as(dy, k, V{}), cs_value_as(xhat, k, V{})};
        },
        [&](u32, Row q) {
            cs_add(aw, ln_dw_term(q.g, q.v));
            cs_add(ab, q.g);
        });
    cs_put(pw + (size_t)ch * cols + j, aw);
    cs_put(pb + (size_t)ch * cols + j, ab);
}
extern "C" __global__ void layernorm_param_sums4(float* pw, float* pb, const u16* xhat, const u16* dy, u32 rows,
                                                 u32 cols) {
    ln_param_chunk_sums<float4>(pw, pb, xhat, dy, rows, cols);
}
extern "C" __global__ void layernorm_param_sums(float* pw, float* pb, const u16* xhat, const u16* dy, u32 rows,
                                                u32 cols) {
    ln_param_chunk_sums<float>(pw, pb, xhat, dy, rows, cols);
}
