//! The SIMD engine, at every level this CPU offers, equals the scalar
//! reference bit for bit (NaN payloads of sums aside, which IEEE 754 leaves
//! open), on odd and zero lengths and on slices at every misalignment.

use phalanx_compute::{
    bf16, f16, reduce_bytes, scale_bytes, AdamParams, ComputeEngine, ComputeError, DType,
    MomentumParams, ReduceOp, ScalarEngine, SgdParams, SimdEngine, SimdLevel,
};
use proptest::prelude::*;

fn engines() -> Vec<SimdEngine> {
    SimdLevel::available()
        .into_iter()
        .map(|l| SimdEngine::with_level(l).expect("available level"))
        .collect()
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn assert_same(got: &[f32], want: &[f32], what: &str) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        prop_assert!(
            same(*g, *w),
            "{}: element {} is {:e} ({:#x}), reference {:e} ({:#x})",
            what,
            i,
            g,
            g.to_bits(),
            w,
            w.to_bits()
        );
    }
    Ok(())
}

/// Ordinary values, and the ones that break naive kernels.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        6 => -1000.0f32..1000.0,
        1 => any::<u32>().prop_map(f32::from_bits),
        1 => prop::sample::select(vec![0.0f32, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN,
            f32::MIN_POSITIVE, -f32::MIN_POSITIVE / 2.0, f32::MAX, 1.0, -1.0]),
    ]
}

fn pair() -> impl Strategy<Value = (Vec<f32>, Vec<f32>, usize)> {
    (0usize..600, 0usize..16).prop_flat_map(|(n, offset)| {
        (
            prop::collection::vec(value(), n + offset),
            prop::collection::vec(value(), n + offset),
            Just(offset),
        )
    })
}

