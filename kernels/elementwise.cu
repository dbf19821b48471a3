// Element-wise ops and casts (sim/src/fp8.rs, half16.rs, backend glue).

extern "C" __global__ void cast_fp8(const float* x, u8* q, float scale, u32 n, int e5m2, unsigned long long* saturated) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float v = x[i] * scale;
    float mx = e5m2 ? 57344.0f : 448.0f;
    if (fabsf(v) > mx) atomicAdd(saturated, 1ull);
    q[i] = fp8train_encode_sat(v, e5m2);
}
extern "C" __global__ void decode_fp8(const u8* q, float* x, float inv_scale, u32 n, int e5m2) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float v = fp8train_decode(q[i], e5m2);
    x[i] = isnan(v) ? FP8TRAIN_NAN : v * inv_scale;  // one canonical NaN, as the simulator
}
extern "C" __global__ void cast_bf16(const float* x, u16* y, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) y[i] = fp8train_to_bf16(x[i]);
}
extern "C" __global__ void cast_f16(const float* x, u16* y, float scale, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) y[i] = fp8train_to_f16(x[i] * scale);
}
extern "C" __global__ void decode_f16(const u16* h, float* x, float inv_scale, u32 n) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    float v = fp8train_from_f16(h[i]);
    x[i] = isnan(v) ? FP8TRAIN_NAN : v * inv_scale;
}
extern "C" __global__ void add_bias(float* x, const float* b, u32 n, u32 c) {
    u32 i = fp8train_tid();
    if (i < n) x[i] += b[i % c];
}
extern "C" __global__ void add(float* out, const float* a, const float* b, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) out[i] = a[i] + b[i];
}
extern "C" __global__ void accumulate(float* acc, const float* x, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) acc[i] += x[i];
}
extern "C" __global__ void scale_inplace(float* x, float s, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) x[i] *= s;
}

// Row-major [rows x cols] -> [cols x rows] (K-major copies for the fast GEMM).
extern "C" __global__ void transpose_u8(const u8* src, u8* dst, u32 rows, u32 cols) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)rows * cols) return;
    size_t r = t / cols, c = t % cols;
    dst[c * rows + r] = src[t];
}
extern "C" __global__ void transpose_u16(const u16* src, u16* dst, u32 rows, u32 cols) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)rows * cols) return;
    size_t r = t / cols, c = t % cols;
    dst[c * rows + r] = src[t];
}
