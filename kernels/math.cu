// The project's transcendentals (sim/src/math.rs) over a range of f32 bit patterns, for
// `fp8train verify`'s full sweeps. op: 0 = exp, 1 = log, 2 = tanh, 3 = exp2_fast.

extern "C" __global__ void math_sweep(float* y, u32 start, u32 count, int op) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float x = __uint_as_float(start + i);
    y[i] = op == 0 ? fp8train_exp(x) : (op == 1 ? fp8train_log(x) : (op == 2 ? fp8train_tanh(x) : fp8train_exp2_fast(x)));
}
