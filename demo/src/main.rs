//! `phalanx-demo`: what Phalanx is for, in one command. Four real `phalanxd`
//! processes on loopback (certificates generated into a temporary
//! directory) and four trainers — the client library, one thread each —
//! train a small network on the handwritten digits with data parallelism.
//! Midway one member is SIGKILLed, another computes 3x slower, and the
//! killed one is restarted and rejoins with the live trainers' state. The
//! training never restarts; at the end the demo compares its accuracy with
//! a failure-free run of the same seed and writes a loss-versus-time plot.

mod model;
mod plot;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use phalanx_client::{Client, ClientError, MemberId};
use phalanx_compute::{ComputeEngine, ScalarEngine, SgdParams, SimdEngine};
use phalanx_testkit::{set_policy, ClusterOptions, LocalCluster, KILL};

use model::{Sample, PARAMS};

/// Trains a small network on real phalanxd processes while members die,
/// lag and rejoin, and shows that the training keeps going.
#[derive(Parser, Debug)]
#[command(name = "phalanx-demo", version)]
struct Cli {
    /// Members (phalanxd processes and trainers).
    #[arg(long, default_value_t = 4)]
    members: usize,
    /// Training steps.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// The member SIGKILLed at a fifth of the steps and restarted at two
    /// fifths (it rejoins with the group's state).
    #[arg(long, default_value_t = 2)]
    kill: u32,
    /// The member that computes 3x slower from three tenths of the steps on.
    #[arg(long, default_value_t = 3)]
    slow: u32,
    /// The trainers' compute engine for the optimizer step.
    #[arg(long, value_enum, default_value_t = Engine::Simd)]
    engine: Engine,
    /// Train without faults (the run the faulty one is compared with).
    #[arg(long)]
    no_faults: bool,
    /// Simulated compute per step and member, ms (the model itself takes
    /// microseconds; this stands for a real model's forward/backward).
    #[arg(long, default_value_t = 8)]
    compute_ms: u64,
    /// Where the loss plot (SVG) goes.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The phalanxd binary (default: next to this one).
    #[arg(long)]
    phalanxd: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Engine {
    /// Plain loops.
    Scalar,
    /// The best SIMD instructions of this CPU.
    Simd,
    /// NVIDIA GPU (builds with `--features cuda`).
    Cuda,
}

const SEED: u64 = 2026;
const BATCH: usize = 16;
const LR: f32 = 0.5;
const TEST: usize = 497;

fn engine(e: Engine) -> Result<Box<dyn ComputeEngine>> {
    Ok(match e {
        Engine::Scalar => Box::new(ScalarEngine),
        Engine::Simd => Box::new(SimdEngine::detect()),
        #[cfg(feature = "cuda")]
        Engine::Cuda => Box::new(
            phalanx_compute::CudaEngine::new(0).map_err(|e| anyhow::anyhow!("--engine cuda: {e}"))?,
        ),
        #[cfg(not(feature = "cuda"))]
        Engine::Cuda => bail!(
            "this build has no CUDA engine: build with `cargo build --release --locked --bins --features phalanx-demo/cuda`, or use --engine simd or scalar"
        ),
    })
}

/// What the trainers share with the conductor.
#[derive(Debug)]
struct Shared {
    start: Instant,
    /// Per member index: steps completed.
    progress: Vec<AtomicU64>,
    /// Per member index: compute-time multiplier (1 or 3).
    slowness: Vec<AtomicU64>,
    /// Per member index: its process was killed; the trainer waits for the
    /// restart and joins.
    killed: Vec<AtomicBool>,
    /// (seconds, loss) of member 1's steps.
    losses: Mutex<Vec<(f64, f32)>>,
    /// Member 1's view of the last step: epoch, ring size, left out.
    status: Mutex<(u64, usize, Vec<MemberId>)>,
    /// Steps that closed without some member (as member 1 saw them).
    partial: AtomicU64,
    /// Member 1's final parameters.
    last: Mutex<Option<Vec<f32>>>,
    /// Errors that ended a trainer.
    errors: Mutex<Vec<String>>,
    /// When (seconds) and at which step the killed member's trainer got
    /// the group's state back.
    rejoined: Mutex<Option<(f64, u64)>>,
}

/// One trainer: connects, (re)joins when told its process was restarted,
/// trains to `steps`.
#[allow(clippy::too_many_arguments)]
fn trainer(
    socket: PathBuf,
    idx: usize,
    n: usize,
    steps: u64,
    compute: Duration,
    train: Arc<Vec<Sample>>,
    shared: Arc<Shared>,
    engine: Box<dyn ComputeEngine>,
) -> Result<()> {
    // The state handed to a rejoining member: parameters, then the step.
    let mut state = model::init(SEED);
    state.push(0.0);
    let mut client = Client::connect(&socket)?;
    let mut grad = vec![0.0f32; PARAMS];
    let mut skip = 0u64;
    loop {
        let step = state[PARAMS] as u64;
        if step >= steps {
            if idx == 0 {
                *shared.last.lock().unwrap() = Some(state[..PARAMS].to_vec());
            }
            return Ok(());
        }
        let loss = if skip > 0 {
            // Behind: this step closed without us; only collect its result.
            skip -= 1;
            grad.iter_mut().for_each(|g| *g = 0.0);
            None
        } else {
            let batch = model::batch_of(&train, n, idx, step, BATCH);
            let loss = model::gradient(&state[..PARAMS], &batch, &mut grad);
            let times = shared.slowness[idx].load(Ordering::SeqCst) as u32;
            std::thread::sleep(compute * times);
            Some(loss)
        };
        let info = match client.all_reduce_weighted(&mut grad, BATCH as u64) {
            Ok(info) => info,
            Err(e) => {
                if !shared.killed[idx].load(Ordering::SeqCst) {
                    bail!("m{}: {e}", idx + 1);
                }
                // Our daemon was killed: wait for its restart, then join.
                while shared.killed[idx].load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                client = connect_retry(&socket)?;
                client.join(&mut state)?;
                *shared.rejoined.lock().unwrap() =
                    Some((shared.start.elapsed().as_secs_f64(), state[PARAMS] as u64));
                skip = 0;
                continue;
            }
        };
        engine
            .sgd(
                &mut state[..PARAMS],
                &grad,
                &SgdParams {
                    lr: model::learning_rate(LR, step, steps),
                    weight_decay: 0.0,
                },
            )
            .context("optimizer step")?;
        state[PARAMS] += 1.0;
        skip = skip.max(info.meta.behind);
        shared.progress[idx].store(step + 1, Ordering::SeqCst);
        if idx == 0 {
            if let Some(loss) = loss {
                let t = shared.start.elapsed().as_secs_f64();
                shared.losses.lock().unwrap().push((t, loss));
            }
            let left: Vec<MemberId> = info.meta.left_out.iter().map(|(m, _)| *m).collect();
            if !left.is_empty() {
                shared.partial.fetch_add(1, Ordering::SeqCst);
            }
            *shared.status.lock().unwrap() =
                (info.epoch.0, info.contributors.len() + left.len(), left);
        }
        if !info.waiting.is_empty() {
            client.admit(&mut state)?;
        }
    }
}

fn connect_retry(socket: &std::path::Path) -> Result<Client, ClientError> {
    let start = Instant::now();
    loop {
        match Client::connect(socket) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > Duration::from_secs(30) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The same training without any failure, in this process: every member's
/// gradient in every step, averaged.
fn failure_free(train: &[Sample], n: usize, steps: u64, engine: &dyn ComputeEngine) -> Vec<f32> {
    let mut p = model::init(SEED);
    let mut sum = vec![0.0f32; PARAMS];
    let mut g = vec![0.0f32; PARAMS];
    for step in 0..steps {
        sum.iter_mut().for_each(|s| *s = 0.0);
        for m in 0..n {
            model::gradient(&p, &model::batch_of(train, n, m, step, BATCH), &mut g);
            sum.iter_mut().zip(&g).for_each(|(s, g)| *s += g);
        }
        sum.iter_mut().for_each(|s| *s /= n as f32);
        engine
            .sgd(
                &mut p,
                &sum,
                &SgdParams {
                    lr: model::learning_rate(LR, step, steps),
                    weight_decay: 0.0,
                },
            )
            .expect("same lengths");
    }
    p
}

fn progress_line(shared: &Shared, steps: u64, n: usize, note: &str) -> String {
    let step = shared.progress[0].load(Ordering::SeqCst);
    let width = 30;
    let done = (step as usize * width) / steps.max(1) as usize;
    let loss = shared
        .losses
        .lock()
        .unwrap()
        .iter()
        .rev()
        .take(20)
        .map(|(_, l)| *l)
        .sum::<f32>()
        / 20.0;
    let (epoch, ring, left) = shared.status.lock().unwrap().clone();
    let left = if left.is_empty() {
        "-".to_string()
    } else {
        left.iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "step {step:>4}/{steps} [{}{}] loss {loss:.3} | members {ring}/{n} | epoch e{epoch} | left out {left:<6} | {note}",
        "#".repeat(done),
        ".".repeat(width - done)
    )
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phalanx-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let n = cli.members;
    if n < 3 {
        bail!("--members must be at least 3 (a member is killed and another slowed)");
    }
    let faults = !cli.no_faults;
    let kill = cli.kill as usize;
    let slow = cli.slow as usize;
    if faults && (kill < 2 || kill > n || slow < 1 || slow > n || kill == slow) {
        bail!("--kill must be 2..={n} and --slow 1..={n}, different members (member 1 reports)");
    }
    let (kill, slow) = (kill - 1, slow - 1);
    let trainer_engine = engine(cli.engine)?;
    let phalanxd = match cli.phalanxd {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("phalanxd"),
    };
    if !phalanxd.exists() {
        bail!(
            "{} not found: build it first (cargo build --release --locked --bins)",
            phalanxd.display()
        );
    }
    let (train, test) = model::split(model::digits(), TEST, SEED);
    let train = Arc::new(train);
    println!(
        "Phalanx demo: {n} phalanxd processes on loopback, {n} trainers, a 64-32-10 network on \
         {} handwritten digits ({} held out), {} steps of {BATCH} samples per member",
        train.len(),
        test.len(),
        cli.steps
    );
    let dir = std::env::temp_dir().join(format!("phalanx-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cluster = LocalCluster::start(ClusterOptions {
        members: n,
        phalanxd,
        dir: dir.clone(),
        data_plane: String::new(),
        control: String::new(),
        keep: std::env::var_os("PHALANX_KEEP_DEMO_DIR").is_some(),
        flags: Vec::new(),
        bootstrap: false,
    })?;
    cluster.wait_settled_with(Duration::from_secs(30), true)?;
    set_policy(
        cluster.members[0].metrics,
        "backup=1".parse().expect("valid"),
    )?;
    println!(
        "cluster up (certificates, configs and logs in {}); quorum policy backup=1: each step \
         closes with the first {} members ready",
        dir.display(),
        n - 1
    );
    let shared = Arc::new(Shared {
        start: Instant::now(),
        progress: (0..n).map(|_| AtomicU64::new(0)).collect(),
        slowness: (0..n).map(|_| AtomicU64::new(1)).collect(),
        killed: (0..n).map(|_| AtomicBool::new(false)).collect(),
        losses: Mutex::new(Vec::new()),
        status: Mutex::new((0, n, Vec::new())),
        partial: AtomicU64::new(0),
        last: Mutex::new(None),
        errors: Mutex::new(Vec::new()),
        rejoined: Mutex::new(None),
    });
    let compute = Duration::from_millis(cli.compute_ms);
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (socket, train, shared) = (
                cluster.members[i].socket.clone(),
                train.clone(),
                shared.clone(),
            );
            let steps = cli.steps;
            let engine = engine(cli.engine).expect("checked above");
            std::thread::spawn(move || {
                if let Err(e) = trainer(socket, i, n, steps, compute, train, shared.clone(), engine)
                {
                    shared.errors.lock().unwrap().push(format!("{e:#}"));
                }
            })
        })
        .collect();
    // The fault schedule, by member 1's step.
    // Early enough that the restarted member has most of the run to rejoin.
    let (kill_at, slow_at, back_at) = (cli.steps / 5, cli.steps * 3 / 10, cli.steps * 2 / 5);
    let mut marks: Vec<(f64, String)> = Vec::new();
    let mut stage = 0;
    let mut note = "all healthy".to_string();
    let tty = std::io::stderr().is_terminal();
    let mut last_print = 0;
    loop {
        let step = shared.progress[0].load(Ordering::SeqCst);
        let now = shared.start.elapsed().as_secs_f64();
        if faults && stage == 0 && step >= kill_at {
            shared.killed[kill].store(true, Ordering::SeqCst);
            cluster.signal(kill, KILL)?;
            note = format!("m{} SIGKILLed", kill + 1);
            marks.push((now, format!("kill m{}", kill + 1)));
            stage = 1;
        } else if faults && stage == 1 && step >= slow_at {
            shared.slowness[slow].store(3, Ordering::SeqCst);
            note = format!("m{} killed, m{} 3x slow", kill + 1, slow + 1);
            marks.push((now, format!("m{} 3x slow", slow + 1)));
            stage = 2;
        } else if faults && stage == 2 && step >= back_at {
            cluster.spawn(kill)?;
            shared.killed[kill].store(false, Ordering::SeqCst);
            note = format!("m{} restarted, rejoining; m{} 3x slow", kill + 1, slow + 1);
            marks.push((now, format!("m{} restarted", kill + 1)));
            stage = 3;
        } else if stage == 3 {
            if let Some((t, at)) = *shared.rejoined.lock().unwrap() {
                note = format!("m{} rejoined at step {at}; m{} 3x slow", kill + 1, slow + 1);
                marks.push((t, format!("m{} rejoined", kill + 1)));
                stage = 4;
            }
        }
        let finished = threads.iter().all(|t| t.is_finished());
        if tty {
            eprint!("\r{}", progress_line(&shared, cli.steps, n, &note));
        } else if step >= last_print + cli.steps / 10 || finished {
            last_print = step;
            eprintln!("{}", progress_line(&shared, cli.steps, n, &note));
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if tty {
        eprintln!();
    }
    for t in threads {
        let _ = t.join();
    }
    let errors = shared.errors.lock().unwrap().clone();
    if !errors.is_empty() {
        bail!("a trainer failed: {}", errors.join("; "));
    }
    let elapsed = shared.start.elapsed();
    let failovers = cluster.metric(0, "phalanx_failovers_total").unwrap_or(0.0);
    let epoch = cluster.metric(0, "phalanx_epoch").unwrap_or(0.0);
    drop(cluster);
    let last = shared
        .last
        .lock()
        .unwrap()
        .clone()
        .context("member 1 finished")?;
    let acc = model::accuracy(&last, &test);
    let reference = failure_free(&train, n, cli.steps, trainer_engine.as_ref());
    let ref_acc = model::accuracy(&reference, &test);
    let plot = cli
        .plot
        .unwrap_or_else(|| std::env::temp_dir().join("phalanx-demo-loss.svg"));
    plot::write(&plot, &shared.losses.lock().unwrap(), &marks)?;
    let within = (acc - ref_acc).abs() <= 1.0 + 1e-9;
    let every = (0..n).all(|i| shared.progress[i].load(Ordering::SeqCst) == cli.steps);
    println!("summary");
    println!(
        "  steps completed:       {} of {} by every trainer in {:.1} s; the training never restarted: {}",
        shared.progress[0].load(Ordering::SeqCst),
        cli.steps,
        elapsed.as_secs_f64(),
        if every {
            "yes"
        } else {
            "NO"
        }
    );
    let rejoined = *shared.rejoined.lock().unwrap();
    println!(
        "  failovers:             {failovers:.0} (epochs: {epoch:.0}){}",
        match (faults, rejoined) {
            (false, _) => String::new(),
            (true, Some((_, at))) => format!(
                "; m{} SIGKILLed at step {kill_at}, restarted at {back_at}, rejoined with the group's state at step {at}",
                kill + 1
            ),
            (true, None) => format!("; m{} SIGKILLed at step {kill_at}, never rejoined", kill + 1),
        }
    );
    println!(
        "  steps without stragglers: {} of {} (backup=1{})",
        shared.partial.load(Ordering::SeqCst),
        cli.steps,
        if faults {
            format!("; m{} 3x slow from step {slow_at}", slow + 1)
        } else {
            String::new()
        }
    );
    println!(
        "  final accuracy:        {acc:.1}% on {} held-out digits; failure-free run, same seed: {ref_acc:.1}% (within 1 point: {})",
        test.len(),
        if within { "yes" } else { "NO" }
    );
    println!("  loss plot:             {}", plot.display());
    if !within || !every || (faults && rejoined.is_none()) {
        bail!("the run fell short: see the summary");
    }
    Ok(())
}
