// The step's decisions on the device, so a training step needs no read-back
// (Backend::delayed_scaling_update, flag_nonfinite, step_control, mean_to): each the
// simulator's function (sim/src/scaling.rs record_ring, sim/src/ops/adamw.rs
// step_control) in the same f32 operations. Tiny: one thread per tensor, or one thread.

#define DELAYED_E5M2 0x80000000u

// record_ring of tensor i's amax (its statistics slot, slots[i] without bit 31) into its
// window of amaxes (hist[i * window..]), then its [1/s, s] pair (scales[SCALE_STRIDE *
// i..]) from the window's max; a non-finite amax is not recorded and keeps the scale.
#define SCALE_STRIDE 64
extern "C" __global__ void delayed_scaling_update(float* hist, u32* recorded, float* scales, const u32* slots,
                                                  u32 n, u32 window, const unsigned long long* stats) {
    u32 i = fp8train_tid();
    if (i >= n) return;
    u32 slot = slots[i];
    float amax = fp8train_slot_amax(stats[slot & ~DELAYED_E5M2]);
    if (!isfinite(amax)) return;
    float* h = hist + (size_t)i * window;
    u32 r = recorded[i];
    h[r % window] = amax;
    r += 1;
    if (r >= 2 * window) r -= window;
    recorded[i] = r;
    u32 live = r < window ? r : window;
    float m = 0.0f;
    for (u32 k = 0; k < live; k++) m = h[k] > m ? h[k] : m;
    float* pair = scales + (size_t)SCALE_STRIDE * i;
    float s = fp8train_scale_for_max(slot & DELAYED_E5M2 ? 57344.0f : 448.0f, m, 0, pair[1]);
    fp8train_store_scale(pair, s);
}

// out[0] = 1 if any amax slot stats[slots[k]] (k < n) holds a non-finite value, else 0.
extern "C" __global__ void flag_nonfinite(float* out, const unsigned long long* stats, const u32* slots, u32 n) {
    __shared__ int bad;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    for (u32 k = threadIdx.x; k < n; k += blockDim.x)
        if (!isfinite(fp8train_slot_amax(stats[slots[k]]))) bad = 1;
    __syncthreads();
    if (threadIdx.x == 0) out[0] = bad ? 1.0f : 0.0f;
}

// out[0] = sum[0] / n (the mean's division after the contract's sum).
extern "C" __global__ void mean_finish(float* out, const float* sum, float n) {
    if (fp8train_tid() == 0) out[0] = __fdiv_rn(sum[0], n);
}

// out[i] = src[idx[i]], or 0 where idx[i] is ~0 (the gradients' sums of squares, each
// left by its tree somewhere in a partials buffer).
extern "C" __global__ void gather_f32(float* out, const float* src, const u32* idx, u32 n) {
    u32 i = fp8train_tid();
    if (i < n) out[i] = idx[i] == 0xffffffffu ? 0.0f : src[idx[i]];
}

// The step controller's words (sim/src/ops/adamw.rs: ctl, step_control), in its order.
#define CTL_MU 0
#define CTL_NORM 2
#define CTL_GRAD_SCALE 3
#define CTL_BC1 4
#define CTL_BC2 5
#define CTL_P1 6
#define CTL_P2 7
#define CTL_OVERFLOW 8
#define CTL_GOOD_STEPS 9
#define CTL_OPT_STEPS 10
#define CTL_MU_BEFORE 11
extern "C" __global__ void step_control(float* w, const float* sq, u32 nsq, float grad_clip, float ranks, float beta1,
                                        float beta2, u32 growth_interval, float mu_min, float mu_max) {
    if (fp8train_tid() != 0) return;
    float mu = w[CTL_MU];
    w[CTL_MU_BEFORE] = mu;
    u32 good = __float_as_uint(w[CTL_GOOD_STEPS]);
    if (w[CTL_OVERFLOW] != 0.0f) {
        w[CTL_MU] = fmaxf(__fmul_rn(mu, 0.5f), mu_min);
        w[CTL_NORM] = FP8TRAIN_NAN;
        good = 0;
    } else {
        float unscale = __fmul_rn(mu, ranks);
        float total = 0.0f;
        for (u32 k = 0; k < nsq; k++) total = __fadd_rn(total, sq[k]);
        float norm = __fdiv_rn(__fsqrt_rn(total), unscale);
        float clip = (grad_clip > 0.0f && norm > grad_clip) ? __fdiv_rn(grad_clip, norm) : 1.0f;
        u32 t = __float_as_uint(w[CTL_OPT_STEPS]);
        t = t == 0xffffffffu ? t : t + 1;
        w[CTL_OPT_STEPS] = __uint_as_float(t);
        if (t <= 100000u) {
            w[CTL_P1] = __fmul_rn(w[CTL_P1], beta1);
            w[CTL_P2] = __fmul_rn(w[CTL_P2], beta2);
        }
        w[CTL_BC1] = __fsub_rn(1.0f, w[CTL_P1]);
        w[CTL_BC2] = __fsub_rn(1.0f, w[CTL_P2]);
        w[CTL_GRAD_SCALE] = __fdiv_rn(clip, unscale);
        w[CTL_NORM] = norm;
        good += 1;
        if (good >= growth_interval) {
            w[CTL_MU] = fminf(__fmul_rn(mu, 2.0f), mu_max);
            good = 0;
        }
    }
    w[CTL_GOOD_STEPS] = __uint_as_float(good);
}
