// Flash attention on Hopper's warpgroup products (wgmma.mma_async, sm_90a): the same
// algorithm, tiles, masks, softmax and outputs as flash_attention.cu (whose helpers it
// uses), with the products issued by the 128 threads of a block as one warpgroup. A
// warpgroup's 64 x N accumulator is, warp by warp, the C fragments of mma.m16n8k16 (warp
// w holds rows 16w..16w+15), and its A operand from registers is mma's A fragment: the
// softmax code is shared unchanged. Operands in shared memory are read by the tensor
// cores directly (no ldmatrix), from tiles in the 128-byte swizzled layout: a 64-row tile
// is stored as blocks of 64 columns (8 KiB each), row r of a block at 128 r bytes, its
// 16-byte chunk j at position j ^ (r % 8). The same tile serves as a K-major operand
// (rows = M or N, columns = K; 8-row groups 1024 B apart) and as an MN-major one (rows =
// K, columns = N; 64-column blocks 8 KiB apart), so Q, K, V and dO are staged once and
// used both ways. dS tiles (written by one kernel, read by another) use the unswizzled
// layout of 8 x 8 core matrices instead, which is also their global layout: element (r,
// col) of a 64 x 64 tile at byte (r / 8) 1024 + (col / 8) 128 + (r % 8) 16 + (col % 8) 2.
// Fast class: the products' accumulation order is the tensor cores' own, held to
// verify's bound.
// Built only for sm_90a (the host picks these kernels when they exist).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

typedef unsigned long long u64;
#define F9_BLOCK 4096  // u16 elements of a 64-row x 64-column block of a swizzled tile

// Shared-memory matrix descriptor: start address, leading and stride byte offsets, each
// in 16-byte units (the swizzle mode goes in bits 62..63, 0 = none).
__device__ __forceinline__ u64 f9_desc(const void* p, u32 lbo, u32 sbo) {
    return (u64)((fa_smem(p) & 0x3FFFFu) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}
__device__ __forceinline__ void f9_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void f9_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Until at most N of the committed groups are still running (they finish in order).
template <int N>
__device__ __forceinline__ void f9_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from touching accumulators between issue and wait.
template <int N>
__device__ __forceinline__ void f9_hold(float* d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
__device__ __forceinline__ void f9_tiles_ready() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
}

// Start copying rows r0..r0+63 (zero past t) of a BF16 matrix with `row_stride`
// elements per row, COLS columns from `src`, into the swizzled tile `dst` (see the
// header). Consecutive threads take consecutive 16-byte chunks of a row, as the global
// layout wants; the swizzle spreads any 8 chunks of one row over all banks.
template <int COLS>
__device__ __forceinline__ void f9_stage(u16* dst, const u16* src, size_t row_stride, u32 r0, u32 t) {
    constexpr u32 V = COLS / 8;
#pragma unroll
    for (u32 e = threadIdx.x; e < FA_TILE * V; e += FA_THREADS) {
        u32 r = e / V, v = e % V;
        bool in = r0 + r < t;
        fa_cp16(dst + (v / 8) * F9_BLOCK + r * 64 + ((v % 8) ^ (r % 8)) * 8,
                src + (size_t)(in ? r0 + r : 0) * row_stride + 8 * v, in);
    }
}
// Descriptors (128-byte swizzle) of a swizzled tile as a K-major operand (rows = M or N,
// columns = K) at column 16 kk, and as an MN-major one (rows = K) at row 16 kk.
__device__ __forceinline__ u64 f9_kmajor(const u16* tile, int kk) {
    return f9_desc(tile + (kk / 4) * F9_BLOCK + (kk % 4) * 16, 16, 1024) | (1ull << 62);
}
__device__ __forceinline__ u64 f9_mnmajor(const u16* tile, int kk) {
    return f9_desc(tile + kk * 16 * 64, 2 * F9_BLOCK, 1024) | (1ull << 62);
}

#define F9_D8(i) "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define F9_D32(i) F9_D8(i), F9_D8(i + 8), F9_D8(i + 16), F9_D8(i + 24)
#define F9_R32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define F9_R64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// D (64 x N) = (acc ? D : 0) + A B, A (64 x 16) and B (16 x N) from shared memory; TA, TB:
// 1 = MN-major.
template <int TA, int TB>
__device__ __forceinline__ void f9_ss_n64(float* d, u64 a, u64 b, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " F9_R32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : F9_D32(0)
                 : "l"(a), "l"(b), "r"(acc), "n"(TA), "n"(TB));
}
template <int TA, int TB>
__device__ __forceinline__ void f9_ss_n128(float* d, u64 a, u64 b, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " F9_R64 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
                 : F9_D32(0), F9_D32(32)
                 : "l"(a), "l"(b), "r"(acc), "n"(TA), "n"(TB));
}
// D (64 x N) += A B, A (64 x 16) from registers (mma A fragments), B from shared memory.
template <int TB>
__device__ __forceinline__ void f9_rs_n64(float* d, const u32* a, u64 b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " F9_R32 ", {%32, %33, %34, %35}, %36, 1, 1, 1, %37;\n"
                 : F9_D32(0)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TB));
}
template <int TB>
__device__ __forceinline__ void f9_rs_n128(float* d, const u32* a, u64 b) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " F9_R64 ", {%64, %65, %66, %67}, %68, 1, 1, 1, %69;\n"
                 : F9_D32(0), F9_D32(32)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TB));
}
// Width-generic forms (N = 64 or 128).
template <int N, int TA, int TB>
__device__ __forceinline__ void f9_ss(float* d, u64 a, u64 b, int acc) {
    if constexpr (N == 64) f9_ss_n64<TA, TB>(d, a, b, acc);
    else f9_ss_n128<TA, TB>(d, a, b, acc);
}
template <int N, int TB>
__device__ __forceinline__ void f9_rs(float* d, const u32* a, u64 b) {
    if constexpr (N == 64) f9_rs_n64<TB>(d, a, b);
    else f9_rs_n128<TB>(d, a, b);
}

