// Causal multi-head attention (sim/src/ops/attention.rs): the online softmax over key
// blocks of 64, fma chains for every product, one thread per (batch, head, query).
#define KEY_BLOCK 64

__device__ __forceinline__ float attn_dot(const float* a, const float* b, u32 hs) {
    float acc = 0.0f;
    for (u32 d = 0; d < hs; d++) acc = fmaf(a[d], b[d], acc);
    return acc;
}
__device__ __forceinline__ size_t attn_at(u32 bb, u32 i, u32 part, u32 h, u32 t, u32 c, u32 hs) {
    return ((size_t)bb * t + i) * 3 * c + (size_t)part * c + (size_t)h * hs;
}

extern "C" __global__ void attention_forward(float* out, float* stats, const float* qkv, u32 b, u32 t, u32 c, u32 nh) {
    u32 idx = fp8train_tid();
    if (idx >= b * nh * t) return;
    u32 hs = c / nh, i = idx % t, bh = idx / t, bb = bh / nh, h = bh % nh;
    float scale = 1.0f / sqrtf((float)hs);
    const float* q = qkv + attn_at(bb, i, 0, h, t, c, hs);
    float* o = out + ((size_t)bb * t + i) * c + (size_t)h * hs;
    for (u32 d = 0; d < hs; d++) o[d] = 0.0f;
    float m = __int_as_float(0xff800000), l = 0.0f;
    float sc[KEY_BLOCK];
    for (u32 j0 = 0; j0 <= i; j0 += KEY_BLOCK) {
        u32 j1 = min(j0 + KEY_BLOCK, i + 1), w = j1 - j0;
        for (u32 jj = 0; jj < w; jj++) sc[jj] = attn_dot(q, qkv + attn_at(bb, j0 + jj, 1, h, t, c, hs), hs) * scale;
        float m_new = fmaxf(m, fp8train_cmax((int)w, [&](int jj) { return sc[jj]; }));
        float alpha = fp8train_exp(m - m_new);
        for (u32 jj = 0; jj < w; jj++) sc[jj] = fp8train_exp(sc[jj] - m_new);
        l = l * alpha + fp8train_csum((int)w, [&](int jj) { return sc[jj]; });
        for (u32 d = 0; d < hs; d++) {
            float acc = o[d] * alpha;
            for (u32 jj = 0; jj < w; jj++) acc = fmaf(sc[jj], qkv[attn_at(bb, j0 + jj, 2, h, t, c, hs) + d], acc);
            o[d] = acc;
        }
        m = m_new;
    }
    for (u32 d = 0; d < hs; d++) o[d] /= l;
    stats[((size_t)bh * t + i) * 2] = m;
    stats[((size_t)bh * t + i) * 2 + 1] = l;
}

// Backward, step 1: P and dS rows (scratch of b*nh*t*t each), one thread per query.
extern "C" __global__ void attention_backward_scores(float* pm, float* ds, const float* dout, const float* qkv,
                                                     const float* out, const float* stats, u32 b, u32 t, u32 c, u32 nh) {
    u32 idx = fp8train_tid();
    if (idx >= b * nh * t) return;
    u32 hs = c / nh, i = idx % t, bh = idx / t, bb = bh / nh, h = bh % nh;
    float scale = 1.0f / sqrtf((float)hs);
    float m = stats[((size_t)bh * t + i) * 2], l = stats[((size_t)bh * t + i) * 2 + 1];
    const float* d_o = dout + ((size_t)bb * t + i) * c + (size_t)h * hs;
    const float* o = out + ((size_t)bb * t + i) * c + (size_t)h * hs;
    float di = fp8train_csum((int)hs, [&](int d) { return d_o[d] * o[d]; });
    const float* q = qkv + attn_at(bb, i, 0, h, t, c, hs);
    for (u32 j = 0; j <= i; j++) {
        float sij = attn_dot(q, qkv + attn_at(bb, j, 1, h, t, c, hs), hs) * scale;
        float p = fp8train_exp(sij - m) / l;
        float dp = attn_dot(d_o, qkv + attn_at(bb, j, 2, h, t, c, hs), hs);
        size_t at = ((size_t)bh * t + i) * t + j;
        pm[at] = p;
        ds[at] = p * (dp - di);
    }
}

