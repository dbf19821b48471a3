// GELU, tanh approximation (sim/src/ops/gelu.rs), same operation order.
#define GELU_K __int_as_float(0x3f4c422a)
#define GELU_A 0.044715f
#define GELU_A3 0.134145f

__device__ __forceinline__ float gelu_inner(float x) { return GELU_K * (x + GELU_A * ((x * x) * x)); }

__device__ __forceinline__ float gelu_value(float v) { return (0.5f * v) * (1.0f + fp8train_tanh(gelu_inner(v))); }
__device__ __forceinline__ float gelu_grad(float v, float dy) {
    float t = fp8train_tanh(gelu_inner(v));
    float d = 0.5f * (1.0f + t) + ((0.5f * v) * (1.0f - t * t)) * (GELU_K * (1.0f + GELU_A3 * (v * v)));
    return d * dy;
}
// Four BF16 pre-activations at i0 as f32 (one 8-byte load).
__device__ __forceinline__ void gelu_load4(float* v, const u16* x, size_t i0) {
    uint2 w = *(const uint2*)(x + i0);
    v[0] = fp8train_from_bf16((u16)(w.x & 0xffff)); v[1] = fp8train_from_bf16((u16)(w.x >> 16));
    v[2] = fp8train_from_bf16((u16)(w.y & 0xffff)); v[3] = fp8train_from_bf16((u16)(w.y >> 16));
}

// y = gelu(x) of the BF16 pre-activation, stored per `mode` (fp8train_act_store). Four
// elements per thread when aligned (launched over (n + 3) / 4 threads); every thread
// reaches the amax flush (no early return), one atomic per block.
extern "C" __global__ void gelu_forward(void* y, int mode, float scale, unsigned long long* amax, const u16* x, u32 n) {
    u32 am = 0;
    size_t i0 = 4 * (size_t)fp8train_tid();
    if (i0 + 3 < n && ((((size_t)x & 7) | ((size_t)y & 15)) == 0)) {
        float v[4];
        gelu_load4(v, x, i0);
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = gelu_value(v[k]);
        fp8train_act_store4(y, mode, scale, i0, v, am);
    } else {
        for (size_t i = i0; i < n && i < i0 + 4; i++)
            fp8train_act_store(y, mode, scale, i, gelu_value(fp8train_from_bf16(x[i])), am);
    }
    if (mode == ACT_E4M3) fp8train_block_flush(am, 0, amax, nullptr);
}
extern "C" __global__ void gelu_backward(float* dx, const u16* x, const float* dy, u32 n) {
    size_t i0 = 4 * (size_t)fp8train_tid();
    if (i0 + 3 < n && ((((size_t)x & 7) | (((size_t)dx | (size_t)dy) & 15)) == 0)) {
        float v[4];
        gelu_load4(v, x, i0);
        float4 g = *(const float4*)(dy + i0);
        *(float4*)(dx + i0) = make_float4(gelu_grad(v[0], g.x), gelu_grad(v[1], g.y), gelu_grad(v[2], g.z), gelu_grad(v[3], g.w));
        return;
    }
    for (size_t i = i0; i < n && i < i0 + 4; i++) dx[i] = gelu_grad(fp8train_from_bf16(x[i]), dy[i]);
}
