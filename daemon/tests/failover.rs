//! Failures during training, with real `phalanxd` processes on 127.0.0.x:
//! five members run the small model of `common::training`; members are
//! SIGKILLed (the Raft leader among them), restarted, cut off. After each,
//! every step's result is exactly the sum over the contributors the daemon
//! reported (checked inside the trainers), and the replicas that finish hold
//! bit-for-bit identical parameters.

mod common;

use std::sync::atomic::Ordering;

use common::training::{self, Shared};
use phalanx_testkit::{LocalCluster, KILL};

fn start(members: usize, control: &str) -> (LocalCluster, std::sync::Arc<Shared>) {
    let cluster = common::cluster_with(
        members,
        "heartbeat_interval_ms = 100\nsuspect_after_ms = 400",
        control,
    );
    (cluster, Shared::new(members))
}

/// Trainers' handles, in member order.
type Trainers = Vec<std::thread::JoinHandle<Result<Vec<f32>, phalanx_client::ClientError>>>;

/// `members` daemons whose trainers have done 20 steps.
fn training_group(members: usize) -> (LocalCluster, std::sync::Arc<Shared>, Trainers) {
    let (cluster, shared) = start(members, "");
    let trainers = (0..members)
        .map(|i| trainer(&cluster, i, false, &shared))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 20);
    (cluster, shared, trainers)
}

/// The trainer of member index `i` (joining first when `join`).
fn trainer(
    cluster: &LocalCluster,
    i: usize,
    join: bool,
    shared: &std::sync::Arc<Shared>,
) -> std::thread::JoinHandle<Result<Vec<f32>, phalanx_client::ClientError>> {
    training::spawn(cluster.members[i].socket.clone(), i, join, shared.clone())
}

fn leader(cluster: &LocalCluster, asking: usize) -> usize {
    let id = cluster
        .metric(asking, "phalanx_raft_leader")
        .expect("leader metric") as u32;
    cluster
        .members
        .iter()
        .position(|m| m.id == id)
        .expect("a member leads")
}

/// Stops the trainers soon, checks they all finished with one history and
/// identical replicas, and that no daemon removed anyone over `fault`.
fn finish_with_no_removal(
    cluster: &LocalCluster,
    shared: &std::sync::Arc<Shared>,
    trainers: Trainers,
    fault: &str,
) {
    shared.stop_soon(5);
    let mut finished = Vec::new();
    for (i, t) in trainers.into_iter().enumerate() {
        match t.join().expect("trainer thread") {
            Ok(state) => finished.push((i, state)),
            Err(e) => panic!("m{} failed: {e}", i + 1),
        }
    }
    training::assert_identical(&finished);
    training::assert_one_history(shared);
    for m in &cluster.members {
        let log = std::fs::read_to_string(&m.log).unwrap();
        assert!(
            !log.contains("member removed"),
            "m{}'s log records a removal: {fault} is not a failure",
            m.id
        );
    }
}

#[test]
fn killing_a_member_then_the_raft_leader_during_training() {
    let _serial = common::one_at_a_time();
    let (mut cluster, shared, trainers) = training_group(5);
    // A member in the middle of an all-reduce.
    common::wait_for_op_in_flight(&cluster, 3);
    cluster.signal(3, KILL).unwrap();
    let after_kill = shared.max_step();
    training::wait_until("steps without m4", 60, || {
        shared.max_step() >= after_kill + 20
    });
    // Now the Raft leader (whichever member it is among the survivors).
    let asker = if leader(&cluster, 0) == 0 { 1 } else { 0 };
    let victim = leader(&cluster, asker);
    assert_ne!(victim, 3);
    cluster.signal(victim, KILL).unwrap();
    let after_leader = shared.max_step();
    training::wait_until("steps without the old leader", 60, || {
        shared.max_step() >= after_leader + 20
    });
    shared.stop_soon(5);
    let mut finished = Vec::new();
    for (i, t) in trainers.into_iter().enumerate() {
        match t.join().expect("trainer thread") {
            Ok(state) => finished.push((i, state)),
            Err(e) => assert!(i == 3 || i == victim, "survivor m{} failed: {e}", i + 1),
        }
    }
    assert_eq!(finished.len(), 3, "three survivors finish");
    training::assert_identical(&finished);
    training::assert_one_history(&shared);
    let results = shared.results.lock().unwrap();
    let last = results.iter().rfind(|r| r.0 == finished[0].0).unwrap();
    assert_eq!(
        last.3.len(),
        3,
        "the last steps combine the three survivors: {last:?}"
    );
    let epochs: std::collections::BTreeSet<u64> = results.iter().map(|r| r.2).collect();
    assert!(
        epochs.len() >= 3,
        "two failovers, three epochs at least: {epochs:?}"
    );
}