// Step 2: dq (one thread per (query, channel)) and dk, dv (one per (key, channel)).
// dqkv is stored in BF16 (RNE of the f32 value), as the QKV layer's backward reads it.
extern "C" __global__ void attention_backward_grads(u16* dqkv, const float* pm, const float* ds, const float* dout,
                                                    const float* qkv, u32 b, u32 t, u32 c, u32 nh) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    u32 hs = c / nh;
    if (idx >= (size_t)b * nh * t * hs) return;
    u32 d = idx % hs;
    size_t rest = idx / hs;
    u32 i = rest % t;
    u32 bh = rest / t, bb = bh / nh, h = bh % nh;
    float scale = 1.0f / sqrtf((float)hs);
    const float* P = pm + (size_t)bh * t * t;
    const float* S = ds + (size_t)bh * t * t;
    // i as a query: dq
    float acc = 0.0f;
    for (u32 j = 0; j <= i; j++) acc = fmaf(S[(size_t)i * t + j], qkv[attn_at(bb, j, 1, h, t, c, hs) + d], acc);
    dqkv[attn_at(bb, i, 0, h, t, c, hs) + d] = fp8train_to_bf16(acc * scale);
    // i as a key (j = i): dk, dv over queries i2 >= i
    float ak = 0.0f, av = 0.0f;
    for (u32 i2 = i; i2 < t; i2++) {
        ak = fmaf(S[(size_t)i2 * t + i], qkv[attn_at(bb, i2, 0, h, t, c, hs) + d], ak);
        av = fmaf(P[(size_t)i2 * t + i], dout[((size_t)bb * t + i2) * c + (size_t)h * hs + d], av);
    }
    dqkv[attn_at(bb, i, 1, h, t, c, hs) + d] = fp8train_to_bf16(ak * scale);
    dqkv[attn_at(bb, i, 2, h, t, c, hs) + d] = fp8train_to_bf16(av);
}

// ---- Tiled versions of the two kernels above (same per-query operation order, so the
// same bits): a block of 64 threads takes 64 consecutive queries of one (batch, head)
// and walks the key blocks of 64 in order, staging keys and values in shared memory;
// each thread keeps its output row in registers. HS (head size) is a template argument
// so that row stays in registers. Grid: (ceil(t / 64), b * nh).
#define ATT_TILE 64

template <int HS>
__device__ void attention_forward_tiled(float* out, float* stats, const float* qkv, u32 t, u32 c, u32 nh) {
    extern __shared__ float att_sh[];
    float* Qs = att_sh;                          // [64][HS + 1]
    float* KV = Qs + ATT_TILE * (HS + 1);        // [64][HS]: keys, then values
    float* Ss = KV + ATT_TILE * HS;              // [64][65]
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 q0 = blockIdx.x * ATT_TILE, tid = threadIdx.x, i = q0 + tid;
    bool active = i < t;
    float scale = 1.0f / sqrtf((float)HS);
    for (u32 e = tid; e < ATT_TILE * HS; e += ATT_TILE) {
        u32 r = e / HS, d = e % HS;
        Qs[r * (HS + 1) + d] = q0 + r < t ? qkv[attn_at(bb, q0 + r, 0, h, t, c, HS) + d] : 0.0f;
    }
    float o[HS];
#pragma unroll
    for (int d = 0; d < HS; d++) o[d] = 0.0f;
    float m = __int_as_float(0xff800000), l = 0.0f;
    const float* q = Qs + tid * (HS + 1);
    float* sc = Ss + tid * 65;
    u32 last = min(t, q0 + ATT_TILE) - 1;
    for (u32 j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();
        for (u32 e = tid; e < ATT_TILE * HS; e += ATT_TILE) {
            u32 r = e / HS, d = e % HS;
            KV[e] = j0 + r < t ? qkv[attn_at(bb, j0 + r, 1, h, t, c, HS) + d] : 0.0f;
        }
        __syncthreads();
        bool live = active && j0 <= i;
        u32 w = live ? min((u32)ATT_TILE, i + 1 - j0) : 0;
        float alpha = 1.0f;
        if (live) {
            for (u32 jj = 0; jj < w; jj++) {
                const float* k = KV + jj * HS;
                float acc = 0.0f;
#pragma unroll
                for (int d = 0; d < HS; d++) acc = fmaf(q[d], k[d], acc);
                sc[jj] = acc * scale;
            }
            float m_new = fmaxf(m, fp8train_cmax((int)w, [&](int jj) { return sc[jj]; }));
            alpha = fp8train_exp(m - m_new);
            for (u32 jj = 0; jj < w; jj++) sc[jj] = fp8train_exp(sc[jj] - m_new);
            l = l * alpha + fp8train_csum((int)w, [&](int jj) { return sc[jj]; });
            m = m_new;
        }
        __syncthreads();
        for (u32 e = tid; e < ATT_TILE * HS; e += ATT_TILE) {
            u32 r = e / HS, d = e % HS;
            KV[e] = j0 + r < t ? qkv[attn_at(bb, j0 + r, 2, h, t, c, HS) + d] : 0.0f;
        }
        __syncthreads();
        if (live) {
#pragma unroll
            for (int d = 0; d < HS; d++) {
                float acc = o[d] * alpha;
                for (u32 jj = 0; jj < w; jj++) acc = fmaf(sc[jj], KV[jj * HS + d], acc);
                o[d] = acc;
            }
        }
    }
    if (!active) return;
    float* orow = out + ((size_t)bb * t + i) * c + (size_t)h * HS;
#pragma unroll
    for (int d = 0; d < HS; d++) orow[d] = o[d] / l;
    stats[((size_t)bh * t + i) * 2] = m;
    stats[((size_t)bh * t + i) * 2 + 1] = l;
}

