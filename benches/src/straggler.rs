//! The straggler benchmark: real `phalanxd` processes, one trainer per
//! member that "computes" for a fixed time per step (a sleep) and then
//! all-reduces its gradient; one member computes `slow`x longer. Four runs,
//! a fresh cluster each: every member healthy (sync), then the slow member
//! under `sync`, `backup=1` and a deadline. The figure is the step time the
//! healthy members see (the time between two of their consecutive results),
//! as a ratio to the healthy run's, medians of the same run.
//!
//! Trainers follow the client guide: a result that says the member is
//! `behind` lets it skip computing that many steps (their results are
//! decided without it).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use phalanx_client::{Client, ReduceOp};
use phalanx_testkit::set_policy;
use serde_json::json;

use crate::quantile;

/// Options from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub members: usize,
    pub slow: f64,
    pub steps: usize,
    pub compute_ms: u64,
    pub elems: usize,
    pub deadline: String,
    pub phalanxd: PathBuf,
}

/// One run's figures.
#[derive(Debug)]
struct Run {
    name: &'static str,
    policy: String,
    /// Healthy members' step times, seconds, ascending.
    healthy_steps: Vec<f64>,
    /// Steps the slow member contributed to (as member 1 saw them).
    slow_contributed: usize,
    /// Steps the slow member's trainer skipped computing (it was behind).
    slow_skipped: usize,
    /// Demotions and readmissions, as member 1's log announced them.
    demotions: usize,
    readmissions: usize,
}

/// Steps at the start of a run left out of the figures (connections,
/// first deadline estimates).
const WARMUP: usize = 10;

fn run_one(o: &Options, name: &'static str, policy: &str, slow: bool) -> Result<Run> {
    let n = o.members;
    let cluster = crate::settled_cluster(n, &o.phalanxd, &format!("straggler-{name}"))?;
    set_policy(
        cluster.members[0].metrics,
        policy.parse().map_err(anyhow::Error::msg)?,
    )
    .with_context(|| format!("setting policy {policy}"))?;
    let slow_idx = n - 1;
    let start = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let socket = cluster.members[i].socket.clone();
            let start = start.clone();
            let factor = if slow && i == slow_idx { o.slow } else { 1.0 };
            let compute = Duration::from_secs_f64(o.compute_ms as f64 / 1000.0 * factor);
            let (steps, elems) = (o.steps, o.elems);
            std::thread::spawn(move || -> Result<(Vec<Instant>, usize, usize)> {
                let mut c = Client::connect(&socket)?;
                let me = c.member();
                let mut grad = vec![1.0f32; elems];
                let mut done = Vec::with_capacity(steps);
                let (mut skip, mut skipped, mut slow_in) = (0u64, 0usize, 0usize);
                start.wait();
                for _ in 0..steps {
                    if skip > 0 {
                        skip -= 1;
                        skipped += 1;
                    } else {
                        std::thread::sleep(compute);
                    }
                    grad.fill(1.0);
                    let info = c.all_reduce(&mut grad, ReduceOp::Sum)?;
                    done.push(Instant::now());
                    skip = skip.max(info.meta.behind);
                    if info
                        .contributors
                        .iter()
                        .any(|m| m.0 as usize == slow_idx + 1)
                    {
                        slow_in += 1;
                    }
                    anyhow::ensure!(
                        grad[0] == info.contributors.len() as f32,
                        "{me}: result {} with {} contributors",
                        grad[0],
                        info.contributors.len()
                    );
                }
                Ok((done, skipped, slow_in))
            })
        })
        .collect();
    let mut healthy_steps = Vec::new();
    let (mut slow_contributed, mut slow_skipped) = (0, 0);
    for (i, t) in threads.into_iter().enumerate() {
        let (done, skipped, slow_in) = t
            .join()
            .map_err(|_| anyhow::anyhow!("trainer {i} panicked"))?
            .with_context(|| format!("trainer of m{}", i + 1))?;
        if i == 0 {
            slow_contributed = slow_in;
        }
        if slow && i == slow_idx {
            slow_skipped = skipped;
            continue;
        }
        healthy_steps.extend(
            done.windows(2)
                .skip(WARMUP)
                .map(|w| (w[1] - w[0]).as_secs_f64()),
        );
    }
    healthy_steps.sort_by(f64::total_cmp);
    let log = std::fs::read_to_string(&cluster.members[0].log).unwrap_or_default();
    let demotions = log.matches("member demoted to observer").count();
    let readmissions = log.matches("observer readmitted").count();
    drop(cluster);
    Ok(Run {
        name,
        policy: policy.to_string(),
        healthy_steps,
        slow_contributed,
        slow_skipped,
        demotions,
        readmissions,
    })
}

