//! # phalanx-compute
//!
//! The arithmetic a collective and an optimizer need, behind one trait so a
//! trainer can plug in the engine that fits its hardware:
//!
//! * [`ScalarEngine`]: the portable reference; every other engine is tested
//!   against it.
//! * [`SimdEngine`]: explicit AVX-512 / AVX2 / SSE2 kernels on x86-64 and NEON
//!   on aarch64, chosen at run time from the CPU's features.
//!
//! ## Semantics every engine shares
//!
//! * `reduce` combines element-wise: `acc[i] = acc[i] op src[i]`. `Mean`
//!   accumulates as `Sum`; the division by the contributor count happens once,
//!   at the end, through [`ComputeEngine::scale_f32`] and friends.
//! * `min` and `max` are symmetric, so partners that compute `min(a, b)` and
//!   `min(b, a)` get the same bits: a NaN on either side gives the canonical
//!   quiet NaN, and of two equal values `min` returns `-0.0` if either is
//!   `-0.0` and `max` returns `+0.0` if either is `+0.0`.
//! * bf16 and f16 are widened to f32, combined, and rounded back to nearest
//!   even: the accumulation itself is in f32.
//! * No fused multiply-add is used anywhere, so an engine's result does not
//!   depend on which instructions the CPU has: **the SIMD engine equals the
//!   scalar engine bit for bit** in every op (the tests check each level the
//!   CPU offers).
//!
//! ## Error bound of a distributed sum
//!
//! A collective sums `n` contributions in an order the algorithm fixes (ring,
//! recursive doubling), not the reference's left-to-right order. With `u` the
//! unit roundoff of the buffer's dtype (2^-24 for f32, 2^-8 for bf16, 2^-11
//! for f16), each of the at most `n - 1` additions rounds once, so
//!
//! `|result - exact| <= (n - 1) * u * sum(|x_i|)` (first order),
//!
//! and a `Mean`, which multiplies by the f32 reciprocal of `n`, adds the
//! rounding of the reciprocal and of the product: `2u * |mean|`.
//! [`sum_error_bound`] computes this bound; the simulator checks every result
//! against it.
//!
//! ```
//! use phalanx_compute::{ComputeEngine, ScalarEngine, SimdEngine};
//! use phalanx_protocol::wire::ReduceOp;
//!
//! let simd = SimdEngine::detect();
//! let mut acc = vec![1.0f32, 2.0, 3.0];
//! simd.reduce_f32(ReduceOp::Sum, &mut acc, &[0.5, 0.5, 0.5]).unwrap();
//! assert_eq!(acc, [1.5, 2.5, 3.5]);
//!
//! let mut reference = vec![1.0f32, 2.0, 3.0];
//! ScalarEngine.reduce_f32(ReduceOp::Sum, &mut reference, &[0.5, 0.5, 0.5]).unwrap();
//! assert_eq!(acc, reference);
//! ```
#![deny(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("phalanx-compute reads tensor payloads as little-endian in place");

mod bytes;
#[cfg(feature = "cuda")]
mod cuda;
mod optim;
mod scalar;
mod simd;

pub use bytes::{apply_action, element_range, reduce_bytes, scale_bytes, EngineArithmetic};
#[cfg(feature = "cuda")]
pub use cuda::{compile_kernels, CudaEngine, CudaUnavailable};
pub use half::{bf16, f16};
pub use optim::{AdamParams, MomentumParams, SgdParams};
pub use phalanx_protocol::wire::{DType, ReduceOp};
pub use scalar::ScalarEngine;
pub use simd::{SimdEngine, SimdLevel};

use thiserror::Error;

/// Why an engine refused an op. Nothing was written when an error is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ComputeError {
    /// Two slices that must be equally long are not.
    #[error("length mismatch: {what} has {got} elements, expected {expected}")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// Its length.
        got: usize,
        /// The expected length.
        expected: usize,
    },
    /// A byte buffer is not a whole number of elements.
    #[error("{len} bytes is not a whole number of {dtype} elements")]
    RaggedBytes {
        /// The byte length.
        len: usize,
        /// The dtype.
        dtype: DType,
    },
}

