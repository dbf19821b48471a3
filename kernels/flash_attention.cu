// Flash attention on tensor cores: the `fast` class of attention (contract rule 6:
// products with unspecified accumulation, held to a measured bound against the exact
// kernels of attention.cu by `fp8train verify`). BF16 operands (q, k, v, dout are cast
// to BF16 once by the host side; the probabilities are rounded to BF16), f32
// accumulation (mma.sync m16n8k16), an online softmax over key tiles of 64 in base 2
// (exponents s * log2(e) / sqrt(hs) - m as one fma, exponentials by fp8train_exp2_fast), causal tiles
// skipped, masks only on the diagonal tile. Tiles stream through shared memory with
// cp.async, double-buffered: the next tile is in flight while this one is multiplied.
// Fragments come out of shared memory through ldmatrix (.trans for the operands needed
// transposed). Backward recomputes the probabilities from the saved row max and sum in
// the dK/dV kernel, which also leaves dS (BF16, one 64 x 64 tile per causal pair of tiles)
// for a dQ kernel that multiplies it by K: no sum is split across blocks (no atomics:
// run-to-run deterministic) and S, P, dP are computed once. Layouts as the exact kernels: qkv [b, t, 3c] BF16, out
// [b, t, c] BF16 (the contract's storage), stats [b*nh, t, 2] = (max of the scaled
// scores, sum of exponentials).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, q = lane % 4):
//   A 16x16 row-major: a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B 16x8 col-major:  b0 = (k 2q..2q+1, n g), b1 = (k 2q+8..2q+9, n g)
//   C 16x8 f32:        c0, c1 = (g, 2q..2q+1), c2, c3 = (g+8, 2q..2q+1)
// A pair of BF16 values is one 32-bit word, the lower index in the low half.

#define FA_TILE 64
#define FA_THREADS 128
#define FA_NEG_INF __int_as_float(0xff800000)
#define FA_LOG2E 1.44269504088896341f
#define FA_LN2 0.69314718055994531f