// P and dS rows for the 64 queries of the block, written coalesced through shared tiles
// (entries above the diagonal are not written: attention_backward_grads never reads them).
template <int HS>
__device__ void attention_backward_scores_tiled(float* pm, float* ds, const float* dout, const float* qkv,
                                                const float* out, const float* stats, u32 t, u32 c, u32 nh) {
    extern __shared__ float att_sh[];
    float* Qs = att_sh;                        // [64][HS + 1]
    float* Gs = Qs + ATT_TILE * (HS + 1);      // dout rows [64][HS + 1]
    float* Ks = Gs + ATT_TILE * (HS + 1);      // [64][HS]
    float* Vs = Ks + ATT_TILE * HS;            // [64][HS]
    float* Ps = Vs + ATT_TILE * HS;            // [64][65]
    float* Ds = Ps + ATT_TILE * 65;            // [64][65]
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 q0 = blockIdx.x * ATT_TILE, tid = threadIdx.x, i = q0 + tid;
    bool active = i < t;
    float scale = 1.0f / sqrtf((float)HS);
    for (u32 e = tid; e < ATT_TILE * HS; e += ATT_TILE) {
        u32 r = e / HS, d = e % HS;
        bool in = q0 + r < t;
        Qs[r * (HS + 1) + d] = in ? qkv[attn_at(bb, q0 + r, 0, h, t, c, HS) + d] : 0.0f;
        Gs[r * (HS + 1) + d] = in ? dout[((size_t)bb * t + q0 + r) * c + (size_t)h * HS + d] : 0.0f;
    }
    __syncthreads();
    const float* q = Qs + tid * (HS + 1);
    const float* g = Gs + tid * (HS + 1);
    float m = 0.0f, l = 1.0f, di = 0.0f;
    if (active) {
        m = stats[((size_t)bh * t + i) * 2];
        l = stats[((size_t)bh * t + i) * 2 + 1];
        const float* orow = out + ((size_t)bb * t + i) * c + (size_t)h * HS;
        di = fp8train_csum(HS, [&](int d) { return g[d] * orow[d]; });
    }
    u32 last = min(t, q0 + ATT_TILE) - 1;
    for (u32 j0 = 0; j0 <= last; j0 += ATT_TILE) {
        __syncthreads();
        for (u32 e = tid; e < ATT_TILE * HS; e += ATT_TILE) {
            u32 r = e / HS, d = e % HS;
            bool in = j0 + r < t;
            Ks[e] = in ? qkv[attn_at(bb, j0 + r, 1, h, t, c, HS) + d] : 0.0f;
            Vs[e] = in ? qkv[attn_at(bb, j0 + r, 2, h, t, c, HS) + d] : 0.0f;
        }
        __syncthreads();
        if (active && j0 <= i) {
            u32 w = min((u32)ATT_TILE, i + 1 - j0);
            for (u32 jj = 0; jj < w; jj++) {
                float acc = 0.0f, accv = 0.0f;
#pragma unroll
                for (int d = 0; d < HS; d++) acc = fmaf(q[d], Ks[jj * HS + d], acc);
#pragma unroll
                for (int d = 0; d < HS; d++) accv = fmaf(g[d], Vs[jj * HS + d], accv);
                float sij = acc * scale;
                float p = fp8train_exp(sij - m) / l;
                Ps[tid * 65 + jj] = p;
                Ds[tid * 65 + jj] = p * (accv - di);
            }
        }
        __syncthreads();
        for (u32 e = tid; e < ATT_TILE * ATT_TILE; e += ATT_TILE) {
            u32 r = e / ATT_TILE, jj = e % ATT_TILE;
            u32 qi = q0 + r, j = j0 + jj;
            if (qi < t && j <= qi) {
                size_t at = ((size_t)bh * t + qi) * t + j;
                pm[at] = Ps[r * 65 + jj];
                ds[at] = Ds[r * 65 + jj];
            }
        }
    }
}

#define ATT_INSTANCE(HS)                                                                                           \
    extern "C" __global__ void __launch_bounds__(ATT_TILE) attention_forward_hs##HS(                               \
        float* out, float* stats, const float* qkv, u32 t, u32 c, u32 nh) {                                      \
        attention_forward_tiled<HS>(out, stats, qkv, t, c, nh);                                                   \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(ATT_TILE) attention_backward_scores_hs##HS(                       \
        float* pm, float* ds, const float* dout, const float* qkv, const float* out, const float* stats, u32 t,   \
        u32 c, u32 nh) {                                                                                           \
        attention_backward_scores_tiled<HS>(pm, ds, dout, qkv, out, stats, t, c, nh);                             \
    }
ATT_INSTANCE(16)
ATT_INSTANCE(32)
ATT_INSTANCE(64)
ATT_INSTANCE(128)
