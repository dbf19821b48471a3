// FP8 casts (sim/src/fp8.rs). `fp8_encode_sweep` runs the saturating casts of both
// formats over a range of f32 bit patterns, for `fp8train verify`'s full 2^32 sweep.

extern "C" __global__ void fp8_encode_sweep(u8* e4m3, u8* e5m2, u32 start, u32 count) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float x = __uint_as_float(start + i);
    e4m3[i] = fp8train_e4m3_sat(x);
    e5m2[i] = fp8train_e5m2_sat(x);
}

// q = sat_encode(x * scale), the scaled cast of every FP8 tensor.
extern "C" __global__ void fp8_encode_scaled(const float* x, u8* q, float scale, u32 n, int e5m2) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i] * scale;
    q[i] = e5m2 ? fp8train_e5m2_sat(v) : fp8train_e4m3_sat(v);
}
