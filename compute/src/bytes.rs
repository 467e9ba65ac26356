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
