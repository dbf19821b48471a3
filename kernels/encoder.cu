// Token + position embedding (sim/src/ops/encoder.rs).
extern "C" __global__ void encoder_forward(float* out, const u32* tokens, const float* wte, const float* wpe, u32 b,
                                           u32 t, u32 c) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)b * t * c) return;
    size_t n = idx / c, i = idx % c;
    out[idx] = wte[(size_t)tokens[n] * c + i] + wpe[(n % t) * c + i];
}
// The same from the FP16 master codes of the table: f16_value (decode_f16's value), then
// the position's added.
extern "C" __global__ void encoder_forward_f16(float* out, const u32* tokens, const u16* wte, const float* inv_p,
                                               const float* wpe, u32 b, u32 t, u32 c) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)b * t * c) return;
    size_t n = idx / c, i = idx % c;
    out[idx] = f16_value(wte[(size_t)tokens[n] * c + i], fp8train_ld(inv_p)) + wpe[(n % t) * c + i];
}
// One thread per channel: rows in ascending order, so the additions keep their order.
extern "C" __global__ void encoder_backward(float* dwte, float* dwpe, const float* dout, const u32* tokens, u32 b,
                                            u32 t, u32 c) {
    u32 i = fp8train_tid();
    if (i >= c) return;
    for (size_t n = 0; n < (size_t)b * t; n++) dwte[(size_t)tokens[n] * c + i] += dout[n * c + i];
    for (u32 p = 0; p < t; p++) {
        float acc = 0.0f;
        for (u32 bb = 0; bb < b; bb++) acc += dout[((size_t)bb * t + p) * c + i];
        dwpe[(size_t)p * c + i] = acc;
    }
}

// The same sums in parallel. The host groups positions by token (`order`: positions
// sorted by token, stable, so ascending within a token; segment s holds
// order[seg[s] .. seg[s+1]) of token segtok[s]); one thread per (segment, channel) adds
// its rows in ascending order, as the one-thread version does. Grid: (segments, ceil(c/128)).
extern "C" __global__ void encoder_backward_wte(float* dwte, const float* dout, const u32* order, const u32* seg,
                                                const u32* segtok, u32 c) {
    u32 i = blockIdx.y * blockDim.x + threadIdx.x, s = blockIdx.x;
    if (i >= c) return;
    float* dst = dwte + (size_t)segtok[s] * c + i;
    float acc = *dst;
    for (u32 k = seg[s]; k < seg[s + 1]; k++) acc += dout[(size_t)order[k] * c + i];
    *dst = acc;
}
// One thread per (position, channel): batches in ascending order.
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const float* dout, u32 b, u32 t, u32 c) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)t * c) return;
    u32 p = idx / c, i = idx % c;
    float acc = 0.0f;
    for (u32 bb = 0; bb < b; bb++) acc += dout[((size_t)bb * t + p) * c + i];
    dwpe[idx] = acc;
}
