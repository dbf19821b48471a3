// The row's max over the block from each thread's (max, saw a NaN) (reduce::max: a NaN
// anywhere gives NaN); `wmax`: 64 floats of shared scratch. Every thread gets it.
__device__ float ce_block_max(float mx, bool nan, float* wmax) {
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, mx, o);
        mx = other > mx ? other : mx;
    }
    nan = __any_sync(0xffffffffu, nan);
    u32 warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if ((threadIdx.x & 31) == 0) { wmax[warp] = mx; wmax[32 + warp] = nan ? 1.0f : 0.0f; }
    __syncthreads();
    float m = __int_as_float(0xff800000);
    bool any_nan = false;
    for (u32 k = 0; k < warps; k++) { m = wmax[k] > m ? wmax[k] : m; any_nan |= wmax[32 + k] != 0.0f; }
    return any_nan ? FP8TRAIN_NAN : m;
}

// e^(l - m) as the contract's cross-entropy computes it (sim math::exp_from_max): the
// polynomial 2^y of one fused multiply-add's exponent, ml = m * log2(e) once per row.
__device__ __forceinline__ float ce_exp(float l, float ml) {
    return fp8train_exp2_fast(fmaf(l, fp8train_bits(0x3fb8aa3bu), -ml));
}
// The same where m is finite (so no logit is NaN, and l log2(e) - m log2(e) is at most
// half an ulp of ml above 0): the same bits.
__device__ __forceinline__ float ce_exp_finite(float l, float ml) {
    return fp8train_exp2_fast_below(fmaf(l, fp8train_bits(0x3fb8aa3bu), -ml));
}

// Fused softmax + cross-entropy (sim/src/ops/crossentropy.rs): one block per row of the
// BF16 logits (computed in f32). The max is order-free (NaN wins); the sum of
// exponentials (ce_exp) is the contract's sum: thread t sums chunks t, t + blockDim, ...
// sequentially, the block runs the tree over the chunk partials (dynamic shared memory:
// chunks + chunks / 2 + 1 + 64 floats; 2^20 classes fit). With `with_grad` the gradient
// is written over the logits in BF16 (RNE), as the LM head's backward products read it:
// each element is read and then written by the same thread, after every thread's reads
// of the row (the barrier before the tree), and the target's logit is read before.
extern "C" __global__ void crossentropy(float* losses, u16* logits, const u32* targets, const float* mu, float rows,
                                        u32 n, u32 v, int with_grad) {
    extern __shared__ float ce_sh[];
    float dloss = __fdiv_rn(*mu, rows);  // backend::LossGrad
    u32 r = blockIdx.x;
    if (r >= n) return;  // whole block
    int chunks = ((int)v + 31) / 32;
    float* pa = ce_sh;
    float* pb = ce_sh + chunks;                 // the tree's scratch: chunks / 2 + 1
    float* wmax = pb + chunks / 2 + 1;          // 32 maxima + 32 NaN flags
    u16* lr = logits + (size_t)r * v;
    u32 tgt = targets[r];
    float lt = fp8train_from_bf16(lr[tgt]);
    float mx = __int_as_float(0xff800000);
    bool nan = false;
    for (u32 j = threadIdx.x; j < v; j += blockDim.x) {
        float a = fp8train_from_bf16(lr[j]);
        nan |= isnan(a);
        mx = a > mx ? a : mx;
    }
    float m = ce_block_max(mx, nan, wmax);
    float ml = m * fp8train_bits(0x3fb8aa3bu);
    for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
        float acc = 0.0f;
        int end = min((int)v, (ch + 1) * 32);
        for (int j = ch * 32; j < end; j++) acc = acc + ce_exp(fp8train_from_bf16(lr[j]), ml);
        pa[ch] = acc;
    }
    __syncthreads();
    float z = fp8train_block_tree(pa, pb, chunks);
    if (with_grad) {
        float rz = 1.0f / z;
        for (u32 j = threadIdx.x; j < v; j += blockDim.x) {
            float ind = j == tgt ? 1.0f : 0.0f;
            lr[j] = fp8train_to_bf16((ce_exp(fp8train_from_bf16(lr[j]), ml) * rz - ind) * dloss);
        }
    }
    if (threadIdx.x == 0) losses[r] = (fp8train_log(z) + m) - lt;
}

