//! The failover benchmark: a cluster of real `phalanxd` processes, one
//! trainer per member all-reducing in a loop; one member is SIGKILLed and we
//! time how long the survivors take to complete an all-reduce without it
//! (suspicion, Raft commit of the new epoch, recovery exchange, re-run).
//! A fresh cluster per trial; the victim rotates over the members, so some
//! trials kill the Raft leader. Then the victim's daemon is restarted and
//! its trainer joins with the live trainers' state: the rejoin time runs
//! from the restarted daemon being ready to the first step that includes it.
//! `--policy` runs the trial under a quorum policy (steps cut without the
//! slowest), where the stall the survivors' trainers see at the kill can
//! differ from the time to the new epoch.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use phalanx_client::{Client, ReduceOp};
use phalanx_testkit::{set_policy, LocalCluster};
use serde_json::json;

use crate::quantile;

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub members: usize,
    pub trials: usize,
    pub elems: usize,
    pub phalanxd: PathBuf,
    /// The quorum policy the trials run under.
    pub policy: String,
    /// Compute time each trainer spends per step, ms.
    pub compute_ms: u64,
}

/// One completed all-reduce: when, its epoch, and the member ids it
/// combines.
type Completion = (Instant, u64, Vec<u32>);

/// Elements of the state a joining trainer receives.
const STATE: usize = 4096;

#[derive(Debug)]
struct Trial {
    victim: u32,
    was_leader: bool,
    failover_s: f64,
    /// The longest gap between two completions at any survivor, from the
    /// last one before the kill to its first in the new epoch.
    stall_s: f64,
    epoch_commit_ms: Option<f64>,
    reruns: f64,
    /// Restarted daemon ready → first completed step that includes it.
    rejoin_s: f64,
}

