// Fused softmax + cross-entropy (sim/src/ops/crossentropy.rs): one block per row. The
// max is order-free (NaN wins); the sum of exponentials is the contract's sum: thread t
// sums chunks t, t + blockDim, ... sequentially, the block runs the tree over the chunk
// partials (dynamic shared memory: chunks + chunks / 2 + 1 + 64 floats; 2^20 classes fit).
// dlogits is written in BF16 (RNE), as the LM head's backward products read it.
extern "C" __global__ void crossentropy(float* losses, u16* dlogits, const float* logits, const u32* targets,
                                        float dloss, u32 n, u32 v, int with_grad) {
    extern __shared__ float ce_sh[];
    u32 r = blockIdx.x;
    if (r >= n) return;  // whole block
    int chunks = ((int)v + 31) / 32;
    float* pa = ce_sh;
    float* pb = ce_sh + chunks;                 // the tree's scratch: chunks / 2 + 1
    float* wmax = pb + chunks / 2 + 1;          // 32 maxima + 32 NaN flags
    const float* lr = logits + (size_t)r * v;
    float mx = __int_as_float(0xff800000);
    bool nan = false;
    for (u32 j = threadIdx.x; j < v; j += blockDim.x) { float a = lr[j]; nan |= isnan(a); mx = a > mx ? a : mx; }
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, mx, o);
        mx = other > mx ? other : mx;
    }
    nan = __any_sync(0xffffffffu, nan);
    u32 warp = threadIdx.x / 32, warps = blockDim.x / 32;
    if ((threadIdx.x & 31) == 0) { wmax[warp] = mx; wmax[32 + warp] = nan ? 1.0f : 0.0f; }
    __syncthreads();
    float m = __int_as_float(0xff800000);
    bool any_nan = false;
    for (u32 k = 0; k < warps; k++) { m = wmax[k] > m ? wmax[k] : m; any_nan |= wmax[32 + k] != 0.0f; }
    if (any_nan) m = FP8TRAIN_NAN;
    for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
        float acc = 0.0f;
        int end = min((int)v, (ch + 1) * 32);
        for (int j = ch * 32; j < end; j++) acc = acc + fp8train_exp(lr[j] - m);
        pa[ch] = acc;
    }
    __syncthreads();
    float z = fp8train_block_tree(pa, pb, chunks);
    u32 tgt = targets[r];
    if (with_grad) {
        u16* dr = dlogits + (size_t)r * v;
        for (u32 j = threadIdx.x; j < v; j += blockDim.x) {
            float ind = j == tgt ? 1.0f : 0.0f;
            dr[j] = fp8train_to_bf16((fp8train_exp(lr[j] - m) / z - ind) * dloss);
        }
    }
    if (threadIdx.x == 0) losses[r] = (fp8train_log(z) + m) - lr[tgt];
}