// The same with the row staged in shared memory as f32 (v a multiple of 4, the row
// fits): the logits are read from global memory once, and each exponential is computed
// once (in place of its logit) and kept there for the gradient. Same operations in the same order as
// `crossentropy`: the same bits. Element j of chunk ch (32 elements) sits at
// ch * 32 + ((j + 4 ch) mod 32): groups of 4 stay whole and 16-byte aligned, and the 8
// threads of a quarter-warp reading one group each from chunks ch..ch+7 hit 8 distinct
// 4-bank groups. Dynamic shared memory: 32 * chunks + chunks + chunks / 2 + 1 + 64 floats.
//
// The shared memory holds one row, so one block runs per SM: the blocks are persistent
// (row r, r + gridDim.x, ...) and, when the row's 16-byte units fit CE_PREF per thread,
// each thread loads its units of the block's next row into registers as soon as the
// current row is staged, so the next row's loads are in flight while this row's
// exponentials, sums and gradient are computed (the maximum is order-free, so staging
// from registers changes nothing else).
#define CE_AT(ch, j) ((ch) * 32 + (((j) + 4 * (ch)) & 31))
#define CE_PREF 7
extern "C" __global__ void __launch_bounds__(1024, 1)
    crossentropy_staged(float* losses, u16* logits, const u32* targets, const float* mu, float rows, u32 n, u32 v,
                        int with_grad) {
    extern __shared__ __align__(16) float ce_sh[];
    float dloss = __fdiv_rn(*mu, rows);  // backend::LossGrad
    int chunks = ((int)v + 31) / 32, groups = (int)v / 4;
    float* row = ce_sh;
    float* pa = row + 32 * chunks;
    float* pb = pa + chunks;
    float* wmax = pb + chunks / 2 + 1;
    // 16-byte units of a row when it is 16-byte aligned (v a multiple of 8), else 0.
    const int pairs = v % 8 == 0 ? groups / 2 : 0;
    const bool prefetch = pairs > 0 && pairs <= CE_PREF * (int)blockDim.x;
    uint4 pre[CE_PREF];
    auto fetch = [&](u32 rr) {
        const uint4* l8 = (const uint4*)(logits + (size_t)rr * v);
#pragma unroll
        for (int k = 0; k < CE_PREF; k++) {
            int h = threadIdx.x + k * blockDim.x;
            if (h < pairs) pre[k] = l8[h];
        }
    };
    if (prefetch && blockIdx.x < n) fetch(blockIdx.x);
    for (u32 r = blockIdx.x; r < n; r += gridDim.x) {
        uint2* lr = (uint2*)(logits + (size_t)r * v);
        float mx = __int_as_float(0xff800000);
        bool nan = false;
        auto stage = [&](int g, uint2 w) {
            float4 q = fp8train_bf16x4(w);
            *(float4*)(row + CE_AT(g / 8, 4 * (g % 8))) = q;
            nan |= isnan(q.x) | isnan(q.y) | isnan(q.z) | isnan(q.w);
            mx = q.x > mx ? q.x : mx; mx = q.y > mx ? q.y : mx; mx = q.z > mx ? q.z : mx; mx = q.w > mx ? q.w : mx;
        };
        if (prefetch) {
#pragma unroll
            for (int k = 0; k < CE_PREF; k++) {
                int h = threadIdx.x + k * blockDim.x;
                if (h < pairs) {
                    stage(2 * h, make_uint2(pre[k].x, pre[k].y));
                    stage(2 * h + 1, make_uint2(pre[k].z, pre[k].w));
                }
            }
            if (r + gridDim.x < n) fetch(r + gridDim.x);
        } else if (pairs > 0) {  // 16-byte loads (the row is 16-byte aligned): more of the row in flight
            const uint4* l8 = (const uint4*)lr;
#pragma unroll 4
            for (int h = threadIdx.x; h < pairs; h += blockDim.x) {
                uint4 w = l8[h];
                stage(2 * h, make_uint2(w.x, w.y));
                stage(2 * h + 1, make_uint2(w.z, w.w));
            }
        } else {
#pragma unroll 4
            for (int g = threadIdx.x; g < groups; g += blockDim.x) stage(g, lr[g]);
        }
        // (ce_block_max's barrier also makes the staged row visible to the block.)
        float m = ce_block_max(mx, nan, wmax);
        u32 tgt = targets[r];
        float lt = row[CE_AT(tgt / 32, tgt % 32)];
        __syncthreads();  // (every thread has read the target's logit before it is replaced)
        // The exponentials first, every thread an equal share of groups of 4 (a chunk per
        // thread would leave the threads with two chunks the critical path: 1572 chunks over
        // 1024 threads at GPT-2's vocabulary), then each chunk's sum in its order.
        float ml = m * fp8train_bits(0x3fb8aa3bu);
        for (int g = threadIdx.x; g < groups; g += blockDim.x) {
            float4* p = (float4*)(row + CE_AT(g / 8, 4 * (g % 8)));
            float4 q = *p;
            *p = make_float4(ce_exp(q.x, ml), ce_exp(q.y, ml), ce_exp(q.z, ml), ce_exp(q.w, ml));
        }
        __syncthreads();
        for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
            float acc = 0.0f;
            int len = min(32, (int)v - ch * 32);
            for (int j = 0; j < len; j += 4) {
                float4 q = *(const float4*)(row + CE_AT(ch, j));
                acc = acc + q.x;
                acc = acc + q.y;
                acc = acc + q.z;
                acc = acc + q.w;
            }
            pa[ch] = acc;
        }
        __syncthreads();
        float z = fp8train_block_tree(pa, pb, chunks);
        if (with_grad) {
            float rz = 1.0f / z;
            for (int g = threadIdx.x; g < groups; g += blockDim.x) {
                float4 e = *(const float4*)(row + CE_AT(g / 8, 4 * (g % 8)));
                float4 q = make_float4(e.x * rz, e.y * rz, e.z * rz, e.w * rz);
                u32 j = 4 * g;
                float d0 = (q.x - (j == tgt ? 1.0f : 0.0f)) * dloss;
                float d1 = (q.y - (j + 1 == tgt ? 1.0f : 0.0f)) * dloss;
                float d2 = (q.z - (j + 2 == tgt ? 1.0f : 0.0f)) * dloss;
                float d3 = (q.w - (j + 3 == tgt ? 1.0f : 0.0f)) * dloss;
                lr[g] = fp8train_to_bf16x4(d0, d1, d2, d3);
            }
        }
        if (threadIdx.x == 0) losses[r] = (fp8train_log(z) + m) - lt;
        __syncthreads();  // (every thread is done with the row's shared memory before the next is staged)
    }
}

