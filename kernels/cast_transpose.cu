// Fused cast + transpose into FP8 (sim/src/ops/cast_transpose.rs): one read of x
// (row-major rows x cols) writes the saturating scaled codes in both layouts; the amax
// comes from the reduction kernels. Every code equals sat_encode(x * scale).
extern "C" __global__ void cast_transpose(const float* x, u8* q, u8* qt, float scale, u32 rows, u32 cols, int e5m2) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)rows * cols) return;
    size_t r = t / cols, c = t % cols;
    u8 code = fp8train_encode_sat(x[t] * scale, e5m2);
    q[t] = code;
    qt[c * rows + r] = code;
}
