// Flash attention on tensor cores: the `fast` class of attention (contract rule 6:
// products with unspecified accumulation, held to a measured bound against the exact
// kernels of attention.cu by `fp8train verify`). BF16 operands (q, k, v, dout and the
// probabilities rounded to BF16), f32 accumulation (mma.sync m16n8k16), an online
// softmax over key tiles of 64 using the project's exp, causal tiles skipped. Backward
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
// Stage rows r0..r0+63 of one part (0 q, 1 k, 2 v) of qkv as BF16: row-major into `rm`
// (row stride ld) and/or transposed into `tr` (row = channel, stride FA_TILE + 8).
template <int HS>
__device__ void fa_stage(u16* rm, u16* tr, const float* src, size_t row_stride, u32 r0, u32 t, int ld) {
    for (u32 e = threadIdx.x; e < FA_TILE * HS; e += blockDim.x) {
        u32 r = e / HS, d = e % HS;
        u16 v = r0 + r < t ? fp8train_to_bf16(src[(size_t)(r0 + r) * row_stride + d]) : 0;
        if (rm) rm[r * ld + d] = v;
        if (tr) tr[d * (FA_TILE + 8) + r] = v;
    }
}

template <int HS>
__device__ void flash_forward(float* out, float* stats, const float* qkv, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8, LT = FA_TILE + 8;
    extern __shared__ u16 fa_sh[];
    u16* Qs = fa_sh;             // [64][LD]
    u16* Ks = Qs + FA_TILE * LD; // [64][LD]
    u16* Vt = Ks + FA_TILE * LD; // [HS][LT]
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;  // longest tiles first
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const float* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    fa_stage<HS>(Qs, nullptr, base, rs, q0, t, LD);
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
        fa_stage<HS>(Ks, nullptr, base + c, rs, k0, t, LD);
        fa_stage<HS>(nullptr, Vt, base + 2 * (size_t)c, rs, k0, t, LD);
        __syncthreads();
        float s[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HS / 16; kk++) {
                u32 b0, b1;
                fa_frag_bt(b0, b1, Ks, LD, 8 * n, 16 * kk, g, q);
                fa_mma(s[n], qa[kk], b0, b1);
            }
        }
        float tmax[2] = {FA_NEG_INF, FA_NEG_INF};
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                u32 col = k0 + 8 * n + 2 * q + (e & 1), r = row[e >> 1];
                float v = (col > r || col >= t) ? FA_NEG_INF : s[n][e] * scale;
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
            alpha[r] = fp8train_exp(mrow[r] - safe);
            mrow[r] = mnew;
            tmax[r] = safe;
        }
        float psum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = fp8train_exp(s[n][e] - tmax[e >> 1]);
                s[n][e] = p;
                psum[e >> 1] += p;
            }
#pragma unroll
        for (int r = 0; r < 2; r++) lrow[r] = lrow[r] * alpha[r] + psum[r];
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            o[n][0] *= alpha[0]; o[n][1] *= alpha[0]; o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            u32 pa[4];
            fa_c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < HS / 8; n++) {
                u32 b0, b1;
                fa_frag_bt(b0, b1, Vt, LT, 8 * n, 16 * kk, g, q);
                fa_mma(o[n], pa, b0, b1);
            }
        }
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
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            orow[8 * n + 2 * q] = o[n][2 * r] / lrow[r];
            orow[8 * n + 2 * q + 1] = o[n][2 * r + 1] / lrow[r];
        }
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

// Probabilities of a 16 x 64 block (rows `row[]`, columns col0 + ...), in place.
__device__ __forceinline__ void fa_probs(float (*s)[4], float scale, const u32* row, u32 col0, u32 t, const float* m,
                                         const float* linv, int q, bool transposed) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            // not transposed: rows are queries; transposed: rows are keys, columns queries
            u32 r = row[e >> 1], col = col0 + 8 * n + 2 * q + (e & 1);
            u32 qi = transposed ? col : r, kj = transposed ? r : col;
            int si = transposed ? (8 * n + 2 * q + (e & 1)) : (e >> 1);
            bool live = kj <= qi && qi < t && kj < t;
            s[n][e] = live ? fp8train_exp(s[n][e] * scale - m[si]) * linv[si] : 0.0f;
        }
}

