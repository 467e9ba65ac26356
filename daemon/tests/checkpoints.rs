//! Checkpoints with real daemons: trainers save their state every 10 steps
//! while they train; every daemon and trainer is SIGKILLed; the daemons
//! restart, each trainer restores exactly the state of the latest
//! committed checkpoint from its daemon's store, joins, and the training
//! goes on from there to the very state it had reached before the kill.

mod common;

use std::time::Duration;

use phalanx_client::{Client, ClientError, ReduceOp};
use phalanx_testkit::{LocalCluster, KILL};

/// Elements of state: 4 MiB of f32, so a copy spans several chunks.
const STATE: usize = 1 << 20;

/// Trains `steps` steps from `state` (each adds the all-reduced step
/// gradient to it) and checkpoints after every 10th, waiting for the
/// commit. Returns the state and what the commits said.
fn train(
    client: &mut Client,
    state: &mut [f32],
    steps: std::ops::RangeInclusive<u64>,
) -> Vec<String> {
    let mut said = Vec::new();
    for step in steps {
        one_step(client, state, step);
        if step.is_multiple_of(10) {
            client.checkpoint(state, step).unwrap();
            said.push(client.wait_checkpoint(step).unwrap());
        }
    }
    said
}

fn cluster(members: usize, replicas: usize) -> LocalCluster {
    common::cluster_with(
        members,
        "",
        &format!("\n[checkpoint]\nreplicas = {replicas}\nkeep = 2"),
    )
}

