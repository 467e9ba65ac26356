//! The CUDA engine (feature `cuda`) equals the scalar reference bit for bit
//! (NaN payloads aside) on every operation of the engine trait. Without a
//! GPU, the driver or NVRTC, each test prints why it was skipped and passes.
//! Run with `cargo test --release --locked -p phalanx-compute --features cuda
//! --test cuda -- --nocapture` (or `scripts/gpu-check.sh`).

#![cfg(feature = "cuda")]

use phalanx_compute::{
    bf16, f16, AdamParams, ComputeEngine, CudaEngine, MomentumParams, ReduceOp, ScalarEngine,
    SgdParams,
};
use phalanx_protocol::rng::SplitMix64;

fn engine(test: &str) -> Option<CudaEngine> {
    match CudaEngine::new(0) {
        Ok(e) => Some(e),
        Err(why) => {
            println!("{test}: skipped: {why}");
            None
        }
    }
}

/// Ordinary values and the awkward ones (zeros of both signs, infinities,
/// NaN, subnormals, extremes).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let special = [
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE / 2.0,
        f32::MAX,
        1.0,
        -1.0,
    ];
    (0..n)
        .map(|_| match rng.below(8) {
            0 => special[rng.below(special.len() as u64) as usize],
            1 => f32::from_bits(rng.next_u64() as u32),
            _ => (rng.below(2_000_000) as f32 - 1_000_000.0) / 1000.0,
        })
        .collect()
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn assert_same(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            same(*g, *w),
            "{what}: element {i} is {g:e} ({:#x}), reference {w:e} ({:#x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

const N: usize = 100_003;

/// Needs only NVRTC (no GPU): the kernels compile, every one is there.
#[test]
fn the_kernels_compile() {
    match phalanx_compute::compile_kernels() {
        Ok(ptx) => {
            for k in [
                "reduce_f32",
                "reduce_bf16",
                "scale_f16",
                "f32_to_bf16_k",
                "adam",
            ] {
                assert!(
                    ptx.contains(&format!(".entry {k}")),
                    "no kernel {k} in the PTX"
                );
            }
            assert!(
                ptx.contains("cvt.rn.bf16.f32"),
                "bf16 rounding is not cvt.rn"
            );
            assert!(ptx.contains(".target sm_80"), "not compiled for sm_80");
            println!("the_kernels_compile: {} bytes of PTX", ptx.len());
            if let Some(path) = std::env::var_os("PHALANX_DUMP_PTX") {
                std::fs::write(path, &ptx).expect("writing the PTX");
            }
        }
        Err(phalanx_compute::CudaUnavailable::NoLibrary(lib)) => {
            println!("the_kernels_compile: skipped: {lib} is not installed");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn reductions_match_the_reference() {
    let Some(gpu) = engine("reductions_match_the_reference") else {
        return;
    };
    println!("engine: {}", gpu.name());
    for (k, op) in ReduceOp::ALL.into_iter().enumerate() {
        let (a, b) = (values(k as u64, N), values(100 + k as u64, N));
        let (mut got, mut want) = (a.clone(), a.clone());
        gpu.reduce_f32(op, &mut got, &b).unwrap();
        ScalarEngine.reduce_f32(op, &mut want, &b).unwrap();
        assert_same(&got, &want, &format!("f32 {op}"));

        let ah: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
        let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
        let (mut got, mut want) = (ah.clone(), ah.clone());
        gpu.reduce_bf16(op, &mut got, &bh).unwrap();
        ScalarEngine.reduce_bf16(op, &mut want, &bh).unwrap();
        let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        assert_same(&widen(&got), &widen(&want), &format!("bf16 {op}"));

        let ah: Vec<f16> = a.iter().map(|&x| f16::from_f32(x)).collect();
        let bh: Vec<f16> = b.iter().map(|&x| f16::from_f32(x)).collect();
        let (mut got, mut want) = (ah.clone(), ah.clone());
        gpu.reduce_f16(op, &mut got, &bh).unwrap();
        ScalarEngine.reduce_f16(op, &mut want, &bh).unwrap();
        let widen = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        assert_same(&widen(&got), &widen(&want), &format!("f16 {op}"));
    }
}

#[test]
fn scaling_and_casts_match_the_reference() {
    let Some(gpu) = engine("scaling_and_casts_match_the_reference") else {
        return;
    };
    let a = values(7, N);
    let (mut got, mut want) = (a.clone(), a.clone());
    gpu.scale_f32(&mut got, 0.3);
    ScalarEngine.scale_f32(&mut want, 0.3);
    assert_same(&got, &want, "scale f32");

    let mut gb = vec![bf16::ZERO; N];
    let mut wb = vec![bf16::ZERO; N];
    gpu.cast_f32_to_bf16(&a, &mut gb).unwrap();
    ScalarEngine.cast_f32_to_bf16(&a, &mut wb).unwrap();
    let (mut g32, mut w32) = (vec![0.0; N], vec![0.0; N]);
    gpu.cast_bf16_to_f32(&gb, &mut g32).unwrap();
    ScalarEngine.cast_bf16_to_f32(&wb, &mut w32).unwrap();
    assert_same(&g32, &w32, "f32 -> bf16 -> f32");
    gpu.scale_bf16(&mut gb, 1.7);
    ScalarEngine.scale_bf16(&mut wb, 1.7);
    let widen = |v: &[bf16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    assert_same(&widen(&gb), &widen(&wb), "scale bf16");

    let mut gh = vec![f16::ZERO; N];
    let mut wh = vec![f16::ZERO; N];
    gpu.cast_f32_to_f16(&a, &mut gh).unwrap();
    ScalarEngine.cast_f32_to_f16(&a, &mut wh).unwrap();
    gpu.cast_f16_to_f32(&gh, &mut g32).unwrap();
    ScalarEngine.cast_f16_to_f32(&wh, &mut w32).unwrap();
    assert_same(&g32, &w32, "f32 -> f16 -> f32");
    gpu.scale_f16(&mut gh, 0.9);
    ScalarEngine.scale_f16(&mut wh, 0.9);
    let widen = |v: &[f16]| v.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
    assert_same(&widen(&gh), &widen(&wh), "scale f16");
    assert!(gpu.cast_f32_to_f16(&a, &mut gh[..3]).is_err());
}

#[test]
fn optimizers_match_the_reference() {
    let Some(gpu) = engine("optimizers_match_the_reference") else {
        return;
    };
    let small = |seed| -> Vec<f32> { values(seed, N).iter().map(|x| x.clamp(-5.0, 5.0)).collect() };
    let (p, g, m, v) = (small(1), small(2), small(3), small(4));
    let v: Vec<f32> = v.iter().map(|x| x.abs()).collect();

    let h = SgdParams {
        lr: 0.01,
        weight_decay: 1e-4,
    };
    let (mut got, mut want) = (p.clone(), p.clone());
    gpu.sgd(&mut got, &g, &h).unwrap();
    ScalarEngine.sgd(&mut want, &g, &h).unwrap();
    assert_same(&got, &want, "sgd");

    for nesterov in [false, true] {
        let h = MomentumParams {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov,
        };
        let (mut gp, mut wp, mut gv, mut wv) = (p.clone(), p.clone(), m.clone(), m.clone());
        gpu.momentum(&mut gp, &g, &mut gv, &h).unwrap();
        ScalarEngine.momentum(&mut wp, &g, &mut wv, &h).unwrap();
        assert_same(&gp, &wp, "momentum params");
        assert_same(&gv, &wv, "momentum velocity");
    }

    let h = AdamParams {
        step: 3,
        weight_decay: 1e-2,
        ..AdamParams::default()
    };
    let (mut gp, mut wp) = (p.clone(), p.clone());
    let (mut gm, mut wm) = (m.clone(), m.clone());
    let (mut gv, mut wv) = (v.clone(), v.clone());
    gpu.adam(&mut gp, &g, &mut gm, &mut gv, &h).unwrap();
    ScalarEngine
        .adam(&mut wp, &g, &mut wm, &mut wv, &h)
        .unwrap();
    assert_same(&gp, &wp, "adam params");
    assert_same(&gm, &wm, "adam m");
    assert_same(&gv, &wv, "adam v");
}
