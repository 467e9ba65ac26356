//! The continuity benchmark: does training keep going, at what rate, while
//! members die, come back and lag? Real `phalanxd` processes, one trainer
//! per member; every `kill_every` a member is SIGKILLed (rotating over the
//! healthy members, so the Raft leader is among the victims), its daemon
//! restarted `down` later and its trainer `join()`s with the group's state,
//! while the last member computes `slow`x longer for the whole run. The
//! same training without the kills (the slow member included), in the same
//! invocation, is the baseline: `goodput_ratio` is the steps per second of
//! the one over the other, so it prices the failures, not the straggler
//! (the straggler benchmark does that). Then both again with every core
//! kept busy by other processes (`*_cpu_busy`).
//!
//! Trainers follow the README's loop: a result listing members waiting
//! makes every live trainer `admit()`; a call that fails makes the trainer
//! reconnect and `join()` (a trainer whose daemon was killed waits for the
//! restart first); a member `behind` skips computing. The state a trainer
//! holds is a vector every step adds its result into, and its step count:
//! at the end every trainer must hold the same state, so a lost or doubled
//! step fails the benchmark.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use phalanx_client::{Client, ClientError, ReduceOp};
use phalanx_testkit::{set_policy, LocalCluster};
use serde_json::json;

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub members: usize,
    /// Length of each run with faults.
    pub duration: Duration,
    /// Length of each failure-free baseline run.
    pub baseline: Duration,
    pub kill_every: Duration,
    /// How long a killed member stays down before its daemon restarts.
    pub down: Duration,
    pub slow: f64,
    pub compute_ms: u64,
    pub elems: usize,
    pub policy: String,
    /// Also run both with every core kept busy.
    pub busy: bool,
    pub phalanxd: PathBuf,
}

/// Elements of the state trainers hand over (besides the step count).
const STATE: usize = 1024;

/// Steps every trainer completes before the measured window opens.
const WARMUP: u64 = 20;

/// What the trainers share with the driver.
struct Shared {
    /// Per member index: steps its trainer has completed.
    progress: Vec<AtomicU64>,
    /// Per member index: its daemon is down; the trainer waits to rejoin.
    killed: Vec<AtomicBool>,
    /// Trainers stop once they have completed this many steps.
    stop_at: AtomicU64,
    /// Errors a trainer whose daemon was not killed saw (it rejoined).
    live_errors: Mutex<Vec<String>>,
    /// Steps a rejoining trainer had done beyond the state it got back.
    steps_lost: AtomicU64,
    /// Joins by trainers whose daemon was killed.
    rejoins: AtomicU64,
}

/// One run's figures.
#[derive(Debug)]
struct Run {
    name: &'static str,
    faults: bool,
    busy: bool,
    seconds: f64,
    steps: u64,
    kills: usize,
    leader_kills: usize,
    rejoins: u64,
    steps_lost: u64,
    live_errors: Vec<String>,
    /// Removals of members that were not killed (or removed more often
    /// than killed).
    false_suspicions: usize,
    removals: usize,
    /// Demotions to observer and readmissions the slow member's log
    /// announces (of any member; the slow one, as a rule).
    demotions: usize,
    readmissions: usize,
}

impl Run {
    fn steps_per_s(&self) -> f64 {
        self.steps as f64 / self.seconds
    }
}

/// Kills the busy processes when dropped.
struct Busy(Vec<Child>);

