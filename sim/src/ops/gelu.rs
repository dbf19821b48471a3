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

/// The value GELU is applied to: `x[i] + bias[i % c]` (added first, in f32), or `x[i]`
/// itself without a bias (no `+ 0.0`: that would turn -0 into +0).
#[inline]
fn input(x: &[f32], bias: Option<&[f32]>, i: usize) -> f32 {
    match bias {
        Some(b) => x[i] + b[i % b.len()],
        None => x[i],
    }
}

/// `y = gelu(x + bias)`, the bias broadcast over rows of `bias.len()` columns.
pub fn gelu_forward(y: &mut [f32], x: &[f32], bias: Option<&[f32]>) {
    assert_eq!(x.len(), y.len(), "gelu_forward: lengths differ");
    crate::par::for_chunks_mut(y, |start, out| {
        for (i, o) in out.iter_mut().enumerate() {
            let v = input(x, bias, start + i);
            *o = (0.5 * v) * (1.0 + tanh(inner(v)));
        }
    });
}

/// `dx = dy * gelu'(x + bias)`.
pub fn gelu_backward(dx: &mut [f32], x: &[f32], bias: Option<&[f32]>, dy: &[f32]) {
    assert!(x.len() == dx.len() && dy.len() == dx.len(), "gelu_backward: lengths differ");
    crate::par::for_chunks_mut(dx, |start, out| {
        for (i, o) in out.iter_mut().enumerate() {
            let v = input(x, bias, start + i);
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
        gelu_forward(&mut y, &x, None);
        assert_close("y", &y, &reference(&f64s(&x)), 1e-6);
        let mut dx = vec![0f32; 300];
        gelu_backward(&mut dx, &x, None, &dy);
        // elementwise: d/dx_i of sum_j dy_j y_j = dy_i y'(x_i)
        assert_close("dx", &dx, &numeric_grad(&f64s(&x), &f64s(&dy), reference), 1e-5);
    }

    #[test]
    fn the_bias_is_added_first_in_f32() {
        let (rows, c) = (20, 15);
        let x = randn(rows * c, 9, 2.5);
        let bias = randn(c, 10, 1.0);
        let dy = randn(rows * c, 11, 1.0);
        let shifted: Vec<f32> = x.iter().enumerate().map(|(i, &v)| v + bias[i % c]).collect();
        let (mut y, mut want) = (vec![0f32; rows * c], vec![0f32; rows * c]);
        gelu_forward(&mut y, &x, Some(&bias));
        gelu_forward(&mut want, &shifted, None);
        assert_eq!(
            y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let (mut dx, mut dwant) = (vec![0f32; rows * c], vec![0f32; rows * c]);
        gelu_backward(&mut dx, &x, Some(&bias), &dy);
        gelu_backward(&mut dwant, &shifted, None, &dy);
        assert_eq!(
            dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            dwant.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // No bias means no `+ 0.0`: gelu(-0) stays -0.
        let mut z = [1f32];
        gelu_forward(&mut z, &[-0.0], None);
        assert_eq!(z[0].to_bits(), (-0.0f32).to_bits());
    }
}