// dK and dV for 64 keys per block (16 per warp), over the query tiles at or after them.
template <int HS>
__device__ void flash_backward_kv(float* dqkv, const float* dout, const float* qkv, const float* stats,
                                  const float* dsum, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8, LT = FA_TILE + 8;
    extern __shared__ u16 fa_sh[];
    u16* Qs = fa_sh;                // [64][LD] queries, row-major
    u16* Gs = Qs + FA_TILE * LD;    // dout rows [64][LD]
    u16* Qt = Gs + FA_TILE * LD;    // [HS][LT]
    u16* Gt = Qt + HS * LT;         // [HS][LT]
    float* Ms = (float*)(Gt + HS * LT);  // m, 1/l, D of the 64 queries
    float* Li = Ms + FA_TILE;
    float* Ds = Li + FA_TILE;
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 kt = blockIdx.x, k0 = kt * FA_TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const float* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    const float* gbase = dout + (size_t)bb * t * c + (size_t)h * HS;
    // K and V of this block's keys as A fragments (staged through Qs / Gs).
    fa_stage<HS>(Qs, nullptr, base + c, rs, k0, t, LD);
    fa_stage<HS>(Gs, nullptr, base + 2 * (size_t)c, rs, k0, t, LD);
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
        fa_stage<HS>(Qs, Qt, base, rs, q0, t, LD);
        fa_stage<HS>(Gs, Gt, gbase, c, q0, t, LD);
        for (u32 r = threadIdx.x; r < FA_TILE; r += blockDim.x) {
            bool in = q0 + r < t;
            Ms[r] = in ? stats[((size_t)bh * t + q0 + r) * 2] : 0.0f;
            Li[r] = in ? 1.0f / stats[((size_t)bh * t + q0 + r) * 2 + 1] : 0.0f;
            Ds[r] = in ? dsum[(size_t)bh * t + q0 + r] : 0.0f;
        }
        __syncthreads();
        // S^T = K Q^T (16 keys x 64 queries), then P^T.
        float p[8][4], dp[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            p[n][0] = p[n][1] = p[n][2] = p[n][3] = 0.0f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HS / 16; kk++) {
                u32 b0, b1;
                fa_frag_bt(b0, b1, Qs, LD, 8 * n, 16 * kk, g, q);
                fa_mma(p[n], ka[kk], b0, b1);
                fa_frag_bt(b0, b1, Gs, LD, 8 * n, 16 * kk, g, q);
                fa_mma(dp[n], va[kk], b0, b1);  // dP^T = V dO^T
            }
        }
        fa_probs(p, scale, row, q0, t, Ms, Li, q, true);
        // dS^T = P^T (dP^T - D)
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dp[n][e] = p[n][e] * (dp[n][e] - Ds[8 * n + 2 * q + (e & 1)]);
        // dV += P^T dO, dK += dS^T Q (k = queries)
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            u32 pa[4], sa[4];
            fa_c_to_a(pa, p[2 * kk], p[2 * kk + 1]);
            fa_c_to_a(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < HS / 8; n++) {
                u32 b0, b1;
                fa_frag_bt(b0, b1, Gt, LT, 8 * n, 16 * kk, g, q);
                fa_mma(dv[n], pa, b0, b1);
                fa_frag_bt(b0, b1, Qt, LT, 8 * n, 16 * kk, g, q);
                fa_mma(dk[n], sa, b0, b1);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        float* kd = dqkv + fa_at(bb, row[r], 1, h, t, c, HS);
        float* vd = dqkv + fa_at(bb, row[r], 2, h, t, c, HS);
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            kd[8 * n + 2 * q] = dk[n][2 * r] * scale;
            kd[8 * n + 2 * q + 1] = dk[n][2 * r + 1] * scale;
            vd[8 * n + 2 * q] = dv[n][2 * r];
            vd[8 * n + 2 * q + 1] = dv[n][2 * r + 1];
        }
    }
}

