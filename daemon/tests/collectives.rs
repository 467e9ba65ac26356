//! Real `phalanxd` processes on 127.0.0.x, one trainer each: every collective,
//! every dtype, results equal to the reference and identical on every member.

mod common;

use std::thread;

use half::{bf16, f16};
use phalanx_client::{Client, Element, MemberId, ReduceOp};
use phalanx_compute::sum_error_bound;
use phalanx_protocol::collective::schedule::segment;
use phalanx_protocol::wire::DType;

/// Member `m`'s input: deterministic, varied, exactly representable in every dtype.
fn input(m: usize, len: usize, salt: usize) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7 + m * 13 + salt * 5) % 61) as f32 - 30.0) / 8.0)
        .collect()
}

fn to<T: Element + Conv>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

trait Conv: Copy {
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}
impl Conv for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Conv for bf16 {
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}
impl Conv for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Runs every collective for dtype `T` at member index `me`; returns the raw
/// outputs (for the cross-member comparison) after checking each against the
/// reference.
fn exercise<T: Element + Conv>(
    client: &mut Client,
    me: usize,
    n: usize,
    lens: &[usize],
) -> Vec<Vec<u32>> {
    let dtype = T::DTYPE;
    let members: Vec<MemberId> = client.members().to_vec();
    let mut outputs = Vec::new();
    let bits = |v: &[T]| v.iter().map(|x| x.to_f32().to_bits()).collect::<Vec<u32>>();
    for (salt, &len) in lens.iter().enumerate() {
        let all: Vec<Vec<f32>> = (0..n)
            .map(|m| {
                to::<T>(&input(m, len, salt))
                    .iter()
                    .map(|x| x.to_f32())
                    .collect()
            })
            .collect();
        for op in ReduceOp::ALL {
            let mut data: Vec<T> = to(&input(me, len, salt));
            let info = client
                .all_reduce(&mut data, op)
                .unwrap_or_else(|e| panic!("{dtype} {op} len {len}: {e}"));
            assert_eq!(info.contributors, members);
            for (i, got) in data.iter().enumerate() {
                let xs: Vec<f64> = all.iter().map(|v| f64::from(v[i])).collect();
                let g = f64::from(got.to_f32());
                let (want, bound) = match op {
                    ReduceOp::Min => (xs.iter().copied().fold(f64::INFINITY, f64::min), 0.0),
                    ReduceOp::Max => (xs.iter().copied().fold(f64::NEG_INFINITY, f64::max), 0.0),
                    _ => {
                        let sum: f64 = xs.iter().sum();
                        let abs: f64 = xs.iter().map(|x| x.abs()).sum();
                        let mean = op == ReduceOp::Mean;
                        (
                            if mean { sum / n as f64 } else { sum },
                            sum_error_bound(dtype, n, abs, g, mean),
                        )
                    }
                };
                assert!(
                    (g - want).abs() <= bound,
                    "{dtype} {op} len {len} element {i}: got {g}, want {want} ± {bound}"
                );
            }
            outputs.push(bits(&data));
        }
        // Broadcast from the second member (or the only one).
        let root = members[1.min(n - 1)];
        let mut data: Vec<T> = to(&input(me, len, salt));
        client.broadcast(&mut data, root).unwrap();
        let want: Vec<T> = to(&input(1.min(n - 1), len, salt));
        assert_eq!(bits(&data), bits(&want), "{dtype} broadcast len {len}");
        outputs.push(bits(&data));
        // All-gather.
        let (gathered, _) = client.all_gather::<T>(&to(&input(me, len, salt))).unwrap();
        let want: Vec<T> = (0..n).flat_map(|m| to::<T>(&input(m, len, salt))).collect();
        assert_eq!(bits(&gathered), bits(&want), "{dtype} all-gather len {len}");
        outputs.push(bits(&gathered));
        // Reduce-scatter (max: exact, so the check is bit for bit).
        let (mine, _) = client
            .reduce_scatter::<T>(&to(&input(me, len, salt)), ReduceOp::Max)
            .unwrap();
        let seg = segment(len, n, me);
        let want: Vec<f32> = seg
            .clone()
            .map(|i| all.iter().map(|v| v[i]).fold(f32::NEG_INFINITY, f32::max))
            .collect();
        assert_eq!(
            mine.iter().map(|x| x.to_f32()).collect::<Vec<_>>(),
            want,
            "{dtype} reduce-scatter len {len}"
        );
    }
    // Fusion: many small tensors, a few collectives, the same sums.
    let lens_fused = [3usize, 100, 1, 2000, 17, 5000, 64];
    let mut tensors: Vec<Vec<T>> = lens_fused
        .iter()
        .enumerate()
        .map(|(k, &l)| to(&input(me, l, 100 + k)))
        .collect();
    let mut views: Vec<&mut [T]> = tensors.iter_mut().map(|t| t.as_mut_slice()).collect();
    let infos = client
        .all_reduce_fused(&mut views, ReduceOp::Sum, 8192)
        .unwrap();
    // 8 KiB bound: f32 packs [3,100,1] [2000,17] [5000] [64];
    // 2-byte dtypes pack [3,100,1,2000,17] [5000] [64].
    let expected_groups = if dtype == DType::F32 { 4 } else { 3 };
    assert_eq!(
        infos.len(),
        expected_groups,
        "{dtype}: fused into {} collectives",
        infos.len()
    );
    for (k, t) in tensors.iter().enumerate() {
        let inputs: Vec<Vec<T>> = (0..n)
            .map(|m| to::<T>(&input(m, lens_fused[k], 100 + k)))
            .collect();
        for (i, got) in t.iter().enumerate() {
            let xs: Vec<f64> = inputs.iter().map(|v| f64::from(v[i].to_f32())).collect();
            let sum: f64 = xs.iter().sum();
            let abs: f64 = xs.iter().map(|x| x.abs()).sum();
            let g = f64::from(got.to_f32());
            assert!(
                (g - sum).abs() <= sum_error_bound(dtype, n, abs, g, false),
                "{dtype} fused tensor {k} element {i}"
            );
        }
        outputs.push(bits(t));
    }
    client.barrier().unwrap();
    outputs
}

