// fp8train: the shared header of every kernel. FP8 conversions through PTX (so kernels
// need only the NVRTC library, no cuda_fp8.h) and the project's own exp/log/tanh in the
// operation order of sim/src/math.rs. Compiled with --fmad=false --prec-div=true
// --prec-sqrt=true --ftz=false: no contraction, correctly rounded division and sqrt.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define FP8TRAIN_NAN __int_as_float(0x7fc00000)

// Saturating round-to-nearest-even casts (the contract's scaled cast): |x| > max and
// infinities -> +-max, NaN -> 0x7f. cvt packs its first source into the upper byte.
// Two codes at once: `lo` into the low byte, `hi` into the high one.
__device__ __forceinline__ u16 fp8train_e4m3x2_sat(float lo, float hi) {
    u16 r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u8 fp8train_e4m3_sat(float x) { return (u8)(fp8train_e4m3x2_sat(x, 0.0f) & 0xff); }
__device__ __forceinline__ u8 fp8train_e5m2_sat(float x) {
    u16 r;
    asm("cvt.rn.satfinite.e5m2x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(x));
    return (u8)(r & 0xff);
}

__device__ __forceinline__ float fp8train_bits(u32 b) { return __uint_as_float(b); }

// ---- exp
// a / b by the fast path of the correctly rounded division (reciprocal estimate, one
// Newton step, the quotient, one correction: the code --prec-div emits before its range
// check, whose slow path it leaves out): correctly rounded while a, b and a / b are well
// inside the normal range. In exp, a = r cc is at most 0.13 and b = 2 - cc in [1.6, 2.4];
// where a is tiny (|r| < 2^-50) the quotient is below half an ulp of the terms it is
// added to, so its last bits cannot reach the result (verify sweeps every f32 input).
__device__ __forceinline__ float fp8train_div_fast(float a, float b) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));  // (b is normal: ftz changes nothing)
    r = fmaf(r, fmaf(-b, r, 1.0f), r);
    float q = a * r;
    return fmaf(r, fmaf(-b, q, a), q);
}
// exp (sim/src/math.rs: exp), the same results without branches, so that a thread's
// independent exponentials interleave: the input is clamped to the computed range and
// the special results (NaN, overflow to inf, underflow to 0) are selected at the end.
__device__ __forceinline__ float fp8train_exp(float x) {
    const float INV_LN2 = fp8train_bits(0x3fb8aa3bu);
    const float LN2_HI = fp8train_bits(0x3f317200u);
    const float LN2_LO = fp8train_bits(0x35bfbe8eu);
    const float P1 = fp8train_bits(0x3e2aaa8fu);
    const float P2 = fp8train_bits(0xbb355215u);
    const float OVF = fp8train_bits(0x42b17218u), UNF = fp8train_bits(0xc2cff1b5u);
    float xc = fminf(fmaxf(x, UNF), OVF);  // (a NaN becomes UNF here)
    // kf = rint(xc / ln 2) by adding 1.5 * 2^23 (|xc / ln 2| < 2^22: the sum is exact
    // and rounds to even as rint does), k from the sum's low bits: no conversions.
    const float MAGIC = 12582912.0f;
    float t = xc * INV_LN2 + MAGIC;
    float kf = t - MAGIC;
    float hi = xc - kf * LN2_HI;
    float lo = kf * LN2_LO;
    float r = hi - lo;
    float rr = r * r;
    float cc = r - rr * (P1 + rr * P2);
    float y = 1.0f + ((fp8train_div_fast(r * cc, 2.0f - cc) - lo) + hi);
    // y 2^k, k in [-150, 128], rounded once as the contract's scale_pow2 does: y 2^(k >> 1)
    // is exact (y is in [0.7, 1.42]), the second power of two rounds.
    int k = __float_as_int(t) - __float_as_int(MAGIC), h = k >> 1;
    float v = (y * fp8train_bits((u32)(h + 127) << 23)) * fp8train_bits((u32)(k - h + 127) << 23);
    v = x < UNF ? 0.0f : v;
    v = x > OVF ? __int_as_float(0x7f800000) : v;
    return isnan(x) ? FP8TRAIN_NAN : v;
}