impl Busy {
    /// One spinning process per core.
    fn start() -> Result<Busy> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let mut children = Vec::new();
        for _ in 0..cores {
            children.push(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting a busy process (sh)")?,
            );
        }
        Ok(Busy(children))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The trainer of member index `idx`; returns its final state.
fn trainer(
    socket: PathBuf,
    idx: usize,
    compute: Duration,
    elems: usize,
    shared: Arc<Shared>,
) -> std::thread::JoinHandle<Result<Vec<f32>>> {
    std::thread::spawn(move || -> Result<Vec<f32>> {
        // The state: STATE accumulators, then the step count.
        let mut state = vec![0.0f32; STATE + 1];
        let mut grad = vec![0.0f32; elems];
        let mut client = Client::connect(&socket)?;
        let mut skip = 0u64;
        loop {
            let step = state[STATE] as u64;
            if step >= shared.stop_at.load(Ordering::SeqCst) {
                return Ok(state);
            }
            if skip > 0 {
                skip -= 1;
            } else if !compute.is_zero() {
                std::thread::sleep(compute);
            }
            grad.fill(1.0);
            let info = match client.all_reduce(&mut grad, ReduceOp::Sum) {
                Ok(info) => info,
                Err(e) => {
                    let killed = shared.killed[idx].load(Ordering::SeqCst);
                    if !killed {
                        shared
                            .live_errors
                            .lock()
                            .expect("poisoned")
                            .push(format!("m{} at step {step}: {e}", idx + 1));
                    }
                    while shared.killed[idx].load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    // Closed first: a live daemon gives the stream to a new
                    // connection only once the old one has hung up.
                    drop(client);
                    client = reconnect(&socket)?;
                    client
                        .join(&mut state)
                        .with_context(|| format!("m{} joining after {e}", idx + 1))?;
                    let back = state[STATE] as u64;
                    shared
                        .steps_lost
                        .fetch_add(step.saturating_sub(back), Ordering::SeqCst);
                    if killed {
                        shared.rejoins.fetch_add(1, Ordering::SeqCst);
                    }
                    shared.progress[idx].store(back, Ordering::SeqCst);
                    skip = 0;
                    continue;
                }
            };
            let c = info.contributors.len() as f32;
            if grad.iter().any(|&x| x != c) {
                bail!("m{}: wrong sum {} for {c} contributors", idx + 1, grad[0]);
            }
            // Exact in f32 for millions of steps: small integers.
            for (j, s) in state[..STATE].iter_mut().enumerate() {
                *s += c * ((j % 5) + 1) as f32;
            }
            state[STATE] += 1.0;
            shared.progress[idx].store(step + 1, Ordering::SeqCst);
            skip = skip.max(info.meta.behind);
            if !info.waiting.is_empty() {
                client.admit(&mut state)?;
            }
        }
    })
}

fn reconnect(socket: &Path) -> Result<Client, ClientError> {
    let start = Instant::now();
    loop {
        match Client::connect(socket) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > Duration::from_secs(60) => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Removals per member, as `log` (of a member never killed) records them.
fn removals(log: &str) -> BTreeMap<u32, usize> {
    let mut out = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("member removed: new epoch"))
    {
        let plain = strip_ansi(line);
        let member = plain
            .split_whitespace()
            .find_map(|w| w.strip_prefix("member=m")?.parse::<u32>().ok());
        if let Some(m) = member {
            *out.entry(m).or_insert(0) += 1;
        }
    }
    out
}

/// `s` without terminal colour codes (the daemon's log may carry them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn max_progress(shared: &Shared) -> u64 {
    shared
        .progress
        .iter()
        .map(|p| p.load(Ordering::SeqCst))
        .max()
        .unwrap_or(0)
}

/// Fails with the trainer's error if one has ended.
fn check_trainers(
    threads: &mut [Option<std::thread::JoinHandle<Result<Vec<f32>>>>],
    cluster: &LocalCluster,
) -> Result<()> {
    for (i, t) in threads.iter_mut().enumerate() {
        if t.as_ref().is_some_and(|t| t.is_finished()) {
            let r = t.take().expect("checked").join();
            let e = match r {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => anyhow::anyhow!("stopped early"),
                Err(_) => anyhow::anyhow!("panicked"),
            };
            return Err(e.context(format!(
                "the trainer of m{} ended; its daemon's log:\n{}",
                i + 1,
                phalanx_testkit::tail(&cluster.members[i].log)
            )));
        }
    }
    Ok(())
}

fn run_one(o: &Options, name: &'static str, faults: bool, busy: bool) -> Result<Run> {
    let n = o.members;
    let slow_idx = n - 1;
    let mut cluster = crate::settled_cluster(n, &o.phalanxd, &format!("continuity-{name}"))?;
    if o.policy != "sync" {
        set_policy(
            cluster.members[0].metrics,
            o.policy.parse().map_err(anyhow::Error::msg)?,
        )?;
    }
    let _busy = if busy { Some(Busy::start()?) } else { None };
    let shared = Arc::new(Shared {
        progress: (0..n).map(|_| AtomicU64::new(0)).collect(),
        killed: (0..n).map(|_| AtomicBool::new(false)).collect(),
        stop_at: AtomicU64::new(u64::MAX),
        live_errors: Mutex::new(Vec::new()),
        steps_lost: AtomicU64::new(0),
        rejoins: AtomicU64::new(0),
    });
    let mut threads: Vec<_> = (0..n)
        .map(|i| {
            let factor = if i == slow_idx { o.slow } else { 1.0 };
            let compute = Duration::from_secs_f64(o.compute_ms as f64 / 1e3 * factor);
            let socket = cluster.members[i].socket.clone();
            Some(trainer(socket, i, compute, o.elems, shared.clone()))
        })
        .collect();
    let start = Instant::now();
    while shared
        .progress
        .iter()
        .any(|p| p.load(Ordering::SeqCst) < WARMUP)
    {
        check_trainers(&mut threads, &cluster)?;
        if start.elapsed() > Duration::from_secs(120) {
            bail!("trainers did not get going within 120 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let length = if faults { o.duration } else { o.baseline };
    let (t0, s0) = (Instant::now(), max_progress(&shared));
    let mut next_kill = t0 + o.kill_every / 2;
    let mut down: Option<(usize, Instant)> = None;
    let (mut kills, mut leader_kills, mut victims) = (0, 0, 0usize);
    let mut killed_per_member: BTreeMap<u32, usize> = BTreeMap::new();
    let mut last_report = t0;
    while t0.elapsed() < length {
        check_trainers(&mut threads, &cluster)?;
        let now = Instant::now();
        if let Some((v, at)) = down {
            if now >= at {
                cluster.spawn(v)?;
                cluster.wait_ready(Duration::from_secs(60))?;
                shared.killed[v].store(false, Ordering::SeqCst);
                down = None;
            }
        } else if faults && now >= next_kill && length.saturating_sub(t0.elapsed()) > o.down {
            let v = victims % slow_idx;
            victims += 1;
            let leader = cluster.metric(slow_idx, "phalanx_raft_leader");
            if leader == Some(f64::from(cluster.members[v].id)) {
                leader_kills += 1;
            }
            shared.killed[v].store(true, Ordering::SeqCst);
            cluster.signal(v, phalanx_testkit::KILL)?;
            *killed_per_member.entry(cluster.members[v].id).or_insert(0) += 1;
            kills += 1;
            down = Some((v, now + o.down));
            next_kill = now + o.kill_every;
        }
        if now.duration_since(last_report) >= Duration::from_secs(10) {
            last_report = now;
            let done = max_progress(&shared) - s0;
            eprintln!(
                "  {name}: {:>4.0} s, {done} steps ({:.1}/s), {kills} kills",
                t0.elapsed().as_secs_f64(),
                done as f64 / t0.elapsed().as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (seconds, steps) = (t0.elapsed().as_secs_f64(), max_progress(&shared) - s0);
    // Outside the window: the last victim back, then every trainer stops
    // at the same step and their states are compared.
    if let Some((v, _)) = down {
        cluster.spawn(v)?;
        cluster.wait_ready(Duration::from_secs(60))?;
        shared.killed[v].store(false, Ordering::SeqCst);
    }
    let rejoined = Instant::now();
    while shared.rejoins.load(Ordering::SeqCst) < kills as u64 {
        check_trainers(&mut threads, &cluster)?;
        if rejoined.elapsed() > Duration::from_secs(120) {
            bail!("the last victim's trainer did not rejoin within 120 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    shared
        .stop_at
        .store(max_progress(&shared) + 5, Ordering::SeqCst);
    let mut states = Vec::new();
    let stopping = Instant::now();
    for (i, t) in threads.iter_mut().enumerate() {
        while t.as_ref().is_some_and(|t| !t.is_finished()) {
            if stopping.elapsed() > Duration::from_secs(120) {
                bail!("the trainer of m{} did not reach the last step", i + 1);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let state = t
            .take()
            .context("trainer ended before")?
            .join()
            .map_err(|_| anyhow::anyhow!("the trainer of m{} panicked", i + 1))?
            .with_context(|| format!("the trainer of m{}", i + 1))?;
        states.push(state);
    }
    if let Some(i) = (1..n).find(|&i| states[i] != states[0]) {
        bail!(
            "m{} ends at step {} with a state different from m1's at step {}: an update was lost or doubled",
            i + 1,
            states[i][STATE],
            states[0][STATE]
        );
    }
    // The slow member is never killed: its log holds every removal.
    let log = std::fs::read_to_string(&cluster.members[slow_idx].log).unwrap_or_default();
    let removed = removals(&log);
    let false_suspicions = removed
        .iter()
        .map(|(m, &r)| r.saturating_sub(killed_per_member.get(m).copied().unwrap_or(0)))
        .sum();
    let live_errors = shared.live_errors.lock().expect("poisoned").clone();
    Ok(Run {
        name,
        faults,
        busy,
        seconds,
        steps,
        kills,
        leader_kills,
        rejoins: shared.rejoins.load(Ordering::SeqCst),
        steps_lost: shared.steps_lost.load(Ordering::SeqCst),
        live_errors,
        false_suspicions,
        removals: removed.values().sum(),
        demotions: log.matches("member demoted to observer").count(),
        readmissions: log.matches("observer readmitted").count(),
    })
}

/// Runs the benchmark and prints (and writes) its figures.
pub fn run(o: &Options, json_path: Option<&Path>) -> Result<()> {
    anyhow::ensure!(
        o.members >= 4,
        "--members must be at least 4 (one slow, one killed, a majority left)"
    );
    anyhow::ensure!(
        o.kill_every > o.down,
        "--kill-every-s must be longer than --down-s"
    );
    println!(
        "{} members, policy {}, {} ms compute per step, m{} {}x slow; a member SIGKILLed every {:?} (down {:?}); runs of {:?}, baselines {:?}",
        o.members,
        o.policy,
        o.compute_ms,
        o.members,
        o.slow,
        o.kill_every,
        o.down,
        o.duration,
        o.baseline
    );
    let mut plan = vec![("baseline", false, false), ("faults", true, false)];
    if o.busy {
        plan.push(("baseline_cpu_busy", false, true));
        plan.push(("faults_cpu_busy", true, true));
    }
    let mut runs = Vec::new();
    for (name, faults, busy) in plan {
        eprintln!("run {name}");
        runs.push(run_one(o, name, faults, busy).with_context(|| format!("run {name}"))?);
    }
    println!(
        "{:<18} {:>7} {:>8} {:>8} {:>6} {:>7} {:>8} {:>10} {:>11} {:>9} {:>13}",
        "run",
        "s",
        "steps",
        "steps/s",
        "kills",
        "leader",
        "rejoins",
        "steps lost",
        "live errors",
        "false sus",
        "demoted/back"
    );
    for r in &runs {
        println!(
            "{:<18} {:>7.1} {:>8} {:>8.1} {:>6} {:>7} {:>8} {:>10} {:>11} {:>9} {:>13}",
            r.name,
            r.seconds,
            r.steps,
            r.steps_per_s(),
            r.kills,
            r.leader_kills,
            r.rejoins,
            r.steps_lost,
            r.live_errors.len(),
            r.false_suspicions,
            format!("{}/{}", r.demotions, r.readmissions)
        );
        for e in &r.live_errors {
            println!("  {}: a live trainer saw: {e}", r.name);
        }
    }
    let ratio = |faults: &str, base: &str| {
        let f = runs.iter().find(|r| r.name == faults)?;
        let b = runs.iter().find(|r| r.name == base)?;
        Some(f.steps_per_s() / b.steps_per_s())
    };
    let by_name = |name: &str| runs.iter().find(|r| r.name == name);
    let summary = json!({
        "goodput_ratio": ratio("faults", "baseline"),
        "steps_lost": by_name("faults").map(|r| r.steps_lost),
        "false_suspicions": by_name("faults").map(|r| r.false_suspicions),
        "live_trainer_errors": by_name("faults").map(|r| r.live_errors.len()),
        "goodput_ratio_cpu_busy": ratio("faults_cpu_busy", "baseline_cpu_busy"),
        "steps_lost_cpu_busy": by_name("faults_cpu_busy").map(|r| r.steps_lost),
        "false_suspicions_cpu_busy": by_name("faults_cpu_busy").map(|r| r.false_suspicions),
        "live_trainer_errors_cpu_busy": by_name("faults_cpu_busy").map(|r| r.live_errors.len()),
    });
    let doc = json!({
        "benchmark": "continuity",
        "method": "fresh cluster per run, all members in the ring, policy set; one trainer per member sleeps compute_ms per step (the last member slow x that) then all-reduces, adds the result into its state and hands the state to joiners; fault runs SIGKILL a member every kill_every_s (rotating over all but the slow member), restart its daemon down_s later, and its trainer joins; a live trainer whose call fails rejoins (counted); steps/s = the most advanced trainer's completed steps over the window after 20 warm-up steps; goodput_ratio = fault run's steps/s over the baseline's (the same training without kills), same invocation; false suspicions = removals of a member beyond the times it was killed, from the slow member's log; at the end every trainer stops at the same step and their states must be equal; the *_cpu_busy runs keep one spinning process per core",
        "members": o.members,
        "policy": o.policy,
        "compute_ms": o.compute_ms,
        "slow_factor": o.slow,
        "kill_every_s": o.kill_every.as_secs_f64(),
        "down_s": o.down.as_secs_f64(),
        "elems": o.elems,
        "runs": runs.iter().map(|r| json!({
            "run": r.name,
            "faults": r.faults,
            "cpu_busy": r.busy,
            "seconds": r.seconds,
            "steps": r.steps,
            "steps_per_s": r.steps_per_s(),
            "kills": r.kills,
            "leader_kills": r.leader_kills,
            "rejoins": r.rejoins,
            "steps_lost": r.steps_lost,
            "live_trainer_errors": r.live_errors,
            "removals": r.removals,
            "false_suspicions": r.false_suspicions,
            "slow_member_demotions": r.demotions,
            "slow_member_readmissions": r.readmissions,
        })).collect::<Vec<_>>(),
        "summary": summary,
    });
    crate::write_report(&doc, json_path)?;
    println!("summary: {}", doc["summary"]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removals_are_counted_per_member_through_colour_codes() {
        let log = "\
2026-12-02T04:00:00Z  WARN phalanx_protocol::membership::plane: member removed: new epoch epoch=e3 member=m2 reason=silent ring=[m1, m3]
2026-12-02T04:00:01Z  INFO phalanx_protocol::membership::plane: member admitted: new epoch epoch=e4 member=m2 life=7
2026-12-02T04:00:02Z \u{1b}[33m WARN\u{1b}[0m member removed: new epoch \u{1b}[3mepoch\u{1b}[0m\u{1b}[2m=\u{1b}[0me5 \u{1b}[3mmember\u{1b}[0m\u{1b}[2m=\u{1b}[0mm12
2026-12-02T04:00:03Z  WARN member removed: new epoch epoch=e6 member=m2 reason=silent";
        let r = removals(log);
        assert_eq!(r, BTreeMap::from([(2, 2), (12, 1)]));
    }
}
