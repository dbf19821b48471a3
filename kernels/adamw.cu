// AdamW of every level (sim/src/ops/adamw.rs): the same per-element operation order.
// amax of new values: atomicMax on the bit patterns, order-free (amax[0] master, [1] m,
// [2] v, zero before the launch). Grid-stride, so any grid gives the same values.
__device__ __forceinline__ void adam_amax(unsigned long long* amax, int k, u32 bits) {
    bits = fp8train_warp_max_u32(bits);
    if ((threadIdx.x & 31) == 0 && bits) atomicMax(&amax[k], (unsigned long long)bits);
}
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

extern "C" __global__ void adamw_f32(float* p, const float* g32, const u8* gq, float ginv, float* m, float* v, u32 n,
                                     AdamStep h) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float pi = p[i], mi = m[i], vi = v[i];
    adam_update(h, pi, adam_grad(g32, gq, ginv, i), mi, vi);
    p[i] = pi; m[i] = mi; v[i] = vi;
}

// AdamW of the scaled levels, in two passes over all tensors (Backend::adamw_many):
// pass 1 computes every tensor's new values and keeps only their amax (nothing written);
// the host reads all amaxes at once and picks the scales; pass 2 computes the same
// values again (same inputs, same operations: the same bits) and stores them directly
// in their scaled formats (what an f32 update followed by cast_f16/cast_fp8 stores),
// without an f32 round trip or a read-back per tensor.

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
#define ADAM_FOR_EACH(i) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)

extern "C" __global__ void adamw_o1_amax(const u16* master, float pinv, const float* g32, const u8* gq, float ginv,
                                         const float* m, const float* v, u32 n, AdamStep h, unsigned long long* amax) {
    u32 ap = 0;
    ADAM_FOR_EACH(i) {
        float pi, mi, vi;
        adam_o1_new(master, pinv, g32, gq, ginv, m, v, i, h, pi, mi, vi);
        u32 b = adam_abs_bits(pi); ap = b > ap ? b : ap;
    }
    adam_amax(amax, 0, ap);
}
extern "C" __global__ void adamw_o1_apply(u16* master, float pinv, const float* g32, const u8* gq, float ginv,
                                          float* m, float* v, u32 n, AdamStep h, float pscale) {
    ADAM_FOR_EACH(i) {
        float pi, mi, vi;
        adam_o1_new(master, pinv, g32, gq, ginv, m, v, i, h, pi, mi, vi);
        m[i] = mi; v[i] = vi;
        master[i] = fp8train_to_f16(pi * pscale);
    }
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
    float g[8];
    if (gq) {
        uint2 gg = ((const uint2*)gq)[k];
        u32 gw[2] = {gg.x, gg.y};
#pragma unroll
        for (int u = 0; u < 8; u++) g[u] = fp8train_decode((u8)(gw[u / 4] >> (8 * (u % 4))), 0) * ginv;
    } else {
        float4 a = ((const float4*)g32)[2 * k], b = ((const float4*)g32)[2 * k + 1];
        g[0] = a.x; g[1] = a.y; g[2] = a.z; g[3] = a.w; g[4] = b.x; g[5] = b.y; g[6] = b.z; g[7] = b.w;
    }
#pragma unroll
    for (int u = 0; u < 8; u++) {
        pi[u] = fp8train_from_f16((u16)(pw[u / 2] >> (16 * (u % 2)))) * pinv;
        mi[u] = fp8train_decode((u8)(mw[u / 4] >> (8 * (u % 4))), 0) * minv;
        vi[u] = fp8train_from_f16((u16)(vw[u / 2] >> (16 * (u % 2)))) * vinv;
        adam_update(h, pi[u], g[u], mi[u], vi[u]);
    }
}
#define ADAM_STRIDE_FROM(i, first, end) \
    for (size_t i = (first) + (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (end); i += (size_t)gridDim.x * blockDim.x)

extern "C" __global__ void adamw_o2_amax(const u16* master, float pinv, const float* g32, const u8* gq, float ginv,
                                         const u8* m8, float minv, const u16* vh, float vinv, u32 n, AdamStep h,
                                         unsigned long long* amax) {
    u32 ap = 0, am = 0, av = 0;
    auto take = [&](float pi, float mi, float vi) {
        u32 b = adam_abs_bits(pi); ap = b > ap ? b : ap;
        b = adam_abs_bits(mi); am = b > am ? b : am;
        b = adam_abs_bits(vi); av = b > av ? b : av;
    };
    size_t groups = adam_o2_vec(master, g32, gq, m8, vh) ? n / 8 : 0;
    ADAM_STRIDE_FROM(k, 0, groups) {
        float pi[8], mi[8], vi[8];
        adam_o2_new8(master, pinv, g32, gq, ginv, m8, minv, vh, vinv, k, h, pi, mi, vi);
#pragma unroll
        for (int u = 0; u < 8; u++) take(pi[u], mi[u], vi[u]);
    }
    ADAM_STRIDE_FROM(i, 8 * groups, n) {
        float pi, mi, vi;
        adam_o2_new(master, pinv, g32, gq, ginv, m8, minv, vh, vinv, i, h, pi, mi, vi);
        take(pi, mi, vi);
    }
    adam_amax(amax, 0, ap);
    adam_amax(amax, 1, am);
    adam_amax(amax, 2, av);
}
extern "C" __global__ void adamw_o2_apply(u16* master, float pinv, const float* g32, const u8* gq, float ginv, u8* m8,
                                          float minv, u16* vh, float vinv, u32 n, AdamStep h, float pscale,
                                          float mscale, float vscale) {
    size_t groups = adam_o2_vec(master, g32, gq, m8, vh) ? n / 8 : 0;
    ADAM_STRIDE_FROM(k, 0, groups) {
        float pi[8], mi[8], vi[8];
        adam_o2_new8(master, pinv, g32, gq, ginv, m8, minv, vh, vinv, k, h, pi, mi, vi);
        u32 pw[4], vw[4], mw[2] = {0, 0};
#pragma unroll
        for (int u = 0; u < 4; u++) {
            pw[u] = (u32)fp8train_to_f16(pi[2 * u] * pscale) | ((u32)fp8train_to_f16(pi[2 * u + 1] * pscale) << 16);
            vw[u] = (u32)fp8train_to_f16(vi[2 * u] * vscale) | ((u32)fp8train_to_f16(vi[2 * u + 1] * vscale) << 16);
        }
#pragma unroll
        for (int u = 0; u < 8; u++) mw[u / 4] |= (u32)fp8train_encode_sat(mi[u] * mscale, 0) << (8 * (u % 4));
        ((uint4*)master)[k] = make_uint4(pw[0], pw[1], pw[2], pw[3]);
        ((uint4*)vh)[k] = make_uint4(vw[0], vw[1], vw[2], vw[3]);
        ((uint2*)m8)[k] = make_uint2(mw[0], mw[1]);
    }
    ADAM_STRIDE_FROM(i, 8 * groups, n) {
        float pi, mi, vi;
        adam_o2_new(master, pinv, g32, gq, ginv, m8, minv, vh, vinv, i, h, pi, mi, vi);
        master[i] = fp8train_to_f16(pi * pscale);
        m8[i] = fp8train_encode_sat(mi * mscale, 0);
        vh[i] = fp8train_to_f16(vi * vscale);
    }
}
