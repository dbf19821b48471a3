// GELU, tanh approximation (sim/src/ops/gelu.rs), same operation order.
#define GELU_K __int_as_float(0x3f4c422a)
#define GELU_A 0.044715f
#define GELU_A3 0.134145f

__device__ __forceinline__ float gelu_inner(float x) { return GELU_K * (x + GELU_A * ((x * x) * x)); }

// The value GELU is applied to: x + bias[column] (added first), or x without a bias
// (no + 0.0, which would turn -0 into +0).
__device__ __forceinline__ float gelu_input(const float* x, const float* bias, u32 c, size_t i) {
    return bias ? x[i] + bias[i % c] : x[i];
}

// y = gelu(x + bias) stored per `mode` (fp8train_act_store). Grid-stride, so whole warps
// stay to the amax flush.
extern "C" __global__ void gelu_forward(void* y, int mode, float scale, unsigned long long* amax, const float* x,
                                        const float* bias, u32 c, u32 n) {
    u32 am = 0;
    for (size_t i = fp8train_tid(); i < n; i += (size_t)gridDim.x * blockDim.x) {
        float v = gelu_input(x, bias, c, i);
        fp8train_act_store(y, mode, scale, i, (0.5f * v) * (1.0f + fp8train_tanh(gelu_inner(v))), am);
    }
    if (mode == ACT_E4M3) fp8train_act_flush(am, amax);
}
extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* bias, u32 c, const float* dy, u32 n) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float v = gelu_input(x, bias, c, i);
    float t = fp8train_tanh(gelu_inner(v));
    float d = 0.5f * (1.0f + t) + ((0.5f * v) * (1.0f - t * t)) * (GELU_K * (1.0f + GELU_A3 * (v * v)));
    dx[i] = d * dy[i];
}