// The same with the row staged in shared memory as BF16 (v a multiple of 8; the row and
// its chunk partials take under half of an SM's shared memory: GPT-2's 50304 classes
// 108 KiB), one row per block and two blocks per SM, so one block's loads and stores
// overlap the other's arithmetic (`crossentropy_staged` keeps a row as f32, one block per
// SM, and waits on memory between its phases). The exponentials are computed twice, for
// the chunk sums and for the gradient: the polynomial costs less than keeping them. Same
// operations in the same order as `crossentropy`: the same bits. The row is copied in
// with cp.async, 16-byte unit u (8 logits; u = 4 ch + k for chunk ch) at CE16(u): its
// place in its chunk XOR (u / 8) % 4, so 8 threads reading unit k of chunks ch..ch+7 (ch
// a multiple of 8) and 8 threads reading units u..u+7 (u a multiple of 8) both hit 8
// distinct 4-bank groups. Dynamic shared memory: 64 * chunks + 4 * (chunks + chunks / 2
// + 1 + 64) bytes. Where m and dloss are finite (no logit NaN, none +inf), the same
// values with fewer instructions: the exponentials without the NaN select and the upper
// clamp, q * dloss for every element but the target's (q - 0 is q), and the gradient
// packed by the hardware's BF16 conversion (RNE, as fp8train_to_bf16 rounds finite
// values); otherwise the general forms, whose NaN is the contract's.
#define CE16(u) (((u) & ~3) | (((u) ^ ((u) >> 3)) & 3))
__device__ __forceinline__ void ce_cp16(void* dst, const void* src) {
    u32 d = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src));
}
// Eight BF16 (a 16-byte unit, lowest address first) widened.
__device__ __forceinline__ void ce_widen8(uint4 w, float* x) {
    float4 a = fp8train_bf16x4(make_uint2(w.x, w.y)), b = fp8train_bf16x4(make_uint2(w.z, w.w));
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}
// Two finite values rounded to BF16 (RNE) by the hardware, lo at the lower address.
__device__ __forceinline__ u32 ce_bf16x2_finite(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
// The row's max from each thread's units by the BF16 pairs' NaN-propagating max, then
// widened (exact; only the sign of a zero maximum can differ from the f32 comparisons',
// and no result depends on it).
__device__ __forceinline__ u32 ce_max_bf16x2(u32 a, u32 b) {
    u32 d;
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
extern "C" __global__ void __launch_bounds__(512, 2)
    crossentropy_rows(float* losses, u16* logits, const u32* targets, const float* mu, float rows, u32 n, u32 v,
                      int with_grad) {
    extern __shared__ __align__(16) uint4 ce_rows_sh[];
    float dloss = __fdiv_rn(*mu, rows);  // backend::LossGrad
    u32 r = blockIdx.x;
    if (r >= n) return;  // whole block
    int units = (int)v / 8, chunks = ((int)v + 31) / 32;
    uint4* row = ce_rows_sh;  // 4 * chunks units: CE16 keeps a unit inside its chunk
    float* pa = (float*)(row + 4 * chunks);
    float* pb = pa + chunks;
    float* wmax = pb + chunks / 2 + 1;
    uint4* lr = (uint4*)(logits + (size_t)r * v);
    for (int u = threadIdx.x; u < units; u += blockDim.x) ce_cp16(row + CE16(u), lr + u);
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncthreads();
    u32 mx2 = 0xff80ff80u;  // (-inf, -inf)
    for (int u = threadIdx.x; u < units; u += blockDim.x) {
        uint4 w = row[CE16(u)];
        mx2 = ce_max_bf16x2(ce_max_bf16x2(mx2, w.x), ce_max_bf16x2(w.y, ce_max_bf16x2(w.z, w.w)));
    }
    float lo = __uint_as_float(mx2 << 16), hi = __uint_as_float(mx2 & 0xffff0000u);
    float m = ce_block_max(hi > lo ? hi : lo, isnan(lo) || isnan(hi), wmax);
    float ml = m * fp8train_bits(0x3fb8aa3bu);
    bool finite = fabsf(m) <= fp8train_bits(0x7f7fffffu);  // (uniform over the block)
    u32 tgt = targets[r];
    float lt;
    {
        float x[8];
        ce_widen8(row[CE16((int)tgt / 8)], x);
        lt = x[tgt % 8];
    }
    for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
        float acc = 0.0f;
        int len = min(32, (int)v - ch * 32);  // a multiple of 8
        for (int k = 0; k < len / 8; k++) {
            float x[8];
            ce_widen8(row[CE16(4 * ch + k)], x);
            if (finite) {
#pragma unroll
                for (int i = 0; i < 8; i++) acc = acc + ce_exp_finite(x[i], ml);
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) acc = acc + ce_exp(x[i], ml);
            }
        }
        pa[ch] = acc;
    }
    __syncthreads();
    float z = fp8train_block_tree(pa, pb, chunks);
    if (with_grad) {
        float rz = 1.0f / z;
        // (q - 0) * dloss is q * dloss: only the target's element subtracts.
        if (finite && fabsf(dloss) <= fp8train_bits(0x7f7fffffu)) {
            for (int u = threadIdx.x; u < units; u += blockDim.x) {
                float x[8], d[8];
                ce_widen8(row[CE16(u)], x);
#pragma unroll
                for (int i = 0; i < 8; i++) d[i] = (ce_exp_finite(x[i], ml) * rz) * dloss;
                u32 j0 = 8 * (u32)u;
                if (tgt - j0 < 8u) {
#pragma unroll
                    for (int i = 0; i < 8; i++)
                        if (j0 + i == tgt) d[i] = (ce_exp_finite(x[i], ml) * rz - 1.0f) * dloss;
                }
                lr[u] = make_uint4(ce_bf16x2_finite(d[0], d[1]), ce_bf16x2_finite(d[2], d[3]),
                                   ce_bf16x2_finite(d[4], d[5]), ce_bf16x2_finite(d[6], d[7]));
            }
        } else {
            for (int u = threadIdx.x; u < units; u += blockDim.x) {
                float x[8], d[8];
                ce_widen8(row[CE16(u)], x);
                u32 j0 = 8 * (u32)u;
#pragma unroll
                for (int i = 0; i < 8; i++) d[i] = (ce_exp(x[i], ml) * rz - (j0 + i == tgt ? 1.0f : 0.0f)) * dloss;
                uint2 a = fp8train_to_bf16x4(d[0], d[1], d[2], d[3]), b = fp8train_to_bf16x4(d[4], d[5], d[6], d[7]);
                lr[u] = make_uint4(a.x, a.y, b.x, b.y);
            }
        }
    }
    if (threadIdx.x == 0) losses[r] = (fp8train_log(z) + m) - lt;
}