// ---- log (sim/src/math.rs: log)
__device__ float fp8train_log(float x) {
    const float LN2_HI = fp8train_bits(0x3f317180u);
    const float LN2_LO = fp8train_bits(0x3717f7d1u);
    const float LG1 = fp8train_bits(0x3f2aaaaau);
    const float LG2 = fp8train_bits(0x3eccce13u);
    const float LG3 = fp8train_bits(0x3e91e9eeu);
    const float LG4 = fp8train_bits(0x3e789e26u);
    const u32 SQRT_HALF = 0x3f3504f3u;
    if (isnan(x) || x < 0.0f) return FP8TRAIN_NAN;
    if (x == 0.0f) return __int_as_float(0xff800000);
    if (isinf(x)) return x;
    u32 ix = __float_as_uint(x);
    int k = 0;
    if (ix < 0x00800000u) {
        k = -25;
        ix = __float_as_uint(x * fp8train_bits(0x4c000000u));
    }
    ix += 0x3f800000u - SQRT_HALF;
    k += (int)(ix >> 23) - 127;
    ix = (ix & 0x007fffffu) + SQRT_HALF;
    float f = fp8train_bits(ix) - 1.0f;
    float s = f / (2.0f + f);
    float z = s * s;
    float w = z * z;
    float t1 = w * (LG2 + w * LG4);
    float t2 = z * (LG1 + w * LG3);
    float r = t2 + t1;
    float hfsq = 0.5f * f * f;
    float dk = (float)k;
    return (((s * (hfsq + r) + dk * LN2_LO) - hfsq) + f) + dk * LN2_HI;
}

// ---- tanh (sim/src/math.rs: tanh)
__device__ float fp8train_tanh(float x) {
    const float T1 = fp8train_bits(0xbeaaaaa5u);
    const float T2 = fp8train_bits(0x3e088685u);
    const float T3 = fp8train_bits(0xbd5c9221u);
    const float T4 = fp8train_bits(0x3cac8eb2u);
    const float T5 = fp8train_bits(0xbbcd4554u);
    if (isnan(x)) return FP8TRAIN_NAN;
    float ax = fabsf(x);
    float r;
    if (ax < 0.55f) {
        float z = ax * ax;
        float p = (((T5 * z + T4) * z + T3) * z + T2) * z + T1;
        r = ax + ax * z * p;
    } else if (ax < 10.0f) {
        r = 1.0f - 2.0f / (fp8train_exp(ax + ax) + 1.0f);
    } else {
        r = 1.0f;
    }
    return signbit(x) ? -r : r;
}

// ---- FP8 decode (sim/src/fp8.rs: decode_bits), exact
__device__ __forceinline__ float fp8train_decode(u8 code, int e5m2) {
    u32 c = code, m = e5m2 ? 2u : 3u;
    int bias = e5m2 ? 15 : 7;
    u32 sign = (c & 0x80u) << 24;
    u32 ex = (c & 0x7fu) >> m;
    u32 man = c & ((1u << m) - 1u);
    u32 ones = (1u << (7u - m)) - 1u;
    if (e5m2 && ex == ones) return __uint_as_float(man == 0 ? (sign | 0x7f800000u) : (sign | 0x7fc00000u));
    if (!e5m2 && ex == ones && man == (1u << m) - 1u) return __uint_as_float(sign | 0x7fc00000u);
    if (ex == 0) {
        if (man == 0) return __uint_as_float(sign);
        u32 p = 31u - __clz(man);
        int e = 1 - bias - (int)m + (int)p;
        u32 frac = (man - (1u << p)) << (23u - p);
        return __uint_as_float(sign | ((u32)(e + 127) << 23) | frac);
    }
    return __uint_as_float(sign | ((u32)((int)ex - bias + 127) << 23) | (man << (23u - m)));
}

__device__ __forceinline__ u8 fp8train_encode_sat(float x, int e5m2) {
    return e5m2 ? fp8train_e5m2_sat(x) : fp8train_e4m3_sat(x);
}

// ---- BF16 / FP16 (sim/src/half16.rs): RNE, one canonical NaN
__device__ __forceinline__ u16 fp8train_to_bf16(float x) {
    if (isnan(x)) return 0x7fc0;
    u32 b = __float_as_uint(x);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float fp8train_from_bf16(u16 h) { return __uint_as_float((u32)h << 16); }
// Four BF16 values (8 bytes, lowest address first) widened.
__device__ __forceinline__ float4 fp8train_bf16x4(uint2 w) {
    return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u), __uint_as_float(w.y << 16),
                       __uint_as_float(w.y & 0xffff0000u));
}
// Four values rounded to BF16 (RNE) and packed, lowest address first (8 bytes).
__device__ __forceinline__ uint2 fp8train_to_bf16x4(float a, float b, float c, float d) {
    return make_uint2((u32)fp8train_to_bf16(a) | ((u32)fp8train_to_bf16(b) << 16),
                      (u32)fp8train_to_bf16(c) | ((u32)fp8train_to_bf16(d) << 16));
}
// acc = acc + v per lane (four separate sequential sums).
__device__ __forceinline__ void fp8train_add4(float4& acc, float4 v) {
    acc.x = acc.x + v.x;
    acc.y = acc.y + v.y;
    acc.z = acc.z + v.z;
    acc.w = acc.w + v.w;
}
__device__ __forceinline__ u16 fp8train_to_f16(float x) {
    if (isnan(x)) return 0x7e00;
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ float fp8train_from_f16(u16 h) {
    float r;
    asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(h));
    return r;
}

