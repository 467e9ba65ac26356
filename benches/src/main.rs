//! `phalanx-bench`: Phalanx's benchmarks. Each prints a table and, with
//! `--json FILE`, writes the raw figures and a `summary` object.

mod allreduce;
mod continuity;
mod failover;
mod kernels;
mod straggler;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Benchmarks for Phalanx. Figures are medians of repeated samples taken in
/// one run, and targets are ratios against a baseline measured in the same
/// run, so a noisy shared machine moves both sides together.
#[derive(Parser, Debug)]
#[command(name = "phalanx-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reduction-kernel bandwidth: the scalar and SIMD f32 sum-reduce
    /// (`acc += src`) against `memcpy` of the same size, at 64 KiB, 1 MiB,
    /// 16 MiB and 64 MiB. GB/s counts the buffer size once per pass, as the
    /// peers' memcpy_bench.c does.
    Kernels {
        /// Write the figures and the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Samples per size; the median is reported.
        #[arg(long, default_value_t = 7)]
        samples: usize,
        /// Bytes moved per sample (more is steadier, slower).
        #[arg(long, default_value_t = 2 << 30)]
        bytes_per_sample: u64,
        /// A short run for CI: 3 samples of 128 MiB each.
        #[arg(long)]
        quick: bool,
    },
    /// End-to-end all-reduce (f32 sum) through real `phalanxd` processes on
    /// 127.0.0.x with TLS, one trainer per member, nccl-tests definitions
    /// (op time = max over members, median over iterations after warm-up;
    /// busbw = algbw x 2(n-1)/n). Where `mpicc` and `mpirun` exist, the Open
    /// MPI peer from ../shared/peers runs in the same invocation over TCP on
    /// loopback, and the table shows both with the ratios.
    Allreduce {
        /// Member counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        members: Vec<usize>,
        /// Tensor sizes in bytes (4K, 64K, 1M, 16M, 64M ...), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "4K,64K,1M,16M,64M")]
        sizes: Vec<String>,
        /// Timed iterations per size (default: the peers' 500/200/40/15 by size).
        #[arg(long)]
        iters: Option<usize>,
        /// Warm-up iterations per size.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Write the figures and the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The phalanxd binary (default: next to this one).
        #[arg(long)]
        phalanxd: Option<PathBuf>,
        /// Where mpi_allreduce_bench.c lives.
        #[arg(long, default_value = "../shared/peers")]
        peers_dir: PathBuf,
        /// Do not run the Open MPI peer.
        #[arg(long)]
        no_mpi: bool,
        /// Extra `[data_plane]` config lines for every member (e.g. "channels = 8").
        #[arg(long, default_value = "")]
        data_plane: String,
        /// Time `Client::all_reduce` (copies the tensor into and out of shared
        /// memory) instead of the zero-copy `all_reduce_staged`.
        #[arg(long)]
        copy_api: bool,
    },
    /// Failover: real `phalanxd` processes, one trainer per member
    /// all-reducing in a loop; SIGKILL one member per trial (rotating, so the
    /// Raft leader is among the victims) and time until every survivor has
    /// completed an all-reduce without it. Also the commit latency of the
    /// epoch change, the stall the survivors' trainers see, and — the
    /// victim restarted, its trainer joining — the rejoin time. Default
    /// bounds (100 ms heartbeats, 400 ms suspicion).
    Failover {
        /// Members per cluster (at least 3).
        #[arg(long, default_value_t = 5)]
        members: usize,
        /// Quorum policy the steps close by (`sync`, `backup=1`, `deadline=p50`...).
        #[arg(long, default_value = "sync")]
        policy: String,
        /// Compute time per step in each trainer, ms (standing for a model's).
        #[arg(long, default_value_t = 0)]
        compute_ms: u64,
        /// Trials (a fresh cluster each).
        #[arg(long, default_value_t = 10)]
        trials: usize,
        /// f32 elements per all-reduce.
        #[arg(long, default_value_t = 16384)]
        elems: usize,
        /// Write the figures and the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The phalanxd binary (default: next to this one).
        #[arg(long)]
        phalanxd: Option<PathBuf>,
    },
    /// Continuity: real `phalanxd` processes, one trainer per member; a
    /// member SIGKILLed every KILL_EVERY_S (rotating, the Raft leader
    /// included) and restarted DOWN_S later, its trainer rejoining, while
    /// the last member computes SLOW times longer; against the same
    /// training without the kills in the same invocation. Then both again with
    /// every core kept busy by spinning processes. JSON summary:
    /// goodput_ratio (steps per second), steps_lost, false_suspicions
    /// (removals of members that were not killed), and the same
    /// `*_cpu_busy`. Every trainer must end with the same state.
    Continuity {
        /// Members (the last one is slow; the others are killed in turn).
        #[arg(long, default_value_t = 5)]
        members: usize,
        /// Minutes of each run with faults.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Minutes of each baseline run (the same training, no kills).
        #[arg(long, default_value_t = 1.0)]
        baseline_minutes: f64,
        /// Seconds between kills.
        #[arg(long, default_value_t = 30.0)]
        kill_every_s: f64,
        /// Seconds a killed member stays down before its daemon restarts.
        #[arg(long, default_value_t = 3.0)]
        down_s: f64,
        /// How many times slower the slow member computes.
        #[arg(long, default_value_t = 3.0)]
        slow: f64,
        /// A healthy member's compute time per step, ms.
        #[arg(long, default_value_t = 8)]
        compute_ms: u64,
        /// Quorum policy the steps close by.
        #[arg(long, default_value = "backup=1")]
        policy: String,
        /// f32 elements per all-reduce.
        #[arg(long, default_value_t = 16384)]
        elems: usize,
        /// Skip the two runs with every core kept busy.
        #[arg(long)]
        no_busy: bool,
        /// Write the figures and the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The phalanxd binary (default: next to this one).
        #[arg(long)]
        phalanxd: Option<PathBuf>,
    },
    /// The CUDA engine (build with `--features cuda`): GB/s of the f32
    /// sum-reduce kernel on device-resident buffers next to a
    /// device-to-device copy in the same run (medians), at 16 MiB and
    /// 256 MiB. JSON summary: `reduce_over_d2d_256MiB`.
    Cuda {
        /// Write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Timed runs per size.
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
    /// Stragglers: real `phalanxd` processes, one trainer per member that
    /// computes (sleeps) a fixed time per step and all-reduces; one member
    /// computes SLOW times longer. Four runs (fresh cluster each): all
    /// healthy, then the slow member under sync, backup=1 and a deadline.
    /// Prints the healthy members' step-time p50/p99 and the ratios to the
    /// healthy run (JSON summary: sync_p50_over_healthy,
    /// backup_p50_over_healthy, deadline_p50_over_healthy).
    Straggler {
        /// Members (the last one is slow).
        #[arg(long, default_value_t = 4)]
        members: usize,
        /// How many times slower the slow member computes.
        #[arg(long, default_value_t = 3.0)]
        slow: f64,
        /// Steps per run.
        #[arg(long, default_value_t = 200)]
        steps: usize,
        /// A healthy member's compute time per step, ms.
        #[arg(long, default_value_t = 20)]
        compute_ms: u64,
        /// f32 elements per all-reduce.
        #[arg(long, default_value_t = 65536)]
        elems: usize,
        /// The deadline run's policy.
        #[arg(long, default_value = "deadline=p50 floor_ms=5 ceiling_ms=1000")]
        deadline: String,
        /// Write the figures and the summary as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The phalanxd binary (default: next to this one).
        #[arg(long)]
        phalanxd: Option<PathBuf>,
    },
}

