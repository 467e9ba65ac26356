//! Stragglers, with real `phalanxd` processes on 127.0.0.x: members whose
//! trainers compute 3x slower under the `backup` and `deadline` quorum
//! policies (set with the same HTTP call `phalanxctl policy` makes). Every
//! trainer checks every result against the gradients of the contributors
//! the daemon names (each trainer can compute every member's gradient: the
//! replicas are identical), so a left-out member's input mixed into a step
//! fails the run; all replicas must end bit-for-bit identical.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use phalanx_client::{Client, ClientError, MemberId, ReduceOp};
use phalanx_testkit::{set_policy, LocalCluster, KILL};

const DIM: usize = 1024;
const LR: f32 = 1.0 / 1024.0;

/// A step's gradient at member `m` (multiples of 1/16: sums are exact in
/// any order).
fn gradient(m: u32, step: u64, w: &[f32]) -> Vec<f32> {
    w.iter()
        .enumerate()
        .map(|(j, &wj)| {
            let x = ((m as u64 * 7 + step * 13 + j as u64 * 3) % 11) as f32 - 5.0;
            (((wj * x - 1.0) * x * 16.0).round() / 16.0).clamp(-1000.0, 1000.0)
        })
        .collect()
}

/// One result as a trainer saw it.
#[derive(Clone, Debug)]
struct Seen {
    idx: usize,
    step: u64,
    contributors: Vec<MemberId>,
    left_out: Vec<(MemberId, String)>,
    /// The trainer skipped computing this step's gradient (it was behind).
    skipped: bool,
}

#[derive(Debug)]
struct Shared {
    /// Trainers give sample counts (8 x their member id) and take the
    /// weighted mean instead of the sum.
    weighted: bool,
    /// The policy folds late inputs into the member's next step.
    fold: bool,
    /// Every input a trainer passed: (member id, step).
    inputs: Mutex<std::collections::HashMap<(u32, u64), Vec<f32>>>,
    /// Per member index: ms of "compute" per step.
    compute_ms: Vec<AtomicU64>,
    progress: Vec<AtomicU64>,
    seen: Mutex<Vec<Seen>>,
}

impl Shared {
    fn new(compute_ms: &[u64]) -> Arc<Shared> {
        Arc::new(Shared {
            weighted: false,
            fold: false,
            inputs: Mutex::new(Default::default()),
            compute_ms: compute_ms.iter().map(|&c| AtomicU64::new(c)).collect(),
            progress: compute_ms.iter().map(|_| AtomicU64::new(0)).collect(),
            seen: Mutex::new(Vec::new()),
        })
    }

