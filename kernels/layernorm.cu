// LayerNorm (sim/src/ops/layernorm.rs): one warp per row. Lane l sums chunks l, l+32,
// ... of the row sequentially (the contract's chunks of 32), the warp then runs the
// contract's tree over the chunk partials: the same bits as one thread doing it all.
// Each warp first copies its row(s) into shared memory with coalesced 16-byte loads, one
// padding float after every 32 (element i at i + i / 32), so that lane l reading chunk l
// element by element hits 32 different banks; the weights are staged once per block.
#define LN_EPS 1e-5f
#define LN_AT(i) ((i) + ((i) >> 5))

// The contract's sum of term(i) for i < c, computed by the calling warp; `pa`/`pb` are
// this warp's shared scratch of (c + 31) / 32 floats each.
template <typename F>
__device__ float ln_warp_sum(int c, float* pa, float* pb, F term) {
    int chunks = (c + 31) / 32, lane = threadIdx.x & 31;
    for (int ch = lane; ch < chunks; ch += 32) {
        float acc = 0.0f;
        int end = min(c, (ch + 1) * 32);
#pragma unroll 8
        for (int i = ch * 32; i < end; i++) acc = acc + term(i);
        pa[ch] = acc;
    }
    __syncwarp();
    return fp8train_warp_tree(pa, pb, chunks);
}

// Row `src` (c floats) into padded shared memory `dst` by `threads` threads from `t0`:
// asynchronous 4-byte copies (cp.async; a warp's instruction moves 128 consecutive
// bytes), so every copy of the staged rows is in flight at once instead of one load
// round trip per loop step; ln_staged() waits for the calling thread's copies.
__device__ __forceinline__ void ln_stage(float* dst, const float* src, u32 c, u32 t0, u32 threads) {
    for (u32 i = t0; i < c; i += threads)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((u32)__cvta_generic_to_shared(dst + LN_AT(i))),
                     "l"(src + i));
}
__device__ __forceinline__ void ln_staged() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Dynamic shared memory, in floats: the weights and the bias (c + chunks each) for the
// block, then per warp 2 * chunks of scratch and one staged row of c + chunks (see
// ln_cfg). Nothing in the loops below waits on a global load.
// y is stored per `mode` (fp8train_act_store); amax collects max |y| for E4M3.
extern "C" __global__ void layernorm_forward(void* y, int mode, float scale, unsigned long long* amax, float* mean,
                                             float* rstd, const float* x, const float* w, const float* b, u32 n,
                                             u32 c) {
    extern __shared__ float ln_sh[];
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    u32 r = blockIdx.x * warps + warp;
    int chunks = ((int)c + 31) / 32, padded = (int)c + chunks;
    float* sw = ln_sh;
    float* sb = sw + padded;
    float* pa = sb + padded + (size_t)warp * (2 * chunks + padded);
    float* pb = pa + chunks;
    float* sx = pb + chunks;
    bool live = r < n;
    ln_stage(sw, w, c, threadIdx.x, blockDim.x);
    ln_stage(sb, b, c, threadIdx.x, blockDim.x);
    if (live) ln_stage(sx, x + (size_t)r * c, c, lane, 32);
    ln_staged();
    __syncthreads();
    if (!live) return;  // whole warps leave together: only warp-level syncs below
    float mu = ln_warp_sum((int)c, pa, pb, [&](int i) { return sx[LN_AT(i)]; }) / (float)c;
    float var = ln_warp_sum((int)c, pa, pb, [&](int i) { float d = sx[LN_AT(i)] - mu; return d * d; }) / (float)c;
    float s = 1.0f / sqrtf(var + LN_EPS);
    size_t row = (size_t)r * c;
    u32 am = 0;
#pragma unroll 4
    for (u32 i = lane; i < c; i += 32)
        fp8train_act_store(y, mode, scale, row + i, ((sx[LN_AT(i)] - mu) * s) * sw[LN_AT(i)] + sb[LN_AT(i)], am);
    if (mode == ACT_E4M3) fp8train_act_flush(am, amax);
    if (lane == 0) { mean[r] = mu; rstd[r] = s; }
}

