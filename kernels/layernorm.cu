// LayerNorm (sim/src/ops/layernorm.rs): one thread per row, the contract's sums.
#define LN_EPS 1e-5f

extern "C" __global__ void layernorm_forward(float* y, float* mean, float* rstd, const float* x, const float* w,
                                             const float* b, u32 n, u32 c) {
    u32 r = fp8train_tid();
    if (r >= n) return;
    const float* xr = x + (size_t)r * c;
    float mu = fp8train_csum((int)c, [&](int i) { return xr[i]; }) / (float)c;
    float var = fp8train_csum((int)c, [&](int i) { float d = xr[i] - mu; return d * d; }) / (float)c;
    float s = 1.0f / sqrtf(var + LN_EPS);
    float* yr = y + (size_t)r * c;
    for (u32 i = 0; i < c; i++) yr[i] = ((xr[i] - mu) * s) * w[i] + b[i];
    mean[r] = mu;
    rstd[r] = s;
}

// dx (overwritten) and dy * normalized (into `pr`, for the weight gradient's column sums).
extern "C" __global__ void layernorm_backward_rows(float* dx, float* pr, const float* dy, const float* x,
                                                   const float* w, const float* mean, const float* rstd, u32 n, u32 c) {
    u32 r = fp8train_tid();
    if (r >= n) return;
    const float* xr = x + (size_t)r * c;
    const float* dyr = dy + (size_t)r * c;
    float mu = mean[r], rs = rstd[r];
    float s1 = fp8train_csum((int)c, [&](int i) { return w[i] * dyr[i]; }) / (float)c;
    float s2 = fp8train_csum((int)c, [&](int i) { return (w[i] * dyr[i]) * ((xr[i] - mu) * rs); }) / (float)c;
    for (u32 i = 0; i < c; i++) {
        float nrm = (xr[i] - mu) * rs;
        float g = w[i] * dyr[i];
        dx[(size_t)r * c + i] = ((g - s1) - nrm * s2) * rs;
        pr[(size_t)r * c + i] = dyr[i] * nrm;
    }
}
