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

__device__ __forceinline__ float gelu_value(float v) { return (0.5f * v) * (1.0f + fp8train_tanh(gelu_inner(v))); }
__device__ __forceinline__ float gelu_grad(float v, float dy) {
    float t = fp8train_tanh(gelu_inner(v));
    float d = 0.5f * (1.0f + t) + ((0.5f * v) * (1.0f - t * t)) * (GELU_K * (1.0f + GELU_A3 * (v * v)));
    return d * dy;
}
// Four elements per thread from 4 * tid (16-byte loads) when the bias (if any) has a
// multiple of 4 columns and the buffers are aligned, else one at a time; launched over (n + 3) / 4 threads.
__device__ __forceinline__ bool gelu_vec(const void* a, const void* b, const void* d, const float* bias, u32 c,
                                         size_t i0, u32 n) {
    return (!bias || (c & 3) == 0) && ((((size_t)a | (size_t)b | (size_t)d | (size_t)bias) & 15) == 0) && i0 + 3 < n;
}
__device__ __forceinline__ void gelu_load4(float* v, const float* x, const float* bias, u32 c, size_t i0) {
    float4 xv = *(const float4*)(x + i0);
    v[0] = xv.x; v[1] = xv.y; v[2] = xv.z; v[3] = xv.w;
    if (bias) {
        float4 b = *(const float4*)(bias + i0 % c);
        v[0] = v[0] + b.x; v[1] = v[1] + b.y; v[2] = v[2] + b.z; v[3] = v[3] + b.w;
    }
}

// y = gelu(x + bias) stored per `mode` (fp8train_act_store); every thread reaches the
// amax flush (no early return), one atomic per block.
extern "C" __global__ void gelu_forward(void* y, int mode, float scale, unsigned long long* amax, const float* x,
                                        const float* bias, u32 c, u32 n) {
    u32 am = 0;
    size_t i0 = 4 * (size_t)fp8train_tid();
    if (gelu_vec(y, x, x, bias, c, i0, n)) {
        float v[4];
        gelu_load4(v, x, bias, c, i0);
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = gelu_value(v[k]);
        fp8train_act_store4(y, mode, scale, i0, v, am);
    } else {
        for (size_t i = i0; i < n && i < i0 + 4; i++)
            fp8train_act_store(y, mode, scale, i, gelu_value(gelu_input(x, bias, c, i)), am);
    }
    if (mode == ACT_E4M3) fp8train_block_flush(am, 0, amax, nullptr);
}
extern "C" __global__ void gelu_backward(float* dx, const float* x, const float* bias, u32 c, const float* dy, u32 n) {
    size_t i0 = 4 * (size_t)fp8train_tid();
    if (gelu_vec(dx, x, dy, bias, c, i0, n)) {
        float v[4];
        gelu_load4(v, x, bias, c, i0);
        float4 g = *(const float4*)(dy + i0);
        *(float4*)(dx + i0) = make_float4(gelu_grad(v[0], g.x), gelu_grad(v[1], g.y), gelu_grad(v[2], g.z), gelu_grad(v[3], g.w));
        return;
    }
    for (size_t i = i0; i < n && i < i0 + 4; i++) dx[i] = gelu_grad(gelu_input(x, bias, c, i), dy[i]);
}