/// A trainer: joins first when `join`, then all-reduces until `stop`,
/// checking each sum and logging it, and hands its state over when a
/// result reports members waiting.
fn trainer(
    socket: PathBuf,
    join: bool,
    o: &Options,
    log: Arc<Mutex<Vec<Completion>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<()>> {
    let (elems, compute) = (o.elems, Duration::from_millis(o.compute_ms));
    std::thread::spawn(move || -> Result<()> {
        let mut c = Client::connect(&socket)?;
        let mut v = vec![1.0f32; elems];
        let mut state: Vec<f32> = (0..STATE).map(|i| i as f32).collect();
        if join {
            let mut got = vec![0.0f32; STATE];
            c.join(&mut got)?;
            if got != state {
                bail!("the joiner received a different state");
            }
        }
        while !stop.load(Ordering::Relaxed) {
            if !compute.is_zero() {
                std::thread::sleep(compute);
            }
            v.fill(1.0);
            let info = c.all_reduce(&mut v, ReduceOp::Sum)?;
            let want = info.contributors.len() as f32;
            if v.iter().any(|&x| x != want) {
                bail!("wrong sum {} for {} contributors", v[0], want);
            }
            let ids = info.contributors.iter().map(|m| m.0).collect();
            log.lock()
                .expect("poisoned")
                .push((Instant::now(), info.epoch.0, ids));
            if !info.waiting.is_empty() {
                c.admit(&mut state)?;
            }
        }
        Ok(())
    })
}

/// `e`, with the tail of member index `i`'s log.
fn with_log(e: anyhow::Error, cluster: &LocalCluster, i: usize) -> anyhow::Error {
    e.context(format!(
        "member {}; log:\n{}",
        i + 1,
        phalanx_testkit::tail(&cluster.members[i].log)
    ))
}

/// Waits (polling, up to `bound`) for `find` to return an instant.
fn wait_for(
    bound: Duration,
    what: &str,
    mut find: impl FnMut() -> Option<Instant>,
) -> Result<Instant> {
    let start = Instant::now();
    loop {
        if let Some(t) = find() {
            return Ok(t);
        }
        if start.elapsed() > bound {
            bail!("{what}: not within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sum and count of a histogram across members `ids`.
fn histogram_totals(cluster: &LocalCluster, ids: &[usize], name: &str) -> (f64, f64) {
    let mut sum = 0.0;
    let mut count = 0.0;
    for &i in ids {
        sum += cluster.metric(i, &format!("{name}_sum")).unwrap_or(0.0);
        count += cluster.metric(i, &format!("{name}_count")).unwrap_or(0.0);
    }
    (sum, count)
}

fn counter_total(cluster: &LocalCluster, ids: &[usize], prefix: &str) -> f64 {
    ids.iter()
        .filter_map(|&i| cluster.metrics(i).ok())
        .map(|text| {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

fn run_trial(o: &Options, trial: usize) -> Result<Trial> {
    let n = o.members;
    // Every member in the ring before the clock starts: this benchmark
    // measures one failure, not a suspicion while the group forms.
    let mut cluster = crate::settled_cluster(n, &o.phalanxd, &format!("failover-{trial}"))?;
    let settled_at = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let logs: Vec<Arc<Mutex<Vec<Completion>>>> =
        (0..n).map(|_| Arc::new(Mutex::new(Vec::new()))).collect();
    if o.policy != "sync" {
        let policy = o.policy.parse().map_err(anyhow::Error::msg)?;
        set_policy(cluster.members[0].metrics, policy)?;
    }
    let mut threads: Vec<_> = (0..n)
        .map(|i| {
            let socket = cluster.members[i].socket.clone();
            trainer(socket, false, o, logs[i].clone(), stop.clone())
        })
        .collect();
    // Warm up: every trainer has completed some ops.
    let start = Instant::now();
    while logs.iter().any(|l| l.lock().expect("poisoned").len() < 20) {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("trainers did not get going within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Past the daemons' start-up grace (2 s after the group forms, when
    // heartbeats are not judged yet), so the figure is a steady-state one.
    while settled_at.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let victim = trial % n;
    let survivors: Vec<usize> = (0..n).filter(|&i| i != victim).collect();
    let leader = cluster.metric(survivors[0], "phalanx_raft_leader");
    let was_leader = leader == Some(f64::from(cluster.members[victim].id));
    let (sum0, count0) = histogram_totals(&cluster, &survivors, "phalanx_epoch_commit_seconds");
    let reruns0 = counter_total(&cluster, &survivors, "phalanx_ops_recovered_total");
    let epoch0 = logs[survivors[0]]
        .lock()
        .expect("poisoned")
        .last()
        .map_or(0, |c| c.1);
    let killed_at = Instant::now();
    cluster.signal(victim, phalanx_testkit::KILL)?;
    // Each survivor's first completion in the epoch without the victim, and
    // the longest wait between its completions until then.
    let (mut failover, mut stall) = (Duration::ZERO, Duration::ZERO);
    for &i in &survivors {
        let at = wait_for(
            Duration::from_secs(30),
            "a completion in the new epoch",
            || {
                logs[i]
                    .lock()
                    .expect("poisoned")
                    .iter()
                    .find(|(t, e, _)| *t > killed_at && *e > epoch0)
                    .map(|c| c.0)
            },
        )
        .map_err(|e| with_log(e, &cluster, i))?;
        failover = failover.max(at - killed_at);
        let log = logs[i].lock().expect("poisoned");
        let before = log
            .iter()
            .rev()
            .find(|c| c.0 <= killed_at)
            .map_or(killed_at, |c| c.0);
        let mut last = before;
        for c in log.iter().filter(|c| c.0 > before && c.0 <= at) {
            stall = stall.max(c.0 - last);
            last = c.0;
        }
    }
    let (sum1, count1) = histogram_totals(&cluster, &survivors, "phalanx_epoch_commit_seconds");
    let reruns = counter_total(&cluster, &survivors, "phalanx_ops_recovered_total") - reruns0;
    // The victim comes back in a new life; its trainer joins.
    threads.remove(victim).join().ok();
    cluster.spawn(victim)?;
    cluster.wait_ready(Duration::from_secs(60))?;
    let ready_at = Instant::now();
    let joiner_log = Arc::new(Mutex::new(Vec::new()));
    let socket = cluster.members[victim].socket.clone();
    threads.push(trainer(socket, true, o, joiner_log, stop.clone()));
    let victim_id = cluster.members[victim].id;
    let rejoined = wait_for(
        Duration::from_secs(60),
        "a step including the restarted member",
        || {
            logs[survivors[0]]
                .lock()
                .expect("poisoned")
                .iter()
                .find(|(t, _, ids)| *t > ready_at && ids.contains(&victim_id))
                .map(|c| c.0)
        },
    )
    .map_err(|e| with_log(e, &cluster, victim))?;
    stop.store(true, Ordering::Relaxed);
    drop(cluster); // the trainers' next op fails: the daemons are gone
    for t in threads {
        let _ = t.join();
    }
    Ok(Trial {
        victim: victim as u32 + 1,
        was_leader,
        failover_s: failover.as_secs_f64(),
        stall_s: stall.as_secs_f64(),
        rejoin_s: (rejoined - ready_at).as_secs_f64(),
        epoch_commit_ms: (count1 > count0).then(|| (sum1 - sum0) / (count1 - count0) * 1e3),
        reruns,
    })
}

pub fn run(o: &Options, json_path: Option<&Path>) -> Result<()> {
    if o.members < 3 {
        bail!("--members must be at least 3 (a majority must survive the kill)");
    }
    println!("policy {}, {} ms compute per step", o.policy, o.compute_ms);
    println!(
        "{:>5} {:>6} {:>7} {:>11} {:>8} {:>15} {:>7} {:>9}",
        "trial",
        "victim",
        "leader",
        "failover s",
        "stall s",
        "epoch commit ms",
        "re-runs",
        "rejoin s"
    );
    let mut trials = Vec::new();
    let mut restarts = 0;
    for t in 0..o.trials {
        let r = loop {
            match run_trial(o, t) {
                Ok(r) => break r,
                Err(e) if restarts < 3 => {
                    restarts += 1;
                    eprintln!("note: trial {t} set-up failed, starting it again: {e:#}");
                }
                Err(e) => return Err(e.context(format!("trial {t}"))),
            }
        };
        println!(
            "{:>5} {:>6} {:>7} {:>11.3} {:>8.3} {:>15} {:>7} {:>9.3}",
            t,
            format!("m{}", r.victim),
            if r.was_leader { "yes" } else { "no" },
            r.failover_s,
            r.stall_s,
            r.epoch_commit_ms
                .map_or("-".into(), |ms| format!("{ms:.1}")),
            r.reruns,
            r.rejoin_s
        );
        trials.push(r);
    }
    let mut f: Vec<f64> = trials.iter().map(|t| t.failover_s).collect();
    f.sort_by(f64::total_cmp);
    let mut c: Vec<f64> = trials.iter().filter_map(|t| t.epoch_commit_ms).collect();
    c.sort_by(f64::total_cmp);
    let sorted = |g: fn(&Trial) -> f64| {
        let mut v: Vec<f64> = trials.iter().map(g).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (stall, rejoin) = (sorted(|t| t.stall_s), sorted(|t| t.rejoin_s));
    let summary = json!({
        "policy": o.policy,
        "failover_p50_s": quantile(&f, 0.5),
        "failover_max_s": f.last().copied(),
        "stall_p50_s": quantile(&stall, 0.5),
        "stall_max_s": stall.last().copied(),
        "rejoin_p50_s": quantile(&rejoin, 0.5),
        "rejoin_max_s": rejoin.last().copied(),
        "epoch_commit_p50_ms": (!c.is_empty()).then(|| quantile(&c, 0.5)),
        "trials": trials.len(),
        "leader_kills": trials.iter().filter(|t| t.was_leader).count(),
        "set_up_restarts": restarts,
    });
    let doc = json!({
        "benchmark": "failover",
        "method": "fresh cluster per trial; one trainer per member all-reducing f32 sums in a loop (after compute_ms), under the policy; SIGKILL one member (rotating); failover = time from the kill to the last survivor's first completed all-reduce in a newer epoch; stall = the longest gap between consecutive completions at any survivor from its last before the kill to that one; epoch commit = from a survivor's first accepted proposal of the removal to its commit (mean over the survivors that proposed); then the victim's daemon restarts and its trainer joins: rejoin = from the restarted daemon ready to the first survivor's completion that includes it",
        "members": o.members,
        "policy": o.policy,
        "compute_ms": o.compute_ms,
        "elems": o.elems,
        "results": trials.iter().map(|t| json!({
            "victim": t.victim,
            "was_leader": t.was_leader,
            "failover_s": t.failover_s,
            "stall_s": t.stall_s,
            "rejoin_s": t.rejoin_s,
            "epoch_commit_ms": t.epoch_commit_ms,
            "reruns": t.reruns,
        })).collect::<Vec<_>>(),
        "summary": summary,
    });
    crate::write_report(&doc, json_path)?;
    println!("summary: {}", doc["summary"]);
    Ok(())
}
