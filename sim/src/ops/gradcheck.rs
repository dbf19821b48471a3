//! Test helpers: f64 central-difference gradients of a reference forward, to check
//! each layer's f32 backward against.

/// d/dx_i of `sum_j w_j * f(x)_j` by central differences in f64.
pub fn numeric_grad(x: &[f64], w: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let h = 1e-6 * x[i].abs().max(1.0);
            xp[i] = x[i] + h;
            let up: f64 = f(&xp).iter().zip(w).map(|(a, b)| a * b).sum();
            xp[i] = x[i] - h;
            let down: f64 = f(&xp).iter().zip(w).map(|(a, b)| a * b).sum();
            xp[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Assert `got` (f32 analytic) matches `want` (f64 numeric): relative to the largest
/// magnitude of `want`.
pub fn assert_close(name: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: lengths");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / scale;
        assert!(err < tol, "{name}[{i}]: analytic {g} vs numeric {w} (rel err {err:.2e})");
    }
}

pub fn randn(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    crate::rng::fill_normal(seed, 99, 0, 0.0, std, &mut v);
    v
}

pub fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}