// Issue 13, item 6: nobody was judged during the start-up grace, so a
// member killed just after the group formed was removed only after it (2 s
// by default; here two minutes, longer than the test waits). Its peers had
// heard its heartbeats: they judge it at once.
#[test]
fn a_member_killed_during_the_start_up_grace_is_removed_at_once() {
    let _serial = common::one_at_a_time();
    let mut cluster = common::cluster_with(
        3,
        "heartbeat_interval_ms = 100\nsuspect_after_ms = 400\nstartup_grace_ms = 120000",
        "",
    );
    let shared = Shared::new(3);
    let trainers: Vec<_> = (0..3)
        .map(|i| trainer(&cluster, i, false, &shared))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 5);
    cluster.signal(2, KILL).unwrap();
    let after_kill = shared.max_step();
    training::wait_until("steps without m3, well within the grace", 60, || {
        shared.max_step() >= after_kill + 20
    });
    shared.stop_soon(5);
    let mut finished = Vec::new();
    for (i, t) in trainers.into_iter().enumerate() {
        match t.join().expect("trainer thread") {
            Ok(state) => finished.push((i, state)),
            Err(e) => assert_eq!(i, 2, "survivor m{} failed: {e}", i + 1),
        }
    }
    assert_eq!(finished.len(), 2, "both survivors finish");
    training::assert_identical(&finished);
    training::assert_one_history(&shared);
    let log = std::fs::read_to_string(&cluster.members[0].log).unwrap();
    assert!(
        log.contains("no heartbeat for"),
        "m1's log gives the heartbeat silence as the reason"
    );
}

// Issue 13, item 7: faults the way networks fail. A connection between two
// live members is dropped while they train, again and again, with what is
// in flight on it; nobody is suspected, so no new epoch came, and both ends
// waited for frames that were gone (the cluster simulator wedged 9 of 400
// seeds so). Each end now asks for a new epoch with the same ring, and the
// ops are finished again there: no trainer sees an error.
#[test]
fn connections_dropped_mid_training_cost_no_trainer_an_error() {
    let _serial = common::one_at_a_time();
    let (cluster, shared, trainers) = training_group(4);
    let dropped = || {
        std::fs::read_to_string(&cluster.members[0].log)
            .unwrap()
            .matches("fault injection: dropping the connections")
            .count()
    };
    for round in 0..8 {
        common::wait_for_op_in_flight(&cluster, 0);
        cluster
            .drop_connections(0, cluster.members[1 + round % 3].id)
            .unwrap();
        training::wait_until("the gate drops the connections", 60, || dropped() > round);
        let at = shared.max_step();
        training::wait_until("steps after a dropped connection", 60, || {
            shared.max_step() >= at + 10
        });
    }
    // Before, each lost frame stalled the group until the progress signal
    // removed the members waiting on it (30 s), and their trainers joined
    // again.
    finish_with_no_removal(&cluster, &shared, trainers, "a dropped connection");
}

