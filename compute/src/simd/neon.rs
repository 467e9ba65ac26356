//! aarch64 NEON kernels (NEON is part of the aarch64 baseline). `fmin`/`fmax`
//! already order -0 below +0 as the reference does; NaN lanes are replaced by
//! the canonical NaN to match it.

use std::arch::aarch64::*;

use crate::scalar::{reduce_f32_scalar, scale_f32_scalar};
use crate::ReduceOp;

fn binary(
    acc: &mut [f32],
    src: &[f32],
    tail: ReduceOp,
    f: impl Fn(float32x4_t, float32x4_t) -> float32x4_t,
) {
    let n = acc.len().min(src.len());
    let pa = acc.as_mut_ptr();
    let ps = src.as_ptr();
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n, inside both slices.
        unsafe { vst1q_f32(pa.add(i), f(vld1q_f32(pa.add(i)), vld1q_f32(ps.add(i)))) };
        i += 4;
    }
    reduce_f32_scalar(tail, &mut acc[i..n], &src[i..n]);
}

fn canonical_nan(a: float32x4_t, b: float32x4_t, m: float32x4_t) -> float32x4_t {
    // SAFETY: NEON is always present on aarch64.
    unsafe {
        let ordered = vandq_u32(vceqq_f32(a, a), vceqq_f32(b, b));
        vbslq_f32(ordered, m, vdupq_n_f32(f32::NAN))
    }
}

pub fn reduce(op: ReduceOp, acc: &mut [f32], src: &[f32]) {
    match op {
        // SAFETY (all closures): NEON is always present on aarch64.
        ReduceOp::Sum | ReduceOp::Mean => binary(acc, src, op, |a, b| unsafe { vaddq_f32(a, b) }),
        ReduceOp::Min => binary(acc, src, op, |a, b| {
            canonical_nan(a, b, unsafe { vminq_f32(a, b) })
        }),
        ReduceOp::Max => binary(acc, src, op, |a, b| {
            canonical_nan(a, b, unsafe { vmaxq_f32(a, b) })
        }),
    }
}

pub fn scale(x: &mut [f32], factor: f32) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i + 4 <= n {
        // SAFETY: i + 4 <= n.
        unsafe { vst1q_f32(p.add(i), vmulq_n_f32(vld1q_f32(p.add(i)), factor)) };
        i += 4;
    }
    scale_f32_scalar(&mut x[i..], factor);
}