// Four E4M3 codes (lowest byte first) to f32, exactly: the hardware conversion to FP16
// pairs (every E4M3 value is an FP16 value) and FP16 to f32, four instructions where
// fp8train_decode takes about fifteen per code. NaN codes give a NaN (its payload may
// differ from fp8train_decode's; every consumer stores NaN canonically).
__device__ __forceinline__ void fp8train_e4m3x4_to_f32(u32 w, float* out) {
    u32 lo, hi;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(lo) : "h"((u16)(w & 0xffffu)));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(hi) : "h"((u16)(w >> 16)));
    out[0] = fp8train_from_f16((u16)(lo & 0xffffu));
    out[1] = fp8train_from_f16((u16)(lo >> 16));
    out[2] = fp8train_from_f16((u16)(hi & 0xffffu));
    out[3] = fp8train_from_f16((u16)(hi >> 16));
}

// ---- the contract's sum (sim/src/reduce.rs): chunks of 32 summed sequentially from
// +0, then a pairwise tree over the chunk partials (an odd last one passes up).
#define FP8TRAIN_MAX_PARTIALS 2048
template <typename F>
__device__ float fp8train_csum(int n, F term) {
    float part[FP8TRAIN_MAX_PARTIALS];
    int chunks = (n + 31) / 32;
    if (chunks == 0) return 0.0f;
    for (int ch = 0; ch < chunks; ch++) {
        float acc = 0.0f;
        int end = min(n, (ch + 1) * 32);
        for (int i = ch * 32; i < end; i++) acc = acc + term(i);
        part[ch] = acc;
    }
    int m = chunks;
    while (m > 1) {
        int half = m / 2;
        for (int i = 0; i < half; i++) part[i] = part[2 * i] + part[2 * i + 1];
        if (m % 2 == 1) { part[half] = part[m - 1]; m = half + 1; } else { m = half; }
    }
    return part[0];
}

// Tree over `chunks` partials stored with `stride` in global memory (in place).
__device__ float fp8train_tree(float* part, int chunks, int stride) {
    if (chunks == 0) return 0.0f;
    int m = chunks;
    while (m > 1) {
        int half = m / 2;
        for (int i = 0; i < half; i++) part[i * stride] = part[2 * i * stride] + part[(2 * i + 1) * stride];
        if (m % 2 == 1) { part[half * stride] = part[(m - 1) * stride]; m = half + 1; } else { m = half; }
    }
    return part[0];
}

// reduce::max semantics: any NaN -> NaN, empty -> -inf.
template <typename F>
__device__ float fp8train_cmax(int n, F term) {
    float mx = __int_as_float(0xff800000);
    bool nan = false;
    for (int i = 0; i < n; i++) {
        float v = term(i);
        nan |= isnan(v);
        mx = v > mx ? v : mx;
    }
    return nan ? FP8TRAIN_NAN : mx;
}

__device__ __forceinline__ u32 fp8train_tid() { return blockIdx.x * blockDim.x + threadIdx.x; }

// One thread's walk down rows r0..end-1 of a column (the contract's column chunks):
// `use(r, load(r))` in row order, with the loads of 8 rows issued before the 8 uses, so
// a thread has 8 loads in flight (a store in `use`, to a byte type that may alias
// anything, would otherwise hold each load back until the previous store is done).
template <typename Load, typename Use>
__device__ __forceinline__ void fp8train_column_walk(u32 r0, u32 end, Load load, Use use) {
    u32 r = r0;
    for (; r + 8 <= end; r += 8) {
        decltype(load(r)) v[8];
#pragma unroll
        for (u32 i = 0; i < 8; i++) v[i] = load(r + i);
#pragma unroll
        for (u32 i = 0; i < 8; i++) use(r + i, v[i]);
    }
    for (; r < end; r++) use(r, load(r));
}

