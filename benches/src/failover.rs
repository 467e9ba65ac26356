//! The failover benchmark: a cluster of real `phalanxd` processes, one
//! trainer per member all-reducing in a loop; one member is SIGKILLed and we
//! time how long the survivors take to complete an all-reduce without it
//! (suspicion, Raft commit of the new epoch, recovery exchange, re-run).
//! A fresh cluster per trial; the victim rotates over the members, so some
//! trials kill the Raft leader.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use phalanx_client::{Client, ReduceOp};
use phalanx_testkit::LocalCluster;
use serde_json::json;

use crate::quantile;

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub members: usize,
    pub trials: usize,
    pub elems: usize,
    pub phalanxd: PathBuf,
}

/// One completed all-reduce: when, and how many members contributed.
type Completion = (Instant, usize);

#[derive(Debug)]
struct Trial {
    victim: u32,
    was_leader: bool,
    failover_s: f64,
    epoch_commit_ms: Option<f64>,
    reruns: f64,
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
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let socket = cluster.members[i].socket.clone();
            let log = logs[i].clone();
            let stop = stop.clone();
            let elems = o.elems;
            std::thread::spawn(move || -> Result<()> {
                let mut c = Client::connect(&socket)?;
                let mut v = vec![1.0f32; elems];
                while !stop.load(Ordering::Relaxed) {
                    v.fill(1.0);
                    let info = c.all_reduce(&mut v, ReduceOp::Sum)?;
                    let want = info.contributors.len() as f32;
                    if v.iter().any(|&x| x != want) {
                        bail!("wrong sum {} for {} contributors", v[0], want);
                    }
                    log.lock()
                        .expect("poisoned")
                        .push((Instant::now(), info.contributors.len()));
                }
                Ok(())
            })
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
    let killed_at = Instant::now();
    cluster.signal(victim, phalanx_testkit::KILL)?;
    // Each survivor's first completion without the victim.
    let mut failover = Duration::ZERO;
    for &i in &survivors {
        let at = loop {
            let found = logs[i]
                .lock()
                .expect("poisoned")
                .iter()
                .find(|(t, k)| *t > killed_at && *k == n - 1)
                .map(|(t, _)| *t);
            if let Some(t) = found {
                break t;
            }
            if killed_at.elapsed() > Duration::from_secs(30) {
                bail!(
                    "member {} completed no all-reduce without the victim within 30 s; log:\n{}",
                    i + 1,
                    phalanx_testkit::tail(&cluster.members[i].log)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        failover = failover.max(at - killed_at);
    }
    let (sum1, count1) = histogram_totals(&cluster, &survivors, "phalanx_epoch_commit_seconds");
    let reruns = counter_total(&cluster, &survivors, "phalanx_ops_recovered_total") - reruns0;
    stop.store(true, Ordering::Relaxed);
    drop(cluster); // the trainers' next op fails: the daemons are gone
    for t in threads {
        let _ = t.join();
    }
    Ok(Trial {
        victim: victim as u32 + 1,
        was_leader,
        failover_s: failover.as_secs_f64(),
        epoch_commit_ms: (count1 > count0).then(|| (sum1 - sum0) / (count1 - count0) * 1e3),
        reruns,
    })
}

pub fn run(o: &Options, json_path: Option<&Path>) -> Result<()> {
    if !o.phalanxd.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --locked -p phalanx-daemon`, or pass --phalanxd",
            o.phalanxd.display()
        );
    }
    if o.members < 3 {
        bail!("--members must be at least 3 (a majority must survive the kill)");
    }
    println!(
        "{:>5} {:>6} {:>7} {:>11} {:>15} {:>7}",
        "trial", "victim", "leader", "failover s", "epoch commit ms", "re-runs"
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
            "{:>5} {:>6} {:>7} {:>11.3} {:>15} {:>7}",
            t,
            format!("m{}", r.victim),
            if r.was_leader { "yes" } else { "no" },
            r.failover_s,
            r.epoch_commit_ms
                .map_or("-".into(), |ms| format!("{ms:.1}")),
            r.reruns
        );
        trials.push(r);
    }
    let mut f: Vec<f64> = trials.iter().map(|t| t.failover_s).collect();
    f.sort_by(f64::total_cmp);
    let mut c: Vec<f64> = trials.iter().filter_map(|t| t.epoch_commit_ms).collect();
    c.sort_by(f64::total_cmp);
    let summary = json!({
        "failover_p50_s": quantile(&f, 0.5),
        "failover_max_s": f.last().copied(),
        "epoch_commit_p50_ms": (!c.is_empty()).then(|| quantile(&c, 0.5)),
        "trials": trials.len(),
        "leader_kills": trials.iter().filter(|t| t.was_leader).count(),
        "set_up_restarts": restarts,
    });
    let doc = json!({
        "benchmark": "failover",
        "method": "fresh cluster per trial; one trainer per member all-reducing f32 sums in a loop; SIGKILL one member (rotating); failover = time from the kill to the last survivor's first completed all-reduce whose result names n-1 contributors; epoch commit = from a survivor's first accepted proposal of the removal to its commit (mean over the survivors that proposed)",
        "members": o.members,
        "elems": o.elems,
        "results": trials.iter().map(|t| json!({
            "victim": t.victim,
            "was_leader": t.was_leader,
            "failover_s": t.failover_s,
            "epoch_commit_ms": t.epoch_commit_ms,
            "reruns": t.reruns,
        })).collect::<Vec<_>>(),
        "summary": summary,
    });
    crate::write_report(&doc, json_path)?;
    println!("summary: {}", doc["summary"]);
    Ok(())
}