// Forward: 64 queries per block (16 rows per warp), Q staged once, K and V tiles of 64
// keys in three buffers. The products of one tile overlap the softmax of the next: S of
// tile kt and O += P V of tile kt - 1 are issued together, the softmax of tile kt runs as
// soon as S is in (while the tensor cores still add P V into O), and O is rescaled after.
// Tile kt + 1 is copied in meanwhile, into the buffer tile kt - 2 used. Shared memory:
// [Q][K0][V0][K1][V1][K2][V2].
template <int HS>
__device__ void flash90_forward(u16* out, float* stats, const u16* qkv, u32 t, u32 c, u32 nh) {
    constexpr int TE = FA_TILE * HS;  // elements of a tile
    extern __shared__ __align__(1024) u16 fa_sh[];
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;  // longest tiles first
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    auto kbuf = [&](u32 kt) { return fa_sh + (1 + 2 * (kt % 3)) * TE; };
    auto stage_kv = [&](u32 kt) {
        f9_stage<HS>(kbuf(kt), base + c, rs, kt * FA_TILE, t);
        f9_stage<HS>(kbuf(kt) + TE, base + 2 * (size_t)c, rs, kt * FA_TILE, t);
    };
    f9_stage<HS>(fa_sh, base, rs, q0, t);
    stage_kv(0);
    fa_commit();
    if (qt >= 1) stage_kv(1);
    fa_commit();
    float o[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float mrow[2] = {FA_NEG_INF, FA_NEG_INF}, lrow[2] = {0.0f, 0.0f}, alpha[2];
    float sl2 = FA_LOG2E / sqrtf((float)HS);
    u32 row[2] = {q0 + 16 * warp + g, q0 + 16 * warp + g + 8};
    auto edge = [&](u32 kt) { return kt == qt || (kt + 1) * FA_TILE > t; };
    // S = Q K^T (64 x 64), both K-major; the first tile on its own.
    float s[8][4];
    u32 pa[4][4];
    fa_wait<1>();
    f9_tiles_ready();
    f9_fence();
#pragma unroll
    for (int kk = 0; kk < HS / 16; kk++) f9_ss<64, 0, 0>(&s[0][0], f9_kmajor(fa_sh, kk), f9_kmajor(kbuf(0), kk), kk);
    f9_commit();
    f9_wait<0>();
    f9_hold<32>(&s[0][0]);
    fa_softmax_probs(s, alpha, mrow, lrow, row, 0, t, sl2, edge(0), q);  // o is zero: no rescale
    fa_pack_a(pa, s);
    for (u32 kt = 1; kt <= qt; kt++) {
        fa_wait<0>();
        f9_tiles_ready();  // tile kt is in; every warp is done with tile kt - 2's buffer
        if (kt + 1 <= qt) stage_kv(kt + 1);
        fa_commit();
        f9_fence();
#pragma unroll
        for (int kk = 0; kk < HS / 16; kk++)
            f9_ss<64, 0, 0>(&s[0][0], f9_kmajor(fa_sh, kk), f9_kmajor(kbuf(kt), kk), kk);
        f9_commit();
        // O += P V of the previous tile: P from registers, V (rows = keys = K) MN-major.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) f9_rs<HS, 1>(&o[0][0], pa[kk], f9_mnmajor(kbuf(kt - 1) + TE, kk));
        f9_commit();
        f9_wait<1>();
        f9_hold<32>(&s[0][0]);
        fa_softmax_probs(s, alpha, mrow, lrow, row, kt * FA_TILE, t, sl2, edge(kt), q);
        f9_wait<0>();
        f9_hold<HS / 2>(&o[0][0]);
        fa_rescale<HS>(o, alpha);
        fa_pack_a(pa, s);
    }
    f9_fence();
#pragma unroll
    for (int kk = 0; kk < 4; kk++) f9_rs<HS, 1>(&o[0][0], pa[kk], f9_mnmajor(kbuf(qt) + TE, kk));
    f9_commit();
    f9_wait<0>();
    f9_hold<HS / 2>(&o[0][0]);
    fa_store_out<HS>(out, stats, o, mrow, lrow, row, bb, bh, h, t, c, q);
}

// dK and dV for 64 keys per block over the query tiles at or after them, and dS for
// flash90_backward_dq, stored per causal tile pair in the core-matrix layout (rows =
// keys) so that kernel stages it with straight copies. Shared memory: K, V, then two
// buffers of (Q tile, dO tile, aux of its 64 queries).
template <int HS>
__device__ void flash90_backward_kv(u16* dqkv, u16* ds, const u16* dout, const u16* qkv, const float4* aux, u32 t,
                                    u32 c, u32 nh) {
    constexpr int TE = FA_TILE * HS, BUF = 2 * TE + FA_TILE * 8;  // u16 units
    extern __shared__ __align__(1024) u16 fa_sh[];
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 kt = gridDim.x - 1 - blockIdx.x, k0 = kt * FA_TILE;  // shortest loops last
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* base = qkv + fa_at(bb, 0, 0, h, t, c, HS);
    const u16* gbase = dout + (size_t)bb * t * c + (size_t)h * HS;
    const float4* abase = aux + (size_t)bh * t;
    auto stage = [&](u32 qt) {
        u16* buf = fa_sh + 2 * TE + ((qt - kt) & 1) * BUF;
        u32 q0 = qt * FA_TILE;
        f9_stage<HS>(buf, base, rs, q0, t);
        f9_stage<HS>(buf + TE, gbase, c, q0, t);
        if (threadIdx.x < FA_TILE) {
            bool in = q0 + threadIdx.x < t;
            fa_cp16(buf + 2 * TE + 8 * threadIdx.x, abase + (in ? q0 + threadIdx.x : 0), in);
        }
    };
    f9_stage<HS>(fa_sh, base + c, rs, k0, t);
    f9_stage<HS>(fa_sh + TE, base + 2 * (size_t)c, rs, k0, t);
    stage(kt);
    fa_commit();
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;
    float sl2 = FA_LOG2E / sqrtf((float)HS);
    u32 row[2] = {k0 + 16 * warp + g, k0 + 16 * warp + g + 8};
    u32 tiles = (t + FA_TILE - 1) / FA_TILE;
    u16* dsh = ds + (size_t)bh * (tiles * (tiles + 1) / 2) * FA_TILE * FA_TILE;
    for (u32 qt = kt; qt < tiles; qt++) {
        fa_prefetch(qt + 1 < tiles, [&] { stage(qt + 1); });
        f9_tiles_ready();
        const u16* Qs = fa_sh + 2 * TE + ((qt - kt) & 1) * BUF;
        const u16* Gs = Qs + TE;
        const float4* As = (const float4*)(Qs + 2 * TE);
        u32 q0 = qt * FA_TILE;
        // S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries), all K-major.
        float p[8][4], dp[8][4];
        f9_fence();
#pragma unroll
        for (int kk = 0; kk < HS / 16; kk++) f9_ss<64, 0, 0>(&p[0][0], f9_kmajor(fa_sh, kk), f9_kmajor(Qs, kk), kk);
#pragma unroll
        for (int kk = 0; kk < HS / 16; kk++) f9_ss<64, 0, 0>(&dp[0][0], f9_kmajor(fa_sh + TE, kk), f9_kmajor(Gs, kk), kk);
        f9_commit();
        f9_wait<0>();
        f9_hold<32>(&p[0][0]);
        f9_hold<32>(&dp[0][0]);
        fa_probs(p, sl2, row, q0, t, As, q, qt == kt || q0 + FA_TILE > t);
        fa_dscores(dp, p, As, q);
        u32 pa[4][4], da[4][4];
        fa_pack_a(pa, p);
        fa_pack_a(da, dp);
        // dS: element (key r, query col) of the pair's tile at (r / 8) 512 + (col / 8) 64
        // + (r % 8) 8 + col % 8; a warp's 32 words per (n, r) are 128 contiguous bytes.
        u16* dst = dsh + fa_pair(qt, kt) * FA_TILE * FA_TILE;
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            *(u32*)(dst + (2 * warp) * 512 + (2 * kk) * 64 + g * 8 + 2 * q) = da[kk][0];
            *(u32*)(dst + (2 * warp + 1) * 512 + (2 * kk) * 64 + g * 8 + 2 * q) = da[kk][1];
            *(u32*)(dst + (2 * warp) * 512 + (2 * kk + 1) * 64 + g * 8 + 2 * q) = da[kk][2];
            *(u32*)(dst + (2 * warp + 1) * 512 + (2 * kk + 1) * 64 + g * 8 + 2 * q) = da[kk][3];
        }
        // dV += P^T dO, dK += dS^T Q (k = queries; dO and Q MN-major).
        f9_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) f9_rs<HS, 1>(&dv[0][0], pa[kk], f9_mnmajor(Gs, kk));
#pragma unroll
        for (int kk = 0; kk < 4; kk++) f9_rs<HS, 1>(&dk[0][0], da[kk], f9_mnmajor(Qs, kk));
        f9_commit();
        f9_wait<0>();
        f9_hold<HS / 2>(&dv[0][0]);
        f9_hold<HS / 2>(&dk[0][0]);
        __syncthreads();  // this buffer is refilled two tiles on
    }
    fa_store_grad<HS>(dqkv, dk, 1.0f / sqrtf((float)HS), row, 1, bb, h, t, c, q);
    fa_store_grad<HS>(dqkv, dv, 1.0f, row, 2, bb, h, t, c, q);
}