// The CI run of stop 23 (continuity benchmark): the hello of a connection
// its dialer had given up finished at the acceptor after its replacement's,
// took over the control route and the link's slot, then closed. The
// acceptor's recovery reports, Raft messages and frames no longer reached
// the dialer, only heartbeats did, and the dialer's trainer waited on the
// recovery exchange until it failed.
#[test]
fn a_connection_given_up_whose_start_comes_late_takes_over_nothing() {
    let _serial = common::one_at_a_time();
    let (cluster, shared, trainers) = training_group(3);
    // The lower id dials: member 1 dials member 3.
    let (dialer, acceptor) = (0, 2);
    let (dialer_id, acceptor_id) = (cluster.members[dialer].id, cluster.members[acceptor].id);
    let logged = |i: usize, what: &str| {
        std::fs::read_to_string(&cluster.members[i].log)
            .unwrap()
            .contains(what)
    };
    cluster
        .stall_next_connection(acceptor, dialer_id, std::time::Duration::from_secs(3))
        .unwrap();
    training::wait_until("the gate arms the stall", 60, || {
        logged(acceptor, "the next connection from the peer will be held")
    });
    // The dialer redials; the acceptor holds the new connection's start...
    cluster.drop_connections(dialer, acceptor_id).unwrap();
    training::wait_until("the acceptor holds the connection", 60, || {
        logged(acceptor, "holding an accepted connection")
    });
    // ...while the dialer gives it up for another, which starts at once.
    cluster.drop_connections(dialer, acceptor_id).unwrap();
    training::wait_until("the given-up connection starts late", 60, || {
        logged(acceptor, "the held connection starts now")
    });
    // Its tasks run at once; before, the steps stopped within milliseconds.
    let late = shared.max_step();
    training::wait_until("steps after the late start", 60, || {
        shared.max_step() >= late + 300
    });
    // A new epoch: its recovery exchange needs the acceptor's report at the
    // dialer.
    common::wait_for_op_in_flight(&cluster, dialer);
    cluster
        .drop_connections(dialer, cluster.members[1].id)
        .unwrap();
    let at = shared.max_step();
    training::wait_until("steps in the new epoch", 60, || {
        shared.max_step() >= at + 100
    });
    finish_with_no_removal(&cluster, &shared, trainers, "a late connection start");
}

// Issue 13, item 7: latency, the way networks slow down. m1's links are
// made slow both ways while the group trains (150 ms, then 300 ms each way:
// every jump leaves a gap in the heartbeats, under the 400 ms bound), then
// fast again while an op is in flight, which must let nothing overtake what
// was held. A slow link is not a dead member: no trainer sees an error and
// nobody is removed.
#[test]
fn slow_links_cost_no_trainer_an_error_and_remove_nobody() {
    let _serial = common::one_at_a_time();
    let (cluster, shared, trainers) = training_group(4);
    let m1 = cluster.members[0].id;
    let logged = |i: usize| {
        std::fs::read_to_string(&cluster.members[i].log)
            .unwrap()
            .matches("fault injection: delays of traffic from peers set")
            .count()
    };
    let slow = |ms: u64| {
        let delay = std::time::Duration::from_millis(ms);
        let before: Vec<usize> = (0..4).map(logged).collect();
        for i in 1..4 {
            cluster.delay(0, cluster.members[i].id, delay).unwrap();
            cluster.delay(i, m1, delay).unwrap();
        }
        training::wait_until("the gates take the delay", 60, || {
            (0..4).all(|i| logged(i) > before[i])
        });
    };
    for (ms, steps) in [(150, 10), (300, 6)] {
        slow(ms);
        let (at, since) = (shared.max_step(), std::time::Instant::now());
        training::wait_until("steps over slow links", 120, || {
            shared.max_step() >= at + steps
        });
        // The others' contributions to a step cross a slow link into m1
        // after m1's to the step before crossed one out of it: a delay a
        // step at least, less a pair of steps for what was on its way when
        // the delay came (a lower bound, whatever the load or algorithm).
        let least = std::time::Duration::from_millis(ms * (steps - 2));
        assert!(
            since.elapsed() >= least,
            "{steps} steps with m1's links at {ms} ms took {:?}, under {least:?}",
            since.elapsed()
        );
    }
    common::wait_for_op_in_flight(&cluster, 0);
    slow(0);
    let at = shared.max_step();
    training::wait_until("steps once the links are fast again", 60, || {
        shared.max_step() >= at + 50
    });
    finish_with_no_removal(&cluster, &shared, trainers, "a slow link");
}