__device__ __forceinline__ void fa_mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two f32 rounded to nearest-even BF16 in one instruction (lo in the low half).
__device__ __forceinline__ u32 fa_pack(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 fa_smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void fa_ldsm4(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(p)));
}
__device__ __forceinline__ void fa_ldsm4_trans(u32* r, const u16* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(fa_smem(p)));
}
// A fragment (rows r0..r0+15, cols k0..k0+15) of a row-major BF16 tile with row stride ld:
// lanes 8m..8m+7 address the rows of 8x8 matrix m = (rows +8 if m odd, cols +8 if m >= 2).
__device__ __forceinline__ void fa_frag_a(u32* a, const u16* s, int ld, int r0, int k0, int lane) {
    fa_ldsm4(a, s + (r0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + k0 + 8 * (lane >> 4));
}
// B fragments of n-tiles n0 and n0+8 (b[0..1], b[2..3]) for k0..k0+15, from a tile
// holding B^T row-major (row = n, col = k).
__device__ __forceinline__ void fa_frag_bt2(u32* b, const u16* s, int ld, int n0, int k0, int lane) {
    fa_ldsm4(b, s + (n0 + (lane & 7) + 8 * (lane >> 4)) * ld + k0 + 8 * ((lane >> 3) & 1));
}
// The same from a tile holding B row-major (row = k, col = n), transposed by ldmatrix.
__device__ __forceinline__ void fa_frag_b2_trans(u32* b, const u16* s, int ld, int k0, int n0, int lane) {
    fa_ldsm4_trans(b, s + (k0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + n0 + 8 * (lane >> 4));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !valid
// (src must still be a mapped address).
__device__ __forceinline__ void fa_cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fa_smem(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void fa_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void fa_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ size_t fa_at(u32 bb, u32 i, u32 part, u32 h, u32 t, u32 c, u32 hs) {
    return ((size_t)bb * t + i) * 3 * c + (size_t)part * c + (size_t)h * hs;
}
// Start copying rows r0..r0+63 (zero past t) of a BF16 matrix with `row_stride`
// elements per row, HS columns from `src`, into `dst` (row stride HS + 8).
template <int HS>
__device__ __forceinline__ void fa_stage(u16* dst, const u16* src, size_t row_stride, u32 r0, u32 t) {
    constexpr int V = HS / 8;  // 16-byte vectors per row
#pragma unroll
    for (u32 e = threadIdx.x; e < FA_TILE * V; e += FA_THREADS) {
        u32 r = e / V, v = e % V;
        bool in = r0 + r < t;
        fa_cp16(dst + r * (HS + 8) + 8 * v, src + (size_t)(in ? r0 + r : 0) * row_stride + 8 * v, in);
    }
}

// The flash backward kernels' double buffering: when there is a next tile, start its
// copies (`stage_next`) and wait for the current tile's; with none, wait for everything.
template <typename Stage>
__device__ __forceinline__ void fa_prefetch(bool more, Stage stage_next) {
    if (more) {
        stage_next();
        fa_commit();
        fa_wait<1>();
    } else {
        fa_wait<0>();
    }
}

// Start loading the K and V tiles of keys r0.. into `next` (the buffer not in use) and
// wait for the tile before it; with no next tile (null), wait for everything.
template <int HS>
__device__ __forceinline__ void fa_next_kv(u16* next, const u16* base, u32 c, u32 r0, u32 t) {
    if (next) {
        size_t rs = 3 * (size_t)c;
        fa_stage<HS>(next, base + c, rs, r0, t);
        fa_stage<HS>(next + FA_TILE * (HS + 8), base + 2 * (size_t)c, rs, r0, t);
        fa_commit();
        fa_wait<1>();
    } else {
        fa_wait<0>();
    }
}

// s[n] (16 x 64) = A x B^T, A = rows r0.. of the row-major tile `as` (16 x HS), B^T the
// row-major tile `bt` (row = column index of s), both with row stride HS + 8.
template <int HS>
__device__ __forceinline__ void fa_scores(float (*s)[4], const u16* as, int r0, const u16* bt, int lane) {
#pragma unroll
    for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) {
        u32 a[4];
        fa_frag_a(a, as, HS + 8, r0, 16 * kk, lane);
#pragma unroll
        for (int np = 0; np < 4; np++) {
            u32 b[4];
            fa_frag_bt2(b, bt, HS + 8, 16 * np, 16 * kk, lane);
            fa_mma(s[2 * np], a, b[0], b[1]);
            fa_mma(s[2 * np + 1], a, b[2], b[3]);
        }
    }
}
// The same with A held in registers (a[kk] = fragment of columns 16kk..16kk+15).
template <int HS>
__device__ __forceinline__ void fa_scores_reg(float (*s)[4], const u32 (*a)[4], const u16* bt, int lane) {
#pragma unroll
    for (int n = 0; n < 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++)
#pragma unroll
        for (int np = 0; np < 4; np++) {
            u32 b[4];
            fa_frag_bt2(b, bt, HS + 8, 16 * np, 16 * kk, lane);
            fa_mma(s[2 * np], a[kk], b[0], b[1]);
            fa_mma(s[2 * np + 1], a[kk], b[2], b[3]);
        }
}
// The A fragments (k = 16 kk..16 kk + 15) of a 16 x 64 block held as C fragments,
// rounded to BF16: what a product with P, dS or their transposes as left operand takes.
__device__ __forceinline__ void fa_pack_a(u32 (*pa)[4], float (*p)[4]) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        pa[kk][0] = fa_pack(p[2 * kk][0], p[2 * kk][1]);
        pa[kk][1] = fa_pack(p[2 * kk][2], p[2 * kk][3]);
        pa[kk][2] = fa_pack(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        pa[kk][3] = fa_pack(p[2 * kk + 1][2], p[2 * kk + 1][3]);
    }
}
// acc (16 x HS) += P (16 x 64, as C fragments) x B (64 x HS, row-major tile).
template <int HS>
__device__ __forceinline__ void fa_accumulate(float (*acc)[4], float (*p)[4], const u16* b, int lane) {
    u32 pa[4][4];
    fa_pack_a(pa, p);
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
#pragma unroll
        for (int np = 0; np < HS / 16; np++) {
            u32 bb[4];
            fa_frag_b2_trans(bb, b, HS + 8, 16 * kk, 16 * np, lane);
            fa_mma(acc[2 * np], pa[kk], bb[0], bb[1]);
            fa_mma(acc[2 * np + 1], pa[kk], bb[2], bb[3]);
        }
    }
}

// One key tile of the online softmax for this warp's 16 query rows `row`: the scores s
// (16 x 64 C fragments, keys k0..) masked on an edge tile (causal diagonal or past t),
// the row max m (base-2 units) and sum l updated, s left holding the probabilities
// 2^(s sl2 - m), and alpha = the factor the output accumulated so far is rescaled by
// (fa_rescale; a separate step so that it can wait for products still adding into o).
__device__ __forceinline__ void fa_softmax_probs(float (*s)[4], float* alpha, float* mrow, float* lrow,
                                                 const u32* row, u32 k0, u32 t, float sl2, bool edge, int q) {
    float tmax[2] = {FA_NEG_INF, FA_NEG_INF};
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            u32 col = k0 + 8 * n + 2 * q + (e & 1), r = row[e >> 1];
            if (edge && (col > r || col >= t)) s[n][e] = FA_NEG_INF;
            tmax[e >> 1] = fmaxf(tmax[e >> 1], s[n][e]);
        }
    // The row max in raw units (sl2 > 0, so it scales to the max of the scaled
    // scores); each exponent is then one fma: s * sl2 - m.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
        tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
        float mnew = fmaxf(mrow[r], tmax[r] * sl2);
        float safe = mnew == FA_NEG_INF ? 0.0f : mnew;  // a row with nothing unmasked yet
        alpha[r] = fp8train_exp2_fast(mrow[r] - safe);
        mrow[r] = mnew;
        tmax[r] = -safe;
    }
    float psum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = fp8train_exp2_fast(fmaf(s[n][e], sl2, tmax[e >> 1]));
            s[n][e] = p;
            psum[e >> 1] += p;
        }
