// Flash attention on tensor cores: the `fast` class of attention (contract rule 6:
// products with unspecified accumulation, held to a measured bound against the exact
// kernels of attention.cu by `fp8train verify`). BF16 operands (q, k, v, dout are cast
// to BF16 once by the host side; the probabilities are rounded to BF16), f32
// accumulation (mma.sync m16n8k16), an online softmax over key tiles of 64 using the
// project's fast exp (fp8train_exp_fast), causal tiles skipped, masks only on the
// diagonal tile. Tiles are staged row-major with 16-byte copies; the operands that
// are needed transposed come out of shared memory through ldmatrix.trans. Backward
// recomputes the probabilities from the saved row max and sum; dK/dV and dQ come from
// two kernels so that no sum is split across blocks (no atomics: run-to-run
// deterministic). Layouts as the exact kernels: qkv [b, t, 3c] f32, out [b, t, c] f32,
// stats [b*nh, t, 2] = (max of the scaled scores, sum of exponentials).
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, q = lane % 4):
//   A 16x16 row-major: a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B 16x8 col-major:  b0 = (k 2q..2q+1, n g), b1 = (k 2q+8..2q+9, n g)
//   C 16x8 f32:        c0, c1 = (g, 2q..2q+1), c2, c3 = (g+8, 2q..2q+1)
// A pair of BF16 values is one 32-bit word, the lower index in the low half.

#define FA_TILE 64
#define FA_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void fa_mma(float* d, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 fa_ld(const u16* p) { return *(const u32*)p; }
__device__ __forceinline__ u32 fa_pack(float lo, float hi) {
    return (u32)fp8train_to_bf16(lo) | ((u32)fp8train_to_bf16(hi) << 16);
}
// A fragment (rows r0..r0+15, cols k0..k0+15) of a row-major BF16 tile with row stride ld.
__device__ __forceinline__ void fa_frag_a(u32* a, const u16* s, int ld, int r0, int k0, int g, int q) {
    a[0] = fa_ld(s + (r0 + g) * ld + k0 + 2 * q);
    a[1] = fa_ld(s + (r0 + g + 8) * ld + k0 + 2 * q);
    a[2] = fa_ld(s + (r0 + g) * ld + k0 + 2 * q + 8);
    a[3] = fa_ld(s + (r0 + g + 8) * ld + k0 + 2 * q + 8);
}
// B fragment (k0..k0+15 x n0..n0+7) from a tile holding B^T row-major (row = n, col = k).
__device__ __forceinline__ void fa_frag_bt(u32& b0, u32& b1, const u16* s, int ld, int n0, int k0, int g, int q) {
    b0 = fa_ld(s + (n0 + g) * ld + k0 + 2 * q);
    b1 = fa_ld(s + (n0 + g) * ld + k0 + 2 * q + 8);
}
// The A fragment for keys 16kk..16kk+15 from the f32 C fragments of n-tiles 2kk, 2kk+1.
__device__ __forceinline__ void fa_c_to_a(u32* a, const float* c0, const float* c1) {
    a[0] = fa_pack(c0[0], c0[1]);
    a[1] = fa_pack(c0[2], c0[3]);
    a[2] = fa_pack(c1[0], c1[1]);
    a[3] = fa_pack(c1[2], c1[3]);
}
__device__ __forceinline__ size_t fa_at(u32 bb, u32 i, u32 part, u32 h, u32 t, u32 c, u32 hs) {
    return ((size_t)bb * t + i) * 3 * c + (size_t)part * c + (size_t)h * hs;
}
// Stage rows r0..r0+63 (zero past t) of a BF16 matrix with `row_stride` elements per
// row, HS columns from `src`, into `dst` (row stride HS + 8), 16 bytes per copy.
template <int HS>
__device__ __forceinline__ void fa_stage(u16* dst, const u16* src, size_t row_stride, u32 r0, u32 t) {
    constexpr int V = HS / 8;  // 16-byte vectors per row
    for (u32 e = threadIdx.x; e < FA_TILE * V; e += blockDim.x) {
        u32 r = e / V, v = e % V;
        uint4 w = make_uint4(0, 0, 0, 0);
        if (r0 + r < t) w = *(const uint4*)(src + (size_t)(r0 + r) * row_stride + 8 * v);
        *(uint4*)(dst + r * (HS + 8) + 8 * v) = w;
    }
}
// B fragment (k0..k0+15 x n0..n0+7) from a tile holding B row-major (row = k, col = n).
__device__ __forceinline__ void fa_frag_b_trans(u32& b0, u32& b1, const u16* s, int ld, int k0, int n0, int lane) {
    const u16* p = s + (k0 + (lane & 15)) * ld + n0;
    u32 addr = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(b0), "=r"(b1) : "r"(addr));
}