    fn min_step(&self, of: &[usize]) -> u64 {
        of.iter()
            .map(|&i| self.progress[i].load(Ordering::SeqCst))
            .min()
            .unwrap_or(0)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Trains `steps` steps at member index `idx`: computes (sleeps its
/// compute time, then the gradient), all-reduces with the sum, checks the
/// result is exactly the sum over the contributors the daemon named, and
/// applies it. When a result says this member is behind, it skips computing
/// that many steps (their results are decided) and passes zeros.
fn spawn(
    socket: std::path::PathBuf,
    idx: usize,
    steps: u64,
    shared: Arc<Shared>,
) -> thread::JoinHandle<Result<Vec<f32>, ClientError>> {
    thread::spawn(move || {
        let mut c = Client::connect(&socket)?;
        let me = c.member().0;
        let mut w = vec![0.0f32; DIM];
        let mut skip = 0u64;
        let mut last_contributors: Vec<MemberId> = Vec::new();
        for step in 0..steps {
            let skipped = skip > 0;
            let mut buf = if skipped {
                skip -= 1;
                vec![0.0; DIM]
            } else {
                thread::sleep(Duration::from_millis(
                    shared.compute_ms[idx].load(Ordering::SeqCst),
                ));
                gradient(me, step, &w)
            };
            let info = if shared.weighted {
                let info = c.all_reduce_weighted(&mut buf, 8 * u64::from(me))?;
                check_weighted(me, step, &w, &buf, &info);
                for (wj, s) in w.iter_mut().zip(&buf) {
                    *wj -= LR * s;
                }
                info
            } else {
                sum_step(
                    &mut c,
                    me,
                    step,
                    &mut w,
                    &mut buf,
                    skipped,
                    &last_contributors,
                    &shared,
                )?
            };
            skip = skip.max(info.meta.behind);
            last_contributors = info.contributors.clone();
            shared.seen.lock().unwrap().push(Seen {
                idx,
                step,
                contributors: info.contributors,
                left_out: info.meta.left_out,
                skipped,
            });
            shared.progress[idx].store(step + 1, Ordering::SeqCst);
        }
        Ok(w)
    })
}

/// One step with the sum: the result must be exactly the sum over the
/// contributors the daemon names (with their folded late inputs).
#[allow(clippy::too_many_arguments)]
fn sum_step(
    c: &mut Client,
    me: u32,
    step: u64,
    w: &mut [f32],
    buf: &mut [f32],
    skipped: bool,
    last_contributors: &[MemberId],
    shared: &Shared,
) -> Result<phalanx_client::OpInfo, ClientError> {
    shared
        .inputs
        .lock()
        .unwrap()
        .insert((me, step), buf.to_vec());
    let info = c.all_reduce(buf, ReduceOp::Sum)?;
    let mut want: Option<Vec<f32>> = None;
    for m in &info.contributors {
        let mut g = gradient(m.0, step, w);
        if shared.fold && step > 0 && !last_contributors.contains(m) {
            // Its input to the step before, which closed without it.
            let inputs = shared.inputs.lock().unwrap();
            let stale = &inputs[&(m.0, step - 1)];
            g.iter_mut().zip(stale).for_each(|(a, b)| *a += b);
        }
        match want.as_mut() {
            None => want = Some(g),
            Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, b)| *a += b),
        }
    }
    let want = want.expect("a result has contributors");
    assert!(
        want.iter()
            .zip(buf.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "m{me} step {step}: the result is not the sum over its contributors {:?} \
         (left out: {:?})",
        info.contributors,
        info.meta.left_out
    );
    assert!(
        !skipped || !info.contributors.contains(&MemberId(me)),
        "m{me} step {step}: skipped, yet named a contributor"
    );
    let k = info.contributors.len() as f32;
    for (wj, s) in w.iter_mut().zip(buf.iter()) {
        *wj -= LR * s / k;
    }
    Ok(info)
}

/// The result of a weighted mean is the contributors' gradients weighted by
/// the sample counts the result names (each contributor's, 8 x its id).
fn check_weighted(me: u32, step: u64, w: &[f32], got: &[f32], info: &phalanx_client::OpInfo) {
    let samples = &info.meta.samples;
    let named: Vec<MemberId> = samples.iter().map(|(m, _)| *m).collect();
    assert_eq!(named, info.contributors, "m{me} step {step}: sample counts");
    assert!(samples.iter().all(|(m, s)| *s == 8 * u64::from(m.0)));
    let total: u64 = samples.iter().map(|(_, s)| s).sum();
    let mut want = vec![0.0f64; w.len()];
    for (m, s) in samples {
        for (acc, g) in want.iter_mut().zip(gradient(m.0, step, w)) {
            *acc += f64::from(g) * *s as f64 / total as f64;
        }
    }
    for (j, (a, b)) in want.iter().zip(got).enumerate() {
        assert!(
            (a - f64::from(*b)).abs() <= 1e-4 * a.abs().max(1.0),
            "m{me} step {step} [{j}]: weighted mean {b}, want {a} ({samples:?})"
        );
    }
}

fn start(members: usize, policy: &str, suspect: bool) -> LocalCluster {
    let data_plane = if suspect {
        "heartbeat_interval_ms = 100\nsuspect_after_ms = 400"
    } else {
        ""
    };
    let cluster = common::cluster(members, data_plane);
    set_policy(cluster.members[0].metrics, policy.parse().unwrap()).expect("policy set");
    cluster
}

fn run_all(
    cluster: &LocalCluster,
    steps: u64,
    shared: &Arc<Shared>,
) -> Vec<thread::JoinHandle<Result<Vec<f32>, ClientError>>> {
    (0..cluster.members.len())
        .map(|i| spawn(cluster.members[i].socket.clone(), i, steps, shared.clone()))
        .collect()
}

fn finish(trainers: Vec<thread::JoinHandle<Result<Vec<f32>, ClientError>>>) -> Vec<Vec<f32>> {
    let states: Vec<Vec<f32>> = trainers
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("trainer m{} failed: {e}", i + 1))
        })
        .collect();
    assert_identical(&states);
    states
}

fn assert_identical(states: &[Vec<f32>]) {
    for (i, s) in states.iter().enumerate().skip(1) {
        assert!(
            s.iter()
                .zip(&states[0])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "replica {} differs from replica 0",
            i
        );
    }
}

