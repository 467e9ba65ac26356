//! Byte-level entry points for buffers that hold raw little-endian elements
//! (frame payloads, shared memory), aligned or not.

use half::{bf16, f16};

use crate::{ComputeEngine, ComputeError, DType, ReduceOp};

fn whole(len: usize, dtype: DType) -> Result<(), ComputeError> {
    if len.is_multiple_of(dtype.size_bytes()) {
        Ok(())
    } else {
        Err(ComputeError::RaggedBytes { len, dtype })
    }
}

/// Views `bytes` as `T`s in place when aligned, else runs `f` on an aligned
/// copy and writes it back. Payloads cut out of a network buffer are often
/// misaligned; correctness must not depend on it.
fn with_typed_mut<T: bytemuck::Pod, R>(bytes: &mut [u8], f: impl FnOnce(&mut [T]) -> R) -> R {
    match bytemuck::try_cast_slice_mut::<u8, T>(bytes) {
        Ok(typed) => f(typed),
        Err(_) => {
            let mut copy: Vec<T> = bytemuck::pod_collect_to_vec(bytes);
            let r = f(&mut copy);
            bytes.copy_from_slice(bytemuck::cast_slice(&copy));
            r
        }
    }
}

fn with_typed<T: bytemuck::Pod, R>(bytes: &[u8], f: impl FnOnce(&[T]) -> R) -> R {
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(typed) => f(typed),
        Err(_) => f(&bytemuck::pod_collect_to_vec::<u8, T>(bytes)),
    }
}

/// `acc op= src` over raw little-endian elements of `dtype`.
pub fn reduce_bytes(
    engine: &dyn ComputeEngine,
    dtype: DType,
    op: ReduceOp,
    acc: &mut [u8],
    src: &[u8],
) -> Result<(), ComputeError> {
    whole(acc.len(), dtype)?;
    crate::same_len("src bytes", src.len(), acc.len())?;
    match dtype {
        DType::F32 => with_typed_mut::<f32, _>(acc, |a| {
            with_typed::<f32, _>(src, |s| engine.reduce_f32(op, a, s))
        }),
        DType::BF16 => with_typed_mut::<bf16, _>(acc, |a| {
            with_typed::<bf16, _>(src, |s| engine.reduce_bf16(op, a, s))
        }),
        DType::F16 => with_typed_mut::<f16, _>(acc, |a| {
            with_typed::<f16, _>(src, |s| engine.reduce_f16(op, a, s))
        }),
    }
}

/// `x *= factor` over raw little-endian elements of `dtype`.
pub fn scale_bytes(
    engine: &dyn ComputeEngine,
    dtype: DType,
    x: &mut [u8],
    factor: f32,
) -> Result<(), ComputeError> {
    whole(x.len(), dtype)?;
    match dtype {
        DType::F32 => with_typed_mut::<f32, _>(x, |x| engine.scale_f32(x, factor)),
        DType::BF16 => with_typed_mut::<bf16, _>(x, |x| engine.scale_bf16(x, factor)),
        DType::F16 => with_typed_mut::<f16, _>(x, |x| engine.scale_f16(x, factor)),
    }
    Ok(())
}

/// Bytes `range` (in elements of `dtype`) of a buffer of raw elements.
pub fn element_range(dtype: DType, range: &std::ops::Range<usize>) -> std::ops::Range<usize> {
    dtype.byte_range(range)
}

/// Applies one of the collective core's buffer actions (`Reduce`, `Copy`,
/// `Divide`) to the op's working buffer of raw little-endian `dtype`
/// elements. Returns `Ok(false)` for the actions that do not touch the buffer
/// (`Send`, `Complete`, `Aborted`), which the caller handles. One function so
/// the daemon and the simulator execute the core's actions identically.
pub fn apply_action(
    engine: &dyn ComputeEngine,
    dtype: DType,
    buf: &mut [u8],
    action: &phalanx_protocol::collective::Action,
) -> Result<bool, ComputeError> {
    use phalanx_protocol::collective::Action;
    match action {
        Action::Reduce {
            range,
            reduce,
            payload,
            ..
        } => {
            reduce_bytes(
                engine,
                dtype,
                *reduce,
                &mut buf[element_range(dtype, range)],
                payload,
            )?;
        }
        Action::Copy { range, payload, .. } => {
            let dst = &mut buf[element_range(dtype, range)];
            crate::same_len("payload bytes", payload.len(), dst.len())?;
            dst.copy_from_slice(payload);
        }
        Action::Divide { range, divisor, .. } => {
            scale_bytes(
                engine,
                dtype,
                &mut buf[element_range(dtype, range)],
                1.0 / *divisor as f32,
            )?;
        }
        Action::Send { .. } | Action::Complete { .. } | Action::Aborted { .. } => return Ok(false),
    }
    Ok(true)
}

/// An engine as the data-path core's arithmetic
/// ([`phalanx_protocol::node::Arithmetic`]): reductions and scaling of raw
/// little-endian elements, as the daemon and the simulators run them.
#[derive(Debug)]
pub struct EngineArithmetic<E>(pub E);

impl<E: std::ops::Deref<Target = dyn ComputeEngine> + std::fmt::Debug + Send>
    phalanx_protocol::node::Arithmetic for EngineArithmetic<E>
{
    fn reduce(&self, dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) -> Result<(), String> {
        reduce_bytes(&*self.0, dtype, op, acc, src).map_err(|e| e.to_string())
    }

    fn scale(&self, dtype: DType, x: &mut [u8], factor: f32) -> Result<(), String> {
        scale_bytes(&*self.0, dtype, x, factor).map_err(|e| e.to_string())
    }
}
