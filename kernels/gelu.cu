// GELU, tanh approximation (sim/src/ops/gelu.rs), same operation order.
#define GELU_K __int_as_float(0x3f4c422a)
#define GELU_A 0.044715f
#define GELU_A3 0.134145f

__device__ __forceinline__ float gelu_inner(float x) { return GELU_K * (x + GELU_A * ((x * x) * x)); }

__device__ __forceinline__ float gelu_value(float v) { return (0.5f * v) * (1.0f + fp8train_tanh(gelu_inner(v))); }
// gelu'(v): the backward's dx = gelu_factor(v) * dy.
__device__ __forceinline__ float gelu_factor(float v) {
    float t = fp8train_tanh(gelu_inner(v));
    return 0.5f * (1.0f + t) + ((0.5f * v) * (1.0f - t * t)) * (GELU_K * (1.0f + GELU_A3 * (v * v)));
}

// The pre-activation is BF16 (the model stores bf16(product + bias)), so GELU and its
// derivative factor are functions of a 16-bit code: both are tabulated once per process
// by the functions above (tab[code] = gelu_value, tab[65536 + code] = gelu_factor) and
// looked up, the same bits as computing them in place (the exact tanh costs about 100
// instructions a value; the lookup makes the kernels bandwidth-bound). The codes of
// magnitudes 2^-16 <= |v| < 2^8 (both signs, 6144 entries, 24 KiB) are copied into each
// block's shared memory; the rest (near zero, huge, inf, NaN) are read from the global table.
#define GT_LO (111u << 7)  // the BF16 magnitude code of 2^-16
#define GT_N (24u << 7)    // 24 binades
extern "C" __global__ void gelu_table(float* tab) {
    u32 i = fp8train_tid();
    if (i >= 2 * 65536) return;
    float v = fp8train_from_bf16((u16)(i & 0xffff));
    tab[i] = i < 65536 ? gelu_value(v) : gelu_factor(v);
}
// This block's shared copy of one half of the table (gelu_value or gelu_factor).
__device__ __forceinline__ void gelu_stage_table(float* sh, const float* tab) {
    for (u32 i = threadIdx.x; i < 2 * GT_N; i += blockDim.x) sh[i] = tab[(i >= GT_N ? 0x8000u : 0u) + GT_LO + i % GT_N];
    __syncthreads();
}
__device__ __forceinline__ float gelu_lookup(u32 code, const float* sh, const float* tab) {
    u32 m = (code & 0x7fffu) - GT_LO;
    return m < GT_N ? sh[(code >> 15) * GT_N + m] : tab[code];
}

// The pre-activation as GELU's backward reads it: BF16 codes, or E4M3 codes at scale 1
// (the FP8 levels' saved copy). Every E4M3 value is a BF16 value, so the factor of an
// E4M3 code is the table's entry at the BF16 code of the same value: the backward stages
// those 256 entries after the BF16 slice (gelu_stage_e4m3) and indexes them by the byte,
// the same bits as decoding it and looking the BF16 code up.
__device__ __forceinline__ u32 gelu_e4m3_code(u32 q) { return __float_as_uint(fp8train_decode((u8)q, 0)) >> 16; }
#define GT_E4M3 (2u * GT_N)  // offset of the E4M3 entries in the staged table
__device__ __forceinline__ void gelu_stage_e4m3(float* sh, const float* tab, int e4m3) {
    if (e4m3)
        for (u32 i = threadIdx.x; i < 256; i += blockDim.x) sh[GT_E4M3 + i] = tab[gelu_e4m3_code(i)];
    __syncthreads();
}
// The factor of element i (BF16 or E4M3 per `e4m3`).
__device__ __forceinline__ float gelu_factor_at(const void* x, int e4m3, size_t i, const float* sh, const float* tab) {
    return e4m3 ? sh[GT_E4M3 + ((const u8*)x)[i]] : gelu_lookup(((const u16*)x)[i], sh, tab);
}
// The raw words of four elements from element 4 k (x 8-byte aligned for BF16: four
// codes in two words; 4-byte for E4M3: four bytes in .x) and their factors.
__device__ __forceinline__ uint2 gelu_raw4(const void* x, int e4m3, size_t k) {
    return e4m3 ? make_uint2(((const u32*)x)[k], 0u) : ((const uint2*)x)[k];
}
__device__ __forceinline__ float4 gelu_factor4(uint2 w, int e4m3, const float* sh, const float* tab) {
    if (e4m3)
        return make_float4(sh[GT_E4M3 + (w.x & 0xffu)], sh[GT_E4M3 + ((w.x >> 8) & 0xffu)],
                           sh[GT_E4M3 + ((w.x >> 16) & 0xffu)], sh[GT_E4M3 + (w.x >> 24)]);
    return make_float4(gelu_lookup(w.x & 0xffffu, sh, tab), gelu_lookup(w.x >> 16, sh, tab),
                       gelu_lookup(w.y & 0xffffu, sh, tab), gelu_lookup(w.y >> 16, sh, tab));
}