#[cfg(feature = "cuda")]
fn cuda(json_path: Option<&std::path::Path>, samples: usize) -> anyhow::Result<()> {
    let gpu =
        phalanx_compute::CudaEngine::new(0).map_err(|e| anyhow::anyhow!("no CUDA engine: {e}"))?;
    use phalanx_compute::ComputeEngine;
    println!("engine: {}", gpu.name());
    let mut rows = Vec::new();
    for mib in [16usize, 256] {
        let (reduce, d2d) = gpu
            .bench(mib << 20, samples)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        println!(
            "{mib:>4} MiB: reduce {reduce:>8.1} GB/s  d2d copy {d2d:>8.1} GB/s  ratio {:.2}",
            reduce / d2d
        );
        rows.push((mib, reduce, d2d));
    }
    let doc = serde_json::json!({
        "benchmark": "cuda",
        "method": "f32 sum-reduce kernel acc[i] += src[i] on device-resident buffers (3 bytes moved per byte), cuMemcpyDtoD of the same size (2 per byte); median of timed runs after a warm-up",
        "engine": gpu.name(),
        "results": rows.iter().map(|(mib, r, d)| serde_json::json!({"mib": mib, "reduce_GBps": r, "d2d_GBps": d})).collect::<Vec<_>>(),
        "summary": {
            "reduce_over_d2d_16MiB": rows[0].1 / rows[0].2,
            "reduce_over_d2d_256MiB": rows[1].1 / rows[1].2,
        },
    });
    write_report(&doc, json_path)?;
    println!("summary: {}", doc["summary"]);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: Option<&std::path::Path>, _: usize) -> anyhow::Result<()> {
    anyhow::bail!(
        "built without the CUDA engine: build with `--features cuda` (see scripts/gpu-check.sh)"
    )
}

