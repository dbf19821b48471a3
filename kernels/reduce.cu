// Reductions (sim/src/reduce.rs) in the contract's order, whatever the launch shape:
// one thread per 32-element chunk writes its sequential partial; one thread then runs
// the pairwise tree. amax: one thread per chunk, then one thread combines (order-free).

// mode 0: x, 1: x*x
extern "C" __global__ void reduce_chunk_sums(const float* x, float* part, u32 n, int mode) {
    u32 ch = fp8train_tid();
    u32 chunks = (n + 31) / 32;
    if (ch >= chunks) return;
    float acc = 0.0f;
    u32 end = min(n, (ch + 1) * 32);
    for (u32 i = ch * 32; i < end; i++) { float v = x[i]; acc = acc + (mode == 1 ? v * v : v); }
    part[ch] = acc;
}
extern "C" __global__ void reduce_tree(float* part, u32 chunks, float* out) {
    if (fp8train_tid() != 0) return;
    out[0] = fp8train_tree(part, (int)chunks, 1);
}
// part[2*ch] = max |x| of the chunk, part[2*ch+1] = 1 if it held a NaN
extern "C" __global__ void reduce_chunk_amax(const float* x, float* part, u32 n) {
    u32 ch = fp8train_tid();
    u32 chunks = (n + 31) / 32;
    if (ch >= chunks) return;
    float m = 0.0f; float nan = 0.0f;
    u32 end = min(n, (ch + 1) * 32);
    for (u32 i = ch * 32; i < end; i++) { float a = fabsf(x[i]); if (isnan(a)) nan = 1.0f; m = a > m ? a : m; }
    part[2 * ch] = m; part[2 * ch + 1] = nan;
}
extern "C" __global__ void reduce_amax_final(const float* part, u32 chunks, float* out) {
    if (fp8train_tid() != 0) return;
    float m = 0.0f; bool nan = false;
    for (u32 c = 0; c < chunks; c++) { nan |= part[2 * c + 1] != 0.0f; m = part[2 * c] > m ? part[2 * c] : m; }
    out[0] = nan ? FP8TRAIN_NAN : m;
}
// Column sums of rows x cols: partial per (row chunk, column), then a tree per column.
extern "C" __global__ void column_chunk_sums(const float* x, float* part, u32 rows, u32 cols) {
    u32 t = fp8train_tid();
    u32 chunks = (rows + 31) / 32;
    if (t >= chunks * cols) return;
    u32 ch = t / cols, j = t % cols;
    float acc = 0.0f;
    u32 end = min(rows, (ch + 1) * 32);
    for (u32 r = ch * 32; r < end; r++) acc = acc + x[(size_t)r * cols + j];
    part[(size_t)ch * cols + j] = acc;
}
extern "C" __global__ void column_tree(float* part, float* out, u32 chunks, u32 cols) {
    u32 j = fp8train_tid();
    if (j >= cols) return;
    out[j] = chunks == 0 ? 0.0f : fp8train_tree(part + j, (int)chunks, (int)cols);
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
