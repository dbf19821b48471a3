// AdamW of every level (sim/src/ops/adamw.rs): the same per-element operation order.
// amax of new values: atomicMax on the bit patterns, order-free (slots: master, m, v;
// zero before the launch), so any split into blocks gives the same values.
__device__ __forceinline__ u32 adam_abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

struct AdamStep { float lr, beta1, beta2, eps, omb1, omb2, bc1, bc2, decay, grad_scale; };

__device__ __forceinline__ void adam_update(const AdamStep& h, float& p, float g, float& m, float& v) {
    g = g * h.grad_scale;
    m = h.beta1 * m + h.omb1 * g;
    v = h.beta2 * v + h.omb2 * (g * g);
    p = p * h.decay;
    p = p - h.lr * ((m / h.bc1) / (sqrtf(v / h.bc2) + h.eps));
}

// gradient: f32 (gq == null) or E4M3 codes with 1/scale
__device__ __forceinline__ float adam_grad(const float* g32, const u8* gq, float ginv, u32 i) {
    return gq ? fp8train_decode(gq[i], 0) * ginv : g32[i];
}

// AdamW of all tensors in three launches (Backend::adamw_many): pass 1 computes every
// scaled tensor's new values and keeps only their amax (nothing written); pass 2 derives
// each new scale from its amax (every block of a tensor alike), computes the same values
// again (same inputs, same operations: the same bits) and stores them directly in their
// scaled formats (what an f32 update followed by cast_f16/cast_fp8 stores), decoding
// with the old scales; adamw_multi_scales then stores the new scales over the old ones.
// Nothing is read back. Each launch covers every tensor: the host passes a table of
// tensors and one of chunks (tensor, first element), a block per chunk. With a step
// controller (ctl), the bias corrections and the gradient multiplier come from it, and
// a step it marks as overflowed is skipped by every launch.

// Element i's new (master, m, v) at O1: FP16 master (value = code / scale), f32 moments.
__device__ __forceinline__ void adam_o1_new(const u16* master, float pinv, const float* g32, const u8* gq, float ginv,
                                            const float* m, const float* v, size_t i, const AdamStep& h,
                                            float& pi, float& mi, float& vi) {
    pi = fp8train_from_f16(master[i]) * pinv; mi = m[i]; vi = v[i];
    adam_update(h, pi, adam_grad(g32, gq, ginv, i), mi, vi);
}
// The same at O2: FP16 master, E4M3 m, FP16 v (each with 1/scale).
__device__ __forceinline__ void adam_o2_new(const u16* master, float pinv, const float* g32, const u8* gq, float ginv,
                                            const u8* m8, float minv, const u16* vh, float vinv, size_t i,
                                            const AdamStep& h, float& pi, float& mi, float& vi) {
    pi = fp8train_from_f16(master[i]) * pinv;
    mi = fp8train_decode(m8[i], 0) * minv;
    vi = fp8train_from_f16(vh[i]) * vinv;
    adam_update(h, pi, adam_grad(g32, gq, ginv, i), mi, vi);
}
// O2, eight elements per thread and step when every buffer allows 8-element vector
// accesses (16 bytes of FP16 master and v, 8 of E4M3 m and gradient, 32 of f32
// gradient): a thread then has 48 bytes or more in flight instead of 6 (the kernels are
// otherwise latency-bound on byte and half loads). Each element's operations are
// adam_o2_new's, so the bits do not depend on the path; the tail runs one at a time.
__device__ __forceinline__ bool adam_o2_vec(const u16* master, const float* g32, const u8* gq, const u8* m8,
                                            const u16* vh) {
    size_t a = ((size_t)master | (size_t)vh) & 15, b = ((size_t)m8 | (size_t)gq) & 7, c = (size_t)g32 & 15;
    return (a | b | c) == 0;
}
// Element 8k + u's new (master, m, v) for u < 8, from one vector load per buffer.
__device__ __forceinline__ void adam_o2_new8(const u16* master, float pinv, const float* g32, const u8* gq, float ginv,
                                             const u8* m8, float minv, const u16* vh, float vinv, size_t k,
                                             const AdamStep& h, float* pi, float* mi, float* vi) {
    uint4 mp = ((const uint4*)master)[k], vv = ((const uint4*)vh)[k];
    uint2 mm = ((const uint2*)m8)[k];
    u32 pw[4] = {mp.x, mp.y, mp.z, mp.w}, vw[4] = {vv.x, vv.y, vv.z, vv.w}, mw[2] = {mm.x, mm.y};
    float g[8], md[8];
    if (gq) {
        uint2 gg = ((const uint2*)gq)[k];
        fp8train_e4m3x4_to_f32(gg.x, g);
        fp8train_e4m3x4_to_f32(gg.y, g + 4);
#pragma unroll
        for (int u = 0; u < 8; u++) g[u] = g[u] * ginv;
    } else {
        float4 a = ((const float4*)g32)[2 * k], b = ((const float4*)g32)[2 * k + 1];
        g[0] = a.x; g[1] = a.y; g[2] = a.z; g[3] = a.w; g[4] = b.x; g[5] = b.y; g[6] = b.z; g[7] = b.w;
    }
    fp8train_e4m3x4_to_f32(mw[0], md);
    fp8train_e4m3x4_to_f32(mw[1], md + 4);
#pragma unroll
    for (int u = 0; u < 8; u++) {
        pi[u] = fp8train_from_f16((u16)(pw[u / 2] >> (16 * (u % 2)))) * pinv;
        mi[u] = md[u] * minv;
        vi[u] = fp8train_from_f16((u16)(vw[u / 2] >> (16 * (u % 2)))) * vinv;
        adam_update(h, pi[u], g[u], mi[u], vi[u]);
    }
}

