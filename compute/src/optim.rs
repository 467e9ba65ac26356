//! Optimizer hyper-parameters and the per-element update rules every engine
//! follows exactly (the SIMD engine applies the same operations in the same
//! order, without fused multiply-add).

use crate::{same_len, ComputeError};

/// Plain SGD.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdParams {
    /// Learning rate.
    pub lr: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
}

/// SGD with momentum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MomentumParams {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor.
    pub momentum: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
    /// Nesterov's variant.
    pub nesterov: bool,
}

/// Adam.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamParams {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
    /// The 1-based step number, for bias correction.
    pub step: u32,
}

impl Default for AdamParams {
    fn default() -> Self {
        AdamParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        }
    }
}

impl AdamParams {
    /// The bias-correction factors `1/(1-beta1^t)` and `1/(1-beta2^t)`,
    /// computed once per call in f32 so every engine uses the same values.
    pub fn bias_corrections(&self) -> (f32, f32) {
        let t = self.step.max(1) as i32;
        (
            1.0 / (1.0 - self.beta1.powi(t)),
            1.0 / (1.0 - self.beta2.powi(t)),
        )
    }
}

/// The whole SGD update with its argument checks. `inline(always)` so that,
/// called inside a `target_feature` function, the loop vectorises with it.
#[inline(always)]
pub(crate) fn sgd_all(
    params: &mut [f32],
    grads: &[f32],
    h: &SgdParams,
) -> Result<(), ComputeError> {
    same_len("grads", grads.len(), params.len())?;
    for (p, &g) in params.iter_mut().zip(grads) {
        *p = sgd_one(*p, g, h);
    }
    Ok(())
}

/// The whole momentum update with its argument checks.
#[inline(always)]
pub(crate) fn momentum_all(
    params: &mut [f32],
    grads: &[f32],
    velocity: &mut [f32],
    h: &MomentumParams,
) -> Result<(), ComputeError> {
    same_len("grads", grads.len(), params.len())?;
    same_len("velocity", velocity.len(), params.len())?;
    for ((p, &g), v) in params.iter_mut().zip(grads).zip(velocity.iter_mut()) {
        (*p, *v) = momentum_one(*p, g, *v, h);
    }
    Ok(())
}

/// The whole Adam update with its argument checks.
#[inline(always)]
pub(crate) fn adam_all(
    params: &mut [f32],
    grads: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    h: &AdamParams,
) -> Result<(), ComputeError> {
    same_len("grads", grads.len(), params.len())?;
    same_len("m", m.len(), params.len())?;
    same_len("v", v.len(), params.len())?;
    let bc = h.bias_corrections();
    for (((p, &g), m), v) in params
        .iter_mut()
        .zip(grads)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
    {
        (*p, *m, *v) = adam_one(*p, g, *m, *v, h, bc);
    }
    Ok(())
}

#[inline(always)]
fn sgd_one(p: f32, g: f32, h: &SgdParams) -> f32 {
    let g = g + h.weight_decay * p;
    p - h.lr * g
}

#[inline(always)]
fn momentum_one(p: f32, g: f32, v: f32, h: &MomentumParams) -> (f32, f32) {
    let g = g + h.weight_decay * p;
    let v = h.momentum * v + g;
    let d = if h.nesterov { g + h.momentum * v } else { v };
    (p - h.lr * d, v)
}

#[inline(always)]
fn adam_one(p: f32, g: f32, m: f32, v: f32, h: &AdamParams, bc: (f32, f32)) -> (f32, f32, f32) {
    let g = g + h.weight_decay * p;
    let m = h.beta1 * m + (1.0 - h.beta1) * g;
    let v = h.beta2 * v + (1.0 - h.beta2) * (g * g);
    let m_hat = m * bc.0;
    let v_hat = v * bc.1;
    (p - h.lr * m_hat / (v_hat.sqrt() + h.eps), m, v)
}