// ---- the same tree, parallel: `a` holds m partials (shared memory, written and made
// visible by the caller), `b` is scratch of at least m/2 + 1. Level by level, partial i
// of the next level is a[2i] + a[2i+1] and an odd last one passes up, exactly as
// fp8train_tree; only who computes each addition changes. Every thread of the block
// (or warp, for the _warp variant) must call it; all get the root.
__device__ float fp8train_block_tree(float* a, float* b, int m) {
    while (m > 1) {
        int half = m / 2;
        for (int i = threadIdx.x; i < half; i += blockDim.x) b[i] = a[2 * i] + a[2 * i + 1];
        if ((m & 1) && threadIdx.x == 0) b[half] = a[m - 1];
        __syncthreads();
        m = half + (m & 1);
        float* t = a; a = b; b = t;
    }
    float r = a[0];
    __syncthreads();
    return r;
}
__device__ float fp8train_warp_tree(float* a, float* b, int m) {
    int lane = threadIdx.x & 31;
    while (m > 1) {
        int half = m / 2;
        for (int i = lane; i < half; i += 32) b[i] = a[2 * i] + a[2 * i + 1];
        if ((m & 1) && lane == 0) b[half] = a[m - 1];
        __syncwarp();
        m = half + (m & 1);
        float* t = a; a = b; b = t;
    }
    float r = a[0];
    __syncwarp();
    return r;
}

// Order-free max of non-negative float bit patterns over a warp (NaN patterns sort
// above infinity, so a NaN anywhere wins).
__device__ __forceinline__ u32 fp8train_warp_max_u32(u32 v) {
    for (int o = 16; o > 0; o >>= 1) { u32 w = __shfl_xor_sync(0xffffffffu, v, o); v = w > v ? w : v; }
    return v;
}

// 2^y, the project's polynomial exponential (sim/src/math.rs: exp2_fast, operation for
// operation): the fast-class kernels' softmax (flash attention) and the contract's
// cross-entropy. Cheaper than fp8train_exp (no division, no branches, and no conversion
// instructions, which issue at a quarter of the FMA rate): k = round(y) by adding
// 1.5 * 2^23 (the sum's low bits are k), f = y - k in [-1/2, 1/2], p(f) a degree-4
// polynomial fitted for relative error (coefficients by their bits; Horner with explicit
// fmaf, so contraction is as written), scaled by 2^k by adding k to the exponent field. y
// is clamped to [-126, 127] first, so inputs below -126 (-inf included) give about
// 2^-126 instead of flushing to 0 (one select fewer: next to a softmax's largest term,
// which is 1, such terms are nothing), and NaN gives NaN. Relative error below 2.7e-6.
// fp8train_exp2_poly: the clamped input's part.
__device__ __forceinline__ float fp8train_exp2_poly(float c) {
    const float MAGIC = 12582912.0f;  // 1.5 * 2^23
    float t = c + MAGIC;              // 1.5 * 2^23 + round(c), exactly
    float k = t - MAGIC;
    float f = c - k;
    float p = fp8train_bits(0x3c1ccb1au);
    p = fmaf(p, f, fp8train_bits(0x3d650994u));
    p = fmaf(p, f, fp8train_bits(0x3e76036du));
    p = fmaf(p, f, fp8train_bits(0x3f317070u));
    p = fmaf(p, f, fp8train_bits(0x3f7ffff4u));
    return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));  // t's low bits: k
}
__device__ __forceinline__ float fp8train_exp2_fast(float y) {
    float c = fminf(fmaxf(y, -126.0f), 127.0f);  // a NaN becomes -126 here; it is returned below
    float r = fp8train_exp2_poly(c);
    return y != y ? y : r;
}
// The same for y known not to be NaN and at most 127 (the same bits, two instructions fewer).
__device__ __forceinline__ float fp8train_exp2_fast_below(float y) { return fp8train_exp2_poly(fmaxf(y, -126.0f)); }