// One tensor of a multi-tensor launch (the host writes the table: same layout, 128 bytes).
struct AdamItem {
    void* master;     // f32 (level 0) or FP16 codes
    const float* g32; // f32 gradient, or null
    const u8* gq;     // E4M3 gradient codes (with ginv), or null
    void* m;          // f32 (levels 0, 1) or E4M3 codes (2)
    void* v;          // f32 (levels 0, 1) or FP16 codes (2)
    unsigned long long* amax;  // 3 slots: master, m, v
    u32 n, level;     // level 0: f32 state; 1: O1 (FP16 master, f32 moments); 2: O2
    const float* ginv;  // the E4M3 gradient's inverse scale (null: 1)
    float* ps;          // the FP16 master's [1/scale, scale] (levels 1, 2)
    float* mvs;         // m's and v's [1/scale, scale] (level 2)
    const float* ctl;   // the step controller's words, or null
    AdamStep h;
};
// The step's constants: the host's, the controller's where there is one.
__device__ __forceinline__ AdamStep adam_step_of(const AdamItem& it) {
    AdamStep h = it.h;
    if (it.ctl) {
        h.grad_scale = it.ctl[3];
        h.bc1 = it.ctl[4];
        h.bc2 = it.ctl[5];
    }
    return h;
}
__device__ __forceinline__ bool adam_skipped(const AdamItem& it) { return it.ctl && it.ctl[8] != 0.0f; }
// The new scales (pass 2 and adamw_multi_scales alike): master, m, v.
__device__ __forceinline__ void adam_new_scales(const AdamItem& it, float& ps, float& ms, float& vs) {
    ps = ms = vs = 1.0f;
    if (it.level >= 1) ps = fp8train_scale_for_max(65504.0f, fp8train_slot_amax(it.amax[0]), 0, it.ps[1]);
    if (it.level == 2) {
        ms = fp8train_scale_for_max(448.0f, fp8train_slot_amax(it.amax[1]), 0, it.mvs[1]);
        vs = fp8train_scale_for_max(65504.0f, fp8train_slot_amax(it.amax[2]), 0, it.mvs[3]);
    }
}
#define ADAM_CHUNK 16384  // elements per block (a multiple of 8)

