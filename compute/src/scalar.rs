//! The portable reference engine.

use half::{bf16, f16};

use crate::optim::{adam_all, momentum_all, sgd_all};
use crate::{
    same_len, AdamParams, ComputeEngine, ComputeError, MomentumParams, ReduceOp, SgdParams,
};

/// Symmetric minimum (see the crate docs): `min(a, b)` and `min(b, a)` have
/// the same bits.
#[inline(always)]
pub(crate) fn min_f32(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a < b {
        a
    } else if b < a {
        b
    } else {
        // Equal: the bits differ only for +0/-0, and -0 wins.
        f32::from_bits(a.to_bits() | b.to_bits())
    }
}

/// Symmetric maximum (see the crate docs).
#[inline(always)]
pub(crate) fn max_f32(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if a > b {
        a
    } else if b > a {
        b
    } else {
        // Equal: the bits differ only for +0/-0, and +0 wins.
        f32::from_bits(a.to_bits() & b.to_bits())
    }
}

#[inline(always)]
pub(crate) fn combine(op: ReduceOp, a: f32, b: f32) -> f32 {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => a + b,
        ReduceOp::Min => min_f32(a, b),
        ReduceOp::Max => max_f32(a, b),
    }
}

pub(crate) fn reduce_f32_scalar(op: ReduceOp, acc: &mut [f32], src: &[f32]) {
    match op {
        ReduceOp::Sum | ReduceOp::Mean => {
            for (a, &b) in acc.iter_mut().zip(src) {
                *a += b;
            }
        }
        ReduceOp::Min => {
            for (a, &b) in acc.iter_mut().zip(src) {
                *a = min_f32(*a, b);
            }
        }
        ReduceOp::Max => {
            for (a, &b) in acc.iter_mut().zip(src) {
                *a = max_f32(*a, b);
            }
        }
    }
}

pub(crate) fn scale_f32_scalar(x: &mut [f32], factor: f32) {
    for v in x {
        *v *= factor;
    }
}

/// The reference engine: one element at a time, in order.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScalarEngine;

impl ComputeEngine for ScalarEngine {
    fn name(&self) -> String {
        "scalar".into()
    }

    fn reduce_f32(&self, op: ReduceOp, acc: &mut [f32], src: &[f32]) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        reduce_f32_scalar(op, acc, src);
        Ok(())
    }

    fn reduce_bf16(
        &self,
        op: ReduceOp,
        acc: &mut [bf16],
        src: &[bf16],
    ) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        for (a, b) in acc.iter_mut().zip(src) {
            *a = bf16::from_f32(combine(op, a.to_f32(), b.to_f32()));
        }
        Ok(())
    }

    fn reduce_f16(&self, op: ReduceOp, acc: &mut [f16], src: &[f16]) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        for (a, b) in acc.iter_mut().zip(src) {
            *a = f16::from_f32(combine(op, a.to_f32(), b.to_f32()));
        }
        Ok(())
    }

    fn scale_f32(&self, x: &mut [f32], factor: f32) {
        scale_f32_scalar(x, factor);
    }

    fn scale_bf16(&self, x: &mut [bf16], factor: f32) {
        for v in x {
            *v = bf16::from_f32(v.to_f32() * factor);
        }
    }

    fn scale_f16(&self, x: &mut [f16], factor: f32) {
        for v in x {
            *v = f16::from_f32(v.to_f32() * factor);
        }
    }

    fn cast_f32_to_bf16(&self, src: &[f32], dst: &mut [bf16]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(s);
        }
        Ok(())
    }

    fn cast_bf16_to_f32(&self, src: &[bf16], dst: &mut [f32]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
        Ok(())
    }

    fn cast_f32_to_f16(&self, src: &[f32], dst: &mut [f16]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f16::from_f32(s);
        }
        Ok(())
    }

    fn cast_f16_to_f32(&self, src: &[f16], dst: &mut [f32]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
        Ok(())
    }

    fn sgd(&self, params: &mut [f32], grads: &[f32], h: &SgdParams) -> Result<(), ComputeError> {
        sgd_all(params, grads, h)
    }

    fn momentum(
        &self,
        params: &mut [f32],
        grads: &[f32],
        velocity: &mut [f32],
        h: &MomentumParams,
    ) -> Result<(), ComputeError> {
        momentum_all(params, grads, velocity, h)
    }

    fn adam(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        h: &AdamParams,
    ) -> Result<(), ComputeError> {
        adam_all(params, grads, m, v, h)
    }
}
