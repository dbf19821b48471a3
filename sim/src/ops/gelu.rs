//! GELU, tanh approximation (GPT-2):
//! `y = (0.5 * x) * (1 + tanh(K * (x + 0.044715 * ((x * x) * x))))`, K = sqrt(2/pi),
//! with the project's tanh, no FMA, in exactly this order.
//!
//! Backward: with `u = K * (x + A * x^3)`, `t = tanh(u)`:
//! `dy/dx = 0.5 * (1 + t) + ((0.5 * x) * (1 - t * t)) * (K * (1 + (3 * A) * (x * x)))`,
//! evaluated in that order, times the incoming gradient.

use crate::math::tanh;

const K: f32 = f32::from_bits(0x3f4c_422a); // sqrt(2/pi) = 0.7978846
const A: f32 = 0.044715;
const A3: f32 = 0.134145; // 3 * A, rounded once

#[inline]
fn inner(x: f32) -> f32 {
    K * (x + A * ((x * x) * x))
}

pub fn gelu_forward(y: &mut [f32], x: &[f32]) {
    assert_eq!(x.len(), y.len(), "gelu_forward: lengths differ");
    crate::par::for_chunks2(x, y, |xs, ys| {
        for (o, &v) in ys.iter_mut().zip(xs) {
            *o = (0.5 * v) * (1.0 + tanh(inner(v)));
        }
    });
}

/// `dx = dy * gelu'(x)`.
pub fn gelu_backward(dx: &mut [f32], x: &[f32], dy: &[f32]) {
    assert!(x.len() == dx.len() && dy.len() == dx.len(), "gelu_backward: lengths differ");
    crate::par::for_chunks_mut(dx, |start, out| {
        for (i, o) in out.iter_mut().enumerate() {
            let v = x[start + i];
            let t = tanh(inner(v));
            let d = 0.5 * (1.0 + t) + ((0.5 * v) * (1.0 - t * t)) * (K * (1.0 + A3 * (v * v)));
            *o = d * dy[start + i];
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::*;

    fn reference(x: &[f64]) -> Vec<f64> {
        let k = (2.0 / std::f64::consts::PI).sqrt();
        x.iter().map(|&v| 0.5 * v * (1.0 + (k * (v + 0.044715 * v * v * v)).tanh())).collect()
    }

    #[test]
    fn forward_and_gradient_match_f64() {
        let x = randn(300, 7, 2.5);
        let dy = randn(300, 8, 1.0);
        let mut y = vec![0f32; 300];
        gelu_forward(&mut y, &x);
        assert_close("y", &y, &reference(&f64s(&x)), 1e-6);
        let mut dx = vec![0f32; 300];
        gelu_backward(&mut dx, &x, &dy);
        // elementwise: d/dx_i of sum_j dy_j y_j = dy_i y'(x_i)
        assert_close("dx", &dx, &numeric_grad(&f64s(&x), &f64s(&dy), reference), 1e-5);
    }
}
