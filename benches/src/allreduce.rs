//! The end-to-end all-reduce benchmark: real `phalanxd` processes on loopback
//! (TLS on), one trainer thread per member, nccl-tests definitions, and the
//! Open MPI peer from ../shared/peers run in the same invocation when `mpicc`
//! and `mpirun` exist.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use phalanx_client::{Client, ReduceOp};
use phalanx_testkit::{ClusterOptions, LocalCluster};
use serde_json::{json, Value};

use crate::quantile;

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub members: Vec<usize>,
    pub sizes: Vec<usize>,
    pub iters: Option<usize>,
    pub warmup: usize,
    pub phalanxd: PathBuf,
    pub peers_dir: PathBuf,
    pub mpi: bool,
    pub data_plane: String,
    /// Copy tensors in and out of shared memory (`all_reduce`) instead of
    /// working in the staging area (`all_reduce_staged`).
    pub copy_api: bool,
}

/// The peers' iteration counts (../shared/peers/mpi_allreduce_bench.c).
fn default_iters(bytes: usize) -> usize {
    match bytes {
        b if b <= 64 << 10 => 500,
        b if b <= 1 << 20 => 200,
        b if b <= 16 << 20 => 40,
        _ => 15,
    }
}

/// "4K", "64KiB", "16M", "1048576" -> bytes.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let n: usize = num
        .parse()
        .with_context(|| format!("size {s:?}: expected e.g. 4K, 16M, 1048576"))?;
    if n == 0 || !(n * mult).is_multiple_of(4) {
        bail!("size {s:?} must be a positive multiple of 4 bytes (f32)");
    }
    Ok(n * mult)
}

pub fn label(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

#[derive(Debug, Clone)]
struct Row {
    peer: String,
    members: usize,
    bytes: usize,
    iters: usize,
    median_us: f64,
    p10_us: f64,
    p90_us: f64,
    min_us: f64,
    ok: bool,
}

impl Row {
    fn algbw(&self) -> f64 {
        self.bytes as f64 / (self.median_us * 1e-6) / 1e9
    }
    fn busbw(&self) -> f64 {
        self.algbw() * 2.0 * (self.members as f64 - 1.0) / self.members as f64
    }
    fn json(&self) -> Value {
        json!({
            "peer": self.peer, "members": self.members, "size": label(self.bytes), "bytes": self.bytes,
            "iters": self.iters, "median_us": self.median_us, "p10_us": self.p10_us, "p90_us": self.p90_us,
            "min_us": self.min_us, "algbw_GBps": self.algbw(), "busbw_GBps": self.busbw(), "ok": self.ok,
        })
    }
}

/// One cluster of `n` members, every size.
fn run_phalanx(o: &Options, n: usize) -> Result<Vec<Row>> {
    let dir = std::env::temp_dir().join(format!("phalanx-bench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = LocalCluster::start(ClusterOptions {
        members: n,
        phalanxd: o.phalanxd.clone(),
        dir,
        data_plane: o.data_plane.clone(),
        control: String::new(),
        keep: false,
        flags: Vec::new(),
        bootstrap: false,
    })?;
    let start = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|rank| {
            let socket = cluster.members[rank].socket.clone();
            let sizes = o.sizes.clone();
            let (iters, warmup, copy_api) = (o.iters, o.warmup, o.copy_api);
            let start = start.clone();
            std::thread::spawn(move || -> Result<Vec<(Vec<f64>, bool)>> {
                let mut client = Client::connect(&socket)?;
                start.wait();
                let mut out = Vec::new();
                for &bytes in &sizes {
                    let iters = iters.unwrap_or_else(|| default_iters(bytes));
                    let mut buf = vec![(rank + 1) as f32; bytes / 4];
                    let mut times = Vec::with_capacity(iters);
                    let want = (n * (n + 1) / 2) as f32;
                    let mut ok = true;
                    for i in 0..warmup + iters {
                        let dt = if copy_api {
                            buf.fill((rank + 1) as f32);
                            client.barrier()?;
                            let t0 = Instant::now();
                            client.all_reduce(&mut buf, ReduceOp::Sum)?;
                            t0.elapsed().as_secs_f64() * 1e6
                        } else {
                            client.staging::<f32>(bytes / 4)?.fill((rank + 1) as f32);
                            client.barrier()?;
                            let t0 = Instant::now();
                            client.all_reduce_staged::<f32>(bytes / 4, ReduceOp::Sum)?;
                            let dt = t0.elapsed().as_secs_f64() * 1e6;
                            buf.copy_from_slice(client.staging::<f32>(bytes / 4)?);
                            dt
                        };
                        if i == warmup {
                            ok = buf.iter().all(|&x| x == want);
                        }
                        if i >= warmup {
                            times.push(dt);
                        }
                    }
                    out.push((times, ok));
                }
                Ok(out)
            })
        })
        .collect();
    let per_rank: Vec<Vec<(Vec<f64>, bool)>> = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a trainer thread panicked"))?
        })
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for (si, &bytes) in o.sizes.iter().enumerate() {
        let iters = per_rank[0][si].0.len();
        // Op time = max over members of each iteration.
        let mut t: Vec<f64> = (0..iters)
            .map(|k| per_rank.iter().map(|r| r[si].0[k]).fold(0.0, f64::max))
            .collect();
        t.sort_by(|a, b| a.total_cmp(b));
        rows.push(Row {
            peer: "phalanx-quic".into(),
            members: n,
            bytes,
            iters,
            median_us: quantile(&t, 0.5),
            p10_us: quantile(&t, 0.1),
            p90_us: quantile(&t, 0.9),
            min_us: t[0],
            ok: per_rank.iter().all(|r| r[si].1),
        });
    }
    Ok(rows)
}