/// Runs the benchmark and prints (and writes) its figures.
pub fn run(o: &Options, json_path: Option<&Path>) -> Result<()> {
    anyhow::ensure!(o.members >= 2, "--members must be at least 2");
    anyhow::ensure!(
        o.steps > WARMUP + 2,
        "--steps must be more than {}",
        WARMUP + 2
    );
    println!(
        "{} members, {} steps of {} ms compute, one member {}x slower, {} f32 per all-reduce",
        o.members, o.steps, o.compute_ms, o.slow, o.elems
    );
    println!(
        "{:<9} {:<44} {:>8} {:>8} {:>9} {:>12} {:>8} {:>13}",
        "run", "policy", "p50 ms", "p99 ms", "/healthy", "slow in/all", "skipped", "demoted/back"
    );
    let plan: [(&'static str, &str, bool); 4] = [
        ("healthy", "sync", false),
        ("sync", "sync", true),
        ("backup", "backup=1", true),
        ("deadline", o.deadline.as_str(), true),
    ];
    let mut runs = Vec::new();
    for (name, policy, slow) in plan {
        let r = run_one(o, name, policy, slow).with_context(|| format!("run {name}"))?;
        runs.push(r);
    }
    let healthy_p50 = quantile(&runs[0].healthy_steps, 0.5);
    for r in &runs {
        let p50 = quantile(&r.healthy_steps, 0.5);
        println!(
            "{:<9} {:<44} {:>8.2} {:>8.2} {:>9.2} {:>12} {:>8} {:>13}",
            r.name,
            r.policy,
            p50 * 1e3,
            quantile(&r.healthy_steps, 0.99) * 1e3,
            p50 / healthy_p50,
            format!("{}/{}", r.slow_contributed, o.steps),
            r.slow_skipped,
            format!("{}/{}", r.demotions, r.readmissions)
        );
    }
    let ratio = |i: usize| quantile(&runs[i].healthy_steps, 0.5) / healthy_p50;
    let doc = json!({
        "benchmark": "straggler",
        "method": "fresh cluster per run; one trainer per member sleeps compute_ms per step (the last member slow x that) then all-reduces; step time = time between a healthy member's consecutive results, after the first steps; p50/p99 over the healthy members; ratios of medians to the all-healthy run's median, same invocation; a trainer told it is behind skips computing that many steps",
        "members": o.members,
        "slow_factor": o.slow,
        "steps": o.steps,
        "compute_ms": o.compute_ms,
        "elems": o.elems,
        "runs": runs.iter().map(|r| json!({
            "run": r.name,
            "policy": r.policy,
            "step_p50_ms": quantile(&r.healthy_steps, 0.5) * 1e3,
            "step_p99_ms": quantile(&r.healthy_steps, 0.99) * 1e3,
            "slow_member_contributed": r.slow_contributed,
            "slow_member_skipped": r.slow_skipped,
            "demotions": r.demotions,
            "readmissions": r.readmissions,
        })).collect::<Vec<_>>(),
        "summary": {
            "healthy_p50_ms": healthy_p50 * 1e3,
            "sync_p50_over_healthy": ratio(1),
            "backup_p50_over_healthy": ratio(2),
            "deadline_p50_over_healthy": ratio(3),
        },
    });
    crate::write_report(&doc, json_path)?;
    println!("summary: {}", doc["summary"]);
    Ok(())
}