// dx (overwritten, or with `accumulate` dx = dx + grad) and dy * normalized (into `pr`,
// for the weight gradient's column sums). x and dy are staged; the old dx is read in
// the output loop, so a warp needs two staged rows (more warps per SM).
// dy is BF16 (as the products before a layernorm's backward store it), staged as it is
// by 4-byte cp.async (pairs of elements; c even, dy 4-byte aligned) with two padding
// elements after every 32: element i at LN16_AT(i), so lane l reading chunk l element by
// element hits bank 17 l mod 32 (all distinct); widened where it is read.
#define LN16_AT(i) ((i) + 2 * ((i) >> 5))
__device__ __forceinline__ void ln_stage_bf16(u16* dst, const u16* src, u32 c, u32 lane) {
    if (c & 1) {  // (odd rows start at odd elements: plain loads)
        for (u32 i = lane; i < c; i += 32) dst[LN16_AT(i)] = src[i];
        return;
    }
    for (u32 i = 2 * lane; i < c; i += 64)
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((u32)__cvta_generic_to_shared(dst + LN16_AT(i))),
                     "l"(src + i));
}
extern "C" __global__ void layernorm_backward_rows(float* dx, int accumulate, float* pr, const u16* dy, const float* x,
                                                   const float* w, const float* mean, const float* rstd, u32 n, u32 c) {
    extern __shared__ float ln_sh[];
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    u32 r = blockIdx.x * warps + warp;
    int chunks = ((int)c + 31) / 32, padded = (int)c + chunks;
    float* sw = ln_sh;
    float* pa = sw + padded + (size_t)warp * (2 * chunks + padded + ((int)c + 2 * chunks + 1) / 2);
    float* pb = pa + chunks;
    u16* sdy = (u16*)(pb + chunks);  // c + 2 chunks BF16 values: (c + 2 chunks + 1) / 2 floats
    float* sx = pb + chunks + ((int)c + 2 * chunks + 1) / 2;
    bool live = r < n;
    ln_stage(sw, w, c, threadIdx.x, blockDim.x);
    if (live) {
        ln_stage(sx, x + (size_t)r * c, c, lane, 32);
        ln_stage_bf16(sdy, dy + (size_t)r * c, c, lane);
    }
    ln_staged();
    __syncthreads();
    if (!live) return;
    float mu = mean[r], rs = rstd[r];
    auto gy = [&](u32 i) { return fp8train_from_bf16(sdy[LN16_AT(i)]); };
    float s1 = ln_warp_sum((int)c, pa, pb, [&](int i) { return sw[LN_AT(i)] * gy(i); }) / (float)c;
    float s2 = ln_warp_sum((int)c, pa, pb, [&](int i) {
                   return (sw[LN_AT(i)] * gy(i)) * ((sx[LN_AT(i)] - mu) * rs);
               }) / (float)c;
    float* dxr = dx + (size_t)r * c;
    float* prr = pr + (size_t)r * c;
    auto one = [&](u32 i, float old) {
        float nrm = (sx[LN_AT(i)] - mu) * rs;
        float g = sw[LN_AT(i)] * gy(i);
        float d = ((g - s1) - nrm * s2) * rs;
        dxr[i] = accumulate ? old + d : d;
        prr[i] = gy(i) * nrm;
    };
    // Four elements per lane and step, the old dx values loaded first (coalesced, four in
    // flight: a store to pr could otherwise hold each load back).
    u32 i = lane;
    for (; i + 96 < c; i += 128) {
        float old[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (accumulate)
#pragma unroll
            for (u32 u = 0; u < 4; u++) old[u] = dxr[i + 32 * u];
#pragma unroll
        for (u32 u = 0; u < 4; u++) one(i + 32 * u, old[u]);
    }
    for (; i < c; i += 32) one(i, accumulate ? dxr[i] : 0.0f);
}
