// GELU, tanh approximation (sim/src/ops/gelu.rs), same operation order.
#define GELU_K __int_as_float(0x3f4c422a)
#define GELU_A 0.044715f
#define GELU_A3 0.134145f

__device__ __forceinline__ float gelu_inner(float x) { return GELU_K * (x + GELU_A * ((x * x) * x)); }

extern "C" __global__ void gelu_forward(float* y, const float* x, u32 n) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float v = x[i];
    y[i] = (0.5f * v) * (1.0f + fp8train_tanh(gelu_inner(v)));
}
extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* dy, u32 n) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float v = x[i];
    float t = fp8train_tanh(gelu_inner(v));
    float d = 0.5f * (1.0f + t) + ((0.5f * v) * (1.0f - t * t)) * (GELU_K * (1.0f + GELU_A3 * (v * v)));
    dx[i] = d * dy[i];
}
