//! Shared helpers of the process tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use phalanx_testkit::{ClusterOptions, LocalCluster};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Serialises the tests that kill, stop and cut members with the default
/// 400 ms suspicion bound: run side by side on two cores, their daemons
/// starve each other's heartbeats and raise suspicions no test asked for.
#[allow(dead_code)] // not every test file that includes this module needs it
pub fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A fresh cluster of `members` real `phalanxd` processes.
#[allow(dead_code)] // not every test file that includes this module needs it
pub fn cluster(members: usize, data_plane: &str) -> LocalCluster {
    cluster_with(members, data_plane, "")
}

/// A fresh cluster with extra `[control]` lines too.
pub fn cluster_with(members: usize, data_plane: &str, control: &str) -> LocalCluster {
    cluster_formed(members, data_plane, control, false)
}

/// A fresh cluster; with `bootstrap`, formed as on real nodes (member 1
/// `--bootstrap`, the others `--join` it).
pub fn cluster_formed(
    members: usize,
    data_plane: &str,
    control: &str,
    bootstrap: bool,
) -> LocalCluster {
    cluster_started(members, data_plane, control, bootstrap, &[])
}

/// A fresh cluster whose daemons get extra `flags` too.
pub fn cluster_started(
    members: usize,
    data_plane: &str,
    control: &str,
    bootstrap: bool,
    flags: &[&str],
) -> LocalCluster {
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "phalanx-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    LocalCluster::start(ClusterOptions {
        members,
        phalanxd: PathBuf::from(env!("CARGO_BIN_EXE_phalanxd")),
        dir,
        // Generous suspicion bound on the shared, noisy test machine, unless
        // the test is about suspicion itself.
        data_plane: if data_plane.contains("suspect_after_ms") {
            data_plane.to_string()
        } else {
            format!("{data_plane}\nsuspect_after_ms = 3000")
        },
        control: control.to_string(),
        keep: std::env::var_os("PHALANX_KEEP_TEST_DIRS").is_some(),
        flags: flags.iter().map(|f| f.to_string()).collect(),
        bootstrap,
    })
    .expect("starting the local cluster")
}

