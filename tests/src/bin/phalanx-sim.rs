//! `phalanx-sim`: the deterministic cluster simulator from the command line.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use phalanx_protocol::collective::Algorithm;
use phalanx_protocol::wire::{DType, ReduceOp};
use phalanx_tests::scenario::{Fault, KindPlan, OpPlan, Scenario};
use phalanx_tests::sim::{self, Sim};
use phalanx_tests::tensor::Values;

/// Runs Phalanx's collectives on a simulated cluster: N members on a virtual
/// clock over a seeded network that delays and reorders messages, with slow,
/// paused and killed members. Every run checks that all members' outputs are
/// identical, equal the reference within the documented bound, and never mix
/// epochs; a failing seed prints the command that replays it.
#[derive(Parser, Debug)]
#[command(name = "phalanx-sim", version)]
struct Cli {
    /// Print the cores' logs (filter with RUST_LOG, default info), each line
    /// under the member and virtual time it happened at.
    #[arg(long, global = true)]
    log: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A narrated run: a cluster all-reduces while one member is slowed and
    /// another is killed mid-operation; the survivors finish without it.
    Demo {
        /// Members in the simulated cluster.
        #[arg(long, default_value_t = 8)]
        members: usize,
        /// Elements of the f32 tensor each member contributes.
        #[arg(long, default_value_t = 1 << 20)]
        len: usize,
    },
    /// Runs one seed's scenario and reports what it did.
    Run {
        /// The scenario's seed.
        #[arg(long)]
        seed: u64,
        /// Print every event.
        #[arg(long)]
        trace: bool,
    },
    /// Runs one control-plane seed (raft-rs nodes, failure detector and
    /// readmission policy under crashes, pauses, partitions and loss, then a
    /// heal) and reports what it did, or which invariant broke.
    Control {
        /// The scenario's seed.
        #[arg(long)]
        seed: u64,
    },
    /// Runs one checkpoint seed: the control plane's seed with every member
    /// saving checkpoints through the real keeper and raft-rs, holders and
    /// the leader crashed at each stage of chosen saves, chunks corrupted;
    /// checks that a manifest commits only once its holders have the copy,
    /// that kept copies stay, that restores never return a torn state.
    Checkpoint {
        /// The scenario's seed.
        #[arg(long)]
        seed: u64,
    },
    /// Runs one seed of the whole failure path: raft-rs control nodes,
    /// failure detectors and collective cores with trainers, under crashes,
    /// pauses and partitions, then a heal; checks every step's result and
    /// that the survivors end identical.
    Cluster {
        /// The scenario's seed.
        #[arg(long)]
        seed: u64,
    },
    /// Runs one straggler seed: trainers of which some compute 3x slower
    /// (one may recover), steps closed by a backup/deadline policy through
    /// the step coordinator, the daemons' cut path; checks every result,
    /// that nothing deadlocks, that replicas end identical, and demotion.
    Steps {
        /// The scenario's seed.
        #[arg(long)]
        seed: u64,
    },
    /// Runs many seeds and lists the failing ones.
    Sweep {
        /// How many seeds.
        #[arg(long, default_value_t = 1000)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        start: u64,
    },
}