// dQ = dS K for 64 queries per block: A = dS from its stored tiles (rows = keys = K:
// M-major), B = the K tile (rows = keys: MN-major). Shared memory: two buffers of (K
// tile, dS tile).
template <int HS>
__device__ void flash90_backward_dq(u16* dqkv, const u16* ds, const u16* qkv, u32 t, u32 c, u32 nh) {
    constexpr int TE = FA_TILE * HS, DE = FA_TILE * FA_TILE, BUF = TE + DE;
    extern __shared__ __align__(1024) u16 fa_sh[];
    u32 bh = blockIdx.y, bb = bh / nh, h = bh % nh;
    u32 qt = gridDim.x - 1 - blockIdx.x, q0 = qt * FA_TILE;
    int warp = threadIdx.x / 32, lane = threadIdx.x & 31, q = lane & 3;
    size_t rs = 3 * (size_t)c;
    const u16* kbase = qkv + fa_at(bb, 0, 1, h, t, c, HS);
    u32 tiles = (t + FA_TILE - 1) / FA_TILE;
    const u16* dsb = ds + ((size_t)bh * (tiles * (tiles + 1) / 2) + fa_pair(qt, 0)) * DE;
    auto stage = [&](u32 kt) {
        u16* buf = fa_sh + (kt & 1) * BUF;
        f9_stage<HS>(buf, kbase, rs, kt * FA_TILE, t);
        const u16* src = dsb + (size_t)kt * DE;
        for (u32 e = threadIdx.x; e < DE / 8; e += FA_THREADS) fa_cp16(buf + TE + 8 * e, src + 8 * e, true);
    };
    stage(0);
    fa_commit();
    float dq[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
    for (u32 kt = 0; kt <= qt; kt++) {
        fa_prefetch(kt < qt, [&] { stage(kt + 1); });
        f9_tiles_ready();
        const u16* Ks = fa_sh + (kt & 1) * BUF;
        f9_fence();
        // A = dS, M-major in the unswizzled layout: query chunks 128 B apart, 8-key groups
        // 1024 B apart, 16 keys (2048 B) per step.
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            f9_ss<HS, 1, 1>(&dq[0][0], f9_desc(Ks + TE + kk * 1024, 1024, 128), f9_mnmajor(Ks, kk), 1);
        f9_commit();
        f9_wait<0>();
        f9_hold<HS / 2>(&dq[0][0]);
        __syncthreads();  // this buffer is refilled two tiles on
    }
    u32 row[2] = {q0 + 16 * warp + (lane >> 2), q0 + 16 * warp + (lane >> 2) + 8};
    fa_store_grad<HS>(dqkv, dq, 1.0f / sqrtf((float)HS), row, 0, bb, h, t, c, q);
}

#define F9_INSTANCE(HS)                                                                                           \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) flash90_forward_hs##HS(                              \
        u16* out, float* stats, const u16* qkv, u32 t, u32 c, u32 nh) {                                           \
        flash90_forward<HS>(out, stats, qkv, t, c, nh);                                                          \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) flash90_backward_kv_hs##HS(                          \
        u16* dqkv, u16* ds, const u16* dout, const u16* qkv, const float4* aux, u32 t, u32 c, u32 nh) {           \
        flash90_backward_kv<HS>(dqkv, ds, dout, qkv, aux, t, c, nh);                                             \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(FA_THREADS, 2) flash90_backward_dq_hs##HS(                          \
        u16* dqkv, const u16* ds, const u16* qkv, u32 t, u32 c, u32 nh) {                                         \
        flash90_backward_dq<HS>(dqkv, ds, qkv, t, c, nh);                                                        \
    }
F9_INSTANCE(64)
F9_INSTANCE(128)

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