#[test]
fn after_every_daemon_and_trainer_is_killed_each_trainer_restores_the_latest_committed_checkpoint()
{
    let _serial = common::one_at_a_time();
    let mut cluster = cluster(3, 3);
    let sockets: Vec<_> = cluster.members.iter().map(|m| m.socket.clone()).collect();
    // Each trainer trains 30 steps (checkpoints at 10, 20, 30), then 5 more
    // that no checkpoint holds, then waits to be killed with its daemon.
    let (at30_tx, at30_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let trainers: Vec<_> = sockets
        .iter()
        .cloned()
        .map(|socket| {
            let (at30, done) = (at30_tx.clone(), done_tx.clone());
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket).unwrap();
                let mut state = vec![1.0f32; STATE];
                let said = train(&mut client, &mut state, 1..=30);
                at30.send(state.clone()).unwrap();
                // Past the last checkpoint: lost with the kill, redone after.
                train_only(&mut client, &mut state, 31..=35);
                done.send((said, state)).unwrap();
                // Every later call fails once the daemon is killed.
                loop {
                    let mut x = [0f32; 4];
                    if client.all_reduce(&mut x, ReduceOp::Sum).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    let at30: Vec<Vec<f32>> = (0..3)
        .map(|_| at30_rx.recv_timeout(Duration::from_secs(120)).unwrap())
        .collect();
    assert!(
        at30.iter().all(|s| *s == at30[0]),
        "the trainers' states differ at step 30"
    );
    let mut at35 = Vec::new();
    for _ in 0..3 {
        let (said, state) = done_rx.recv_timeout(Duration::from_secs(120)).unwrap();
        assert_eq!(said.len(), 3, "three checkpoints committed");
        assert!(said.iter().all(|s| s.starts_with("committed")), "{said:?}");
        at35.push(state);
    }
    for i in 0..3 {
        cluster.signal(i, KILL).unwrap();
    }
    for t in trainers {
        t.join().unwrap();
    }
    for i in 0..3 {
        cluster.spawn(i).unwrap();
    }
    cluster.wait_ready(Duration::from_secs(60)).unwrap();
    let resumed: Vec<_> = sockets
        .iter()
        .cloned()
        .map(|socket| {
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket).unwrap();
                // The group state came back from the Raft log: the last two
                // checkpoints (keep = 2), each on all three members.
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                let list = loop {
                    let list = client.checkpoints().unwrap();
                    if list.len() == 2 || std::time::Instant::now() > deadline {
                        break list;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                };
                let mut small = vec![0f32; 16];
                let wrong_size = client.restore(&mut small);
                let mut state = vec![0f32; STATE];
                let step = client.restore(&mut state).unwrap();
                let restored = state.clone();
                // No trainer holds a newer state: the group resumes from
                // the restored one (or from a member that went on from it
                // first) and redoes the steps up to 35.
                client.join(&mut state).unwrap();
                let from = *state.last().unwrap() as u64;
                assert!(from >= 30, "joined with the state of step {from}");
                // Until step 35 at least, and on until a step every member
                // contributed to (all three have joined): the same step for
                // every trainer, as they see the same results.
                let mut last = from;
                loop {
                    last += 1;
                    if one_step(&mut client, &mut state, last) == 3 && last >= 35 {
                        break;
                    }
                }
                (list, wrong_size, step, restored, (last, state))
            })
        })
        .collect();
    // What steps 31 on make of step 30's state: what the trainers reached
    // before the kill, and must reach again.
    let mut expected = at30[0].clone();
    for step in 31..=35 {
        update(&mut expected, step);
    }
    assert!(
        at35.iter().all(|s| *s == expected),
        "before the kill, step 35's state"
    );
    let mut ends = Vec::new();
    for (i, t) in resumed.into_iter().enumerate() {
        let (list, wrong_size, step, restored, (last, state)) = t.join().unwrap();
        ends.push(last);
        let steps: Vec<u64> = list.iter().map(|c| c.step).collect();
        assert_eq!(steps, vec![20, 30], "member {i}");
        assert!(
            list.iter()
                .all(|c| c.holders.len() == 3 && c.bytes == (STATE * 4) as u64),
            "{list:?}"
        );
        match wrong_size {
            Err(ClientError::BadRequest(why)) => {
                assert!(why.contains("holds 4194304 bytes"), "{why}")
            }
            other => panic!("a buffer of the wrong size: {other:?}"),
        }
        assert_eq!(step, 30, "member {i} restored step {step}");
        assert!(
            restored == at30[0],
            "member {i}'s restored state is not step 30's"
        );
        let mut want = at30[0].clone();
        for s in 31..=last {
            update(&mut want, s);
        }
        assert!(
            state == want,
            "member {i} resumed to another state at step {last}"
        );
    }
    assert!(
        ends.iter().all(|e| *e == ends[0]),
        "the trainers ended at {ends:?}"
    );
}

/// Trains `steps` steps without checkpointing.
fn train_only(client: &mut Client, state: &mut [f32], steps: std::ops::RangeInclusive<u64>) {
    for step in steps {
        one_step(client, state, step);
    }
}

/// One step: the state's last element is its step; members waiting for
/// the state are handed it, as the README's loop does. Returns how many
/// members contributed.
fn one_step(client: &mut Client, state: &mut [f32], step: u64) -> usize {
    let mut grad = vec![step as f32 * 0.25; 1024];
    // A mean of equal inputs is exact whoever contributed (a member still
    // joining, say), so every member's state follows `update`.
    let info = client.all_reduce(&mut grad, ReduceOp::Mean).unwrap();
    assert!(grad.iter().all(|g| *g == step as f32 * 0.25));
    update(state, step);
    if !info.waiting.is_empty() {
        client.admit(state).unwrap();
    }
    info.contributors.len()
}

/// What a step does to the state.
fn update(state: &mut [f32], step: u64) {
    let (counter, rest) = state.split_last_mut().unwrap();
    for (i, s) in rest.iter_mut().enumerate() {
        *s += step as f32 * 0.25 + (i % 7) as f32;
    }
    *counter = step as f32;
}

#[test]
fn a_checkpoint_commits_on_two_holders_and_a_step_must_be_later() {
    let _serial = common::one_at_a_time();
    let cluster = cluster(3, 2);
    let trainers: Vec<_> = cluster
        .members
        .iter()
        .map(|m| {
            let socket = m.socket.clone();
            std::thread::spawn(move || {
                let mut client = Client::connect(&socket).unwrap();
                let mut state = vec![0.5f32; 4096];
                let said = train(&mut client, &mut state, 1..=10);
                let again = client.checkpoint(&state, 10);
                let list = client.checkpoints().unwrap();
                // A step nobody checkpointed gets an answer, not a wait.
                let never = client.wait_checkpoint(15);
                (said, again, list, never)
            })
        })
        .collect();
    for t in trainers {
        let (said, again, list, never) = t.join().unwrap();
        match never {
            Err(ClientError::Checkpoint(why)) => {
                assert!(why.contains("no checkpoint of step 15"), "{why}")
            }
            other => panic!("waiting for a step never checkpointed: {other:?}"),
        }
        assert!(said[0].starts_with("committed"), "{said:?}");
        match again {
            Err(ClientError::BadRequest(why)) => assert!(why.contains("must be later"), "{why}"),
            other => panic!("checkpointing step 10 twice: {other:?}"),
        }
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].step, 10);
        assert_eq!(
            list[0].holders.len(),
            2,
            "checkpoint.replicas = 2: {list:?}"
        );
    }
    // What `phalanxctl checkpoints` prints: stream, step, epoch, bytes,
    // chunks, holders.
    let table = phalanx_testkit::http_get(cluster.members[0].metrics, "/checkpoints").unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with("0 "))
        .unwrap_or_else(|| panic!("no row for stream 0:\n{table}"));
    let words: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (words[1], words[3], words[4]),
        ("10", "16384", "1"),
        "{table}"
    );
    assert_eq!(
        words[5..].join(" ").matches('m').count(),
        2,
        "two holders: {table}"
    );
    drop(cluster);
}
