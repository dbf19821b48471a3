// The row's max over the block from each thread's (max, saw a NaN) (reduce::max: a NaN
// anywhere gives NaN); `wmax`: 64 floats of shared scratch. Every thread gets it.
__device__ float ce_block_max(float mx, bool nan, float* wmax) {
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
    return any_nan ? FP8TRAIN_NAN : m;
}

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
    float m = ce_block_max(mx, nan, wmax);
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

// The same with the row staged in shared memory (v a multiple of 4, the row fits): the
// logits are read from global memory once, and each exponential is computed once and
// kept there for the gradient. Same operations in the same order as `crossentropy`:
// the same bits. Element j of chunk ch (32 elements) sits at ch * 32 + ((j + 4 ch) mod 32):
// groups of 4 stay whole and 16-byte aligned (cp.async), and the 8 threads of a
// quarter-warp reading one group each from chunks ch..ch+7 hit 8 distinct 4-bank groups.
// Dynamic shared memory: 32 * chunks + chunks + chunks / 2 + 1 + 64 floats.
#define CE_AT(ch, j) ((ch) * 32 + (((j) + 4 * (ch)) & 31))
extern "C" __global__ void __launch_bounds__(1024)
    crossentropy_staged(float* losses, u16* dlogits, const float* logits, const u32* targets, float dloss, u32 n,
                        u32 v, int with_grad) {
    extern __shared__ __align__(16) float ce_sh[];
    u32 r = blockIdx.x;
    if (r >= n) return;  // whole block
    int chunks = ((int)v + 31) / 32, groups = (int)v / 4;
    float* row = ce_sh;
    float* pa = row + 32 * chunks;
    float* pb = pa + chunks;
    float* wmax = pb + chunks / 2 + 1;
    const float* lr = logits + (size_t)r * v;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        u32 dst = (u32)__cvta_generic_to_shared(row + CE_AT(g / 8, 4 * (g % 8)));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(lr + 4 * g));
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::);
    __syncthreads();
    float mx = __int_as_float(0xff800000);
    bool nan = false;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float4 q = *(const float4*)(row + CE_AT(g / 8, 4 * (g % 8)));
        nan |= isnan(q.x) | isnan(q.y) | isnan(q.z) | isnan(q.w);
        mx = q.x > mx ? q.x : mx; mx = q.y > mx ? q.y : mx; mx = q.z > mx ? q.z : mx; mx = q.w > mx ? q.w : mx;
    }
    float m = ce_block_max(mx, nan, wmax);
    for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
        float acc = 0.0f;
        int len = min(32, (int)v - ch * 32);
        for (int j = 0; j < len; j += 4) {
            float4* p = (float4*)(row + CE_AT(ch, j));
            float4 q = *p;
            q.x = fp8train_exp(q.x - m); acc = acc + q.x;
            q.y = fp8train_exp(q.y - m); acc = acc + q.y;
            q.z = fp8train_exp(q.z - m); acc = acc + q.z;
            q.w = fp8train_exp(q.w - m); acc = acc + q.w;
            *p = q;
        }
        pa[ch] = acc;
    }
    __syncthreads();
    float z = fp8train_block_tree(pa, pb, chunks);
    u32 tgt = targets[r];
    if (with_grad) {
        uint2* dr = (uint2*)(dlogits + (size_t)r * v);
        for (int g = threadIdx.x; g < groups; g += blockDim.x) {
            float4 e = *(const float4*)(row + CE_AT(g / 8, 4 * (g % 8)));
            u32 j = 4 * g;
            float d0 = (e.x / z - (j == tgt ? 1.0f : 0.0f)) * dloss;
            float d1 = (e.y / z - (j + 1 == tgt ? 1.0f : 0.0f)) * dloss;
            float d2 = (e.z / z - (j + 2 == tgt ? 1.0f : 0.0f)) * dloss;
            float d3 = (e.w / z - (j + 3 == tgt ? 1.0f : 0.0f)) * dloss;
            dr[g] = make_uint2((u32)fp8train_to_bf16(d0) | ((u32)fp8train_to_bf16(d1) << 16),
                               (u32)fp8train_to_bf16(d2) | ((u32)fp8train_to_bf16(d3) << 16));
        }
    }
    if (threadIdx.x == 0) losses[r] = (fp8train_log(z) + m) - lr[tgt];
}
