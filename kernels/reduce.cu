// Reductions (sim/src/reduce.rs) in the contract's order, whatever the launch shape:
// chunks of 32 summed sequentially, then the pairwise tree over chunk partials. The
// tree is cut into aligned sub-trees of 256 (first pass) and 1024 (later passes)
// partials: an aligned sub-tree of the contract's tree is computed the same way
// wherever it sits, so the root is the same bits as one thread running the whole tree.
// amax is order-free: atomicMax on the bit pattern of |x|.

// One block: 256 chunks (8192 elements) staged through shared memory (row padded by
// one float so each thread's chunk reads hit distinct banks), then their tree.
// mode 0: x, 1: x*x
#define RS_CHUNKS 256
// Block `blk` of the first pass over n elements: its partial into *out.
// `load4(g, v)` puts elements g..g+3 (g a multiple of 4; zero past n) into v: staged
// four at a time (one vector load each where the source allows), the same values.
template <typename L>
__device__ void rs_block4(L load4, u32 n, int mode, u32 blk, float* out) {
    __shared__ float stage[RS_CHUNKS * 33];
    __shared__ float pa[RS_CHUNKS], pb[RS_CHUNKS / 2 + 1];
    size_t base = (size_t)blk * RS_CHUNKS * 32;
#pragma unroll 4
    for (u32 e = 4 * threadIdx.x; e < RS_CHUNKS * 32; e += 4 * RS_CHUNKS) {
        float v[4];
        load4(base + e, v);
        float* d = stage + e + e / 32;  // the four stay in one chunk of 32
        d[0] = v[0]; d[1] = v[1]; d[2] = v[2]; d[3] = v[3];
    }
    __syncthreads();
    u32 chunks_total = (n + 31) / 32;
    u32 ch = blk * RS_CHUNKS + threadIdx.x;
    if (ch < chunks_total) {
        u32 len = min(32u, n - ch * 32);
        const float* s = stage + threadIdx.x * 33;
        float acc = 0.0f;
        for (u32 i = 0; i < len; i++) { float v = s[i]; acc = acc + (mode == 1 ? v * v : v); }
        pa[threadIdx.x] = acc;
    }
    __syncthreads();
    int m = (int)min((u32)RS_CHUNKS, chunks_total - blk * RS_CHUNKS);
    float r = fp8train_block_tree(pa, pb, m);
    if (threadIdx.x == 0) *out = r;
}
template <typename L>
__device__ void rs_block(L load, u32 n, int mode, u32 blk, float* out) {
    rs_block4([&](size_t g, float* v) {
        for (int k = 0; k < 4; k++) v[k] = g + k < n ? load(g + k) : 0.0f;
    }, n, mode, blk, out);
}
template <typename L>
__device__ void rs_blocks(L load, u32 n, int mode, float* out) {
    rs_block(load, n, mode, blockIdx.x, out + blockIdx.x);
}
extern "C" __global__ void __launch_bounds__(RS_CHUNKS) reduce_sum_blocks(const float* x, u32 n, int mode, float* out) {
    rs_blocks([&](size_t g) { return x[g]; }, n, mode, out);
}
// The tree over `n` partials, 1024 aligned partials per block.
extern "C" __global__ void __launch_bounds__(512) reduce_tree_blocks(const float* in, u32 n, float* out) {
    __shared__ float pa[1024], pb[513];
    size_t base = (size_t)blockIdx.x * 1024;
    for (u32 e = threadIdx.x; e < 1024; e += blockDim.x) if (base + e < n) pa[e] = in[base + e];
    __syncthreads();
    int m = (int)min((size_t)1024, n - base);
    float r = fp8train_block_tree(pa, pb, m);
    if (threadIdx.x == 0) out[blockIdx.x] = r;
}
// amax as a bit pattern: out[0] must be zero before the launch. Bits above 0x7f800000
// mean a NaN was seen (the host turns them into the canonical NaN).
// Grid-stride, four elements per thread and step (16-byte loads) when x is aligned.
extern "C" __global__ void amax_bits(const float* x, u32 n, unsigned long long* out) {
    u32 m = 0;
    size_t start = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    size_t vec = ((size_t)x & 15) == 0 ? n / 4 : 0;
    for (size_t v = start; v < vec; v += stride) {
        float4 q = ((const float4*)x)[v];
        u32 a = __float_as_uint(q.x) & 0x7fffffffu, b = __float_as_uint(q.y) & 0x7fffffffu;
        u32 c = __float_as_uint(q.z) & 0x7fffffffu, d = __float_as_uint(q.w) & 0x7fffffffu;
        a = a > b ? a : b;
        c = c > d ? c : d;
        a = a > c ? a : c;
        m = a > m ? a : m;
    }
    for (size_t i = 4 * vec + start; i < n; i += stride) {
        u32 b = __float_as_uint(x[i]) & 0x7fffffffu;
        m = b > m ? b : m;
    }
    m = fp8train_warp_max_u32(m);
    if ((threadIdx.x & 31) == 0 && m != 0) atomicMax(out, (unsigned long long)m);
}
// Column sums of rows x cols: partial per (row chunk, column), then a tree per column.
// A thread takes one chunk of 32 rows of one column (V = float) or of four adjacent
// columns (V = float4: cols a multiple of 4, rows 16-byte aligned for f32, 8-byte for
// BF16, one wide load per row instead of four narrow ones), each column's sum in the
// contract's order, of f32 or BF16 values (widened exactly).
__device__ __forceinline__ float cs_value(const float* x, size_t k) { return x[k]; }
__device__ __forceinline__ float cs_value(const u16* x, size_t k) { return fp8train_from_bf16(x[k]); }
__device__ __forceinline__ float4 cs_value4(const float* x, size_t k) { return *(const float4*)(x + k); }
__device__ __forceinline__ float4 cs_value4(const u16* x, size_t k) { return fp8train_bf16x4(*(const uint2*)(x + k)); }
// The value(s) at k as V (the third argument only picks the width).
template <typename T>
__device__ __forceinline__ float cs_value_as(const T* x, size_t k, float) { return cs_value(x, k); }
template <typename T>
__device__ __forceinline__ float4 cs_value_as(const T* x, size_t k, float4) { return cs_value4(x, k); }
// acc = acc + v per column; a partial stored.
__device__ __forceinline__ void cs_add(float& a, float v) { a = a + v; }
__device__ __forceinline__ void cs_add(float4& a, float4 v) { fp8train_add4(a, v); }
__device__ __forceinline__ void cs_put(float* p, float v) { *p = v; }
__device__ __forceinline__ void cs_put(float* p, float4 v) { *(float4*)p = v; }
// Thread t's chunk sums into `part`, each row's value(s) also handed to copy(offset,
// value) (the fused kernels write a copy of x from the same read; `cs_no_copy` none).
template <typename V, typename T, typename F>
__device__ __forceinline__ void column_chunk_walk(const T* x, float* part, u32 rows, u32 cols, u32 t, F copy) {
    const u32 w = sizeof(V) / 4;
    u32 chunks = (rows + 31) / 32, groups = cols / w;
    if (t >= chunks * groups) return;
    u32 ch = t / groups, j = w * (t % groups);
    V acc = {};
    fp8train_column_walk(ch * 32, min(rows, (ch + 1) * 32), [&](u32 r) { return cs_value_as(x, (size_t)r * cols + j, V{}); },
                         [&](u32 r, V v) {
                             cs_add(acc, v);
                             copy((size_t)r * cols + j, v);
                         });
    cs_put(part + (size_t)ch * cols + j, acc);
}
struct cs_no_copy {
    template <typename V>
    __device__ __forceinline__ void operator()(size_t, V) const {}
};
extern "C" __global__ void column_chunk_sums(const float* x, float* part, u32 rows, u32 cols) {
    column_chunk_walk<float>(x, part, rows, cols, fp8train_tid(), cs_no_copy{});
}
// The same of BF16 values (a layernorm's bias gradient: the column sums of its dy).
extern "C" __global__ void column_chunk_sums_bf16(const u16* x, float* part, u32 rows, u32 cols) {
    column_chunk_walk<float>(x, part, rows, cols, fp8train_tid(), cs_no_copy{});
}
extern "C" __global__ void column_chunk_sums4(const float* x, float* part, u32 rows, u32 cols) {
    column_chunk_walk<float4>(x, part, rows, cols, fp8train_tid(), cs_no_copy{});
}
extern "C" __global__ void column_chunk_sums4_bf16(const u16* x, float* part, u32 rows, u32 cols) {
    column_chunk_walk<float4>(x, part, rows, cols, fp8train_tid(), cs_no_copy{});
}
// The tree over m partials of 32 columns side by side (a[ch * 32 + column]), level by
// level, by a (32, blockDim.y) block: every thread gets its column's root.
__device__ float fp8train_column_block_tree(float* a, float* b, int m) {
    u32 tx = threadIdx.x, ty = threadIdx.y;
    while (m > 1) {
        int half = m / 2;
        for (int i = ty; i < half; i += blockDim.y) b[i * 32 + tx] = a[2 * i * 32 + tx] + a[(2 * i + 1) * 32 + tx];
        if ((m & 1) && ty == 0) b[half * 32 + tx] = a[(m - 1) * 32 + tx];
        __syncthreads();
        m = half + (m & 1);
        float* t = a; a = b; b = t;
    }
    return a[tx];
}
// The same tree for 32 columns per block (block (32, 32)), level by level in shared
// memory, over an aligned group of `group` partials (blockIdx.y: which; the last may be
// short): a sub-tree of the contract's tree wherever it sits (aligned sub-trees compose,
// sim/src/reduce.rs), so a pass with group >= chunks gives the roots and a pass with a
// smaller group leaves the next level's partials, rows g of out. blockIdx.z picks one
// of two (partials, output) pairs (a layernorm's two gradients in one launch). Dynamic
// shared memory (group + group / 2 + 1) * 32 floats. The partials' loads are unrolled
// so that each thread has several in flight.
extern "C" __global__ void column_tree_block(const float* part0, float* out0, const float* part1, float* out1,
                                             u32 chunks, u32 cols, u32 group) {
    extern __shared__ float ct_sh[];
    const float* part = blockIdx.z ? part1 : part0;
    float* out = blockIdx.z ? out1 : out0;
    float* a = ct_sh;
    float* b = ct_sh + (size_t)group * 32;
    u32 tx = threadIdx.x, ty = threadIdx.y, j = blockIdx.x * 32 + tx;
    u32 first = blockIdx.y * group, m = chunks > first ? min(group, chunks - first) : 0;
    bool in = j < cols;
    part += (size_t)first * cols;
#pragma unroll 8
    for (u32 ch = ty; ch < m; ch += blockDim.y) a[ch * 32 + tx] = in ? part[(size_t)ch * cols + j] : 0.0f;
    __syncthreads();
    float r = fp8train_column_block_tree(a, b, (int)m);
    if (in && ty == 0) out[(size_t)blockIdx.y * cols + j] = m == 0 ? 0.0f : r;
}

