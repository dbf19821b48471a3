// Element-wise ops and casts (sim/src/fp8.rs, half16.rs, backend glue).

// The scaled cast and what it saw: stats[0] = max |x| as a bit pattern (atomicMax, so
// order-free; above 0x7f800000 = a NaN was seen), stats[1] = elements clipped. Both must
// be zero before the launch. Grid-stride, so any grid size gives the same result. Four
// elements per thread and step (16-byte loads, 4-byte stores) when the buffers allow.
__device__ __forceinline__ u8 cast_fp8_one(float xv, float scale, float mx, int e5m2, u32& amax, u32& sat) {
    u32 b = __float_as_uint(xv) & 0x7fffffffu;
    amax = b > amax ? b : amax;
    float v = xv * scale;
    sat += fabsf(v) > mx ? 1u : 0u;
    return fp8train_encode_sat(v, e5m2);
}
// Four values' codes packed lowest address first.
__device__ __forceinline__ u32 cast_fp8_four(float4 v, float scale, float mx, int e5m2, u32& amax, u32& sat) {
    u32 w = (u32)cast_fp8_one(v.x, scale, mx, e5m2, amax, sat);
    w |= (u32)cast_fp8_one(v.y, scale, mx, e5m2, amax, sat) << 8;
    w |= (u32)cast_fp8_one(v.z, scale, mx, e5m2, amax, sat) << 16;
    return w | (u32)cast_fp8_one(v.w, scale, mx, e5m2, amax, sat) << 24;
}
extern "C" __global__ void cast_fp8(const float* x, u8* q, const float* scale_p, u32 n, int e5m2,
                                    unsigned long long* stats) {
    float scale = fp8train_ld(scale_p);
    float mx = e5m2 ? 57344.0f : 448.0f;
    u32 amax = 0, sat = 0;
    size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t vec = (((size_t)x & 15) == 0 && ((size_t)q & 3) == 0) ? n / 4 : 0;
    for (size_t v = start; v < vec; v += stride) {
        float4 xv = ((const float4*)x)[v];
        u32 w = (u32)cast_fp8_one(xv.x, scale, mx, e5m2, amax, sat);
        w |= (u32)cast_fp8_one(xv.y, scale, mx, e5m2, amax, sat) << 8;
        w |= (u32)cast_fp8_one(xv.z, scale, mx, e5m2, amax, sat) << 16;
        w |= (u32)cast_fp8_one(xv.w, scale, mx, e5m2, amax, sat) << 24;
        ((u32*)q)[v] = w;
    }
    for (size_t i = 4 * vec + start; i < n; i += stride) q[i] = cast_fp8_one(x[i], scale, mx, e5m2, amax, sat);
    amax = fp8train_warp_max_u32(amax);
    for (int o = 16; o > 0; o >>= 1) sat += __shfl_xor_sync(0xffffffffu, sat, o);
    if ((threadIdx.x & 31) == 0) {
        if (amax) atomicMax(&stats[0], (unsigned long long)amax);
        if (sat) atomicAdd(&stats[1], (unsigned long long)sat);
    }
}
// cast_fp8 of BF16 values (widened exactly): the attention output's cast for the
// projection. Grid-stride, four elements per step (8-byte loads) when aligned.
extern "C" __global__ void cast_fp8_bf16(const u16* x, u8* q, const float* scale_p, u32 n, int e5m2,
                                         unsigned long long* stats) {
    float scale = fp8train_ld(scale_p);
    float mx = e5m2 ? 57344.0f : 448.0f;
    u32 amax = 0, sat = 0;
    size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t vec = (((size_t)x & 7) == 0 && ((size_t)q & 3) == 0) ? n / 4 : 0;
    for (size_t v = start; v < vec; v += stride) {
        uint2 w = ((const uint2*)x)[v];
        u32 o = (u32)cast_fp8_one(fp8train_from_bf16((u16)(w.x & 0xffffu)), scale, mx, e5m2, amax, sat);
        o |= (u32)cast_fp8_one(fp8train_from_bf16((u16)(w.x >> 16)), scale, mx, e5m2, amax, sat) << 8;
        o |= (u32)cast_fp8_one(fp8train_from_bf16((u16)(w.y & 0xffffu)), scale, mx, e5m2, amax, sat) << 16;
        o |= (u32)cast_fp8_one(fp8train_from_bf16((u16)(w.y >> 16)), scale, mx, e5m2, amax, sat) << 24;
        ((u32*)q)[v] = o;
    }
    for (size_t i = 4 * vec + start; i < n; i += stride)
        q[i] = cast_fp8_one(fp8train_from_bf16(x[i]), scale, mx, e5m2, amax, sat);
    fp8train_block_flush(amax, sat, &stats[0], &stats[1]);
}
// The column walks with a copy (reduce.cu: column_chunk_walk): the bias gradient of a
// linear layer and a copy of its output gradient from one read.
// The sums and the scaled FP8 cast of x (a linear layer's output gradient: its E5M2
// copy), with cast_fp8's statistics (stats[0]: amax bits, stats[1]: saturated; one
// atomic each per block).
extern "C" __global__ void column_chunk_sums_cast(const float* x, float* part, u32 rows, u32 cols, u8* q,
                                                  const float* scale_p, int e5m2, unsigned long long* stats) {
    float scale = fp8train_ld(scale_p);
    float mx = e5m2 ? 57344.0f : 448.0f;
    u32 amax = 0, sat = 0;
    column_chunk_walk<float>(x, part, rows, cols, fp8train_tid(),
                       [&](size_t k, float v) { q[k] = cast_fp8_one(v, scale, mx, e5m2, amax, sat); });
    fp8train_block_flush(amax, sat, &stats[0], &stats[1]);
}
// The same, four adjacent columns per thread: one 16-byte load and one 4-byte store of
// codes per row, the same sums and codes.
extern "C" __global__ void column_chunk_sums_cast4(const float* x, float* part, u32 rows, u32 cols, u8* q,
                                                   const float* scale_p, int e5m2, unsigned long long* stats) {
    float scale = fp8train_ld(scale_p);
    float mx = e5m2 ? 57344.0f : 448.0f;
    u32 amax = 0, sat = 0;
    column_chunk_walk<float4>(x, part, rows, cols, fp8train_tid(), [&](size_t k, float4 v) {
        *(u32*)(q + k) = cast_fp8_four(v, scale, mx, e5m2, amax, sat);
    });
    fp8train_block_flush(amax, sat, &stats[0], &stats[1]);
}
// The sums and the scaled FP8 cast of BF16 x (the QKV layer's output gradient, which
// attention's backward stores in BF16), one or four adjacent columns per thread (`by4`:
// cols a multiple of 4, x 8-byte and q 4-byte aligned): the values of cast_fp8_bf16.
extern "C" __global__ void column_chunk_sums_cast_from_bf16(const u16* x, float* part, u32 rows, u32 cols, u8* q,
                                                            const float* scale_p, int e5m2, unsigned long long* stats,
                                                            int by4) {
    float scale = fp8train_ld(scale_p);
    float mx = e5m2 ? 57344.0f : 448.0f;
    u32 amax = 0, sat = 0;
    if (by4)
        column_chunk_walk<float4>(x, part, rows, cols, fp8train_tid(), [&](size_t k, float4 v) {
            *(u32*)(q + k) = cast_fp8_four(v, scale, mx, e5m2, amax, sat);
        });
    else
        column_chunk_walk<float>(x, part, rows, cols, fp8train_tid(),
                           [&](size_t k, float v) { q[k] = cast_fp8_one(v, scale, mx, e5m2, amax, sat); });
    fp8train_block_flush(amax, sat, &stats[0], &stats[1]);
}
// The sums and a BF16 copy of x (RNE; the bf16 level), one or four adjacent columns per
// thread (`by4`: cols a multiple of 4, x 16-byte and q 8-byte aligned).
extern "C" __global__ void column_chunk_sums_bf16_copy(const float* x, float* part, u32 rows, u32 cols, u16* q, int by4) {
    if (by4)
        column_chunk_walk<float4>(x, part, rows, cols, fp8train_tid(),
                           [&](size_t k, float4 v) { *(uint2*)(q + k) = fp8train_to_bf16x4(v.x, v.y, v.z, v.w); });
    else
        column_chunk_walk<float>(x, part, rows, cols, fp8train_tid(), [&](size_t k, float v) { q[k] = fp8train_to_bf16(v); });
}
extern "C" __global__ void decode_fp8(const u8* q, float* x, const float* inv_p, u32 n, int e5m2) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float inv_scale = fp8train_ld(inv_p);
    float v = fp8train_decode(q[i], e5m2);
    x[i] = isnan(v) ? FP8TRAIN_NAN : v * inv_scale;  // one canonical NaN, as the simulator
}
// Four elements per thread (16-byte loads, 8-byte stores) when the buffers allow;
// launched over (n + 3) / 4 threads.
extern "C" __global__ void cast_bf16(const float* x, u16* y, u32 n) {
    u32 v = fp8train_tid();
    if (((size_t)x & 15) == 0 && ((size_t)y & 7) == 0 && 4 * (size_t)v + 3 < n) {
        float4 xv = ((const float4*)x)[v];
        ((uint2*)y)[v] = fp8train_to_bf16x4(xv.x, xv.y, xv.z, xv.w);
        return;
    }
    for (size_t i = 4 * (size_t)v; i < n && i < 4 * (size_t)v + 4; i++) y[i] = fp8train_to_bf16(x[i]);
}
// y = bf16(x + bias[column]) (the bias added first, in f32): a linear layer's output
// stored as its consumer reads it (attention, GELU; Backend::cast_bf16_bias). Four per thread when c % 4 == 0 and aligned.
extern "C" __global__ void cast_bf16_bias(const float* x, const float* bias, u16* y, u32 c, u32 n) {
    size_t v = fp8train_tid();
    if ((c & 3) == 0 && (((size_t)x | (size_t)bias) & 15) == 0 && ((size_t)y & 7) == 0 && 4 * v + 3 < n) {
        float4 xv = ((const float4*)x)[v];
        float4 b = *(const float4*)(bias + (4 * v) % c);
        ((uint2*)y)[v] = fp8train_to_bf16x4(xv.x + b.x, xv.y + b.y, xv.z + b.z, xv.w + b.w);
        return;
    }
    for (size_t i = 4 * v; i < n && i < 4 * v + 4; i++) y[i] = fp8train_to_bf16(x[i] + bias[i % c]);
}
// BF16 -> f32 (exact): the exact attention kernels' qkv.
extern "C" __global__ void widen_bf16(const u16* x, float* y, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) y[i] = fp8train_from_bf16(x[i]);
}
extern "C" __global__ void cast_f16(const float* x, u16* y, float scale, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) y[i] = fp8train_to_f16(x[i] * scale);
}
extern "C" __global__ void decode_f16(const u16* h, float* x, const float* inv_p, u32 n) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float inv_scale = fp8train_ld(inv_p);
    float v = fp8train_from_f16(h[i]);
    x[i] = isnan(v) ? FP8TRAIN_NAN : v * inv_scale;
}
// out = res + (x + bias[column]), x the BF16 product (widened exactly): a linear layer's
// bias and the residual add in one pass. Four elements per thread (16-byte f32 and
// 8-byte BF16 accesses) when c is a multiple of 4 and the buffers are aligned; launched
// over (n + 3) / 4 threads.
extern "C" __global__ void residual_forward(float* out, const float* res, const u16* x, const float* bias, u32 c,
                                            u32 n) {
    size_t v = fp8train_tid();
    if ((c & 3) == 0 && (((size_t)out | (size_t)res | (size_t)bias) & 15) == 0 && ((size_t)x & 7) == 0 &&
        4 * v + 3 < n) {
        float4 r = ((const float4*)res)[v], xv = fp8train_bf16x4(((const uint2*)x)[v]);
        float4 b = *(const float4*)(bias + (4 * v) % c);
        ((float4*)out)[v] = make_float4(r.x + (xv.x + b.x), r.y + (xv.y + b.y), r.z + (xv.z + b.z), r.w + (xv.w + b.w));
        return;
    }
    for (size_t i = 4 * v; i < n && i < 4 * v + 4; i++) out[i] = res[i] + (fp8train_from_bf16(x[i]) + bias[i % c]);
}
// An FP16 master as f32 (decode_f16: value * inv_scale, one canonical NaN).
__device__ __forceinline__ float f16_value(u16 h, float inv_scale) {
    float v = fp8train_from_f16(h);
    return isnan(v) ? FP8TRAIN_NAN : v * inv_scale;
}
// y = bf16(decode_f16(h)): decode_f16 then cast_bf16 in one pass (the LM head's copy of
// an FP16 token embedding). Four per thread (8-byte accesses) when aligned; launched
// over (n + 3) / 4 threads.
extern "C" __global__ void cast_bf16_from_f16(const u16* h, u16* y, const float* inv_p, u32 n) {
    size_t v = fp8train_tid();
    float inv_scale = fp8train_ld(inv_p);
    if ((((size_t)h | (size_t)y) & 7) == 0 && 4 * v + 3 < n) {
        uint2 w = ((const uint2*)h)[v];
        ((uint2*)y)[v] = fp8train_to_bf16x4(f16_value(w.x & 0xffffu, inv_scale), f16_value(w.x >> 16, inv_scale),
                                            f16_value(w.y & 0xffffu, inv_scale), f16_value(w.y >> 16, inv_scale));
        return;
    }
    for (size_t i = 4 * v; i < n && i < 4 * v + 4; i++) y[i] = fp8train_to_bf16(f16_value(h[i], inv_scale));
}
// amax of the decoded FP16 values (out zeroed before the launch); grid-stride, eight
// values per thread and step (16-byte loads) when h is aligned.
extern "C" __global__ void amax_f16(const u16* h, const float* inv_p, u32 n, unsigned long long* out) {
    u32 am = 0;
    float inv_scale = fp8train_ld(inv_p);
    auto take = [&](u16 v) {
        u32 b = __float_as_uint(f16_value(v, inv_scale)) & 0x7fffffffu;
        am = b > am ? b : am;
    };
    size_t start = fp8train_tid(), stride = (size_t)gridDim.x * blockDim.x;
    size_t vec = ((size_t)h & 15) == 0 ? n / 8 : 0;
    for (size_t v = start; v < vec; v += stride) {
        uint4 q = ((const uint4*)h)[v];
        u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            take((u16)(w[k] & 0xffffu));
            take((u16)(w[k] >> 16));
        }
    }
    for (size_t i = 8 * vec + start; i < n; i += stride) take(h[i]);
    fp8train_act_flush(am, out);
}
// The just-in-time cast (Backend::cast_fp8_jit) after amax_bits / amax_f16 left the
// source's amax in *slot: every thread derives the scale from it and the previous one
// (sslot[1]), thread 0 stores it with its inverse in sslot, then q = sat_encode(x *
// scale). The source is f32 (f16 = 0) or FP16 codes decoded with *inv_p (f16 = 1).
// Four elements per thread (launched over (n + 3) / 4 threads).
extern "C" __global__ void cast_fp8_jit(const void* src, int f16, const float* inv_p, u8* q, float* sslot, u32 n,
                                        int e5m2, const unsigned long long* slot) {
    size_t i0 = 4 * (size_t)fp8train_tid();
    if (i0 >= n) return;
    float inv_scale = fp8train_ld(inv_p);
    float scale = fp8train_scale_for_max(e5m2 ? 57344.0f : 448.0f, fp8train_slot_amax(*slot), 0, sslot[1]);
    if (i0 == 0) fp8train_store_scale(sslot, scale);
    auto load = [&](size_t i) { return f16 ? f16_value(((const u16*)src)[i], inv_scale) : ((const float*)src)[i]; };
    if (i0 + 3 < n && (((size_t)q & 3) == 0)) {
        float v[4];
        if (f16 && ((size_t)src & 7) == 0) {
            uint2 h = ((const uint2*)src)[i0 / 4];
            v[0] = f16_value((u16)(h.x & 0xffff), inv_scale); v[1] = f16_value((u16)(h.x >> 16), inv_scale);
            v[2] = f16_value((u16)(h.y & 0xffff), inv_scale); v[3] = f16_value((u16)(h.y >> 16), inv_scale);
        } else if (!f16 && ((size_t)src & 15) == 0) {
            float4 x = ((const float4*)src)[i0 / 4];
            v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
        } else {
            for (int k = 0; k < 4; k++) v[k] = load(i0 + k);
        }
        u32 w = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) w |= (u32)fp8train_encode_sat(v[k] * scale, e5m2) << (8 * k);
        ((u32*)q)[i0 / 4] = w;
        return;
    }
    for (size_t i = i0; i < n && i < i0 + 4; i++) q[i] = fp8train_encode_sat(load(i) * scale, e5m2);
}