/// Every member saw each of the first `steps` steps with the same
/// contributors.
fn assert_one_history(seen: &[Seen], steps: u64) {
    for step in 0..steps {
        let views: std::collections::BTreeSet<&Vec<MemberId>> = seen
            .iter()
            .filter(|s| s.step == step)
            .map(|s| &s.contributors)
            .collect();
        assert_eq!(views.len(), 1, "step {step}: {views:?}");
    }
}

/// Steps (as member index `idx` saw them) that `m` contributed to.
fn contributed(seen: &[Seen], idx: usize, m: u32) -> Vec<u64> {
    seen.iter()
        .filter(|s| s.idx == idx && s.contributors.contains(&MemberId(m)))
        .map(|s| s.step)
        .collect()
}

fn demoted_at(seen: &[Seen], idx: usize, m: u32) -> Option<u64> {
    seen.iter()
        .filter(|s| s.idx == idx)
        .find(|s| {
            s.left_out
                .iter()
                .any(|(x, why)| x.0 == m && why.contains("observer"))
        })
        .map(|s| s.step)
}

#[test]
fn backup_workers_leave_a_3x_slow_member_out_and_demote_it() {
    let _serial = common::one_at_a_time();
    let cluster = start(4, "backup=1", false);
    let shared = Shared::new(&[15, 15, 15, 45]);
    let trainers = run_all(&cluster, 120, &shared);
    finish(trainers);
    let seen = shared.seen();
    let with_slow = contributed(&seen, 0, 4).len();
    assert!(
        with_slow < 40,
        "the slow member contributed to {with_slow} of 120 steps"
    );
    let demoted = demoted_at(&seen, 0, 4).expect("the slow member is demoted");
    assert!(demoted < 60, "demoted only at step {demoted}");
    let skipped = seen.iter().filter(|s| s.idx == 3 && s.skipped).count();
    assert!(
        skipped > 20,
        "the slow trainer skipped only {skipped} steps"
    );
    assert_one_history(&seen, 120);
    let metrics = cluster.metrics(0).unwrap();
    assert!(
        metrics.contains("phalanx_steps_closed_total{reason=\"backup\"}"),
        "no backup closes in the metrics"
    );
    assert!(
        metrics.contains("phalanx_straggler_left_out_steps{member=\"m4\"}"),
        "no attribution in the metrics"
    );
    // What `phalanxctl members` prints.
    let members = phalanx_testkit::http_get(cluster.members[1].metrics, "/members").unwrap();
    assert!(members.contains("policy backup=1"), "{members}");
    let m4 = members
        .lines()
        .skip_while(|l| !l.starts_with("stragglers"))
        .find(|l| l.starts_with("m4 "))
        .unwrap_or_else(|| panic!("no straggler line for m4:\n{members}"));
    let left_out: u64 = m4.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(left_out > 60, "m4 left out of {left_out} steps: {m4}");
}

#[test]
fn the_mean_is_weighted_by_the_contributors_sample_counts() {
    let _serial = common::one_at_a_time();
    // Sync (every member, through the coordinator: the weights need the
    // contributors' counts), then backup=1 with a slow member.
    for (policy, slow) in [("sync", 5), ("backup=1", 30)] {
        let cluster = start(3, policy, false);
        let mut shared = Shared::new(&[5, 5, slow]);
        Arc::get_mut(&mut shared).unwrap().weighted = true;
        let trainers = run_all(&cluster, 40, &shared);
        finish(trainers);
        let seen = shared.seen();
        let partial = seen
            .iter()
            .filter(|s| s.idx == 0 && s.contributors.len() < 3)
            .count();
        if policy == "sync" {
            assert_eq!(partial, 0, "sync steps have every member");
        } else {
            assert!(
                partial > 10,
                "backup=1 left out the slow member {partial} times"
            );
        }
    }
}