#pragma unroll
    for (int r = 0; r < 2; r++) lrow[r] = lrow[r] * alpha[r] + psum[r];
}
template <int HS>
__device__ __forceinline__ void fa_rescale(float (*o)[4], const float* alpha) {
#pragma unroll
    for (int n = 0; n < HS / 8; n++) {
        o[n][0] *= alpha[0]; o[n][1] *= alpha[0]; o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
    }
}

// The forward's epilogue: out rows (BF16) = o / l, stats = (max in natural units, sum).
template <int HS>
__device__ __forceinline__ void fa_store_out(u16* out, float* stats, float (*o)[4], const float* mrow, float* lrow,
                                             const u32* row, u32 bb, u32 bh, u32 h, u32 t, u32 c, int q) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        u16* orow = out + ((size_t)bb * t + row[r]) * c + (size_t)h * HS;
        float inv = 1.0f / lrow[r];
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            *(u32*)(orow + 8 * n + 2 * q) =
                (u32)fp8train_to_bf16(o[n][2 * r] * inv) | ((u32)fp8train_to_bf16(o[n][2 * r + 1] * inv) << 16);
        if (q == 0) {
            stats[((size_t)bh * t + row[r]) * 2] = mrow[r] * FA_LN2;  // back to natural units
            stats[((size_t)bh * t + row[r]) * 2 + 1] = lrow[r];
        }
    }
}

// Rows `row` of this warp (C fragment layout) of part `part` (0 = q, 1 = k, 2 = v) of
// dqkv = acc * scale, stored in BF16 (RNE), as the QKV layer's backward reads it.
template <int HS>
__device__ __forceinline__ void fa_store_grad(u16* dqkv, float (*acc)[4], float scale, const u32* row, u32 part,
                                              u32 bb, u32 h, u32 t, u32 c, int q) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        u16* d = dqkv + fa_at(bb, row[r], part, h, t, c, HS);
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            *(u32*)(d + 8 * n + 2 * q) = (u32)fp8train_to_bf16(acc[n][2 * r] * scale) |
                                         ((u32)fp8train_to_bf16(acc[n][2 * r + 1] * scale) << 16);
    }
}