// Issue 13, item 3: with many daemons sharing the cores, a healthy member
// was removed for "no heartbeat for 401 ms". m3's daemon runs in bursts, as
// a starved process does: SIGSTOPped for 100 ms, then 25 ms longer each
// time up to 350 ms, running 150 ms between, for 8 s; its heartbeats come
// up to 450 ms apart. Its peers' bounds follow its gaps: nobody is removed
// and no trainer sees an error.
#[test]
fn a_daemon_starved_in_growing_bursts_is_not_removed() {
    let _serial = common::one_at_a_time();
    let (mut cluster, shared, trainers) = training_group(4);
    let ms = std::time::Duration::from_millis;
    let (mut stop, until) = (ms(100), std::time::Instant::now() + ms(8_000));
    while std::time::Instant::now() < until {
        cluster.signal(2, rustix::process::Signal::STOP).unwrap();
        std::thread::sleep(stop);
        cluster.signal(2, rustix::process::Signal::CONT).unwrap();
        std::thread::sleep(ms(150));
        stop = (stop + ms(25)).min(ms(350));
    }
    let at = shared.max_step();
    training::wait_until("steps after the starving", 60, || {
        shared.max_step() >= at + 20
    });
    finish_with_no_removal(&cluster, &shared, trainers, "a starved daemon");
}

#[test]
fn a_killed_member_restarts_and_rejoins_with_the_trainers_state() {
    let _serial = common::one_at_a_time();
    let (mut cluster, shared) = start(5, "");
    let mut trainers: Vec<_> = (0..5)
        .map(|i| Some(trainer(&cluster, i, false, &shared)))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 20);
    cluster.signal(4, KILL).unwrap();
    let killed_trainer = trainers[4].take().unwrap();
    assert!(killed_trainer.join().unwrap().is_err());
    let after_kill = shared.max_step();
    training::wait_until("steps without m5", 60, || {
        shared.max_step() >= after_kill + 10
    });
    // Back in a new life: the daemon asks to be readmitted when its trainer
    // joins, and the trainer receives the live trainers' state.
    cluster.spawn(4).unwrap();
    cluster
        .wait_ready(std::time::Duration::from_secs(60))
        .unwrap();
    let joiner_from = shared.max_step();
    trainers[4] = Some(trainer(&cluster, 4, true, &shared));
    training::wait_until("the restarted member trains again", 60, || {
        shared.progress[4].load(Ordering::SeqCst) > joiner_from
    });
    shared.stop_soon(10);
    let finished: Vec<(usize, Vec<f32>)> = trainers
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            (
                i,
                t.unwrap().join().unwrap().expect("every trainer finishes"),
            )
        })
        .collect();
    training::assert_identical(&finished);
    training::assert_one_history(&shared);
    let results = shared.results.lock().unwrap();
    let last = results.iter().rfind(|r| r.0 == 0).unwrap();
    assert_eq!(last.3.len(), 5, "all five contribute again: {last:?}");
    let log = std::fs::read_to_string(&cluster.members[4].log).unwrap();
    assert!(
        log.contains("trainer joined"),
        "the joiner's log does not say so"
    );
}

// The heal reaches the members one by one (each polls its fault file), so
// the recovery report of the epoch that readmits the cut-off member can be
// dropped by a member that still fences it off: this test caught that the
// exchange then waited forever (the daemons now ask for a missing report
// again), and that a trainer whose call failed while its daemon stayed in
// the ring waited in join() for a hand-over nobody sent (its daemon now
// leaves the ring to be readmitted as a joiner).
#[test]
fn a_member_cut_off_gets_no_quorum_then_rejoins_after_the_heal() {
    let _serial = common::one_at_a_time();
    // A short recovery bound so the cut-off member gives up quickly.
    let (cluster, shared) = start(5, "recovery_timeout_ms = 2000");
    let trainers: Vec<_> = (0..5)
        .map(|i| trainer(&cluster, i, false, &shared))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 20);
    let cut_at = std::time::Instant::now();
    cluster.cut(4, &[1, 2, 3, 4]).unwrap();
    // The minority side: its trainer's call fails with NoQuorum, in bound
    // (the trainer then calls join(), which waits for the heal).
    training::wait_until("NoQuorum on the cut-off member", 30, || {
        shared.no_quorum[4].lock().unwrap().0.is_some()
    });
    let waited = shared.no_quorum[4].lock().unwrap().0.unwrap() - cut_at;
    // The majority side goes on without it meanwhile.
    let during = shared.max_step();
    training::wait_until("the majority goes on", 60, || {
        shared.max_step() >= during + 10
    });
    cluster.cut(4, &[]).unwrap();
    let healed_at = shared.max_step();
    training::wait_until("the healed member trains again", 60, || {
        shared.progress[4].load(Ordering::SeqCst) > healed_at
    });
    training::finish_all(&shared, trainers, 10);
    eprintln!("cut-off member got NoQuorum after {waited:?}");
}