/// Waits until member index `i` reports an op in flight (an event, polled
/// with a generous bound for the shared test machine).
#[allow(dead_code)] // not every test file that includes this module needs it
pub fn wait_for_op_in_flight(cluster: &LocalCluster, i: usize) {
    let start = std::time::Instant::now();
    while !cluster
        .metrics(i)
        .unwrap()
        .contains("phalanx_ops_in_flight 1")
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "no op in flight at member {} after 30 s",
            i + 1
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A small data-parallel training loop the failure tests run on every
/// member: a linear model whose per-member gradients are exact multiples of
/// 1/16 below 2^10, so their sum is exact in f32 whatever the order, and a
/// step's result can be checked against the sum over the contributors the
/// daemon reports — bit for bit.
#[allow(dead_code)]
pub mod training {
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::thread;

    use phalanx_client::{Client, ClientError, MemberId, ReduceOp};

    /// Parameters per replica.
    pub const DIM: usize = 2048;
    const LR: f32 = 1e-3;
    /// No stop step set yet.
    pub const RUN_ON: u64 = u64::MAX;

    /// One trainer's result of one step: (member index, step, epoch,
    /// contributors).
    pub type StepResult = (usize, u64, u64, Vec<MemberId>);

    /// What the trainers share with the test.
    #[derive(Debug)]
    pub struct Shared {
        /// (member id, step) → that member's gradient.
        pub grads: Mutex<HashMap<(u32, u64), Vec<f32>>>,
        /// Per member index: the last step completed.
        pub progress: Vec<AtomicU64>,
        /// Trainers stop before this step.
        pub stop_at: AtomicU64,
        /// Every result: (member index, step, epoch, contributors).
        pub results: Mutex<Vec<StepResult>>,
        /// Per member index: when a call first failed with `NoQuorum`, and
        /// at which steps (the trainer then rejoins, as a real one would).
        pub no_quorum: Vec<Mutex<(Option<std::time::Instant>, Vec<u64>)>>,
        /// Per member index: the step whose call failed with another error,
        /// which ends the trainer (its daemon was killed, say).
        pub ended_at: Vec<Mutex<Option<u64>>>,
        /// A trainer that computes long once: (member index, step, how
        /// long), before it issues that step.
        pub slow_step: Mutex<Option<(usize, u64, std::time::Duration)>>,
    }

    impl Shared {
        /// For `n` members.
        pub fn new(n: usize) -> Arc<Shared> {
            Arc::new(Shared {
                grads: Mutex::new(HashMap::new()),
                progress: (0..n).map(|_| AtomicU64::new(0)).collect(),
                stop_at: AtomicU64::new(RUN_ON),
                results: Mutex::new(Vec::new()),
                no_quorum: (0..n).map(|_| Mutex::new((None, Vec::new()))).collect(),
                ended_at: (0..n).map(|_| Mutex::new(None)).collect(),
                slow_step: Mutex::new(None),
            })
        }

        /// The furthest step any trainer completed.
        pub fn max_step(&self) -> u64 {
            self.progress
                .iter()
                .map(|p| p.load(Ordering::SeqCst))
                .max()
                .unwrap_or(0)
        }

        /// Stops every trainer `margin` steps past the furthest one.
        pub fn stop_soon(&self, margin: u64) {
            self.stop_at
                .store(self.max_step() + margin, Ordering::SeqCst);
        }
    }

    fn gradient(member: u32, step: u64, w: &[f32]) -> Vec<f32> {
        w.iter()
            .enumerate()
            .map(|(j, &wj)| {
                let x = ((member as u64 * 7 + step * 13 + j as u64 * 3) % 11) as f32 - 5.0;
                let g = (wj * x - 1.0) * x;
                ((g * 16.0).round() / 16.0).clamp(-1000.0, 1000.0)
            })
            .collect()
    }

    /// Runs member index `idx` (member id `idx + 1`): joins first when
    /// `join`, trains until `stop_at`, hands its state over whenever a
    /// result reports members waiting, and rejoins whenever a call fails
    /// with `NoQuorum` (cut off, or removed on a false suspicion on a loaded
    /// machine: what a real trainer does). Returns the final state
    /// (parameters, then the step); other errors end it.
    pub fn spawn(
        socket: PathBuf,
        idx: usize,
        join: bool,
        shared: Arc<Shared>,
    ) -> thread::JoinHandle<Result<Vec<f32>, ClientError>> {
        thread::spawn(move || {
            let me = idx as u32 + 1;
            let mut c = Client::connect(&socket)?;
            let mut state = vec![0.0f32; DIM + 1];
            if join {
                c.join(&mut state)?;
            }
            loop {
                let step = state[DIM] as u64;
                if step >= shared.stop_at.load(Ordering::SeqCst) {
                    return Ok(state);
                }
                let slow = *shared.slow_step.lock().unwrap();
                if let Some((_, _, long)) = slow.filter(|&(i, at, _)| i == idx && at == step) {
                    thread::sleep(long);
                }
                let g = gradient(me, step, &state[..DIM]);
                shared.grads.lock().unwrap().insert((me, step), g.clone());
                let mut sum = g;
                let info = match c.all_reduce(&mut sum, ReduceOp::Sum) {
                    Ok(info) => info,
                    Err(ClientError::NoQuorum(_)) => {
                        {
                            let mut nq = shared.no_quorum[idx].lock().unwrap();
                            nq.0.get_or_insert_with(std::time::Instant::now);
                            nq.1.push(step);
                        }
                        c.join(&mut state)?;
                        continue;
                    }
                    Err(e) => {
                        *shared.ended_at[idx].lock().unwrap() = Some(step);
                        return Err(e);
                    }
                };
                {
                    let grads = shared.grads.lock().unwrap();
                    // The sum starts from the first contributor's gradient,
                    // not from +0.0: a lone -0.0 stays -0.0 (+0.0 + -0.0 is
                    // +0.0), as it does in the daemon's reduction. The
                    // gradients are multiples of 1/16, so the order of the
                    // other additions does not matter.
                    let mut want: Option<Vec<f32>> = None;
                    for m in &info.contributors {
                        let theirs = grads
                            .get(&(m.0, step))
                            .unwrap_or_else(|| panic!("no gradient of {m} for step {step}"));
                        match want.as_mut() {
                            None => want = Some(theirs.clone()),
                            Some(w) => {
                                for (w, t) in w.iter_mut().zip(theirs) {
                                    *w += t;
                                }
                            }
                        }
                    }
                    let want = want.expect("a result has contributors");
                    if !want
                        .iter()
                        .zip(&sum)
                        .all(|(a, b)| a.to_bits() == b.to_bits())
                    {
                        let others: Vec<(u32, f32)> = grads
                            .iter()
                            .filter(|((_, st), _)| *st == step)
                            .map(|((m, _), g)| (*m, g[0]))
                            .collect();
                        let at = want
                            .iter()
                            .zip(&sum)
                            .position(|(a, b)| a.to_bits() != b.to_bits())
                            .expect("a difference");
                        panic!(
                            "member {me} step {step} ({} in {}): the result is not the sum over its \
                             contributors {:?}: first difference at [{at}]: result {} want {}; \
                             step's gradients[0]: {others:?}",
                            info.op, info.epoch, info.contributors, sum[at], want[at]
                        );
                    }
                }
                let k = info.contributors.len() as f32;
                for (w, s) in state[..DIM].iter_mut().zip(&sum) {
                    *w -= LR * s / k;
                }
                state[DIM] += 1.0;
                shared.progress[idx].store(step + 1, Ordering::SeqCst);
                shared.results.lock().unwrap().push((
                    idx,
                    step,
                    info.epoch.0,
                    info.contributors.clone(),
                ));
                if !info.waiting.is_empty() {
                    c.admit(&mut state)?;
                }
            }
        })
    }

    /// Waits (polling an event, generous bound) until `cond` holds.
    pub fn wait_until(what: &str, bound_s: u64, mut cond: impl FnMut() -> bool) {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(bound_s),
                "{what}: not within {bound_s} s"
            );
            thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// No split brain: every completion of a step names the same
    /// contributors. Two exceptions, by design, both of a result nobody
    /// combines with anything: a member cut off (or falsely suspected) just
    /// as an op completed may have completed it while the others re-ran it
    /// without its last frames (it is fenced, its next call fails with
    /// `NoQuorum`, and it rejoins with the group's state, discarding it);
    /// and a member killed just as an op completed may have received the
    /// last frames while no survivor did (its trainer's next call fails and
    /// it ends). Such a result is printed, not counted.
    pub fn assert_one_history(shared: &Shared) {
        let results = shared.results.lock().unwrap();
        let last_before_failing = |idx: usize, step: u64| {
            shared.no_quorum[idx]
                .lock()
                .unwrap()
                .1
                .contains(&(step + 1))
                || *shared.ended_at[idx].lock().unwrap() == Some(step + 1)
        };
        let (orphans, counted): (Vec<&StepResult>, Vec<&StepResult>) =
            results.iter().partition(|r| last_before_failing(r.0, r.1));
        let mut agreed: HashMap<u64, &StepResult> = HashMap::new();
        for r in counted {
            let first = agreed.entry(r.1).or_insert(r);
            assert_eq!(
                first.3,
                r.3,
                "step {} completed with different contributors: m{} saw {:?}, m{} saw {:?}",
                r.1,
                first.0 + 1,
                first.3,
                r.0 + 1,
                r.3
            );
        }
        for r in orphans {
            if let Some(a) = agreed.get(&r.1).filter(|a| a.3 != r.3) {
                eprintln!(
                    "step {}: m{}'s last result before its call failed names {:?}, the group's \
                     names {:?} (nobody combines it with anything)",
                    r.1,
                    r.0 + 1,
                    r.3,
                    a.3
                );
            }
        }
    }

    /// Stops every trainer `margin` steps past the furthest one, waits for
    /// them all to finish, and checks that they end bit-identical with one
    /// history.
    #[allow(dead_code)] // not every test file that includes this module needs it
    pub fn finish_all(
        shared: &Shared,
        trainers: Vec<thread::JoinHandle<Result<Vec<f32>, ClientError>>>,
        margin: u64,
    ) {
        shared.stop_soon(margin);
        let finished: Vec<(usize, Vec<f32>)> = trainers
            .into_iter()
            .enumerate()
            .map(|(i, t)| (i, t.join().unwrap().expect("every trainer finishes")))
            .collect();
        assert_identical(&finished);
        assert_one_history(shared);
    }

    /// Asserts the states are bit-for-bit identical.
    pub fn assert_identical(states: &[(usize, Vec<f32>)]) {
        let (first_idx, first) = &states[0];
        for (idx, s) in &states[1..] {
            assert!(
                s.iter().zip(first).all(|(a, b)| a.to_bits() == b.to_bits()),
                "member {} and member {} hold different parameters",
                idx + 1,
                first_idx + 1
            );
        }
    }
}
