//! The reduction-kernel benchmark.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use phalanx_compute::{ComputeEngine, ReduceOp, ScalarEngine, SimdEngine};
use serde_json::json;

const SIZES: [(usize, &str); 4] = [
    (64 << 10, "64KiB"),
    (1 << 20, "1MiB"),
    (16 << 20, "16MiB"),
    (64 << 20, "64MiB"),
];

/// A 4 KiB-aligned f32 buffer, as the peer benchmark allocates.
struct Aligned {
    storage: Vec<f32>,
    offset: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, value: f32) -> Aligned {
        let storage = vec![value; len + 1024];
        let misalign = (storage.as_ptr() as usize % 4096) / 4;
        let offset = (1024 - misalign) % 1024;
        Aligned {
            storage,
            offset,
            len,
        }
    }
    fn slice(&self) -> &[f32] {
        &self.storage[self.offset..self.offset + self.len]
    }
    fn slice_mut(&mut self) -> &mut [f32] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn gbps(bytes: usize, reps: usize, start: Instant) -> f64 {
    (bytes * reps) as f64 / start.elapsed().as_secs_f64() / 1e9
}

pub fn run(samples: usize, bytes_per_sample: u64, json_path: Option<&Path>) -> anyhow::Result<()> {
    let simd = SimdEngine::detect();
    let scalar = ScalarEngine;
    println!(
        "engine {} (scalar = portable reference loop), {samples} samples per size, median GB/s",
        simd.name()
    );
    println!(
        "{:>7} {:>10} {:>10} {:>10} {:>14} {:>10}",
        "size", "memcpy", "scalar", "simd", "simd/memcpy", "spread"
    );
    let mut rows = Vec::new();
    let mut summary = serde_json::Map::new();
    for (bytes, label) in SIZES {
        let n = bytes / 4;
        let src = Aligned::new(n, 1e-3);
        let mut dst = Aligned::new(n, 0.0);
        let reps = ((bytes_per_sample / bytes as u64) as usize).max(2);
        let (mut copy, mut sc, mut sv, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..samples {
            let t = Instant::now();
            for _ in 0..reps {
                dst.slice_mut().copy_from_slice(src.slice());
                black_box(dst.slice_mut());
            }
            let c = gbps(bytes, reps, t);
            let t = Instant::now();
            for _ in 0..reps {
                scalar.reduce_f32(ReduceOp::Sum, dst.slice_mut(), src.slice())?;
                black_box(dst.slice_mut());
            }
            sc.push(gbps(bytes, reps, t));
            let t = Instant::now();
            for _ in 0..reps {
                simd.reduce_f32(ReduceOp::Sum, dst.slice_mut(), src.slice())?;
                black_box(dst.slice_mut());
            }
            let s = gbps(bytes, reps, t);
            copy.push(c);
            sv.push(s);
            // The ratio of each sample's pair: both saw the same machine state.
            ratios.push(s / c);
        }
        let spread = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        let (c, s_, v, r) = (median(copy), median(sc), median(sv), median(ratios.clone()));
        println!(
            "{label:>7} {c:>10.2} {s_:>10.2} {v:>10.2} {r:>14.3} {:>4.2}-{:.2}",
            spread.0, spread.1
        );
        rows.push(json!({
            "size": label,
            "size_bytes": bytes,
            "reps_per_sample": reps,
            "memcpy_GBps": c,
            "scalar_sum_GBps": s_,
            "simd_sum_GBps": v,
            "simd_over_memcpy_median": r,
            "simd_over_memcpy_min": spread.0,
            "simd_over_memcpy_max": spread.1,
        }));
        summary.insert(format!("simd_over_memcpy_{label}"), json!(r));
    }
    let doc = json!({
        "benchmark": "kernels",
        "engine": simd.name(),
        "samples": samples,
        "bytes_per_sample": bytes_per_sample,
        "results": rows,
        "summary": summary,
    });
    crate::write_report(&doc, json_path)?;
    Ok(())
}