// The just-in-time cast of many tensors in two launches (Backend::cast_fp8_jit_many;
// the weight views at the start of a step): a table of tensors (the host writes it,
// JitItem's layout) and one of chunks (tensor, first element), a block per chunk of
// JIT_CHUNK elements. Pass 1 (jit_amax_multi) leaves every tensor's amax in its slot
// (one atomic per block: order-free); pass 2 (jit_cast_multi) casts with the scale each
// thread derives from the slot, as cast_fp8_jit does: per tensor, the same codes.
struct JitItem {
    const void* src;          // f32 values or FP16 codes
    u8* q;
    unsigned long long* slot; // this tensor's amax slot
    u32 n, f16;               // f16: src holds FP16 codes, decoded with *inv
    const float* inv;         // null: 1
    float* sslot;             // the scale slot [1/s, s]: previous scale in, the new pair out
    u32 e5m2, pad;
};
#define JIT_CHUNK 16384
// This block's chunk of the table: its tensor `it` and the elements [first, end).
#define JIT_CHUNK_OF_BLOCK(items, chunks, it, first, end) \
    uint2 jit_ch = (chunks)[blockIdx.x];                  \
    const JitItem& it = (items)[jit_ch.x];                \
    size_t first = jit_ch.y, end = min(first + JIT_CHUNK, (size_t)it.n)
