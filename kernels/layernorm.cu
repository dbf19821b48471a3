// LayerNorm (sim/src/ops/layernorm.rs): one warp per row. Lane l sums chunks l, l+32,
// ... of the row sequentially (the contract's chunks of 32), the warp then runs the
// contract's tree over the chunk partials: the same bits as one thread doing it all.
#define LN_EPS 1e-5f

// The contract's sum of term(i) for i < c, computed by the calling warp; `pa`/`pb` are
// this warp's shared scratch of (c + 31) / 32 floats each.
template <typename F>
__device__ float ln_warp_sum(int c, float* pa, float* pb, F term) {
    int chunks = (c + 31) / 32, lane = threadIdx.x & 31;
    for (int ch = lane; ch < chunks; ch += 32) {
        float acc = 0.0f;
        int end = min(c, (ch + 1) * 32);
        for (int i = ch * 32; i < end; i++) acc = acc + term(i);
        pa[ch] = acc;
    }
    __syncwarp();
    return fp8train_warp_tree(pa, pb, chunks);
}

// Block: `warps` rows; dynamic shared memory: 2 * chunks floats per warp.
extern "C" __global__ void layernorm_forward(float* y, float* mean, float* rstd, const float* x, const float* w,
                                             const float* b, u32 n, u32 c) {
    extern __shared__ float ln_sh[];
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    u32 r = blockIdx.x * warps + warp;
    int chunks = ((int)c + 31) / 32;
    float* pa = ln_sh + (size_t)warp * 2 * chunks;
    float* pb = pa + chunks;
    if (r >= n) return;  // whole warps leave together: only warp-level syncs below
    const float* xr = x + (size_t)r * c;
    float mu = ln_warp_sum((int)c, pa, pb, [&](int i) { return xr[i]; }) / (float)c;
    float var = ln_warp_sum((int)c, pa, pb, [&](int i) { float d = xr[i] - mu; return d * d; }) / (float)c;
    float s = 1.0f / sqrtf(var + LN_EPS);
    float* yr = y + (size_t)r * c;
    for (u32 i = lane; i < c; i += 32) yr[i] = ((xr[i] - mu) * s) * w[i] + b[i];
    if (lane == 0) { mean[r] = mu; rstd[r] = s; }
}

// dx (overwritten) and dy * normalized (into `pr`, for the weight gradient's column sums).
extern "C" __global__ void layernorm_backward_rows(float* dx, float* pr, const float* dy, const float* x,
                                                   const float* w, const float* mean, const float* rstd, u32 n, u32 c) {
    extern __shared__ float ln_sh[];
    u32 warp = threadIdx.x / 32, lane = threadIdx.x & 31, warps = blockDim.x / 32;
    u32 r = blockIdx.x * warps + warp;
    int chunks = ((int)c + 31) / 32;
    float* pa = ln_sh + (size_t)warp * 2 * chunks;
    float* pb = pa + chunks;
    if (r >= n) return;
    const float* xr = x + (size_t)r * c;
    const float* dyr = dy + (size_t)r * c;
    float mu = mean[r], rs = rstd[r];
    float s1 = ln_warp_sum((int)c, pa, pb, [&](int i) { return w[i] * dyr[i]; }) / (float)c;
    float s2 = ln_warp_sum((int)c, pa, pb, [&](int i) { return (w[i] * dyr[i]) * ((xr[i] - mu) * rs); }) / (float)c;
    for (u32 i = lane; i < c; i += 32) {
        float nrm = (xr[i] - mu) * rs;
        float g = w[i] * dyr[i];
        dx[(size_t)r * c + i] = ((g - s1) - nrm * s2) * rs;
        pr[(size_t)r * c + i] = dyr[i] * nrm;
    }
}
