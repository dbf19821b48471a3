// Fused softmax + cross-entropy (sim/src/ops/crossentropy.rs): one thread per row.
extern "C" __global__ void crossentropy(float* losses, float* dlogits, const float* logits, const u32* targets,
                                        float dloss, u32 n, u32 v, int with_grad) {
    u32 r = fp8train_tid();
    if (r >= n) return;
    const float* lr = logits + (size_t)r * v;
    float m = fp8train_cmax((int)v, [&](int j) { return lr[j]; });
    float z = fp8train_csum((int)v, [&](int j) { return fp8train_exp(lr[j] - m); });
    u32 tgt = targets[r];
    if (with_grad) {
        for (u32 j = 0; j < v; j++) {
            float ind = j == tgt ? 1.0f : 0.0f;
            dlogits[(size_t)r * v + j] = (fp8train_exp(lr[j] - m) / z - ind) * dloss;
        }
    }
    losses[r] = (fp8train_log(z) + m) - lr[tgt];
}
