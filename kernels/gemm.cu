// The exact GEMM (sim/src/ops/gemm.rs), SIMT: one thread per output element runs the
// fma chain over k in ascending order from +0 (with `accumulate`: from the value in c,
// scale 1), then multiplies by the scale product (scale * *sa) * *sb: the host's scale
// and the operands' inverse scales (null: 1), in that order.
// Operand types: 0 = f32, 1 = bf16, 2 = e4m3, 3 = e5m2; element (i, j) of a strided
// operand is p[i * rs + j * cs].

__device__ __forceinline__ float gemm_load(const void* p, size_t idx, int ty) {
    if (ty == 0) return ((const float*)p)[idx];
    if (ty == 1) return fp8train_from_bf16(((const u16*)p)[idx]);
    return fp8train_decode(((const u8*)p)[idx], ty == 3);
}

__device__ __forceinline__ float gemm_exact_one(size_t t, const float* c, const void* a, int ta, u32 ars, u32 acs,
                                               const void* b, int tb, u32 brs, u32 bcs, u32 n, u32 k, int accumulate) {
    size_t i = t / n, j = t % n;
    float acc = accumulate ? c[t] : 0.0f;
    for (u32 p = 0; p < k; p++) {
        acc = fmaf(gemm_load(a, i * ars + (size_t)p * acs, ta), gemm_load(b, (size_t)p * brs + j * bcs, tb), acc);
    }
    return acc;
}

extern "C" __global__ void gemm_exact(float* c, const void* a, int ta, u32 ars, u32 acs, const void* b, int tb,
                                      u32 brs, u32 bcs, u32 m, u32 n, u32 k, float scale, const float* sa,
                                      const float* sb, int accumulate) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)m * n) return;
    scale = scale * fp8train_ld(sa) * fp8train_ld(sb);
    c[t] = gemm_exact_one(t, c, a, ta, ars, acs, b, tb, brs, bcs, n, k, accumulate) * scale;
}

// The same product stored in BF16 (the f32 result rounded once, RNE).
extern "C" __global__ void gemm_exact_bf16(u16* c, const void* a, int ta, u32 ars, u32 acs, const void* b, int tb,
                                           u32 brs, u32 bcs, u32 m, u32 n, u32 k, float scale, const float* sa,
                                           const float* sb) {
    size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (size_t)m * n) return;
    scale = scale * fp8train_ld(sa) * fp8train_ld(sb);
    c[t] = fp8train_to_bf16(gemm_exact_one(t, nullptr, a, ta, ars, acs, b, tb, brs, bcs, n, k, 0) * scale);
}