__device__ __forceinline__ void jit_load4(const JitItem& it, float inv, size_t i, float* v) {
    if (it.f16) {
        uint2 h = *(const uint2*)((const u16*)it.src + i);
        v[0] = f16_value((u16)(h.x & 0xffff), inv); v[1] = f16_value((u16)(h.x >> 16), inv);
        v[2] = f16_value((u16)(h.y & 0xffff), inv); v[3] = f16_value((u16)(h.y >> 16), inv);
    } else {
        float4 x = *(const float4*)((const float*)it.src + i);
        v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    }
}
__device__ __forceinline__ float jit_load1(const JitItem& it, float inv, size_t i) {
    return it.f16 ? f16_value(((const u16*)it.src)[i], inv) : ((const float*)it.src)[i];
}
// Whether tensor `it` takes 4-element vector accesses (every table entry is checked the same way).
__device__ __forceinline__ bool jit_vec(const JitItem& it) {
    return (((size_t)it.src & (it.f16 ? 7 : 15)) | ((size_t)it.q & 3)) == 0;
}
extern "C" __global__ void jit_amax_multi(const JitItem* items, const uint2* chunks) {
    JIT_CHUNK_OF_BLOCK(items, chunks, it, first, end);
    float inv = fp8train_ld(it.inv);
    u32 am = 0;
    size_t vend = jit_vec(it) ? first + (end - first) / 4 * 4 : first;
    for (size_t i = first + 4 * threadIdx.x; i < vend; i += 4 * blockDim.x) {
        float v[4];
        jit_load4(it, inv, i, v);
#pragma unroll
        for (int k = 0; k < 4; k++) { u32 b = __float_as_uint(v[k]) & 0x7fffffffu; am = b > am ? b : am; }
    }
    for (size_t i = vend + threadIdx.x; i < end; i += blockDim.x) {
        u32 b = __float_as_uint(jit_load1(it, inv, i)) & 0x7fffffffu;
        am = b > am ? b : am;
    }
    fp8train_block_flush(am, 0, it.slot, nullptr);
}
extern "C" __global__ void jit_cast_multi(const JitItem* items, const uint2* chunks) {
    JIT_CHUNK_OF_BLOCK(items, chunks, it, first, end);
    float inv = fp8train_ld(it.inv);
    float scale = fp8train_scale_for_max(it.e5m2 ? 57344.0f : 448.0f, fp8train_slot_amax(*it.slot), 0, it.sslot[1]);
    if (first == 0 && threadIdx.x == 0) fp8train_store_scale(it.sslot, scale);
    size_t vend = jit_vec(it) ? first + (end - first) / 4 * 4 : first;
    for (size_t i = first + 4 * threadIdx.x; i < vend; i += 4 * blockDim.x) {
        float v[4];
        jit_load4(it, inv, i, v);
        u32 w = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) w |= (u32)fp8train_encode_sat(v[k] * scale, it.e5m2) << (8 * k);
        *(u32*)(it.q + i) = w;
    }
    for (size_t i = vend + threadIdx.x; i < end; i += blockDim.x) it.q[i] = fp8train_encode_sat(jit_load1(it, inv, i) * scale, it.e5m2);
}