// dQ for 64 queries per block (16 per warp), over the key tiles at or before them.
template <int HS>
__device__ void flash_backward_q(float* dqkv, const float* dout, const float* qkv, const float* stats,
                                 const float* dsum, u32 t, u32 c, u32 nh) {
    constexpr int LD = HS + 8, LT = FA_TILE + 8;
    extern __shared__ u16 fa_sh[];
    u16* Ks = fa_sh;               // [64][LD]
    u16* Vs = Ks + FA_TILE * LD;   // [64][LD]
    u16* Kt = Vs + FA_TILE * LD;   // [HS][LT]
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const float* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    const float* gbase = dout + (size_t)bb * t * c + (size_t)h * HS;
    fa_stage<HS>(Ks, nullptr, base, rs, q0, t, LD);
    fa_stage<HS>(Vs, nullptr, gbase, c, q0, t, LD);
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
        fa_stage<HS>(Ks, Kt, base + c, rs, k0, t, LD);
        fa_stage<HS>(Vs, nullptr, base + 2 * (size_t)c, rs, k0, t, LD);
        __syncthreads();
        float p[8][4], dp[8][4];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            p[n][0] = p[n][1] = p[n][2] = p[n][3] = 0.0f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < HS / 16; kk++) {
                u32 b0, b1;
                fa_frag_bt(b0, b1, Ks, LD, 8 * n, 16 * kk, g, q);
                fa_mma(p[n], qa[kk], b0, b1);
                fa_frag_bt(b0, b1, Vs, LD, 8 * n, 16 * kk, g, q);
                fa_mma(dp[n], ga[kk], b0, b1);  // dP = dO V^T
            }
        }
        fa_probs(p, scale, row, k0, t, m, linv, q, false);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dp[n][e] = p[n][e] * (dp[n][e] - dd[e >> 1]);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            u32 sa[4];
            fa_c_to_a(sa, dp[2 * kk], dp[2 * kk + 1]);
#pragma unroll
            for (int n = 0; n < HS / 8; n++) {
                u32 b0, b1;
                fa_frag_bt(b0, b1, Kt, LT, 8 * n, 16 * kk, g, q);
                fa_mma(dq[n], sa, b0, b1);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        if (row[r] >= t) continue;
        float* qd = dqkv + fa_at(bb, row[r], 0, h, t, c, HS);
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            qd[8 * n + 2 * q] = dq[n][2 * r] * scale;
            qd[8 * n + 2 * q + 1] = dq[n][2 * r + 1] * scale;
        }
    }
}

#define FA_INSTANCE(HS)                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) flash_forward_hs##HS(float* out, float* stats,              \
                                                                           const float* qkv, u32 t, u32 c, u32 nh) { \
        flash_forward<HS>(out, stats, qkv, t, c, nh);                                                             \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_backward_kv_hs##HS(                                    \
        float* dqkv, const float* dout, const float* qkv, const float* stats, const float* dsum, u32 t, u32 c,     \
        u32 nh) {                                                                                                  \
        flash_backward_kv<HS>(dqkv, dout, qkv, stats, dsum, t, c, nh);                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) flash_backward_q_hs##HS(                                     \
        float* dqkv, const float* dout, const float* qkv, const float* stats, const float* dsum, u32 t, u32 c,     \
        u32 nh) {                                                                                                  \
        flash_backward_q<HS>(dqkv, dout, qkv, stats, dsum, t, c, nh);                                             \
    }
FA_INSTANCE(64)
FA_INSTANCE(128)