template <int HS>
__device__ void flash_forward(u16* out, float* stats, const u16* qkv, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8, TILE = FA_TILE * LD;
    extern __shared__ __align__(16) u16 fa_sh[];  // [K0][V0][K1][V1]; Q passes through K1
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;  // longest tiles first
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    fa_stage<HS>(fa_sh + 2 * TILE, base, rs, q0, t);
    fa_stage<HS>(fa_sh, base + c, rs, 0, t);
    fa_stage<HS>(fa_sh + TILE, base + 2 * (size_t)c, rs, 0, t);
    fa_commit();
    fa_wait<0>();
    __syncthreads();
    u32 qa[HS / 16][4];
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) fa_frag_a(qa[kk], fa_sh + 2 * TILE, LD, 16 * warp, 16 * kk, lane);
    __syncthreads();  // Q is in registers everywhere before K1 is refilled
    float o[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float mrow[2] = {FA_NEG_INF, FA_NEG_INF}, lrow[2] = {0.0f, 0.0f};
    float sl2 = FA_LOG2E / sqrtf((float)HS);
    u32 row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    for (u32 kt = 0; kt <= qt; kt++) {
        const u16* Ks = fa_sh + (kt & 1) * 2 * TILE;
        const u16* Vs = Ks + TILE;
        fa_next_kv<HS>(kt < qt ? fa_sh + ((kt + 1) & 1) * 2 * TILE : nullptr, base, c, (kt + 1) * FA_TILE, t);
        __syncthreads();
        u32 k0 = kt * FA_TILE;
        float s[8][4];
        fa_scores_reg<HS>(s, qa, Ks, lane);
        float alpha[2];
        fa_softmax_probs(s, alpha, mrow, lrow, row, k0, t, sl2, kt == qt || k0 + FA_TILE > t, q);
        fa_rescale<HS>(o, alpha);
        fa_accumulate<HS>(o, s, Vs, lane);
        __syncthreads();  // this buffer is refilled two tiles on
    }
    fa_store_out<HS>(out, stats, o, mrow, lrow, row, bb, bh, h, t, c, q);
}

// Per query row of every head, what both backward kernels need: aux[bh, i] = (row max
// in base-2 units, 1 / row sum, D = sum_d dout[i, d] * out[i, d], 0); dout and out are
// BF16 [b, t, c] (dout as the projection's backward product stores it, the operand the
// backward kernels read). 8 threads per row.
extern "C" __global__ void flash_backward_prep(float4* aux, const u16* dout, const u16* out, const float* stats, u32 b,
                                               u32 t, u32 c, u32 nh) {
    u32 gid = blockIdx.x * blockDim.x + threadIdx.x, idx = gid / 8, part = gid % 8;
    bool in = idx < b * nh * t;
    float acc = 0.0f;
    if (in) {
        u32 hs = c / nh, i = idx % t, bh = idx / t, bb = bh / nh, h = bh % nh;
        const u16* g = dout + ((size_t)bb * t + i) * c + (size_t)h * hs;
        const u16* o = out + ((size_t)bb * t + i) * c + (size_t)h * hs;
        for (u32 d = 4 * part; d < hs; d += 32) {
            uint2 x = *(const uint2*)(g + d);
            uint2 y = *(const uint2*)(o + d);
            acc += fp8train_from_bf16((u16)(x.x & 0xffffu)) * fp8train_from_bf16((u16)(y.x & 0xffffu)) +
                   fp8train_from_bf16((u16)(x.x >> 16)) * fp8train_from_bf16((u16)(y.x >> 16)) +
                   fp8train_from_bf16((u16)(x.y & 0xffffu)) * fp8train_from_bf16((u16)(y.y & 0xffffu)) +
                   fp8train_from_bf16((u16)(x.y >> 16)) * fp8train_from_bf16((u16)(y.y >> 16));
        }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 4);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (in && part == 0)
        aux[idx] = make_float4(stats[(size_t)idx * 2] * FA_LOG2E, 1.0f / stats[(size_t)idx * 2 + 1], acc, 0.0f);
}

// Probabilities of a 16 x 64 block of S^T in place (rows are keys, columns queries):
// p = 2^(s * sl2 - m) / l with each query's (m, 1 / l) from `cols`.
__device__ __forceinline__ void fa_probs(float (*s)[4], float sl2, const u32* row, u32 col0, u32 t, const float4* cols,
                                         int q, bool edge) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            u32 kj = row[e >> 1], cl = 8 * n + 2 * q + (e & 1), qi = col0 + cl;
            bool live = !edge || (kj <= qi && qi < t && kj < t);
            s[n][e] = live ? fp8train_exp2_fast(fmaf(s[n][e], sl2, -cols[cl].x)) * cols[cl].y : 0.0f;
        }
}

// dS^T = P^T (dP^T - D) in place of dp (rows keys, columns queries; D of each query
// from `cols`).
__device__ __forceinline__ void fa_dscores(float (*dp)[4], float (*p)[4], const float4* cols, int q) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dp[n][e] = p[n][e] * (dp[n][e] - cols[8 * n + 2 * q + (e & 1)].z);
}