pub(crate) fn same_len(
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), ComputeError> {
    if got == expected {
        Ok(())
    } else {
        Err(ComputeError::LengthMismatch {
            what,
            got,
            expected,
        })
    }
}

/// Gradient arithmetic for collectives and optimizers. Implementations must be
/// deterministic: the same inputs give the same bits on every call.
pub trait ComputeEngine: Send + Sync + std::fmt::Debug {
    /// A short name for logs and benchmarks.
    fn name(&self) -> String;

    /// `acc[i] = acc[i] op src[i]` over f32.
    fn reduce_f32(&self, op: ReduceOp, acc: &mut [f32], src: &[f32]) -> Result<(), ComputeError>;
    /// `acc[i] = acc[i] op src[i]` over bf16, accumulated in f32.
    fn reduce_bf16(&self, op: ReduceOp, acc: &mut [bf16], src: &[bf16])
        -> Result<(), ComputeError>;
    /// `acc[i] = acc[i] op src[i]` over f16, accumulated in f32.
    fn reduce_f16(&self, op: ReduceOp, acc: &mut [f16], src: &[f16]) -> Result<(), ComputeError>;

    /// `x[i] *= factor`.
    fn scale_f32(&self, x: &mut [f32], factor: f32);
    /// `x[i] *= factor`, computed in f32.
    fn scale_bf16(&self, x: &mut [bf16], factor: f32);
    /// `x[i] *= factor`, computed in f32.
    fn scale_f16(&self, x: &mut [f16], factor: f32);

    /// f32 to bf16, rounding to nearest even.
    fn cast_f32_to_bf16(&self, src: &[f32], dst: &mut [bf16]) -> Result<(), ComputeError>;
    /// bf16 to f32 (exact).
    fn cast_bf16_to_f32(&self, src: &[bf16], dst: &mut [f32]) -> Result<(), ComputeError>;
    /// f32 to f16, rounding to nearest even.
    fn cast_f32_to_f16(&self, src: &[f32], dst: &mut [f16]) -> Result<(), ComputeError>;
    /// f16 to f32 (exact).
    fn cast_f16_to_f32(&self, src: &[f16], dst: &mut [f32]) -> Result<(), ComputeError>;

    /// Plain SGD: `p -= lr * (g + wd * p)`.
    fn sgd(&self, params: &mut [f32], grads: &[f32], h: &SgdParams) -> Result<(), ComputeError>;
    /// SGD with momentum (PyTorch's formulation, optional Nesterov).
    fn momentum(
        &self,
        params: &mut [f32],
        grads: &[f32],
        velocity: &mut [f32],
        h: &MomentumParams,
    ) -> Result<(), ComputeError>;
    /// Adam with bias correction and L2 weight decay.
    fn adam(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        h: &AdamParams,
    ) -> Result<(), ComputeError>;
}

/// Unit roundoff of a dtype: half the distance from 1.0 to the next value.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 2f64.powi(-24),
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
    }
}

/// The documented bound on `|result - exact|` for one element of a
/// distributed sum (or mean, with `mean = true`) of `n` contributions whose
/// absolute values sum to `abs_sum`; `result` is the value the collective
/// produced (see the crate docs).
pub fn sum_error_bound(dtype: DType, n: usize, abs_sum: f64, result: f64, mean: bool) -> f64 {
    let u = unit_roundoff(dtype);
    // One extra rounding covers the conversion of the inputs' exact sum and
    // keeps the bound meaningful for n = 1.
    let sum_bound = (n as f64) * u * abs_sum * 1.01;
    if mean {
        sum_bound / n as f64 + 2.0 * u * result.abs()
    } else {
        sum_bound
    }
}
