//! Forming and growing a group as on real nodes, with real `phalanxd`
//! processes on 127.0.0.x: `--bootstrap` on the first node and `--join ADDR`
//! on the others, whose configs list only themselves; and a new node joining
//! a group that is training. Every step's result is checked bit for bit
//! against the sum over its reported contributors, and the replicas compared
//! at the end.

mod common;

use std::sync::atomic::Ordering;

use common::training::{self, Shared};
use phalanx_testkit::http_get;

fn fast_detection() -> &'static str {
    "heartbeat_interval_ms = 100\nsuspect_after_ms = 3000"
}

fn voters(members_table: &str) -> usize {
    members_table
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("voter"))
        .count()
}

#[test]
fn a_group_bootstrapped_by_one_node_grows_by_join_and_trains() {
    let _serial = common::one_at_a_time();
    let cluster = common::cluster_formed(3, fast_detection(), "", true);
    let shared = Shared::new(3);
    // The joined nodes' trainers enter the ring through join() before
    // member 1's trainer issues its first step (the order a loaded machine
    // once produced: a stream with no history and joiners already in the
    // ring must still hand them the state); the other order is the next
    // test's.
    let joiners: Vec<_> = (1..3)
        .map(|i| training::spawn(cluster.members[i].socket.clone(), i, true, shared.clone()))
        .collect();
    training::wait_until("both joined nodes in the ring", 60, || {
        cluster.metric(0, "phalanx_members{status=\"active\"}") == Some(3.0)
    });
    let mut trainers = vec![training::spawn(
        cluster.members[0].socket.clone(),
        0,
        false,
        shared.clone(),
    )];
    trainers.extend(joiners);
    training::wait_until("every trainer trains", 120, || {
        shared
            .progress
            .iter()
            .all(|p| p.load(Ordering::SeqCst) >= 10)
    });
    training::finish_all(&shared, trainers, 10);
    let results = shared.results.lock().unwrap();
    let last = results.iter().rfind(|r| r.0 == 0).unwrap();
    assert_eq!(
        last.3.len(),
        3,
        "the last steps combine all three: {last:?}"
    );
    drop(results);
    // The leader promotes the joined nodes once they are in the ring:
    // three voters, as configured.
    let mut table = String::new();
    training::wait_until("three voters", 60, || {
        table = http_get(cluster.members[0].metrics, "/members").unwrap();
        voters(&table) == 3
    });
    for m in &cluster.members[1..] {
        let log = std::fs::read_to_string(&m.log).unwrap();
        assert!(
            log.contains("group state restored from a snapshot"),
            "member {} learnt the group from the leader's snapshot; its log:\n{log}",
            m.id
        );
    }
}

#[test]
fn a_new_node_joins_a_group_that_is_training() {
    let _serial = common::one_at_a_time();
    let mut cluster = common::cluster_with(3, fast_detection(), "");
    let shared = Shared::new(4);
    let mut trainers: Vec<_> = (0..3)
        .map(|i| training::spawn(cluster.members[i].socket.clone(), i, false, shared.clone()))
        .collect();
    training::wait_until("warm-up", 60, || shared.max_step() >= 10);
    let i = cluster.add_member().expect("a fourth node joins");
    assert_eq!(i, 3);
    trainers.push(training::spawn(
        cluster.members[3].socket.clone(),
        3,
        true,
        shared.clone(),
    ));
    let joined_at = shared.max_step();
    training::wait_until("the new node trains", 120, || {
        shared.progress[3].load(Ordering::SeqCst) > joined_at + 5
    });
    training::finish_all(&shared, trainers, 10);
    let results = shared.results.lock().unwrap();
    let last = results.iter().rfind(|r| r.0 == 3).unwrap();
    assert_eq!(last.3.len(), 4, "the last steps combine all four: {last:?}");
    drop(results);
    let log = std::fs::read_to_string(&cluster.members[3].log).unwrap();
    for what in [
        "group state restored from a snapshot",
        "received state verified",
    ] {
        assert!(
            log.contains(what),
            "the new node's log lacks {what:?}:\n{log}"
        );
    }
    let table = http_get(cluster.members[0].metrics, "/members").unwrap();
    let active = table
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("active"))
        .count();
    assert_eq!(active, 4, "members table:\n{table}");
}