// Issue 13, item 3: a member removed while its trainer is in lockstep (its
// daemon stopped past the suspicion bound while its trainer computed, well
// within the recovery bound) failed its trainer's next call with NoQuorum
// once it heard of its removal, and the trainer had to join() and be handed
// the whole state. Now its daemon holds the call, is readmitted in the same
// life, receives the results the group completed meanwhile and serves them
// to its trainer: no error, and the same state as the others' at the end.
#[test]
fn a_member_stopped_past_its_suspicion_comes_back_in_lockstep_without_an_error() {
    stop_past_suspicion_and_resume(Some((20, std::time::Duration::from_millis(1500))));
}

/// Trains 5 members; SIGSTOPs m5's daemon once its trainer reached step
/// `during.0` (while it computes for `during.1`, or at once in the middle
/// of an all-reduce), until the others removed it and went on 10 steps;
/// resumes it and checks its trainer came back in lockstep without an
/// error. Returns the stopped daemon's count of doubts taken back.
fn stop_past_suspicion_and_resume(during: Option<(u64, std::time::Duration)>) -> Option<f64> {
    use rustix::process::Signal;
    let _serial = common::one_at_a_time();
    // A long recovery bound: nothing may give up before the daemon runs
    // again on a slow machine.
    let (mut cluster, shared) = start(5, "recovery_timeout_ms = 30000");
    let at = during.map_or(20, |(at, _)| at);
    if let Some((at, compute)) = during {
        *shared.slow_step.lock().unwrap() = Some((4, at, compute));
    }
    let trainers: Vec<_> = (0..5)
        .map(|i| trainer(&cluster, i, false, &shared))
        .collect();
    training::wait_until("m5's trainer reaches the step it is stopped at", 60, || {
        shared.progress[4].load(Ordering::SeqCst) >= at
    });
    cluster.signal(4, Signal::STOP).unwrap();
    training::wait_until("the others remove the stopped member", 60, || {
        cluster.metric(0, "phalanx_failovers_total").unwrap_or(0.0) >= 1.0
    });
    let during = shared.max_step();
    training::wait_until("the others go on", 60, || shared.max_step() >= during + 10);
    cluster.signal(4, Signal::CONT).unwrap();
    let resumed_at = shared.max_step();
    training::wait_until("the stopped member trains again", 60, || {
        shared.progress[4].load(Ordering::SeqCst) > resumed_at
    });
    training::finish_all(&shared, trainers, 10);
    let tail = || phalanx_testkit::tail(&cluster.members[4].log);
    assert_eq!(
        *shared.no_quorum[4].lock().unwrap(),
        (None, vec![]),
        "the stopped member's trainer saw NoQuorum:\n{}",
        tail()
    );
    let log = std::fs::read_to_string(&cluster.members[4].log).unwrap();
    assert!(
        log.contains("back in lockstep"),
        "its daemon does not say it came back in lockstep:\n{}",
        tail()
    );
    let returns = cluster.metric(4, "phalanx_returns_total{outcome=\"caught_up\"}");
    assert_eq!(returns, Some(1.0), "phalanx_returns_total:\n{}", tail());
    eprintln!("stopped at step {at}, resumed at step {resumed_at}: back in lockstep");
    cluster.metric(4, "phalanx_pause_doubts_total{outcome=\"removed\"}")
}

