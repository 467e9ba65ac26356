//! x86-64 kernels. Each vector op is the lane-wise twin of the scalar
//! reference (`scalar::min_f32` and friends), and the tail that does not fill
//! a vector goes through the reference itself, so results match bit for bit.

use std::arch::x86_64::*;

use crate::scalar::{reduce_f32_scalar, scale_f32_scalar};
use crate::ReduceOp;

/// `f` compiled for AVX-512F, so the loops inlined into it vectorise with it.
///
/// # Safety
/// The CPU must support AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn run_avx512<F: FnMut()>(mut f: F) {
    f()
}

/// `f` compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn run_avx2<F: FnMut()>(mut f: F) {
    f()
}

/// Defines a binary kernel `acc[i] = op(acc[i], src[i])` for one level.
macro_rules! binary_kernel {
    ($name:ident, $feature:literal, $lanes:expr, $load:ident, $store:ident, |$a:ident, $b:ident| $body:expr, $tail:expr) => {
        #[target_feature(enable = $feature)]
        fn $name(acc: &mut [f32], src: &[f32]) {
            let n = acc.len().min(src.len());
            let pa = acc.as_mut_ptr();
            let ps = src.as_ptr();
            let mut i = 0;
            while i + 2 * $lanes <= n {
                // SAFETY: i + 2 * lanes <= n, so both vectors lie inside both slices.
                unsafe {
                    let $a = $load(pa.add(i));
                    let $b = $load(ps.add(i));
                    $store(pa.add(i), $body);
                    let $a = $load(pa.add(i + $lanes));
                    let $b = $load(ps.add(i + $lanes));
                    $store(pa.add(i + $lanes), $body);
                }
                i += 2 * $lanes;
            }
            while i + $lanes <= n {
                // SAFETY: i + lanes <= n.
                unsafe {
                    let $a = $load(pa.add(i));
                    let $b = $load(ps.add(i));
                    $store(pa.add(i), $body);
                }
                i += $lanes;
            }
            reduce_f32_scalar($tail, &mut acc[i..n], &src[i..n]);
        }
    };
}

/// Defines `x[i] *= factor` for one level.
macro_rules! scale_kernel {
    ($name:ident, $feature:literal, $lanes:expr, $load:ident, $store:ident, $set1:ident, $mul:ident) => {
        #[target_feature(enable = $feature)]
        fn $name(x: &mut [f32], factor: f32) {
            let n = x.len();
            let p = x.as_mut_ptr();
            let f = $set1(factor);
            let mut i = 0;
            while i + $lanes <= n {
                // SAFETY: i + lanes <= n.
                unsafe { $store(p.add(i), $mul($load(p.add(i)), f)) };
                i += $lanes;
            }
            scale_f32_scalar(&mut x[i..], factor);
        }
    };
}

// ---- AVX-512F -------------------------------------------------------------

#[inline]
#[target_feature(enable = "avx512f")]
fn or512(a: __m512, b: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(a),
        _mm512_castps_si512(b),
    ))
}
#[inline]
#[target_feature(enable = "avx512f")]
fn and512(a: __m512, b: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_and_si512(
        _mm512_castps_si512(a),
        _mm512_castps_si512(b),
    ))
}

binary_kernel!(
    sum512,
    "avx512f",
    16,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    |a, b| _mm512_add_ps(a, b),
    ReduceOp::Sum
);
binary_kernel!(
    min512,
    "avx512f",
    16,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    |a, b| {
        // minps gives a < b ? a : b; fix equal (signed zeros) and unordered lanes.
        let m = _mm512_min_ps(a, b);
        let m = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b), m, or512(a, b));
        _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b),
            m,
            _mm512_set1_ps(f32::NAN),
        )
    },
    ReduceOp::Min
);
binary_kernel!(
    max512,
    "avx512f",
    16,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    |a, b| {
        let m = _mm512_max_ps(a, b);
        let m = _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b), m, and512(a, b));
        _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b),
            m,
            _mm512_set1_ps(f32::NAN),
        )
    },
    ReduceOp::Max
);
scale_kernel!(
    scale512,
    "avx512f",
    16,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_mul_ps
);