fn which(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Builds and runs the Open MPI peer over TCP on loopback.
fn run_mpi(o: &Options, n: usize, bin: &Path) -> Result<Vec<Row>> {
    let mut cmd = Command::new("mpirun");
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("BENCH_TAG", "openmpi-tcp-lo")
        .args([
            "-np",
            &n.to_string(),
            "--oversubscribe",
            "--mca",
            "pml",
            "ob1",
            "--mca",
            "btl",
            "tcp,self",
        ])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        .arg(bin)
        .args(o.sizes.iter().map(|s| s.to_string()));
    if let Some(i) = o.iters {
        cmd.env("BENCH_ITERS", i.to_string());
    }
    let out = cmd.output().context("running mpirun")?;
    if !out.status.success() {
        bail!("mpirun failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut rows = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("openmpi-tcp-lo,"))
    {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f[i].parse::<f64>().unwrap_or(f64::NAN);
        rows.push(Row {
            peer: "openmpi-tcp-lo".into(),
            members: n,
            bytes: f[2].parse()?,
            iters: f[3].parse()?,
            median_us: num(4),
            p10_us: num(5),
            p90_us: num(6),
            min_us: num(7),
            ok: f[10].trim() == "1",
        });
    }
    Ok(rows)
}

fn build_mpi(peers_dir: &Path) -> Result<PathBuf> {
    let src = peers_dir.join("mpi_allreduce_bench.c");
    if !src.exists() {
        bail!("{} not found (pass --peers-dir)", src.display());
    }
    let bin = std::env::temp_dir().join(format!("phalanx-mpi-bench-{}", std::process::id()));
    let status = Command::new("mpicc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .context("running mpicc")?;
    if !status.success() {
        bail!("mpicc failed on {}", src.display());
    }
    Ok(bin)
}

pub fn run(o: &Options, json_path: Option<&Path>) -> Result<()> {
    let mpi_bin = if o.mpi && which("mpicc") && which("mpirun") {
        match build_mpi(&o.peers_dir) {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("note: Open MPI peer skipped: {e:#}");
                None
            }
        }
    } else {
        eprintln!("note: Open MPI peer skipped (mpicc/mpirun not found, or --no-mpi)");
        None
    };
    let mut rows = Vec::new();
    for &n in &o.members {
        eprintln!("phalanx: {n} members ...");
        rows.extend(run_phalanx(o, n)?);
        if let Some(bin) = &mpi_bin {
            eprintln!("openmpi: {n} ranks ...");
            match run_mpi(o, n, bin) {
                Ok(r) => rows.extend(r),
                Err(e) => eprintln!("note: Open MPI run failed: {e:#}"),
            }
        }
    }
    println!(
        "{:>3} {:>7} | {:>12} {:>9} {:>3} | {:>12} {:>9} | {:>8} {:>9}",
        "n", "size", "phalanx t", "busbw", "ok", "openmpi t", "busbw", "busbw x", "latency x"
    );
    let find = |peer: &str, n: usize, b: usize| {
        rows.iter()
            .find(|r| r.peer == peer && r.members == n && r.bytes == b)
    };
    for &n in &o.members {
        for &b in &o.sizes {
            let p = find("phalanx-quic", n, b).expect("measured");
            let m = find("openmpi-tcp-lo", n, b);
            let fmt_t = |us: f64| {
                if us >= 1000.0 {
                    format!("{:.2}ms", us / 1000.0)
                } else {
                    format!("{us:.0}us")
                }
            };
            println!(
                "{n:>3} {:>7} | {:>12} {:>9.3} {:>3} | {:>12} {:>9} | {:>8} {:>9}",
                label(b),
                fmt_t(p.median_us),
                p.busbw(),
                if p.ok { "ok" } else { "BAD" },
                m.map_or("-".into(), |m| fmt_t(m.median_us)),
                m.map_or("-".into(), |m| format!("{:.3}", m.busbw())),
                m.map_or("-".into(), |m| format!("{:.2}", p.busbw() / m.busbw())),
                m.map_or("-".into(), |m| format!("{:.2}", p.median_us / m.median_us)),
            );
        }
    }
    let ratio = |n: usize, b: usize, f: &dyn Fn(&Row, &Row) -> f64| -> Value {
        match (find("phalanx-quic", n, b), find("openmpi-tcp-lo", n, b)) {
            (Some(p), Some(m)) => json!(f(p, m)),
            _ => Value::Null,
        }
    };
    let summary = json!({
        "busbw_ratio_vs_mpi_n4_16MiB": ratio(4, 16 << 20, &|p, m| p.busbw() / m.busbw()),
        "busbw_ratio_vs_mpi_n4_64MiB": ratio(4, 64 << 20, &|p, m| p.busbw() / m.busbw()),
        "latency_ratio_vs_mpi_n4_4KiB": ratio(4, 4 << 10, &|p, m| p.median_us / m.median_us),
        "busbw_GBps_n4_16MiB": find("phalanx-quic", 4, 16 << 20).map_or(Value::Null, |p| json!(p.busbw())),
    });
    let all_ok = rows
        .iter()
        .filter(|r| r.peer == "phalanx-quic")
        .all(|r| r.ok);
    let doc = json!({
        "benchmark": "allreduce",
        "method": "per op: barrier, then time one all_reduce (f32 sum, through the client library); op time = max over members; median over iterations after warm-up; busbw = algbw * 2(n-1)/n",
        "results": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "summary": summary,
    });
    crate::write_report(&doc, json_path)?;
    println!("summary: {}", doc["summary"]);
    if !all_ok {
        bail!("some all-reduce results were wrong");
    }
    Ok(())
}