// y = gelu(x) of the BF16 pre-activation, stored per `mode` (fp8train_act_store); `tab`
// the gelu_value half of the table; with x8 (not null) also x's E4M3 codes at scale 1
// (the saturating cast). Grid-stride, four elements per step when aligned; one amax
// atomic per block. Dynamic shared memory: 2 * GT_N + 256 floats (the
// backward's E4M3 entries last).
extern "C" __global__ void gelu_forward(void* y, int mode, const float* scale_p, unsigned long long* amax, u8* x8,
                                        const u16* x, u32 n, const float* tab) {
    extern __shared__ float gt_sh[];
    gelu_stage_table(gt_sh, tab);
    float scale = fp8train_ld(scale_p);
    u32 am = 0;
    size_t stride = (size_t)gridDim.x * blockDim.x, start = fp8train_tid();
    size_t vec = ((((size_t)x & 7) | ((size_t)y & 15) | ((size_t)x8 & 3)) == 0) ? n / 4 : 0;
    for (size_t k = start; k < vec; k += stride) {
        uint2 w = ((const uint2*)x)[k];
        float v[4] = {gelu_lookup(w.x & 0xffffu, gt_sh, tab), gelu_lookup(w.x >> 16, gt_sh, tab),
                      gelu_lookup(w.y & 0xffffu, gt_sh, tab), gelu_lookup(w.y >> 16, gt_sh, tab)};
        fp8train_act_store4(y, mode, scale, 4 * k, v, am);
        if (x8) {
            float4 xv = fp8train_bf16x4(w);
            ((u32*)x8)[k] = (u32)fp8train_e4m3x2_sat(xv.x, xv.y) | ((u32)fp8train_e4m3x2_sat(xv.z, xv.w) << 16);
        }
    }
    for (size_t i = 4 * vec + start; i < n; i += stride) {
        fp8train_act_store(y, mode, scale, i, gelu_lookup(x[i], gt_sh, tab), am);
        if (x8) x8[i] = fp8train_e4m3_sat(fp8train_from_bf16(x[i]));
    }
    if (mode == ACT_E4M3) fp8train_block_flush(am, 0, amax, nullptr);
}
// dx = gelu'(x) * dy (dy BF16, as the MLP projection's backward product stores it; x
// BF16 or E4M3 per `e4m3`, gelu_code); `tab` the gelu_factor half of the table.
// Grid-stride as above.
extern "C" __global__ void gelu_backward(float* dx, const void* x, int e4m3, const u16* dy, u32 n, const float* tab) {
    extern __shared__ float gt_sh[];
    gelu_stage_table(gt_sh, tab);
    gelu_stage_e4m3(gt_sh, tab, e4m3);
    size_t stride = (size_t)gridDim.x * blockDim.x, start = fp8train_tid();
    size_t vec = ((((size_t)x & (e4m3 ? 3 : 7)) | ((size_t)dy & 7)) | ((size_t)dx & 15)) == 0 ? n / 4 : 0;
    for (size_t k = start; k < vec; k += stride) {
        float4 f = gelu_factor4(gelu_raw4(x, e4m3, k), e4m3, gt_sh, tab);
        float4 d = fp8train_bf16x4(((const uint2*)dy)[k]);
        ((float4*)dx)[k] = make_float4(f.x * d.x, f.y * d.y, f.z * d.z, f.w * d.w);
    }
    for (size_t i = 4 * vec + start; i < n; i += stride)
        dx[i] = gelu_factor_at(x, e4m3, i, gt_sh, tab) * fp8train_from_bf16(dy[i]);
}
// The MLP's output gradient as the fc layer's backward takes it, without the f32 tensor:
// g = gelu'(x) * dy per element, its column sums' chunk partials (column_chunk_sums'
// order: part[chunk, j] = rows 32 chunk .. sequentially from +0) and g stored as BF16
// (mode ACT_BF16) or as the scaled FP8 cast (ACT_E4M3 here means FP8 of format `e5m2`,
// with cast_fp8's statistics: stats[0] amax bits, stats[1] saturated). One (chunk,
// column) item per thread and step, grid-stride.
extern "C" __global__ void gelu_backward_sums(float* part, void* out, int mode, const float* scale_p, int e5m2,
                                              unsigned long long* stats, const void* x, int e4m3, const u16* dy,
                                              u32 rows, u32 cols, const float* tab) {
    extern __shared__ float gt_sh[];
    gelu_stage_table(gt_sh, tab);
    gelu_stage_e4m3(gt_sh, tab, e4m3);
    float scale = fp8train_ld(scale_p);
    float mx = e5m2 ? 57344.0f : 448.0f;
    u32 amax = 0, sat = 0;
    u32 chunks = (rows + 31) / 32;
    size_t items = (size_t)chunks * cols, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t t = fp8train_tid(); t < items; t += stride) {
        u32 ch = (u32)(t / cols), j = (u32)(t % cols);
        float acc = 0.0f;
        auto load = [&](u32 r) {
            size_t k = (size_t)r * cols + j;
            return make_float2(gelu_factor_at(x, e4m3, k, gt_sh, tab), fp8train_from_bf16(dy[k]));  // (factor, dy)
        };
        fp8train_column_walk(ch * 32, min(rows, (ch + 1) * 32), load, [&](u32 r, float2 v) {
            size_t k = (size_t)r * cols + j;
            float g = v.x * v.y;
            acc = acc + g;
            if (mode == ACT_BF16) ((u16*)out)[k] = fp8train_to_bf16(g);
            else ((u8*)out)[k] = cast_fp8_one(g, scale, mx, e5m2, amax, sat);
        });
        part[(size_t)ch * cols + j] = acc;
    }
    if (mode != ACT_BF16) fp8train_block_flush(amax, sat, &stats[0], &stats[1]);
}