// Issue 13, item 2: three of five members SIGKILLed, the two survivors'
// trainers got NoQuorum and called join(); the three came back, every
// trainer now waited in join() for a live trainer to hand the state over,
// none existed, and after 60 s every join() failed — although the
// survivors' trainers held identical, current states. Now the joiners offer
// their states and the group resumes from the most advanced.
#[test]
fn after_a_lost_quorum_the_group_resumes_from_the_survivors_state() {
    let _serial = common::one_at_a_time();
    let (mut cluster, shared) = start(5, "recovery_timeout_ms = 2000");
    let mut trainers: Vec<_> = (0..5)
        .map(|i| Some(trainer(&cluster, i, false, &shared)))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 20);
    // The three Raft voters (the first three members): one at a time, the
    // group would replace each by a learner and keep its quorum.
    for i in 0..3 {
        cluster.signal(i, KILL).unwrap();
    }
    for t in &mut trainers[..3] {
        assert!(t.take().unwrap().join().unwrap().is_err());
    }
    training::wait_until("NoQuorum at both survivors", 60, || {
        (3..5).all(|i| shared.no_quorum[i].lock().unwrap().0.is_some())
    });
    let survivors_at = shared.progress[3]
        .load(Ordering::SeqCst)
        .min(shared.progress[4].load(Ordering::SeqCst));
    for i in 0..3 {
        cluster.spawn(i).unwrap();
    }
    cluster
        .wait_ready(std::time::Duration::from_secs(60))
        .unwrap();
    let restarted_from = shared.results.lock().unwrap().len();
    for (i, t) in trainers.iter_mut().enumerate().take(3) {
        *t = Some(trainer(&cluster, i, true, &shared));
    }
    training::wait_until("all five train again", 60, || {
        let results = shared.results.lock().unwrap();
        (0..5).all(|i| results[restarted_from..].iter().any(|r| r.0 == i))
    });
    let first_step = shared.results.lock().unwrap()[restarted_from..]
        .iter()
        .map(|r| r.1)
        .min()
        .unwrap();
    assert!(
        first_step >= survivors_at,
        "the group resumed at step {first_step}, the survivors held step {survivors_at}'s state"
    );
    training::finish_all(
        &shared,
        trainers.into_iter().map(Option::unwrap).collect(),
        10,
    );
    // A survivor's trainer held the most advanced state; its daemon says
    // it handed it over (the others may have received it before they
    // heard every offer themselves).
    let roots = (3..5)
        .filter(|&i| {
            std::fs::read_to_string(&cluster.members[i].log)
                .unwrap()
                .contains("the group resumes from this trainer's state")
        })
        .count();
    assert!(
        roots >= 1,
        "no survivor's log says it handed its state over"
    );
}

/// Elements of the state the hand-over test's trainers hold (128 MiB of
/// f32): large enough that the root is killed while it sends.
const BIG_STATE: usize = 32 << 20;

/// The state every trainer of the hand-over test holds (a step counter is
/// kept apart: this test is about the bytes arriving intact).
fn big_state() -> Vec<f32> {
    (0..BIG_STATE).map(|i| (i % 1021) as f32 * 0.5).collect()
}

/// A trainer of the hand-over test: optionally joins (and checks what
/// arrived), then steps a small all-reduce, handing its state over when a
/// result reports members waiting, until `stop`. Counts its steps in `steps`.
fn big_state_trainer(
    socket: std::path::PathBuf,
    join: bool,
    steps: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut c = phalanx_client::Client::connect(&socket).map_err(|e| e.to_string())?;
        let mut state = if join {
            vec![0.0; BIG_STATE]
        } else {
            big_state()
        };
        if join {
            c.join(&mut state).map_err(|e| format!("join: {e}"))?;
            if state != big_state() {
                return Err("the joiner's state differs from the live trainers'".into());
            }
        }
        while !stop.load(Ordering::SeqCst) {
            let mut g = vec![1.0f32; 256];
            let info = c
                .all_reduce(&mut g, phalanx_client::ReduceOp::Sum)
                .map_err(|e| format!("all_reduce: {e}"))?;
            steps.fetch_add(1, Ordering::SeqCst);
            if !info.waiting.is_empty() {
                c.admit(&mut state).map_err(|e| format!("admit: {e}"))?;
            }
        }
        Ok(())
    })
}