#[test]
fn the_policy_changes_while_the_group_trains() {
    let _serial = common::one_at_a_time();
    let cluster = start(4, "sync", false);
    let shared = Shared::new(&[15, 15, 15, 45]);
    let trainers = run_all(&cluster, 150, &shared);
    training_wait("sync steps", 120, || shared.min_step(&[0, 1, 2, 3]) >= 15);
    let metrics = cluster.members[1].metrics;
    set_policy(metrics, "backup=1".parse().unwrap()).expect("backup=1");
    training_wait("steps under backup=1", 120, || {
        shared.min_step(&[0, 1, 2]) >= 80
    });
    set_policy(metrics, "sync".parse().unwrap()).expect("back to sync");
    let back_at = shared.min_step(&[0, 1, 2, 3]);
    finish(trainers);
    let seen = shared.seen();
    assert_one_history(&seen, 150);
    let mine: Vec<&Seen> = seen.iter().filter(|s| s.idx == 0).collect();
    assert!(
        mine.iter().any(|s| s.contributors.len() == 3),
        "backup=1 never closed a step without the slow member"
    );
    assert!(
        mine.iter()
            .filter(|s| s.step > back_at + 5)
            .all(|s| s.contributors.len() == 4),
        "after the switch back to sync every step has every member"
    );
}

#[test]
fn late_inputs_fold_into_the_next_step() {
    let _serial = common::one_at_a_time();
    // Backup=1 over three members: the last one ready each step is left
    // out, and with late=fold its input joins its next step (if it
    // contributes to that one); the trainers check every result for that.
    let cluster = start(3, "backup=1 late=fold", false);
    let mut shared = Shared::new(&[10, 10, 10]);
    Arc::get_mut(&mut shared).unwrap().fold = true;
    let trainers = run_all(&cluster, 60, &shared);
    finish(trainers);
    let seen = shared.seen();
    let mine: Vec<&Seen> = seen.iter().filter(|s| s.idx == 0).collect();
    let folds = mine
        .windows(2)
        .filter(|w| {
            w[1].contributors
                .iter()
                .any(|m| !w[0].contributors.contains(m))
        })
        .count();
    assert!(folds > 5, "only {folds} steps folded a late input");
}

#[test]
fn a_deadline_cuts_two_slow_members() {
    let _serial = common::one_at_a_time();
    let cluster = start(5, "deadline=p50 floor_ms=25 ceiling_ms=2000", false);
    let shared = Shared::new(&[20, 20, 20, 60, 60]);
    let trainers = run_all(&cluster, 100, &shared);
    finish(trainers);
    let seen = shared.seen();
    for m in [4, 5] {
        let n = contributed(&seen, 0, m).len();
        assert!(n < 40, "slow m{m} contributed to {n} of 100 steps");
    }
    for m in [1, 2, 3] {
        let n = contributed(&seen, 0, m).len();
        assert!(n > 60, "healthy m{m} contributed to only {n} of 100 steps");
    }
}

#[test]
fn a_slow_member_that_recovers_is_readmitted() {
    let _serial = common::one_at_a_time();
    let cluster = start(4, "backup=1", false);
    let shared = Shared::new(&[15, 15, 15, 45]);
    let trainers = run_all(&cluster, 400, &shared);
    training_wait("the slow member is demoted", 120, || {
        demoted_at(&shared.seen(), 0, 4).is_some()
    });
    shared.compute_ms[3].store(15, Ordering::SeqCst);
    let recovered_at = shared.min_step(&[0, 1, 2, 3]);
    finish(trainers);
    let seen = shared.seen();
    let after: Vec<u64> = contributed(&seen, 0, 4)
        .into_iter()
        .filter(|&s| s > recovered_at + 5)
        .collect();
    assert!(
        after.len() > 20,
        "m4 contributed to only {} steps after it recovered (at {recovered_at}): {after:?}",
        after.len()
    );
}

#[test]
fn a_slow_member_that_dies_is_removed_and_the_rest_go_on() {
    let _serial = common::one_at_a_time();
    let mut cluster = start(4, "backup=1", true);
    let shared = Shared::new(&[15, 15, 15, 45]);
    let mut trainers = run_all(&cluster, 150, &shared);
    training_wait("steps with the slow member", 120, || {
        shared.min_step(&[0, 1, 2]) >= 40
    });
    cluster.signal(3, KILL).unwrap();
    let slow = trainers.pop().unwrap();
    assert!(
        slow.join().unwrap().is_err(),
        "the killed member's trainer fails"
    );
    finish(trainers);
    let seen = shared.seen();
    let last = seen.iter().rfind(|s| s.idx == 0).unwrap();
    assert_eq!(last.step, 149);
    assert!(!last.contributors.contains(&MemberId(4)));
}

fn training_wait(what: &str, bound_s: u64, mut cond: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(bound_s),
            "{what}: not within {bound_s} s"
        );
        thread::sleep(Duration::from_millis(5));
    }
}