// gelu_backward_sums with four adjacent columns per thread (cols a multiple of 4, x 8-
// (BF16) or 4-byte (E4M3) and dy 8-byte aligned): one load of each per row, a 4- (E5M2)
// or 8-byte (BF16) store; the same sums and codes.
extern "C" __global__ void gelu_backward_sums4(float* part, void* out, int mode, const float* scale_p, int e5m2,
                                               unsigned long long* stats, const void* x, int e4m3, const u16* dy,
                                               u32 rows, u32 cols, const float* tab) {
    extern __shared__ float gt_sh[];
    gelu_stage_table(gt_sh, tab);
    gelu_stage_e4m3(gt_sh, tab, e4m3);
    float scale = fp8train_ld(scale_p);
    float mx = e5m2 ? 57344.0f : 448.0f;
    u32 amax = 0, sat = 0;
    u32 chunks = (rows + 31) / 32, groups = cols / 4;
    size_t items = (size_t)chunks * groups, stride = (size_t)gridDim.x * blockDim.x;
    for (size_t t = fp8train_tid(); t < items; t += stride) {
        u32 ch = (u32)(t / groups), j = 4 * (u32)(t % groups);
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        auto load = [&](u32 r) {
            size_t k = (size_t)r * cols + j;
            uint2 a = gelu_raw4(x, e4m3, k / 4), b = *(const uint2*)(dy + k);
            return make_uint4(a.x, a.y, b.x, b.y);  // (4 raw pre-activations, 4 dy)
        };
        fp8train_column_walk(ch * 32, min(rows, (ch + 1) * 32), load, [&](u32 r, uint4 w) {
            size_t k = (size_t)r * cols + j;
            float4 d = fp8train_bf16x4(make_uint2(w.z, w.w));
            float4 f = gelu_factor4(make_uint2(w.x, w.y), e4m3, gt_sh, tab);
            float4 g = make_float4(f.x * d.x, f.y * d.y, f.z * d.z, f.w * d.w);
            fp8train_add4(acc, g);
            if (mode == ACT_BF16)
                *(uint2*)((u16*)out + k) = fp8train_to_bf16x4(g.x, g.y, g.z, g.w);
            else *(u32*)((u8*)out + k) = cast_fp8_four(g, scale, mx, e5m2, amax, sat);
        });
        *(float4*)(part + (size_t)ch * cols + j) = acc;
    }
    if (mode != ACT_BF16) fp8train_block_flush(amax, sat, &stats[0], &stats[1]);
}