// The gradient reduction's sum (sim: fp8cluster/src/reduce.rs): this rank's shard of
// every rank's codes (`recv`, rank-major, k per rank), summed per element in rank order
// in f32; entries past `mine` (padding) are zero.
extern "C" __global__ void fp8_reduce_sum(const u8* recv, const float* inv, u32 ranks, u32 k, u32 mine, float* sums) {
    u32 i = fp8train_tid();
    if (i >= k) return;
    float acc = 0.0f;
    if (i < mine) {
        for (u32 r = 0; r < ranks; r++) acc += fp8train_decode(recv[(size_t)r * k + i], 0) * inv[r];
    }
    sums[i] = acc;
}
extern "C" __global__ void f32_reduce_sum(const float* recv, u32 ranks, u32 k, u32 mine, float* sums) {
    u32 i = fp8train_tid();
    if (i >= k) return;
    float acc = 0.0f;
    if (i < mine) {
        for (u32 r = 0; r < ranks; r++) acc += recv[(size_t)r * k + i];
    }
    sums[i] = acc;
}

// ---- many tensors at once (the gradient norm's per-tensor sums of squares): the same
// passes as above for every tensor, one launch per pass instead of one per tensor.
// First pass: descriptor t = 7 words (pointer lo, hi, the 1/scale's address lo, hi
// (0: 1), n, E4M3?, first block); block b belongs to the last tensor whose first block is <= b (binary search).
__device__ __forceinline__ u32 rs_find(const u32* d, u32 words, u32 at, u32 nt, u32 b) {
    u32 lo = 0, hi = nt - 1;
    while (lo < hi) {
        u32 mid = (lo + hi + 1) / 2;
        if (d[words * mid + at] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}
extern "C" __global__ void __launch_bounds__(RS_CHUNKS) sq_blocks_multi(const u32* d, u32 nt, float* part) {
    const u32* t = d + 7 * rs_find(d, 7, 6, nt, blockIdx.x);
    const void* p = (const void*)(((unsigned long long)t[1] << 32) | t[0]);
    float inv = fp8train_ld((const float*)(((unsigned long long)t[3] << 32) | t[2]));
    u32 n = t[4], blk = blockIdx.x - t[6];
    bool fp8 = t[5] != 0;
    // One instantiation (its static shared memory counts once); four elements per load
    // where the source is aligned and the four are all in range.
    auto one = [&](size_t g) {
        if (g >= n) return 0.0f;
        if (!fp8) return ((const float*)p)[g];
        float v = fp8train_decode(((const u8*)p)[g], 0);
        return isnan(v) ? FP8TRAIN_NAN : v * inv;
    };
    bool vec = ((size_t)p & (fp8 ? 3 : 15)) == 0;
    rs_block4([&](size_t g, float* v) {
        if (vec && g + 3 < n) {
            if (fp8) {
                float x[4];
                fp8train_e4m3x4_to_f32(((const u32*)p)[g / 4], x);
#pragma unroll
                for (int k = 0; k < 4; k++) v[k] = isnan(x[k]) ? FP8TRAIN_NAN : x[k] * inv;
            } else {
                float4 x = ((const float4*)p)[g / 4];
                v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
            }
        } else {
            for (int k = 0; k < 4; k++) v[k] = one(g + k);
        }
    }, n, 1, blk, part + blockIdx.x);
}
// A tree pass: descriptor t = 4 words (first partial, partials m, first output, first
// block); each block reduces 1024 aligned partials of one tensor, as reduce_tree_blocks.
extern "C" __global__ void __launch_bounds__(512) tree_blocks_multi(const u32* d, u32 nt, const float* in, float* out) {
    __shared__ float pa[1024], pb[513];
    const u32* t = d + 4 * rs_find(d, 4, 3, nt, blockIdx.x);
    u32 grp = blockIdx.x - t[3];
    size_t base = (size_t)t[0] + (size_t)grp * 1024;
    int m = (int)min(1024u, t[1] - grp * 1024);
    for (int e = threadIdx.x; e < m; e += blockDim.x) pa[e] = in[base + e];
    __syncthreads();
    float r = fp8train_block_tree(pa, pb, m);
    if (threadIdx.x == 0) out[t[2] + grp] = r;
}
