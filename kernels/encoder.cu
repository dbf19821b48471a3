// Token + position embedding (sim/src/ops/encoder.rs).
extern "C" __global__ void encoder_forward(float* out, const u32* tokens, const float* wte, const float* wpe, u32 b,
                                           u32 t, u32 c) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)b * t * c) return;
    size_t n = idx / c, i = idx % c;
    out[idx] = wte[(size_t)tokens[n] * c + i] + wpe[(n % t) * c + i];
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