/// # Safety
/// The CPU must support AVX-512F.
pub unsafe fn reduce_avx512(op: ReduceOp, acc: &mut [f32], src: &[f32]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => sum512(acc, src),
            ReduceOp::Min => min512(acc, src),
            ReduceOp::Max => max512(acc, src),
        }
    }
}

/// # Safety
/// The CPU must support AVX-512F.
pub unsafe fn scale_avx512(x: &mut [f32], factor: f32) {
    // SAFETY: forwarded from the caller.
    unsafe { scale512(x, factor) }
}

// ---- AVX2 -----------------------------------------------------------------

binary_kernel!(
    sum256,
    "avx2",
    8,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    |a, b| _mm256_add_ps(a, b),
    ReduceOp::Sum
);
binary_kernel!(
    min256,
    "avx2",
    8,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    |a, b| {
        let m = _mm256_min_ps(a, b);
        let m = _mm256_blendv_ps(m, _mm256_or_ps(a, b), _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b));
        _mm256_blendv_ps(
            m,
            _mm256_set1_ps(f32::NAN),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b),
        )
    },
    ReduceOp::Min
);
binary_kernel!(
    max256,
    "avx2",
    8,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    |a, b| {
        let m = _mm256_max_ps(a, b);
        let m = _mm256_blendv_ps(m, _mm256_and_ps(a, b), _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b));
        _mm256_blendv_ps(
            m,
            _mm256_set1_ps(f32::NAN),
            _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b),
        )
    },
    ReduceOp::Max
);
scale_kernel!(
    scale256,
    "avx2",
    8,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_mul_ps
);

/// # Safety
/// The CPU must support AVX2.
pub unsafe fn reduce_avx2(op: ReduceOp, acc: &mut [f32], src: &[f32]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => sum256(acc, src),
            ReduceOp::Min => min256(acc, src),
            ReduceOp::Max => max256(acc, src),
        }
    }
}

/// # Safety
/// The CPU must support AVX2.
pub unsafe fn scale_avx2(x: &mut [f32], factor: f32) {
    // SAFETY: forwarded from the caller.
    unsafe { scale256(x, factor) }
}

// ---- SSE2 (baseline on x86-64) ---------------------------------------------

/// `mask ? y : x` without SSE4.1's blendv.
#[inline]
#[target_feature(enable = "sse2")]
fn select128(x: __m128, y: __m128, mask: __m128) -> __m128 {
    _mm_or_ps(_mm_and_ps(mask, y), _mm_andnot_ps(mask, x))
}

binary_kernel!(
    sum128,
    "sse2",
    4,
    _mm_loadu_ps,
    _mm_storeu_ps,
    |a, b| _mm_add_ps(a, b),
    ReduceOp::Sum
);
binary_kernel!(
    min128,
    "sse2",
    4,
    _mm_loadu_ps,
    _mm_storeu_ps,
    |a, b| {
        let m = select128(_mm_min_ps(a, b), _mm_or_ps(a, b), _mm_cmpeq_ps(a, b));
        select128(m, _mm_set1_ps(f32::NAN), _mm_cmpunord_ps(a, b))
    },
    ReduceOp::Min
);
binary_kernel!(
    max128,
    "sse2",
    4,
    _mm_loadu_ps,
    _mm_storeu_ps,
    |a, b| {
        let m = select128(_mm_max_ps(a, b), _mm_and_ps(a, b), _mm_cmpeq_ps(a, b));
        select128(m, _mm_set1_ps(f32::NAN), _mm_cmpunord_ps(a, b))
    },
    ReduceOp::Max
);
scale_kernel!(
    scale128,
    "sse2",
    4,
    _mm_loadu_ps,
    _mm_storeu_ps,
    _mm_set1_ps,
    _mm_mul_ps
);

pub fn reduce_sse2(op: ReduceOp, acc: &mut [f32], src: &[f32]) {
    // SAFETY: SSE2 is part of the x86-64 baseline.
    unsafe {
        match op {
            ReduceOp::Sum | ReduceOp::Mean => sum128(acc, src),
            ReduceOp::Min => min128(acc, src),
            ReduceOp::Max => max128(acc, src),
        }
    }
}

pub fn scale_sse2(x: &mut [f32], factor: f32) {
    // SAFETY: SSE2 is part of the x86-64 baseline.
    unsafe { scale128(x, factor) }
}