// Issue 13, item 3: the runner ran on a worker thread, and its node's work
// is synchronous; busy for most of a second (a 128 MiB hand-over's copies
// and checksums on the loaded test machine took 460-930 ms), it held up the
// tasks behind it, heartbeats included, and its peers removed the healthy
// member ("no heartbeat for 401 ms"). The runner has a thread of its own.
// One worker thread makes the old failure certain: nothing else ran.
#[test]
fn a_busy_runner_does_not_silence_its_daemons_heartbeats() {
    let _serial = common::one_at_a_time();
    let cluster = common::cluster_started(
        3,
        "heartbeat_interval_ms = 100\nsuspect_after_ms = 400",
        "",
        false,
        &["--worker-threads", "1"],
    );
    let shared = Shared::new(3);
    let trainers: Trainers = (0..3)
        .map(|i| trainer(&cluster, i, false, &shared))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 20);
    cluster
        .keep_runner_busy(1, std::time::Duration::from_millis(1500))
        .unwrap();
    let log = cluster.members[1].log.clone();
    training::wait_until("the runner is busy and done", 60, || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("the runner is no longer busy")
    });
    let done = shared.max_step();
    training::wait_until("training goes on", 60, || shared.max_step() >= done + 20);
    for m in &cluster.members {
        let log = std::fs::read_to_string(&m.log).unwrap_or_default();
        assert!(
            !log.contains("member removed"),
            "member {} saw a removal although every member lives:\n{}",
            m.id,
            phalanx_testkit::tail(&m.log)
        );
    }
    training::finish_all(&shared, trainers, 10);
}

// Issue 13, item 1: the survivors' trainers re-ran the hand-over as planned,
// but every re-run broadcast whose root was gone failed, and with it every
// live trainer's admit(). Every live trainer holds the same state: the
// hand-over goes on from the next holder, and the joiner waits for it.
#[test]
fn a_hand_over_whose_source_dies_goes_on_from_another_holder() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    use std::sync::Arc;
    let _serial = common::one_at_a_time();
    let (mut cluster, _) = start(5, "");
    let stop = Arc::new(AtomicBool::new(false));
    let steps: Vec<Arc<AtomicU64>> = (0..5).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut trainers: Vec<_> = (0..4)
        .map(|i| {
            Some(big_state_trainer(
                cluster.members[i].socket.clone(),
                false,
                steps[i].clone(),
                stop.clone(),
            ))
        })
        .collect();
    // m5 comes in late, as a restarted member does: its trainer joins.
    cluster
        .terminate(4, std::time::Duration::from_secs(30))
        .unwrap();
    training::wait_until("warm-up", 60, || steps[1].load(Ordering::SeqCst) >= 10);
    cluster.spawn(4).unwrap();
    cluster
        .wait_ready(std::time::Duration::from_secs(60))
        .unwrap();
    let joiner = big_state_trainer(
        cluster.members[4].socket.clone(),
        true,
        steps[4].clone(),
        stop.clone(),
    );
    // The root (m1, the lowest holder) dies as soon as it starts sending.
    let root_log = cluster.members[0].log.clone();
    training::wait_until("the hand-over starts", 60, || {
        std::fs::read_to_string(&root_log)
            .unwrap_or_default()
            .contains("handing the trainers' state to a joining member")
    });
    cluster.signal(0, KILL).unwrap();
    let root_trainer = trainers[0].take().unwrap();
    training::wait_until("the joiner trains", 90, || {
        steps[4].load(Ordering::SeqCst) >= 5
    });
    stop.store(true, Ordering::SeqCst);
    assert!(
        root_trainer.join().unwrap().is_err(),
        "the killed member's trainer fails"
    );
    for (i, t) in trainers.into_iter().enumerate().skip(1) {
        t.unwrap()
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("survivor m{} failed: {e}", i + 1));
    }
    joiner
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the joiner failed: {e}"));
    let went_on = (1..4).any(|i| {
        std::fs::read_to_string(&cluster.members[i].log)
            .unwrap_or_default()
            .contains("hand-over source is gone: handing over from another holder")
    });
    assert!(
        went_on,
        "the root died after its hand-over completed: nothing was re-run"
    );
}

// ... and stopped in the middle of an all-reduce: on resuming, its data
// path ran a moment before its control task had applied its removal, and
// frames that had waited in its socket completed ops the others, lacking
// its frames, re-ran without it; handed to the trainer, such a result was
// not the group's and the return was refused (4 of 5 runs). Now the daemon
// withholds what completes while it doubts its epoch, takes it back on
// hearing of its removal, and the group's version comes by catch-up.
#[test]
fn a_member_stopped_mid_all_reduce_comes_back_in_lockstep_without_an_error() {
    let taken_back = stop_past_suspicion_and_resume(None);
    assert_eq!(
        taken_back,
        Some(1.0),
        "phalanx_pause_doubts_total{{outcome=\"removed\"}}"
    );
}