// Scores of this warp's 16 rows against 64 columns: s[n] = A (16 x HS) x B^T for the
// B tile held row-major (row = column index of s, stride HS + 8).
template <int HS>
__device__ __forceinline__ void fa_scores(float (*s)[4], const u32 (*a)[4], const u16* bt, int g, int q) {
#pragma unroll
    for (int n = 0; n < 8; n++) {
        s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < HS / 16; kk++) {
            u32 b0, b1;
            fa_frag_bt(b0, b1, bt, HS + 8, 8 * n, 16 * kk, g, q);
            fa_mma(s[n], a[kk], b0, b1);
        }
    }
}
// acc (16 x HS) += P (16 x 64, as C fragments) x B (64 x HS, row-major tile).
template <int HS>
__device__ __forceinline__ void fa_accumulate(float (*acc)[4], float (*p)[4], const u16* b, int lane) {
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        u32 pa[4];
        fa_c_to_a(pa, p[2 * kk], p[2 * kk + 1]);
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            u32 b0, b1;
            fa_frag_b_trans(b0, b1, b, HS + 8, 16 * kk, 8 * n, lane);
            fa_mma(acc[n], pa, b0, b1);
        }
    }
}

template <int HS>
__device__ void flash_forward(float* out, float* stats, const u16* qkv, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8;
    extern __shared__ __align__(16) u16 fa_sh[];
    u16* Qs = fa_sh;              // [64][LD]
    u16* Ks = Qs + FA_TILE * LD;  // [64][LD]
    u16* Vs = Ks + FA_TILE * LD;  // [64][LD]
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;  // longest tiles first
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    fa_stage<HS>(Qs, base, rs, q0, t);
    __syncthreads();
    u32 qa[HS / 16][4];
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) fa_frag_a(qa[kk], Qs, LD, 16 * warp, 16 * kk, g, q);
    float o[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float mrow[2] = {FA_NEG_INF, FA_NEG_INF}, lrow[2] = {0.0f, 0.0f};
    float scale = 1.0f / sqrtf((float)HS);
    u32 row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    for (u32 kt = 0; kt <= qt; kt++) {
        u32 k0 = kt * FA_TILE;
        __syncthreads();
        fa_stage<HS>(Ks, base + c, rs, k0, t);
        fa_stage<HS>(Vs, base + 2 * (size_t)c, rs, k0, t);
        __syncthreads();
        float s[8][4];
        fa_scores<HS>(s, qa, Ks, g, q);
        bool edge = kt == qt || k0 + FA_TILE > t;
        float tmax[2] = {FA_NEG_INF, FA_NEG_INF};
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                u32 col = k0 + 8 * n + 2 * q + (e & 1), r = row[e >> 1];
                float v = s[n][e] * scale;
                if (edge && (col > r || col >= t)) v = FA_NEG_INF;
                s[n][e] = v;
                tmax[e >> 1] = fmaxf(tmax[e >> 1], v);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
            float mnew = fmaxf(mrow[r], tmax[r]);
            float safe = mnew == FA_NEG_INF ? 0.0f : mnew;  // a row with nothing unmasked yet
            alpha[r] = fp8train_exp_fast(mrow[r] - safe);
            mrow[r] = mnew;
            tmax[r] = safe;
        }
        float psum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = fp8train_exp_fast(s[n][e] - tmax[e >> 1]);
                s[n][e] = p;
                psum[e >> 1] += p;
            }
#pragma unroll
        for (int r = 0; r < 2; r++) lrow[r] = lrow[r] * alpha[r] + psum[r];
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            o[n][0] *= alpha[0]; o[n][1] *= alpha[0]; o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
        }
        fa_accumulate<HS>(o, s, Vs, lane);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        float* orow = out + ((size_t)bb * t + row[r]) * c + (size_t)h * HS;
        float inv = 1.0f / lrow[r];
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            *(float2*)(orow + 8 * n + 2 * q) = make_float2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (q == 0) {
            stats[((size_t)bh * t + row[r]) * 2] = mrow[r];
            stats[((size_t)bh * t + row[r]) * 2 + 1] = lrow[r];
        }
    }
}

