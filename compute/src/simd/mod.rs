//! The SIMD engine: explicit vector kernels for the f32 hot paths, selected
//! once at construction from the CPU's features.

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::optim::{adam_all, momentum_all, sgd_all};
use crate::scalar::{reduce_f32_scalar, scale_f32_scalar};
use crate::{
    same_len, AdamParams, ComputeEngine, ComputeError, MomentumParams, ReduceOp, SgdParams,
};

/// An instruction-set level the SIMD engine can run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// x86-64 AVX-512F: 16 lanes.
    Avx512,
    /// x86-64 AVX2: 8 lanes.
    Avx2,
    /// x86-64 SSE2 (every x86-64 CPU): 4 lanes.
    Sse2,
    /// aarch64 NEON (every aarch64 CPU): 4 lanes.
    Neon,
    /// No vector unit known: the portable loops.
    Portable,
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Sse2 => "sse2",
            SimdLevel::Neon => "neon",
            SimdLevel::Portable => "portable",
        })
    }
}

impl SimdLevel {
    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Sse2 => true,
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => true,
            SimdLevel::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every level this CPU can run, best first.
    pub fn available() -> Vec<SimdLevel> {
        [
            SimdLevel::Avx512,
            SimdLevel::Avx2,
            SimdLevel::Sse2,
            SimdLevel::Neon,
            SimdLevel::Portable,
        ]
        .into_iter()
        .filter(|l| l.is_supported())
        .collect()
    }

    /// The best level this CPU can run.
    pub fn detect() -> SimdLevel {
        Self::available()[0]
    }
}

/// The runtime-dispatched SIMD engine. Bit-for-bit equal to
/// [`crate::ScalarEngine`] in every op (see the crate docs).
#[derive(Clone, Copy, Debug)]
pub struct SimdEngine {
    level: SimdLevel,
}

impl SimdEngine {
    /// The engine at the best level this CPU supports.
    pub fn detect() -> Self {
        SimdEngine {
            level: SimdLevel::detect(),
        }
    }

    /// The engine at a chosen level, or `None` if this CPU cannot run it.
    pub fn with_level(level: SimdLevel) -> Option<Self> {
        level.is_supported().then_some(SimdEngine { level })
    }

    /// The level in use.
    pub fn level(&self) -> SimdLevel {
        self.level
    }

    fn reduce_f32_unchecked(&self, op: ReduceOp, acc: &mut [f32], src: &[f32]) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `with_level`/`detect` only build an engine whose level the CPU supports.
            SimdLevel::Avx512 => unsafe { x86::reduce_avx512(op, acc, src) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            SimdLevel::Avx2 => unsafe { x86::reduce_avx2(op, acc, src) },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Sse2 => x86::reduce_sse2(op, acc, src),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => neon::reduce(op, acc, src),
            _ => reduce_f32_scalar(op, acc, src),
        }
    }

    fn scale_f32_inner(&self, x: &mut [f32], factor: f32) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is supported (see `reduce_f32_unchecked`).
            SimdLevel::Avx512 => unsafe { x86::scale_avx512(x, factor) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            SimdLevel::Avx2 => unsafe { x86::scale_avx2(x, factor) },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Sse2 => x86::scale_sse2(x, factor),
            #[cfg(target_arch = "aarch64")]
            SimdLevel::Neon => neon::scale(x, factor),
            _ => scale_f32_scalar(x, factor),
        }
    }

    /// Runs `f` over the optimizer loop compiled for the engine's level, so
    /// the element-wise update vectorises with that level's registers. The
    /// update itself is the scalar engine's, operation for operation.
    fn with_level_loop<F: FnMut()>(&self, mut f: F) {
        match self.level {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the level is supported (see `reduce_f32_unchecked`).
            SimdLevel::Avx512 => unsafe { x86::run_avx512(f) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            SimdLevel::Avx2 => unsafe { x86::run_avx2(f) },
            _ => f(),
        }
    }
}

/// Elements per block when half-precision data is widened to f32 on the stack.
const BLOCK: usize = 512;