// cast_bf16 of many tensors (Backend::cast_bf16_many): JitItem rows whose src holds f32
// values and whose q is the BF16 output; a block per chunk, four elements per thread
// (16-byte loads, 8-byte stores) where both are aligned.
extern "C" __global__ void cast_bf16_multi(const JitItem* items, const uint2* chunks) {
    JIT_CHUNK_OF_BLOCK(items, chunks, it, first, end);
    const float* x = (const float*)it.src;
    u16* y = (u16*)it.q;
    bool vec = ((((size_t)x) & 15) | (((size_t)y) & 7)) == 0;
    size_t vend = vec ? first + (end - first) / 4 * 4 : first;
    for (size_t i = first + 4 * threadIdx.x; i < vend; i += 4 * blockDim.x) {
        float4 v = *(const float4*)(x + i);
        *(uint2*)(y + i) = fp8train_to_bf16x4(v.x, v.y, v.z, v.w);
    }
    for (size_t i = vend + threadIdx.x; i < end; i += blockDim.x) y[i] = fp8train_to_bf16(x[i]);
}
// decode_f16 of many tensors (Backend::decode_f16_many): JitItem rows whose src holds
// FP16 codes and whose q is the f32 output; a block per chunk.
extern "C" __global__ void decode_f16_multi(const JitItem* items, const uint2* chunks) {
    JIT_CHUNK_OF_BLOCK(items, chunks, it, first, end);
    const u16* h = (const u16*)it.src;
    float* x = (float*)it.q;
    float inv = fp8train_ld(it.inv);
    for (size_t i = first + threadIdx.x; i < end; i += blockDim.x) x[i] = f16_value(h[i], inv);
}