/// Prints one simulator run's report or failure (with its replay line).
fn outcome<R: std::fmt::Debug, F: std::fmt::Display>(run: Result<R, F>) -> ExitCode {
    match run {
        Ok(r) => {
            println!("ok: {r:?}");
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("{f}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.log {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .without_time()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Demo { members, len } => demo(members, len),
        Command::Control { seed } => {
            let scenario = phalanx_tests::control_sim::ControlScenario::from_seed(seed);
            println!("{scenario:?}");
            outcome(phalanx_tests::control_sim::ControlSim::new(scenario).run())
        }
        Command::Checkpoint { seed } => {
            let scenario = phalanx_tests::control_sim::ControlScenario::with_checkpoints(seed);
            println!("{scenario:?}");
            outcome(phalanx_tests::control_sim::ControlSim::new(scenario).run())
        }
        Command::Cluster { seed } => {
            let scenario = phalanx_tests::cluster_sim::ClusterScenario::from_seed(seed);
            println!("{scenario:?}");
            outcome(phalanx_tests::cluster_sim::ClusterSim::new(scenario).run())
        }
        Command::Steps { seed } => {
            let scenario = phalanx_tests::steps_sim::StepsScenario::from_seed(seed);
            println!("{scenario:?}");
            outcome(phalanx_tests::steps_sim::StepsSim::new(scenario).run())
        }
        Command::Run { seed, trace } => {
            let scenario = Scenario::from_seed(seed);
            println!("{scenario}");
            match Sim::new(scenario.clone(), trace).run() {
                Ok((r, _)) => {
                    println!(
                        "ok: {} events, {} frames, {} epoch changes, {} re-runs, {} stale frames fenced, virtual time {}",
                        r.events, r.frames, r.epochs, r.reruns, r.stale_frames, r.end
                    );
                    ExitCode::SUCCESS
                }
                Err(violations) => {
                    println!(
                        "{}",
                        sim::Failure {
                            scenario: Box::new(scenario),
                            violations
                        }
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Sweep { seeds, start } => {
            let t = Instant::now();
            let mut failed = Vec::new();
            for seed in start..start + seeds {
                if let Err(f) = sim::run_seed(seed) {
                    println!("{f}\n");
                    failed.push(seed);
                }
                if (seed - start + 1) % 100 == 0 {
                    eprintln!(
                        "{} / {seeds} seeds, {} failed, {:.1?}",
                        seed - start + 1,
                        failed.len(),
                        t.elapsed()
                    );
                }
            }
            println!(
                "{} seeds from {start}: {} failed {:?}",
                seeds,
                failed.len(),
                failed
            );
            if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn demo(members: usize, len: usize) -> ExitCode {
    if members < 3 {
        eprintln!(
            "error: the demo needs at least 3 members (one to kill, one to slow, one to survive)"
        );
        return ExitCode::FAILURE;
    }
    let op = |kind, dtype| OpPlan {
        kind,
        algorithm: Algorithm::Auto,
        dtype,
        len,
        values: Values::Random,
    };
    let scenario = Scenario {
        seed: 2026,
        members,
        ops: vec![
            op(KindPlan::AllReduce(ReduceOp::Mean), DType::F32),
            op(KindPlan::AllReduce(ReduceOp::Sum), DType::BF16),
        ],
        chunk_bytes: 256 << 10,
        window: 8,
        latency: Duration::from_micros(50),
        jitter: Duration::from_micros(100),
        start_spread: Duration::from_micros(200),
        scalar_members: vec![0],
        faults: vec![
            Fault::Slow { member: 1, factor: 3 },
            Fault::Kill { member: members - 1, at: Duration::from_millis(2), detect_after: Duration::from_millis(5) },
        ],
        replay: Some(format!("cargo run --release --locked -p phalanx-tests --bin phalanx-sim -- demo --members {members} --len {len}")),
    };
    println!("Phalanx simulated cluster (sans-IO core, virtual clock, seeded network)");
    println!("{scenario}");
    println!(
        "member #1 computes 3x slower; member #{} is killed 2 ms in, detected 5 ms later",
        members - 1
    );
    let t = Instant::now();
    match sim::run(scenario) {
        Ok((r, sim)) => {
            for rec in &sim.ops {
                println!(
                    "{}: {:?} completed in {} after {} run(s) by {} survivors",
                    rec.id,
                    rec.kind,
                    rec.epoch,
                    rec.runs,
                    rec.members.len()
                );
            }
            println!(
                "{} frames, {} epoch change(s), {} op re-run(s), {} stale frames fenced off, virtual time {}, wall {:.2?}",
                r.frames, r.epochs, r.reruns, r.stale_frames, r.end, t.elapsed()
            );
            println!(
                "checks passed: every survivor completed every op; outputs bit-for-bit identical;"
            );
            println!("               results equal the reference within the documented bound; no epoch mixing");
            ExitCode::SUCCESS
        }
        Err(f) => {
            println!("{f}");
            ExitCode::FAILURE
        }
    }
}