// D[bh, i] = sum_d dout[i, d] * out[i, d] (one thread per row).
extern "C" __global__ void flash_backward_rowdot(float* dsum, const float* dout, const float* out, u32 b, u32 t, u32 c,
                                                 u32 nh) {
    u32 idx = fp8train_tid();
    if (idx >= b * nh * t) return;
    u32 hs = c / nh, i = idx % t, bh = idx / t, bb = bh / nh, h = bh % nh;
    const float* g = dout + ((size_t)bb * t + i) * c + (size_t)h * hs;
    const float* o = out + ((size_t)bb * t + i) * c + (size_t)h * hs;
    float acc = 0.0f;
    for (u32 d = 0; d < hs; d++) acc = fmaf(g[d], o[d], acc);
    dsum[idx] = acc;
}

// Probabilities of a 16 x 64 block in place. Not transposed: rows are queries (m, linv
// per row); transposed: rows are keys, columns queries (m, linv per column, shared).
__device__ __forceinline__ void fa_probs(float (*s)[4], float scale, const u32* row, u32 col0, u32 t, const float* m,
                                         const float* linv, int q, bool transposed, bool edge) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            u32 r = row[e >> 1], col = col0 + 8 * n + 2 * q + (e & 1);
            u32 qi = transposed ? col : r, kj = transposed ? r : col;
            int si = transposed ? (8 * n + 2 * q + (e & 1)) : (e >> 1);
            bool live = !edge || (kj <= qi && qi < t && kj < t);
            s[n][e] = live ? fp8train_exp_fast(s[n][e] * scale - m[si]) * linv[si] : 0.0f;
        }
}

// dK and dV for 64 keys per block (16 per warp), over the query tiles at or after them.
template <int HS>
__device__ void flash_backward_kv(float* dqkv, const u16* dout, const u16* qkv, const float* stats,
                                  const float* dsum, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8;
    extern __shared__ __align__(16) u16 fa_sh[];
    u16* Qs = fa_sh;              // [64][LD] queries
    u16* Gs = Qs + FA_TILE * LD;  // [64][LD] dout rows
    float* Ms = (float*)(Gs + FA_TILE * LD);  // m, 1/l, D of the 64 queries
    float* Li = Ms + FA_TILE;
    float* Ds = Li + FA_TILE;
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 kt = blockIdx.x, k0 = kt * FA_TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    const u16* gbase = dout + (size_t)bb * t * c + (size_t)h * HS;
    // K and V of this block's keys as A fragments (staged through Qs / Gs).
    fa_stage<HS>(Qs, base + c, rs, k0, t);
    fa_stage<HS>(Gs, base + 2 * (size_t)c, rs, k0, t);
    __syncthreads();
    u32 ka[HS / 16][4], va[HS / 16][4];
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) {
        fa_frag_a(ka[kk], Qs, LD, 16 * warp, 16 * kk, g, q);
        fa_frag_a(va[kk], Gs, LD, 16 * warp, 16 * kk, g, q);
    }
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;
    float scale = 1.0f / sqrtf((float)HS);
    u32 row[2] = {k0 + 16 * warp + g, k0 + 16 * warp + g + 8};
    u32 tiles = (t + FA_TILE - 1) / FA_TILE;
    for (u32 qt = kt; qt < tiles; qt++) {
        u32 q0 = qt * FA_TILE;
        __syncthreads();
        fa_stage<HS>(Qs, base, rs, q0, t);
        fa_stage<HS>(Gs, gbase, c, q0, t);
        for (u32 r = threadIdx.x; r < FA_TILE; r += blockDim.x) {
            bool in = q0 + r < t;
            Ms[r] = in ? stats[((size_t)bh * t + q0 + r) * 2] : 0.0f;
            Li[r] = in ? 1.0f / stats[((size_t)bh * t + q0 + r) * 2 + 1] : 0.0f;
            Ds[r] = in ? dsum[(size_t)bh * t + q0 + r] : 0.0f;
        }
        __syncthreads();
        // S^T = K Q^T and dP^T = V dO^T (16 keys x 64 queries).
        float p[8][4], dp[8][4];
        fa_scores<HS>(p, ka, Qs, g, q);
        fa_scores<HS>(dp, va, Gs, g, q);
        bool edge = qt == kt || q0 + FA_TILE > t;
        fa_probs(p, scale, row, q0, t, Ms, Li, q, true, edge);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dp[n][e] = p[n][e] * (dp[n][e] - Ds[8 * n + 2 * q + (e & 1)]);
        // dV += P^T dO, dK += dS^T Q (k = queries)
        fa_accumulate<HS>(dv, p, Gs, lane);
        fa_accumulate<HS>(dk, dp, Qs, lane);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        float* kd = dqkv + fa_at(bb, row[r], 1, h, t, c, HS);
        float* vd = dqkv + fa_at(bb, row[r], 2, h, t, c, HS);
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            *(float2*)(kd + 8 * n + 2 * q) = make_float2(dk[n][2 * r] * scale, dk[n][2 * r + 1] * scale);
            *(float2*)(vd + 8 * n + 2 * q) = make_float2(dv[n][2 * r], dv[n][2 * r + 1]);
        }
    }
}