/// A fresh local cluster of `members` in a scratch directory named `name`,
/// every member in the ring (on a loaded machine a daemon can be suspected
/// while the group forms; a benchmark measures what comes after).
fn settled_cluster(
    members: usize,
    phalanxd: &std::path::Path,
    name: &str,
) -> anyhow::Result<phalanx_testkit::LocalCluster> {
    let dir = std::env::temp_dir().join(format!("phalanx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = phalanx_testkit::LocalCluster::start(phalanx_testkit::ClusterOptions {
        members,
        phalanxd: phalanxd.to_path_buf(),
        dir,
        data_plane: String::new(),
        control: String::new(),
        keep: std::env::var_os("PHALANX_KEEP_BENCH_DIRS").is_some(),
        flags: Vec::new(),
        bootstrap: false,
    })?;
    cluster.wait_settled_with(std::time::Duration::from_secs(30), true)?;
    Ok(cluster)
}

/// The phalanxd binary: the one given, or the one next to this binary;
/// an error that says how to build it when it is not there.
fn phalanxd_or_sibling(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("phalanxd"),
    };
    if !path.exists() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release --locked -p phalanx-daemon`, or pass --phalanxd",
            path.display()
        );
    }
    Ok(path)
}

/// The `q` quantile of ascending `sorted` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Writes a benchmark's JSON document to `path`, when given.
fn write_report(doc: &serde_json::Value, path: Option<&std::path::Path>) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_string_pretty(doc)? + "\n")
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Allreduce {
            members,
            sizes,
            iters,
            warmup,
            json,
            phalanxd,
            peers_dir,
            no_mpi,
            data_plane,
            copy_api,
        } => (|| {
            let sizes = sizes
                .iter()
                .map(|s| allreduce::parse_size(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            if members.contains(&0) {
                anyhow::bail!("--members must be positive");
            }
            let phalanxd = phalanxd_or_sibling(phalanxd)?;
            let o = allreduce::Options {
                members,
                sizes,
                iters,
                warmup,
                phalanxd,
                peers_dir,
                mpi: !no_mpi,
                data_plane,
                copy_api,
            };
            allreduce::run(&o, json.as_deref())
        })(),
        Command::Failover {
            members,
            policy,
            compute_ms,
            trials,
            elems,
            json,
            phalanxd,
        } => (|| {
            let phalanxd = phalanxd_or_sibling(phalanxd)?;
            failover::run(
                &failover::Options {
                    members,
                    trials: trials.max(1),
                    elems,
                    phalanxd,
                    policy,
                    compute_ms,
                },
                json.as_deref(),
            )
        })(),
        Command::Continuity {
            members,
            minutes,
            baseline_minutes,
            kill_every_s,
            down_s,
            slow,
            compute_ms,
            policy,
            elems,
            no_busy,
            json,
            phalanxd,
        } => (|| {
            let secs = |what: &str, s: f64| {
                if s.is_finite() && s > 0.0 {
                    Ok(std::time::Duration::from_secs_f64(s))
                } else {
                    anyhow::bail!("{what} must be a positive number, not {s}")
                }
            };
            let o = continuity::Options {
                members,
                duration: secs("--minutes", minutes * 60.0)?,
                baseline: secs("--baseline-minutes", baseline_minutes * 60.0)?,
                kill_every: secs("--kill-every-s", kill_every_s)?,
                down: secs("--down-s", down_s)?,
                slow,
                compute_ms,
                elems,
                policy,
                busy: !no_busy,
                phalanxd: phalanxd_or_sibling(phalanxd)?,
            };
            continuity::run(&o, json.as_deref())
        })(),
        Command::Cuda { json, samples } => cuda(json.as_deref(), samples),
        Command::Straggler {
            members,
            slow,
            steps,
            compute_ms,
            elems,
            deadline,
            json,
            phalanxd,
        } => (|| {
            let phalanxd = phalanxd_or_sibling(phalanxd)?;
            straggler::run(
                &straggler::Options {
                    members,
                    slow,
                    steps,
                    compute_ms,
                    elems,
                    deadline,
                    phalanxd,
                },
                json.as_deref(),
            )
        })(),
        Command::Kernels {
            json,
            samples,
            bytes_per_sample,
            quick,
        } => {
            let (samples, bytes) = if quick {
                (3, 128 << 20)
            } else {
                (samples, bytes_per_sample)
            };
            kernels::run(samples.max(1), bytes, json.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