// Causal (query tile, key tile) pairs of one head, qt >= kt, numbered qt (qt + 1) / 2 + kt:
// where flash_backward_kv leaves dS for flash_backward_dq (64 x 64 BF16 per pair).
__device__ __forceinline__ size_t fa_pair(u32 qt, u32 kt) { return (size_t)qt * (qt + 1) / 2 + kt; }

// dK and dV for 64 keys per block (16 per warp), over the query tiles at or after them,
// and dS for flash_backward_dq. Shared memory: K, V of the block's keys (A operands),
// then two buffers of (Q tile, dO tile, aux of its 64 queries).

template <int HS>
__device__ void flash_backward_kv(u16* dqkv, u16* ds, const u16* dout, const u16* qkv, const float4* aux, u32 t,
                                  u32 c, u32 nh) {
    constexpr int LD = HS + 8, TILE = FA_TILE * LD, BUF = 2 * TILE + FA_TILE * 8;  // u16 units
    extern __shared__ __align__(16) u16 fa_sh[];
    const u16* Ks = fa_sh;
    const u16* Vs = fa_sh + TILE;
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 kt = gridDim.x - 1 - blockIdx.x, k0 = kt * FA_TILE;  // shortest loops last
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    const u16* gbase = dout + (size_t)bb * t * c + (size_t)h * HS;
    const float4* abase = aux + (size_t)bh * t;
    auto stage = [&](u32 qt) {
        u16* buf = fa_sh + 2 * TILE + ((qt - kt) & 1) * BUF;
        u32 q0 = qt * FA_TILE;
        fa_stage<HS>(buf, base, rs, q0, t);
        fa_stage<HS>(buf + TILE, gbase, c, q0, t);
        if (threadIdx.x < FA_TILE) {
            bool in = q0 + threadIdx.x < t;
            fa_cp16(buf + 2 * TILE + 8 * threadIdx.x, abase + (in ? q0 + threadIdx.x : 0), in);
        }
    };
    fa_stage<HS>(fa_sh, base + c, rs, k0, t);
    fa_stage<HS>(fa_sh + TILE, base + 2 * (size_t)c, rs, k0, t);
    stage(kt);
    fa_commit();
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;
    float sl2 = FA_LOG2E / sqrtf((float)HS);
    u32 row[2] = {k0 + 16 * warp + (lane >> 2), k0 + 16 * warp + (lane >> 2) + 8};
    u32 tiles = (t + FA_TILE - 1) / FA_TILE;
    for (u32 qt = kt; qt < tiles; qt++) {
        fa_prefetch(qt + 1 < tiles, [&] { stage(qt + 1); });
        __syncthreads();
        const u16* buf = fa_sh + 2 * TILE + ((qt - kt) & 1) * BUF;
        const u16* Qs = buf;
        const u16* Gs = buf + TILE;
        const float4* As = (const float4*)(buf + 2 * TILE);
        u32 q0 = qt * FA_TILE;
        // S^T = K Q^T and dP^T = V dO^T (16 keys x 64 queries).
        float p[8][4], dp[8][4];
        fa_scores<HS>(p, Ks, 16 * warp, Qs, lane);
        fa_scores<HS>(dp, Vs, 16 * warp, Gs, lane);
        bool edge = qt == kt || q0 + FA_TILE > t;
        fa_probs(p, sl2, row, q0, t, As, q, edge);
        fa_dscores(dp, p, As, q);
        // dS for the dQ kernel, rounded to BF16 as the products below round it: rows =
        // keys, columns = queries of the pair's tile.
        u32 tiles_t = (t + FA_TILE - 1) / FA_TILE;
        u16* dst = ds + ((size_t)bh * (tiles_t * (tiles_t + 1) / 2) + fa_pair(qt, kt)) * FA_TILE * FA_TILE;
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int r = 0; r < 2; r++)
                *(u32*)(dst + (16 * warp + (lane >> 2) + 8 * r) * FA_TILE + 8 * n + 2 * q) =
                    fa_pack(dp[n][2 * r], dp[n][2 * r + 1]);
        // dV += P^T dO, dK += dS^T Q (k = queries)
        fa_accumulate<HS>(dv, p, Gs, lane);
        fa_accumulate<HS>(dk, dp, Qs, lane);
        __syncthreads();  // this buffer is refilled two tiles on
    }
    fa_store_grad<HS>(dqkv, dk, 1.0f / sqrtf((float)HS), row, 1, bb, h, t, c, q);
    fa_store_grad<HS>(dqkv, dv, 1.0f, row, 2, bb, h, t, c, q);
}