// dQ for 64 queries per block (16 per warp), over the key tiles at or before them.
template <int HS>
__device__ void flash_backward_q(float* dqkv, const u16* dout, const u16* qkv, const float* stats,
                                 const float* dsum, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8;
    extern __shared__ __align__(16) u16 fa_sh[];
    u16* Ks = fa_sh;              // [64][LD]
    u16* Vs = Ks + FA_TILE * LD;  // [64][LD]
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    const u16* gbase = dout + (size_t)bb * t * c + (size_t)h * HS;
    fa_stage<HS>(Ks, base, rs, q0, t);
    fa_stage<HS>(Vs, gbase, c, q0, t);
    __syncthreads();
    u32 qa[HS / 16][4], ga[HS / 16][4];
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) {
        fa_frag_a(qa[kk], Ks, LD, 16 * warp, 16 * kk, g, q);
        fa_frag_a(ga[kk], Vs, LD, 16 * warp, 16 * kk, g, q);
    }
    u32 row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    float m[2], linv[2], dd[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        bool in = row[r] < t;
        m[r] = in ? stats[((size_t)bh * t + row[r]) * 2] : 0.0f;
        linv[r] = in ? 1.0f / stats[((size_t)bh * t + row[r]) * 2 + 1] : 0.0f;
        dd[r] = in ? dsum[(size_t)bh * t + row[r]] : 0.0f;
    }
    float dq[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
    float scale = 1.0f / sqrtf((float)HS);
    for (u32 kt = 0; kt <= qt; kt++) {
        u32 k0 = kt * FA_TILE;
        __syncthreads();
        fa_stage<HS>(Ks, base + c, rs, k0, t);
        fa_stage<HS>(Vs, base + 2 * (size_t)c, rs, k0, t);
        __syncthreads();
        float p[8][4], dp[8][4];
        fa_scores<HS>(p, qa, Ks, g, q);   // S = Q K^T
        fa_scores<HS>(dp, ga, Vs, g, q);  // dP = dO V^T
        bool edge = kt == qt || k0 + FA_TILE > t;
        fa_probs(p, scale, row, k0, t, m, linv, q, false, edge);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dp[n][e] = p[n][e] * (dp[n][e] - dd[e >> 1]);
        fa_accumulate<HS>(dq, dp, Ks, lane);  // dQ += dS K
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        float* qd = dqkv + fa_at(bb, row[r], 0, h, t, c, HS);
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            *(float2*)(qd + 8 * n + 2 * q) = make_float2(dq[n][2 * r] * scale, dq[n][2 * r + 1] * scale);
    }
}

#define FA_INSTANCE(HS)                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) flash_forward_hs##HS(float* out, float* stats,              \
                                                                           const u16* qkv, u32 t, u32 c, u32 nh) {   \
        flash_forward<HS>(out, stats, qkv, t, c, nh);                                                             \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_backward_kv_hs##HS(                                    \
        float* dqkv, const u16* dout, const u16* qkv, const float* stats, const float* dsum, u32 t, u32 c,         \
        u32 nh) {                                                                                                  \
        flash_backward_kv<HS>(dqkv, dout, qkv, stats, dsum, t, c, nh);                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_backward_q_hs##HS(                                     \
        float* dqkv, const u16* dout, const u16* qkv, const float* stats, const float* dsum, u32 t, u32 c,         \
        u32 nh) {                                                                                                  \
        flash_backward_q<HS>(dqkv, dout, qkv, stats, dsum, t, c, nh);                                             \
    }
FA_INSTANCE(64)
FA_INSTANCE(128)