template <bool APPLY>
__device__ __forceinline__ void adamw_chunk(const AdamItem* items, const uint2* chunks) {
    uint2 ch = chunks[blockIdx.x];
    const AdamItem& it = items[ch.x];
    if (adam_skipped(it)) return;
    const AdamStep h = adam_step_of(it);
    const float ginv = fp8train_ld(it.ginv);
    const float pinv = it.level >= 1 ? it.ps[0] : 1.0f;
    const float minv = it.level == 2 ? it.mvs[0] : 1.0f, vinv = it.level == 2 ? it.mvs[2] : 1.0f;
    float pscale = 1.0f, mscale = 1.0f, vscale = 1.0f;
    if (APPLY) adam_new_scales(it, pscale, mscale, vscale);
    size_t first = ch.y, end = min(first + ADAM_CHUNK, (size_t)it.n);
    const float* g32 = it.g32;
    const u8* gq = it.gq;
    u32 ap = 0, am = 0, av = 0;
    auto take = [&](float pi, float mi, float vi) {
        u32 b = adam_abs_bits(pi); ap = b > ap ? b : ap;
        b = adam_abs_bits(mi); am = b > am ? b : am;
        b = adam_abs_bits(vi); av = b > av ? b : av;
    };
    if (it.level == 0) {
        if (!APPLY) return;  // no scales: updated in pass 2 only
        float *p = (float*)it.master, *m = (float*)it.m, *v = (float*)it.v;
        for (size_t i = first + threadIdx.x; i < end; i += blockDim.x) {
            float pi = p[i], mi = m[i], vi = v[i];
            adam_update(h, pi, adam_grad(g32, gq, ginv, i), mi, vi);
            p[i] = pi; m[i] = mi; v[i] = vi;
        }
    } else if (it.level == 1) {
        u16* master = (u16*)it.master;
        float *m = (float*)it.m, *v = (float*)it.v;
        for (size_t i = first + threadIdx.x; i < end; i += blockDim.x) {
            float pi, mi, vi;
            adam_o1_new(master, pinv, g32, gq, ginv, m, v, i, h, pi, mi, vi);
            if (APPLY) {
                m[i] = mi; v[i] = vi;
                master[i] = fp8train_to_f16(pi * pscale);
            } else {
                u32 b = adam_abs_bits(pi); ap = b > ap ? b : ap;
            }
        }
    } else {
        u16* master = (u16*)it.master;
        u8* m8 = (u8*)it.m;
        u16* vh = (u16*)it.v;
        // Eight elements per thread and step when every buffer allows vector accesses.
        size_t vend = adam_o2_vec(master, g32, gq, m8, vh) ? end / 8 : first / 8;
        for (size_t k = first / 8 + threadIdx.x; k < vend; k += blockDim.x) {
            float pi[8], mi[8], vi[8];
            adam_o2_new8(master, pinv, g32, gq, ginv, m8, minv, vh, vinv, k, h, pi, mi, vi);
            if (APPLY) {
                u32 pw[4], vw[4], mw[2] = {0, 0};
#pragma unroll
                for (int u = 0; u < 4; u++) {
                    pw[u] = (u32)fp8train_to_f16(pi[2 * u] * pscale) |
                            ((u32)fp8train_to_f16(pi[2 * u + 1] * pscale) << 16);
                    vw[u] = (u32)fp8train_to_f16(vi[2 * u] * vscale) |
                            ((u32)fp8train_to_f16(vi[2 * u + 1] * vscale) << 16);
                }
#pragma unroll
                for (int u = 0; u < 8; u++) mw[u / 4] |= (u32)fp8train_encode_sat(mi[u] * mscale, 0) << (8 * (u % 4));
                ((uint4*)master)[k] = make_uint4(pw[0], pw[1], pw[2], pw[3]);
                ((uint4*)vh)[k] = make_uint4(vw[0], vw[1], vw[2], vw[3]);
                ((uint2*)m8)[k] = make_uint2(mw[0], mw[1]);
            } else {
#pragma unroll
                for (int u = 0; u < 8; u++) take(pi[u], mi[u], vi[u]);
            }
        }
        for (size_t i = 8 * vend + threadIdx.x; i < end; i += blockDim.x) {
            float pi, mi, vi;
            adam_o2_new(master, pinv, g32, gq, ginv, m8, minv, vh, vinv, i, h, pi, mi, vi);
            if (APPLY) {
                master[i] = fp8train_to_f16(pi * pscale);
                m8[i] = fp8train_encode_sat(mi * mscale, 0);
                vh[i] = fp8train_to_f16(vi * vscale);
            } else {
                take(pi, mi, vi);
            }
        }
    }
    if (!APPLY) {
        // One atomic per block and slot (warp maxima through shared memory first).
        __shared__ u32 red[3][32];
        u32 w = threadIdx.x / 32, nw = blockDim.x / 32, mine[3] = {ap, am, av};
#pragma unroll
        for (int k = 0; k < 3; k++) {
            u32 b = fp8train_warp_max_u32(mine[k]);
            if ((threadIdx.x & 31) == 0) red[k][w] = b;
        }
        __syncthreads();
        if (threadIdx.x < 3) {
            u32 b = 0;
            for (u32 j = 0; j < nw; j++) b = red[threadIdx.x][j] > b ? red[threadIdx.x][j] : b;
            if (b) atomicMax(&it.amax[threadIdx.x], (unsigned long long)b);
        }
    }
}
extern "C" __global__ void adamw_multi_amax(const AdamItem* items, const uint2* chunks) {
    adamw_chunk<false>(items, chunks);
}
extern "C" __global__ void adamw_multi_apply(const AdamItem* items, const uint2* chunks) {
    adamw_chunk<true>(items, chunks);
}
// After pass 2: every scaled tensor's new scales over its old ones (a thread per tensor).
extern "C" __global__ void adamw_multi_scales(const AdamItem* items, u32 n) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    const AdamItem& it = items[i];
    if (adam_skipped(it) || it.level == 0) return;
    float ps, ms, vs;
    adam_new_scales(it, ps, ms, vs);
    fp8train_store_scale(it.ps, ps);
    if (it.level == 2) {
        fp8train_store_scale(it.mvs, ms);
        fp8train_store_scale(it.mvs + 2, vs);
    }
}
