//! Failures during training, with real `phalanxd` processes on 127.0.0.x:
//! five members run the small model of `common::training`; members are
//! SIGKILLed (the Raft leader among them), restarted, cut off. After each,
//! every step's result is exactly the sum over the contributors the daemon
//! reported (checked inside the trainers), and the replicas that finish hold
//! bit-for-bit identical parameters.

mod common;

use std::sync::atomic::Ordering;

use common::training::{self, Shared};
use phalanx_client::ClientError;
use phalanx_daemon::cluster::{LocalCluster, KILL};

fn start(members: usize, control: &str) -> (LocalCluster, std::sync::Arc<Shared>) {
    let cluster = common::cluster_with(
        members,
        "heartbeat_interval_ms = 100\nsuspect_after_ms = 400",
        control,
    );
    (cluster, Shared::new(members))
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

#[test]
fn killing_a_member_then_the_raft_leader_during_training() {
    let (mut cluster, shared) = start(5, "");
    let trainers: Vec<_> = (0..5)
        .map(|i| training::spawn(cluster.members[i].socket.clone(), i, false, shared.clone()))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 20);
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

#[test]
fn a_killed_member_restarts_and_rejoins_with_the_trainers_state() {
    let (mut cluster, shared) = start(5, "");
    let mut trainers: Vec<_> = (0..5)
        .map(|i| {
            Some(training::spawn(
                cluster.members[i].socket.clone(),
                i,
                false,
                shared.clone(),
            ))
        })
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
    trainers[4] = Some(training::spawn(
        cluster.members[4].socket.clone(),
        4,
        true,
        shared.clone(),
    ));
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
    let results = shared.results.lock().unwrap();
    let last = results.iter().rfind(|r| r.0 == 0).unwrap();
    assert_eq!(last.3.len(), 5, "all five contribute again: {last:?}");
    let log = std::fs::read_to_string(&cluster.members[4].log).unwrap();
    assert!(
        log.contains("trainer joined"),
        "the joiner's log does not say so"
    );
}

#[test]
fn a_member_cut_off_gets_no_quorum_then_rejoins_after_the_heal() {
    // A short recovery bound so the cut-off member gives up quickly.
    let (cluster, shared) = start(5, "recovery_timeout_ms = 2000");
    let mut trainers: Vec<_> = (0..5)
        .map(|i| {
            Some(training::spawn(
                cluster.members[i].socket.clone(),
                i,
                false,
                shared.clone(),
            ))
        })
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 20);
    let cut_at = std::time::Instant::now();
    let m5_at_cut = shared.progress[4].load(Ordering::SeqCst);
    cluster.cut(4, &[1, 2, 3, 4]).unwrap();
    // The minority side: its trainer's call fails with NoQuorum, in bound.
    let err = trainers[4].take().unwrap().join().unwrap().unwrap_err();
    let waited = cut_at.elapsed();
    assert!(matches!(err, ClientError::NoQuorum(_)), "{err}");
    assert!(
        waited < std::time::Duration::from_secs(20),
        "took {waited:?}"
    );
    // The majority side went on without it meanwhile.
    let during = shared.max_step();
    training::wait_until("the majority goes on", 60, || {
        shared.max_step() >= during + 10
    });
    cluster.cut(4, &[]).unwrap();
    let joiner_from = shared.max_step();
    trainers[4] = Some(training::spawn(
        cluster.members[4].socket.clone(),
        4,
        true,
        shared.clone(),
    ));
    training::wait_until("the healed member trains again", 60, || {
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
    // No split brain: every completion of a step names the same
    // contributors. One exception, by design: the cut-off member may have
    // completed the op in flight at the cut (it had every input; the others
    // lost its last frames and re-ran the step without it). That result is
    // never combined with anything: the member is fenced, its next call
    // fails, and it rejoins with the majority's state, discarding it.
    let results = shared.results.lock().unwrap();
    let mut majority: std::collections::BTreeMap<u64, &Vec<phalanx_client::MemberId>> =
        Default::default();
    for r in results.iter().filter(|r| r.0 != 4) {
        let agreed = majority.entry(r.1).or_insert(&r.3);
        assert_eq!(
            *agreed, &r.3,
            "step {} completed with different contributors",
            r.1
        );
    }
    let fenced: Vec<u64> = results
        .iter()
        .filter(|r| r.0 == 4 && r.1 < joiner_from)
        .map(|r| r.1)
        .collect();
    let last_fenced = fenced.iter().max().copied();
    for r in results.iter().filter(|r| r.0 == 4) {
        if majority.get(&r.1).is_some_and(|m| **m != r.3) {
            assert!(
                r.1 >= m5_at_cut && Some(r.1) == last_fenced,
                "the cut-off member's step {} disagrees with the majority's and was not \
                 its last before being fenced",
                r.1
            );
        }
    }
    eprintln!("cut-off member got NoQuorum after {waited:?}");
}