fn run(n: usize) {
    // Small chunks so the larger tensors stream in many frames.
    let cluster = common::cluster(n, "chunk_bytes = 16384\nchannels = 2");
    let lens = [0usize, 1, 7, 1000, 40_009];
    let handles: Vec<_> = (0..n)
        .map(|me| {
            let socket = cluster.members[me].socket.clone();
            thread::spawn(move || {
                let mut client = Client::connect(&socket).expect("connecting the trainer");
                let mut out = exercise::<f32>(&mut client, me, n, &lens);
                out.extend(exercise::<bf16>(&mut client, me, n, &lens));
                out.extend(exercise::<f16>(&mut client, me, n, &lens));
                out
            })
        })
        .collect();
    let results: Vec<Vec<Vec<u32>>> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            h.join().unwrap_or_else(|_| {
                panic!(
                    "trainer {i} failed; daemon logs in {} (set PHALANX_KEEP_TEST_DIRS=1)",
                    cluster.dir().display()
                )
            })
        })
        .collect();
    for (i, r) in results.iter().enumerate().skip(1) {
        assert_eq!(r, &results[0], "member {} differs from member 1", i + 1);
    }
    let text = cluster.metrics(0).unwrap();
    assert!(
        text.contains("phalanx_ops_total{outcome=\"completed\"}"),
        "metrics:\n{text}"
    );
    assert!(
        text.contains("phalanx_bytes_sent_total"),
        "metrics:\n{text}"
    );
}

#[test]
fn two_members() {
    run(2);
}

#[test]
fn three_members() {
    run(3);
}

#[test]
fn five_members() {
    run(5);
}

/// Two streams per member issued by two threads at once: ops of different
/// streams are in flight together and matched by their own ids.
#[test]
fn concurrent_streams_run_side_by_side() {
    let n = 3;
    let cluster = common::cluster(n, "chunk_bytes = 16384");
    let mut handles = Vec::new();
    for me in 0..n {
        for stream in [1u32, 2] {
            let socket = cluster.members[me].socket.clone();
            handles.push(thread::spawn(move || {
                let mut client = Client::connect_stream(&socket, stream).unwrap();
                for k in 0..30usize {
                    let len = 5000 + 700 * stream as usize;
                    let mut v = vec![(me * 10 + stream as usize + k) as f32; len];
                    let info = client.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    let want: f32 = (0..n).map(|m| (m * 10 + stream as usize + k) as f32).sum();
                    assert!(
                        v.iter().all(|&x| x == want),
                        "stream {stream} op {k}: {} != {want}",
                        v[0]
                    );
                    assert_eq!(info.op.stream(), stream);
                }
            }));
        }
    }
    for h in handles {
        h.join().expect("a stream failed");
    }
    // A second connection issuing a stream already in use is refused, clearly.
    let first = Client::connect_stream(&cluster.members[0].socket, 7).unwrap();
    let err = Client::connect_stream(&cluster.members[0].socket, 7).unwrap_err();
    assert!(
        err.to_string()
            .contains("already issued by another connection"),
        "{err}"
    );
    // A trainer that hung up and reconnects at once takes its stream back.
    drop(first);
    Client::connect_stream(&cluster.members[0].socket, 7)
        .expect("reconnecting to a released stream");
}

/// The zero-copy path: trainers write into the shared staging area and reduce
/// it in place.
#[test]
fn staged_all_reduce_works_in_shared_memory() {
    let n = 2;
    let cluster = common::cluster(n, "");
    let handles: Vec<_> = (0..n)
        .map(|me| {
            let socket = cluster.members[me].socket.clone();
            thread::spawn(move || {
                let mut client = Client::connect(&socket).unwrap();
                let len = 300_001;
                for (i, x) in client.staging::<f32>(len).unwrap().iter_mut().enumerate() {
                    *x = (i % 97) as f32 + me as f32;
                }
                client.all_reduce_staged::<f32>(len, ReduceOp::Sum).unwrap();
                let out = client.staging::<f32>(len).unwrap();
                for (i, &x) in out.iter().enumerate() {
                    assert_eq!(x, 2.0 * (i % 97) as f32 + 1.0, "element {i}");
                }
                // Asking for more than the staging area holds is a clear error.
                let too_many = 1 << 28;
                let err = client
                    .all_reduce_staged::<f32>(too_many, ReduceOp::Sum)
                    .unwrap_err();
                assert!(err.to_string().contains("staging"), "{err}");
            })
        })
        .collect();
    for h in handles {
        h.join().expect("a trainer failed");
    }
}
