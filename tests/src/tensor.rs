//! Test tensors: seeded inputs in any dtype, and conversions between raw
//! little-endian bytes and f64 for reference arithmetic.

use phalanx_compute::{bf16, f16};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::wire::DType;

/// How input values are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    /// Multiples of 1/64 in [-16, 16]: every partial sum of up to 16 is exact
    /// in f32, so any summation order gives the same bits.
    Exact,
    /// Full-mantissa values in [-4, 4): summation order shows in the last bits.
    Random,
}

/// `len` seeded values of `dtype`, as raw little-endian bytes.
pub fn random_bytes(rng: &mut SplitMix64, dtype: DType, len: usize, values: Values) -> Vec<u8> {
    let mut out = Vec::with_capacity(len * dtype.size_bytes());
    for _ in 0..len {
        let x = match values {
            Values::Exact => (rng.below(2049) as f32 - 1024.0) / 64.0,
            Values::Random => (rng.unit() as f32 - 0.5) * 8.0,
        };
        push(&mut out, dtype, x);
    }
    out
}

fn push(out: &mut Vec<u8>, dtype: DType, x: f32) {
    match dtype {
        DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
        DType::BF16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
        DType::F16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
    }
}

/// The elements of `bytes` as f64 (exactly: every dtype embeds in f64).
pub fn to_f64(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(dtype.size_bytes())
        .map(|c| match dtype {
            DType::F32 => f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            DType::BF16 => f64::from(bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            DType::F16 => f64::from(f16::from_le_bytes([c[0], c[1]]).to_f32()),
        })
        .collect()
}

/// A simulated trainer's gradient of `member` at `step` for parameters `w`:
/// multiples of 1/16 of moderate size, so sums are exact in any order and a
/// result can be checked bit for bit against the contributors it names.
pub fn step_gradient(member: u32, step: u64, w: &[f32]) -> Vec<f32> {
    w.iter()
        .enumerate()
        .map(|(j, &wj)| {
            let x = ((member as u64 * 7 + step * 13 + j as u64 * 3) % 11) as f32 - 5.0;
            (((wj * x - 1.0) * x * 16.0).round() / 16.0).clamp(-1000.0, 1000.0)
        })
        .collect()
}

/// f32s as little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes as f32s.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_through_f64() {
        let mut rng = SplitMix64::new(1);
        for dtype in DType::ALL {
            let b = random_bytes(&mut rng, dtype, 50, Values::Random);
            assert_eq!(b.len(), 50 * dtype.size_bytes());
            let v = to_f64(dtype, &b);
            let mut again = Vec::new();
            for x in &v {
                push(&mut again, dtype, *x as f32);
            }
            assert_eq!(again, b);
        }
    }
}