fn op() -> impl Strategy<Value = ReduceOp> {
    prop::sample::select(ReduceOp::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn reduce_f32_matches((acc, src, off) in pair(), op in op()) {
        let mut want = acc.clone();
        ScalarEngine.reduce_f32(op, &mut want[off..], &src[off..]).unwrap();
        for e in engines() {
            let mut got = acc.clone();
            e.reduce_f32(op, &mut got[off..], &src[off..]).unwrap();
            assert_same(&got, &want, &format!("{} {op}", e.name()))?;
        }
    }

    #[test]
    fn reduce_half_matches((acc, src, off) in pair(), op in op()) {
        let a16: Vec<bf16> = acc.iter().map(|&x| bf16::from_f32(x)).collect();
        let s16: Vec<bf16> = src.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut want = a16.clone();
        ScalarEngine.reduce_bf16(op, &mut want[off..], &s16[off..]).unwrap();
        let ah: Vec<f16> = acc.iter().map(|&x| f16::from_f32(x)).collect();
        let sh: Vec<f16> = src.iter().map(|&x| f16::from_f32(x)).collect();
        let mut want_h = ah.clone();
        ScalarEngine.reduce_f16(op, &mut want_h[off..], &sh[off..]).unwrap();
        for e in engines() {
            let mut got = a16.clone();
            e.reduce_bf16(op, &mut got[off..], &s16[off..]).unwrap();
            let g: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
            let w: Vec<f32> = want.iter().map(|x| x.to_f32()).collect();
            assert_same(&g, &w, &format!("{} bf16 {op}", e.name()))?;
            let mut got = ah.clone();
            e.reduce_f16(op, &mut got[off..], &sh[off..]).unwrap();
            let g: Vec<f32> = got.iter().map(|x| x.to_f32()).collect();
            let w: Vec<f32> = want_h.iter().map(|x| x.to_f32()).collect();
            assert_same(&g, &w, &format!("{} f16 {op}", e.name()))?;
        }
    }

    #[test]
    fn scale_and_casts_match((x, _, off) in pair(), factor in value()) {
        let mut want = x.clone();
        ScalarEngine.scale_f32(&mut want[off..], factor);
        let mut want_b = vec![bf16::ZERO; x.len()];
        ScalarEngine.cast_f32_to_bf16(&x, &mut want_b).unwrap();
        let mut want_h = vec![f16::ZERO; x.len()];
        ScalarEngine.cast_f32_to_f16(&x, &mut want_h).unwrap();
        let mut want_sb = want_b.clone();
        ScalarEngine.scale_bf16(&mut want_sb[off..], factor);
        let mut want_sh = want_h.clone();
        ScalarEngine.scale_f16(&mut want_sh[off..], factor);
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let widen_h = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        for e in engines() {
            let mut got = x.clone();
            e.scale_f32(&mut got[off..], factor);
            assert_same(&got, &want, &format!("{} scale", e.name()))?;
            let mut b = vec![bf16::ZERO; x.len()];
            e.cast_f32_to_bf16(&x, &mut b).unwrap();
            assert_same(&widen(&b), &widen(&want_b), "cast bf16")?;
            let mut h = vec![f16::ZERO; x.len()];
            e.cast_f32_to_f16(&x, &mut h).unwrap();
            assert_same(&widen_h(&h), &widen_h(&want_h), "cast f16")?;
            let mut back = vec![0f32; x.len()];
            e.cast_bf16_to_f32(&b, &mut back).unwrap();
            assert_same(&back, &widen(&want_b), "widen bf16")?;
            e.cast_f16_to_f32(&h, &mut back).unwrap();
            assert_same(&back, &widen_h(&want_h), "widen f16")?;
            e.scale_bf16(&mut b[off..], factor);
            assert_same(&widen(&b), &widen(&want_sb), "scale bf16")?;
            e.scale_f16(&mut h[off..], factor);
            assert_same(&widen_h(&h), &widen_h(&want_sh), "scale f16")?;
        }
    }

    #[test]
    fn optimizers_match((p, g, off) in pair(), lr in 0.0f32..1.0, mom in 0.0f32..1.0, wd in 0.0f32..0.1, nesterov in any::<bool>(), step in 1u32..1000) {
        let n = p.len();
        let v0: Vec<f32> = g.iter().map(|x| x * 0.5).collect();
        let sq: Vec<f32> = g.iter().map(|x| x * x).collect();
        let sgd = SgdParams { lr, weight_decay: wd };
        let mp = MomentumParams { lr, momentum: mom, weight_decay: wd, nesterov };
        let ap = AdamParams { lr, weight_decay: wd, step, ..AdamParams::default() };
        let mut want = (p.clone(), v0.clone(), sq.clone());
        ScalarEngine.sgd(&mut want.0[off..], &g[off..], &sgd).unwrap();
        ScalarEngine.momentum(&mut want.0[off..], &g[off..], &mut want.1[off..], &mp).unwrap();
        ScalarEngine.adam(&mut want.0[off..], &g[off..], &mut want.1[off..], &mut want.2[off..], &ap).unwrap();
        for e in engines() {
            let mut got = (p.clone(), v0.clone(), sq.clone());
            e.sgd(&mut got.0[off..], &g[off..], &sgd).unwrap();
            e.momentum(&mut got.0[off..], &g[off..], &mut got.1[off..], &mp).unwrap();
            e.adam(&mut got.0[off..], &g[off..], &mut got.1[off..], &mut got.2[off..], &ap).unwrap();
            assert_same(&got.0, &want.0, &format!("{} params", e.name()))?;
            assert_same(&got.1, &want.1, "m/velocity")?;
            assert_same(&got.2, &want.2, "v")?;
        }
        prop_assert_eq!(want.0.len(), n);
    }

    /// Partners in recursive doubling compute op(a, b) and op(b, a).
    #[test]
    fn min_max_are_symmetric((a, b, _) in pair()) {
        for e in engines() {
            for op in [ReduceOp::Min, ReduceOp::Max] {
                let mut ab = a.clone();
                e.reduce_f32(op, &mut ab, &b).unwrap();
                let mut ba = b.clone();
                e.reduce_f32(op, &mut ba, &a).unwrap();
                for (x, y) in ab.iter().zip(&ba) {
                    prop_assert_eq!(x.to_bits(), y.to_bits());
                }
            }
        }
    }

    /// Payloads cut out of network buffers are misaligned; bytes in, same bits out.
    #[test]
    fn byte_level_entry_handles_misalignment((acc, src, _) in pair(), shift in 0usize..4, op in op()) {
        let engine = SimdEngine::detect();
        let mut want = acc.clone();
        engine.reduce_f32(op, &mut want, &src).unwrap();
        engine.scale_f32(&mut want, 0.5);
        let mut a = vec![0u8; shift];
        a.extend(acc.iter().flat_map(|x| x.to_le_bytes()));
        let mut s = vec![0u8; shift];
        s.extend(src.iter().flat_map(|x| x.to_le_bytes()));
        reduce_bytes(&engine, DType::F32, op, &mut a[shift..], &s[shift..]).unwrap();
        scale_bytes(&engine, DType::F32, &mut a[shift..], 0.5).unwrap();
        let got: Vec<f32> = a[shift..].chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_same(&got, &want, "bytes")?;
    }
}

#[test]
fn known_values() {
    for e in engines() {
        let mut a = vec![1.0f32, -0.0, 0.0, f32::NAN, 5.0];
        e.reduce_f32(ReduceOp::Min, &mut a, &[2.0, 0.0, -0.0, 1.0, f32::NAN])
            .unwrap();
        assert_eq!(a[0], 1.0);
        assert_eq!(a[1].to_bits(), (-0.0f32).to_bits());
        assert_eq!(a[2].to_bits(), (-0.0f32).to_bits());
        assert!(a[3].is_nan() && a[4].is_nan());
        let mut a = vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        e.reduce_f32(ReduceOp::Sum, &mut a, &[1.0; 9]).unwrap();
        assert_eq!(a, [2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        let mut b = vec![bf16::from_f32(1.0); 3];
        e.reduce_bf16(ReduceOp::Max, &mut b, &[bf16::from_f32(3.0); 3])
            .unwrap();
        assert_eq!(b[2].to_f32(), 3.0);
        let mut p = vec![1.0f32; 3];
        e.sgd(
            &mut p,
            &[1.0; 3],
            &SgdParams {
                lr: 0.5,
                weight_decay: 0.0,
            },
        )
        .unwrap();
        assert_eq!(p, [0.5; 3]);
    }
}

#[test]
fn mismatched_lengths_are_errors_and_write_nothing() {
    for e in engines() {
        let mut a = vec![1.0f32; 4];
        let err = e.reduce_f32(ReduceOp::Sum, &mut a, &[1.0; 3]).unwrap_err();
        assert_eq!(
            err,
            ComputeError::LengthMismatch {
                what: "src",
                got: 3,
                expected: 4
            }
        );
        assert_eq!(a, [1.0; 4]);
        let mut m = vec![0.0f32; 4];
        assert!(e
            .adam(
                &mut a,
                &[0.0; 4],
                &mut m,
                &mut [0.0; 2],
                &AdamParams::default()
            )
            .is_err());
        assert_eq!(a, [1.0; 4]);
    }
    let mut bytes = vec![0u8; 6];
    let err = reduce_bytes(
        &ScalarEngine,
        DType::F32,
        ReduceOp::Sum,
        &mut bytes,
        &[0u8; 6],
    )
    .unwrap_err();
    assert_eq!(
        err,
        ComputeError::RaggedBytes {
            len: 6,
            dtype: DType::F32
        }
    );
}

#[test]
fn every_level_this_cpu_has_is_tested() {
    let levels = SimdLevel::available();
    assert!(levels.contains(&SimdLevel::Portable));
    #[cfg(target_arch = "x86_64")]
    assert!(levels.contains(&SimdLevel::Sse2));
    println!("levels under test: {levels:?}");
}