// Row-major [rows x cols] -> [cols x rows] (K-major copies for the fast FP8 GEMM):
// 32 x 32 tiles through shared memory, so reads and writes are both coalesced.
// Block (32, 8); grid (ceil(cols / 32), ceil(rows / 32)).
template <typename T>
__device__ void transpose_tiled(const T* src, T* dst, u32 rows, u32 cols) {
    __shared__ T tile[32][33];
    u32 c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    for (u32 y = threadIdx.y; y < 32; y += 8) {
        u32 r = r0 + y, c = c0 + threadIdx.x;
        if (r < rows && c < cols) tile[y][threadIdx.x] = src[(size_t)r * cols + c];
    }
    __syncthreads();
    for (u32 y = threadIdx.y; y < 32; y += 8) {
        u32 c = c0 + y, r = r0 + threadIdx.x;
        if (r < rows && c < cols) dst[(size_t)c * rows + r] = tile[threadIdx.x][y];
    }
}
extern "C" __global__ void transpose_u8(const u8* src, u8* dst, u32 rows, u32 cols) {
    transpose_tiled<u8>(src, dst, rows, cols);
}
// The same for bytes with rows and cols multiples of 4 (4-byte aligned buffers): 64 x 64
// tiles, every global access 4 bytes wide (a warp moves 2 x 64 bytes per instruction
// instead of 32), the bytes regrouped in shared memory. Block (16, 16); grid
// (ceil(cols / 64), ceil(rows / 64)).
extern "C" __global__ void transpose_u8x4(const u8* src, u8* dst, u32 rows, u32 cols) {
    __shared__ u32 tile[64][17];  // tile[y][w]: bytes 4w..4w+3 of tile row y
    u32 c0 = blockIdx.x * 64, r0 = blockIdx.y * 64, tx = threadIdx.x, ty = threadIdx.y;
    for (u32 y = ty; y < 64; y += 16) {
        u32 r = r0 + y, c = c0 + 4 * tx;
        tile[y][tx] = (r < rows && c < cols) ? *(const u32*)(src + (size_t)r * cols + c) : 0u;
    }
    __syncthreads();
    for (u32 y = ty; y < 64; y += 16) {  // output row c0 + y = source column; 4 source rows per thread
        u32 c = c0 + y, r = r0 + 4 * tx, w = y / 4, sh = 8 * (y % 4);
        if (c >= cols || r >= rows) continue;
        u32 v = 0;
#pragma unroll
        for (u32 i = 0; i < 4; i++) v |= ((tile[4 * tx + i][w] >> sh) & 0xffu) << (8 * i);
        *(u32*)(dst + (size_t)c * rows + r) = v;
    }
}
// The same with 128 x 128 tiles (16 KiB a block: each thread has 16 loads of 4 bytes in
// flight, four times transpose_u8x4's, which held too few bytes in flight per SM to
// reach the copy bandwidth). Words in shared memory are swizzled, word w of tile row r
// at r * 32 + (w ^ ((r / 4) mod 32)), so that both the row-wise loads (a warp: one row's
// 32 words) and the column-wise gathers (thread t: rows 4t..4t+3 of one word column)
// hit 32 distinct banks. Block (32, 8); grid (ceil(cols / 128), ceil(rows / 128)).
#define TR128_AT(r, w) ((r) * 32u + ((w) ^ (((r) >> 2) & 31u)))
extern "C" __global__ void transpose_u8x4_128(const u8* src, u8* dst, u32 rows, u32 cols) {
    __shared__ u32 tile[128 * 32];
    u32 c0 = blockIdx.x * 128, r0 = blockIdx.y * 128, tx = threadIdx.x, ty = threadIdx.y;
    u32 c = c0 + 4 * tx;
#pragma unroll
    for (u32 k = 0; k < 16; k++) {
        u32 y = ty + 8 * k, r = r0 + y;
        tile[TR128_AT(y, tx)] = (r < rows && c < cols) ? *(const u32*)(src + (size_t)r * cols + c) : 0u;
    }
    __syncthreads();
    u32 r = r0 + 4 * tx;
#pragma unroll 4
    for (u32 k = 0; k < 16; k++) {  // output row c0 + y = source column y; 4 source rows per thread
        u32 y = ty + 8 * k, oc = c0 + y, w = y / 4, sh = 8 * (y % 4);
        if (oc >= cols || r >= rows) continue;
        u32 v = 0;
#pragma unroll
        for (u32 i = 0; i < 4; i++) v |= ((tile[TR128_AT(4 * tx + i, w)] >> sh) & 0xffu) << (8 * i);
        *(u32*)(dst + (size_t)oc * rows + r) = v;
    }
}
extern "C" __global__ void transpose_u16(const u16* src, u16* dst, u32 rows, u32 cols) {
    transpose_tiled<u16>(src, dst, rows, cols);
}