// ---- activation outputs (backend ActOut): an op computes each value in f32 and stores
// it as its consumer takes it. mode 0: f32; 1: BF16 (RNE); 2: E4M3 codes of v * scale
// (saturating, the scaled cast), tracking max |v| as a bit pattern as cast_fp8 does.
#define ACT_F32 0
#define ACT_BF16 1
#define ACT_E4M3 2
__device__ __forceinline__ void fp8train_act_store(void* y, int mode, float scale, size_t i, float v, u32& amax) {
    if (mode == ACT_F32) {
        ((float*)y)[i] = v;
    } else if (mode == ACT_BF16) {
        ((u16*)y)[i] = fp8train_to_bf16(v);
    } else {
        u32 b = __float_as_uint(v) & 0x7fffffffu;
        amax = b > amax ? b : amax;
        ((u8*)y)[i] = fp8train_e4m3_sat(v * scale);
    }
}
// The warp's amax into *out (atomicMax on the bit pattern); every lane of the warp calls it.
__device__ __forceinline__ void fp8train_act_flush(u32 amax, unsigned long long* out) {
    amax = fp8train_warp_max_u32(amax);
    if ((threadIdx.x & 31) == 0 && amax) atomicMax(out, (unsigned long long)amax);
}
// Four values at i0 (a multiple of 4; y 16-byte aligned): one 16-, 8- or 4-byte store.
__device__ __forceinline__ void fp8train_act_store4(void* y, int mode, float scale, size_t i0, const float* v,
                                                    u32& amax) {
    if (mode == ACT_F32) {
        ((float4*)y)[i0 / 4] = make_float4(v[0], v[1], v[2], v[3]);
    } else if (mode == ACT_BF16) {
        ((uint2*)y)[i0 / 4] = fp8train_to_bf16x4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u32 b = __float_as_uint(v[k]) & 0x7fffffffu;
            amax = b > amax ? b : amax;
        }
        u32 lo = fp8train_e4m3x2_sat(v[0] * scale, v[1] * scale), hi = fp8train_e4m3x2_sat(v[2] * scale, v[3] * scale);
        ((u32*)y)[i0 / 4] = lo | (hi << 16);
    }
}

// ---- the contract's power-of-two scale (sim/src/scaling.rs: scale_for_max), exactly:
// prev unless 0 < amax < inf; else 2^clamp(floor(log2(max / amax)) - margin, -126, 126)
// with the floor computed from the significands and exponents (no division, no log).
__device__ __forceinline__ void fp8train_split(float x, u32& sig, int& e) {
    u32 b = __float_as_uint(x) & 0x7fffffffu;
    int ex = (int)(b >> 23);
    if (ex == 0) {
        u32 frac = b & 0x7fffffu;
        int lz = __clz(frac) - 8;
        sig = frac << lz;
        e = -126 - lz;
    } else {
        sig = (b & 0x7fffffu) | 0x800000u;
        e = ex - 127;
    }
}
__device__ __forceinline__ float fp8train_scale_for_max(float maxv, float amax, int margin, float prev) {
    if (!(isfinite(amax) && amax > 0.0f)) return prev;
    u32 sn, sd;
    int en, ed;
    fp8train_split(maxv, sn, en);
    fp8train_split(amax, sd, ed);
    int e = en - ed - (sn < sd ? 1 : 0) - margin;
    e = min(max(e, -126), 126);
    return __uint_as_float((u32)(e + 127) << 23);
}
// A scale, an inverse scale or mu the host passed by address (backend::Scalar: a
// value on the device, or a host value the backend keeps a device copy of); null = 1.
__device__ __forceinline__ float fp8train_ld(const float* p) { return p ? *p : 1.0f; }
// A just-in-time scale stored where later kernels read it (backend::ScaleSlot): its
// inverse (exact: a power of two), then the scale. Every block of a cast derives the
// same scale, whichever of them has stored it first.
__device__ __forceinline__ void fp8train_store_scale(float* slot, float s) {
    slot[0] = __frcp_rn(s);
    slot[1] = s;
}
// The amax an amax slot holds (backend::slot_amax).
__device__ __forceinline__ float fp8train_slot_amax(unsigned long long bits) {
    return bits > 0x7f800000ull ? FP8TRAIN_NAN : __uint_as_float((u32)bits);
}
// The block's amax (and count, when `count` is given) into *amax_out / *count_out with one
// atomic each per block: every thread of the (one-dimensional) block must call it.
__device__ __forceinline__ void fp8train_block_flush(u32 amax, u32 count, unsigned long long* amax_out,
                                                     unsigned long long* count_out) {
    __shared__ u32 fl_amax[32], fl_count[32];
    amax = fp8train_warp_max_u32(amax);
    for (int o = 16; o > 0; o >>= 1) count += __shfl_xor_sync(0xffffffffu, count, o);
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    if (lane == 0) { fl_amax[warp] = amax; fl_count[warp] = count; }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 a = 0, n = 0;
        for (u32 w = 0; w < (blockDim.x + 31) / 32; w++) { a = fl_amax[w] > a ? fl_amax[w] : a; n += fl_count[w]; }
        if (a) atomicMax(amax_out, (unsigned long long)a);
        if (count_out && n) atomicAdd(count_out, (unsigned long long)n);
    }
}