fn blockwise<T: Copy>(
    acc: &mut [T],
    src: &[T],
    widen: impl Fn(&[T], &mut [f32]),
    narrow: impl Fn(&[f32], &mut [T]),
    mut kernel: impl FnMut(&mut [f32], &[f32]),
) {
    let mut a = [0f32; BLOCK];
    let mut b = [0f32; BLOCK];
    for (acc, src) in acc.chunks_mut(BLOCK).zip(src.chunks(BLOCK)) {
        let n = acc.len();
        widen(acc, &mut a[..n]);
        widen(src, &mut b[..n]);
        kernel(&mut a[..n], &b[..n]);
        narrow(&a[..n], acc);
    }
}

fn widen_bf16(src: &[bf16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}
fn narrow_bf16(src: &[f32], dst: &mut [bf16]) {
    dst.convert_from_f32_slice(src);
}
fn widen_f16(src: &[f16], dst: &mut [f32]) {
    src.convert_to_f32_slice(dst);
}
fn narrow_f16(src: &[f32], dst: &mut [f16]) {
    dst.convert_from_f32_slice(src);
}

impl ComputeEngine for SimdEngine {
    fn name(&self) -> String {
        format!("simd-{}", self.level)
    }

    fn reduce_f32(&self, op: ReduceOp, acc: &mut [f32], src: &[f32]) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        self.reduce_f32_unchecked(op, acc, src);
        Ok(())
    }

    fn reduce_bf16(
        &self,
        op: ReduceOp,
        acc: &mut [bf16],
        src: &[bf16],
    ) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        blockwise(acc, src, widen_bf16, narrow_bf16, |a, b| {
            self.reduce_f32_unchecked(op, a, b)
        });
        Ok(())
    }

    fn reduce_f16(&self, op: ReduceOp, acc: &mut [f16], src: &[f16]) -> Result<(), ComputeError> {
        same_len("src", src.len(), acc.len())?;
        blockwise(acc, src, widen_f16, narrow_f16, |a, b| {
            self.reduce_f32_unchecked(op, a, b)
        });
        Ok(())
    }

    fn scale_f32(&self, x: &mut [f32], factor: f32) {
        self.scale_f32_inner(x, factor);
    }

    fn scale_bf16(&self, x: &mut [bf16], factor: f32) {
        let mut a = [0f32; BLOCK];
        for chunk in x.chunks_mut(BLOCK) {
            let a = &mut a[..chunk.len()];
            widen_bf16(chunk, a);
            self.scale_f32_inner(a, factor);
            narrow_bf16(a, chunk);
        }
    }

    fn scale_f16(&self, x: &mut [f16], factor: f32) {
        let mut a = [0f32; BLOCK];
        for chunk in x.chunks_mut(BLOCK) {
            let a = &mut a[..chunk.len()];
            widen_f16(chunk, a);
            self.scale_f32_inner(a, factor);
            narrow_f16(a, chunk);
        }
    }

    fn cast_f32_to_bf16(&self, src: &[f32], dst: &mut [bf16]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        narrow_bf16(src, dst);
        Ok(())
    }

    fn cast_bf16_to_f32(&self, src: &[bf16], dst: &mut [f32]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        widen_bf16(src, dst);
        Ok(())
    }

    fn cast_f32_to_f16(&self, src: &[f32], dst: &mut [f16]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        narrow_f16(src, dst);
        Ok(())
    }

    fn cast_f16_to_f32(&self, src: &[f16], dst: &mut [f32]) -> Result<(), ComputeError> {
        same_len("dst", dst.len(), src.len())?;
        widen_f16(src, dst);
        Ok(())
    }

    fn sgd(&self, params: &mut [f32], grads: &[f32], h: &SgdParams) -> Result<(), ComputeError> {
        let mut result = Ok(());
        self.with_level_loop(|| result = sgd_all(params, grads, h));
        result
    }

    fn momentum(
        &self,
        params: &mut [f32],
        grads: &[f32],
        velocity: &mut [f32],
        h: &MomentumParams,
    ) -> Result<(), ComputeError> {
        let mut result = Ok(());
        self.with_level_loop(|| result = momentum_all(params, grads, velocity, h));
        result
    }

    fn adam(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        h: &AdamParams,
    ) -> Result<(), ComputeError> {
        let mut result = Ok(());
        self.with_level_loop(|| result = adam_all(params, grads, m, v, h));
        result
    }
}