// dQ = dS K for 64 queries per block (16 per warp) from the dS tiles flash_backward_kv
// left (rows = keys, so the A fragments come out of shared memory through ldmatrix
// .trans): one product per key tile instead of recomputing S, P and dP. Shared memory:
// two buffers of (K tile, dS tile of 64 rows of 64 + 8).
#define FA_DLD (FA_TILE + 8)
template <int HS>
__device__ void flash_backward_dq(u16* dqkv, const u16* ds, const u16* qkv, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8, TILE = FA_TILE * LD, BUF = TILE + FA_TILE * FA_DLD;
    extern __shared__ __align__(16) u16 fa_sh[];
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* kbase = qkv + fa_at(bb, 0, 1, h, t, c, HS);
    u32 tiles_t = (t + FA_TILE - 1) / FA_TILE;
    const u16* dsb = ds + ((size_t)bh * (tiles_t * (tiles_t + 1) / 2) + fa_pair(qt, 0)) * FA_TILE * FA_TILE;
    auto stage = [&](u32 kt) {
        u16* buf = fa_sh + (kt & 1) * BUF;
        fa_stage<HS>(buf, kbase, rs, kt * FA_TILE, t);
        const u16* src = dsb + (size_t)kt * FA_TILE * FA_TILE;
        for (u32 e = threadIdx.x; e < FA_TILE * 8; e += FA_THREADS)
            fa_cp16(buf + TILE + (e / 8) * FA_DLD + 8 * (e % 8), src + (e / 8) * FA_TILE + 8 * (e % 8), true);
    };
    stage(0);
    fa_commit();
    float dq[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
    for (u32 kt = 0; kt <= qt; kt++) {
        fa_prefetch(kt < qt, [&] { stage(kt + 1); });
        __syncthreads();
        const u16* Ks = fa_sh + (kt & 1) * BUF;
        const u16* Ds = Ks + TILE;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            // A = dS rows 16 warp.. (queries), columns 16 kk.. (keys), from the tile
            // stored with keys as rows.
            u32 a[4];
            fa_ldsm4_trans(a, Ds + (16 * kk + (lane & 7) + 8 * (lane >> 4)) * FA_DLD + 16 * warp + 8 * ((lane >> 3) & 1));
#pragma unroll
            for (int np = 0; np < HS / 16; np++) {
                u32 bfr[4];
                fa_frag_b2_trans(bfr, Ks, LD, 16 * kk, 16 * np, lane);
                fa_mma(dq[2 * np], a, bfr[0], bfr[1]);
                fa_mma(dq[2 * np + 1], a, bfr[2], bfr[3]);
            }
        }
        __syncthreads();  // this buffer is refilled two tiles on
    }
    u32 row[2] = {q0 + 16 * warp + (lane >> 2), q0 + 16 * warp + (lane >> 2) + 8};
    fa_store_grad<HS>(dqkv, dq, 1.0f / sqrtf((float)HS), row, 0, bb, h, t, c, q);
}

#define FA_INSTANCE(HS)                                                                                            \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 3) flash_forward_hs##HS(                                 \
        u16* out, float* stats, const u16* qkv, u32 t, u32 c, u32 nh) {                                            \
        flash_forward<HS>(out, stats, qkv, t, c, nh);                                                             \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_backward_kv_hs##HS(                             \
        u16* dqkv, u16* ds, const u16* dout, const u16* qkv, const float4* aux, u32 t, u32 c, u32 nh) {            \
        flash_backward_kv<HS>(dqkv, ds, dout, qkv, aux, t, c, nh);                                                \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(FA_THREADS) flash_backward_dq_hs##HS(                             \
        u16* dqkv, const u16* ds, const u16* qkv, u32 t, u32 c, u32 nh) {                                          \
        flash_backward_dq<HS>(dqkv, ds, qkv, t, c, nh);                                                           \
    }
FA_INSTANCE(64)
FA_INSTANCE(128)
