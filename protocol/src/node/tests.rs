//! The node's behaviours, each asserted as the exact actions it returns
//! (openraft's engine tests are the model). Time moves by the `now` handed in.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;
use crate::local::{LocalKind, StepMeta};
use crate::membership::{state_checksum, KeptResult};
use crate::stragglers::LeftOut;
use crate::wire::{DType, Held, ReduceOp};
use crate::Step;

/// f32 arithmetic, enough for these tests.
#[derive(Debug)]
struct F32;

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

impl Arithmetic for F32 {
    fn reduce(&self, dtype: DType, op: ReduceOp, acc: &mut [u8], src: &[u8]) -> Result<(), String> {
        assert_eq!(dtype, DType::F32);
        let out: Vec<f32> = floats(acc)
            .iter()
            .zip(floats(src))
            .map(|(&a, b)| match op {
                ReduceOp::Sum | ReduceOp::Mean => a + b,
                ReduceOp::Min => a.min(b),
                ReduceOp::Max => a.max(b),
            })
            .collect();
        acc.copy_from_slice(&bytes(&out));
        Ok(())
    }

    fn scale(&self, dtype: DType, x: &mut [u8], factor: f32) -> Result<(), String> {
        assert_eq!(dtype, DType::F32);
        let out: Vec<f32> = floats(x).iter().map(|v| v * factor).collect();
        x.copy_from_slice(&bytes(&out));
        Ok(())
    }
}

fn m(i: u32) -> MemberId {
    MemberId(i)
}

fn ms(v: u64) -> Time {
    Time(v * 1000)
}

fn members(ids: &[u32]) -> Vec<MemberId> {
    ids.iter().map(|&i| m(i)).collect()
}

fn change(epoch: u64, ring: &[u32], me: u32) -> GroupChange {
    GroupChange {
        epoch: Epoch(epoch),
        ring: members(ring),
        admitted: ring.contains(&me),
        removed: None,
        joined_at: ring.iter().map(|&i| (m(i), Epoch(1))).collect(),
        policy: QuorumPolicy::SYNC,
        confirmed: None,
    }
}

fn report(epoch: u64, from: u32) -> RecoveryReport {
    RecoveryReport {
        epoch: Epoch(epoch),
        member: m(from),
        parked: vec![],
        completed: vec![],
        synced: vec![],
        returned: vec![],
        returning: vec![],
    }
}

type TestNode = Node<Vec<u8>>;

fn drain(node: &mut TestNode) -> Vec<Action<Vec<u8>>> {
    std::iter::from_fn(|| node.poll_action()).collect()
}

/// The actions less the periodic progress reports.
fn without_progress(actions: Vec<Action<Vec<u8>>>) -> Vec<Action<Vec<u8>>> {
    actions
        .into_iter()
        .filter(|a| {
            !matches!(
                a,
                Action::Message {
                    msg: NodeMessage::Progress { .. },
                    ..
                }
            )
        })
        .collect()
}

/// A node of member `me` in life `life`, with no group yet.
fn fresh(me: u32, life: Incarnation) -> TestNode {
    Node::new(
        m(me),
        life,
        NodeConfig::default(),
        Box::new(F32),
        Time::ZERO,
    )
}

/// Member `me` of `ring`, active in epoch 1 (every peer reported).
fn active(me: u32, ring: &[u32], config: NodeConfig) -> TestNode {
    let mut node = Node::new(m(me), Incarnation(1), config, Box::new(F32), Time::ZERO);
    node.handle_group(Time::ZERO, change(1, ring, me));
    for &p in ring.iter().filter(|&&p| p != me) {
        node.handle_message(Time::ZERO, m(p), NodeMessage::Recovery(report(1, p)));
    }
    assert!(node.mode().is_active());
    drain(&mut node);
    node
}

/// Member `me` of `ring`, active in epoch 2 whose steps close by `policy`.
fn under_policy(me: u32, ring: &[u32], policy: &str) -> TestNode {
    let mut node = active(me, ring, NodeConfig::default());
    let policy: QuorumPolicy = policy.parse().unwrap();
    node.handle_group(
        ms(1),
        GroupChange {
            policy,
            ..change(2, ring, me)
        },
    );
    for &p in ring.iter().filter(|&&p| p != me) {
        node.handle_message(ms(1), m(p), NodeMessage::Recovery(report(2, p)));
    }
    assert!(node.mode().is_active());
    drain(&mut node);
    node
}

fn all_reduce(id: u64, seq: u64, input: &[f32]) -> Request<Vec<u8>> {
    Request {
        id: RequestId(id),
        op: OpId::new(0, seq),
        kind: LocalKind::AllReduce(ReduceOp::Sum),
        dtype: DType::F32,
        len: input.len(),
        samples: None,
        buffer: bytes(input),
    }
}

/// Recursive doubling between two members exchanges in round 1 (round 0
/// folds in the members beyond a power of two).
const PAIR: u32 = 1;

fn header(op: OpId, epoch: u64, sender: u32, round: u32, elems: u32) -> FrameHeader {
    FrameHeader {
        op,
        epoch: Epoch(epoch),
        step: Step(op.seq()),
        incarnation: Incarnation(1),
        sender: m(sender),
        round,
        chunk: 0,
        dtype: DType::F32,
        elem_count: elems,
    }
}

fn done(op: OpId, epoch: u64, contributors: &[u32]) -> OpDone {
    OpDone {
        op,
        epoch: Epoch(epoch),
        contributors: members(contributors),
        waiting: vec![],
        meta: StepMeta::default(),
    }
}

#[test]
fn a_group_of_one_completes_at_once() {
    let mut node = active(1, &[1], NodeConfig::default());
    node.handle_submit(ms(1), all_reduce(7, 1, &[1.5, -2.0]));
    assert_eq!(
        drain(&mut node),
        vec![Action::Reply {
            id: RequestId(7),
            buffer: bytes(&[1.5, -2.0]),
            outcome: Ok(done(OpId::new(0, 1), 1, &[1])),
        }]
    );
}

#[test]
fn an_op_runs_with_its_peer_and_answers_with_the_sum() {
    let mut node = active(1, &[1, 2], NodeConfig::default());
    let op = OpId::new(0, 1);
    node.handle_submit(ms(1), all_reduce(1, 1, &[1.0, 2.0]));
    assert_eq!(
        drain(&mut node),
        vec![Action::Frame {
            to: m(2),
            header: header(op, 1, 1, PAIR, 2),
            payload: bytes(&[1.0, 2.0]),
        }]
    );
    node.handle_frame(ms(2), header(op, 1, 2, PAIR, 2), bytes(&[10.0, 20.0]));
    assert_eq!(
        drain(&mut node),
        vec![Action::Reply {
            id: RequestId(1),
            buffer: bytes(&[11.0, 22.0]),
            outcome: Ok(done(op, 1, &[1, 2])),
        }]
    );
    assert_eq!(node.in_flight(), 0);
}

#[test]
fn a_trainer_waits_while_its_daemon_gathers_the_epochs_reports() {
    let mut node = fresh(1, Incarnation(1));
    node.handle_group(Time::ZERO, change(1, &[1, 2], 1));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Message {
            to: m(2),
            msg: NodeMessage::Recovery(report(1, 1)),
        }]
    );
    node.handle_submit(ms(1), all_reduce(1, 1, &[3.0]));
    assert_eq!(
        drain(&mut node),
        vec![],
        "no op runs before the reports are in"
    );
    node.handle_message(ms(2), m(2), NodeMessage::Recovery(report(1, 2)));
    assert_eq!(
        drain(&mut node),
        vec![Action::Frame {
            to: m(2),
            header: header(OpId::new(0, 1), 1, 1, PAIR, 1),
            payload: bytes(&[3.0]),
        }]
    );
}

#[test]
fn a_missing_report_is_asked_for_again_every_two_heartbeats() {
    let mut node = fresh(1, Incarnation(1));
    node.handle_group(Time::ZERO, change(1, &[1, 2, 3], 1));
    drain(&mut node);
    node.handle_message(ms(5), m(2), NodeMessage::Recovery(report(1, 2)));
    assert_eq!(node.poll_timeout(), Some(ms(200)));
    node.handle_timeout(ms(200));
    assert_eq!(
        drain(&mut node),
        vec![Action::Message {
            to: m(3),
            msg: NodeMessage::RecoveryAsk { epoch: Epoch(1) },
        }]
    );
    // A peer asking for this daemon's report gets it again.
    node.handle_message(ms(210), m(3), NodeMessage::RecoveryAsk { epoch: Epoch(1) });
    assert_eq!(
        drain(&mut node),
        vec![Action::Message {
            to: m(3),
            msg: NodeMessage::Recovery(report(1, 1)),
        }]
    );
}

// The continuity benchmark in CI: a peer that was heard but whose report
// never came held the exchange (and every trainer) for a minute. Dropping
// its connections rebuilds a lost route; a peer still mute is suspected
// before the waiting ops fail.
#[test]
fn a_report_overdue_resets_the_links_to_its_peer_then_suspects_it() {
    let mut node = fresh(1, Incarnation(1));
    node.handle_group(Time::ZERO, change(1, &[1, 2, 3], 1));
    drain(&mut node);
    node.handle_message(ms(5), m(2), NodeMessage::Recovery(report(1, 2)));
    let ask = Action::Message {
        to: m(3),
        msg: NodeMessage::RecoveryAsk { epoch: Epoch(1) },
    };
    let overdue = NodeConfig::default().report_overdue();
    assert_eq!(overdue, Duration::from_millis(1500));
    let mut seen = Vec::new();
    let mut t = Time::ZERO;
    while t < ms(3200) {
        t = node
            .poll_timeout()
            .expect("a deadline while reports are missing");
        // Heard all along: the detector has nothing against it.
        node.handle_heartbeat(t, m(2));
        node.handle_heartbeat(t, m(3));
        node.handle_timeout(t);
        for a in without_progress(drain(&mut node)) {
            if a != ask {
                seen.push((t, a));
            }
        }
    }
    assert_eq!(
        seen,
        vec![
            (ms(1600), Action::ResetLinks { member: m(3) }),
            (
                ms(3000),
                Action::Control(ControlRequest::Suspect {
                    member: m(3),
                    reason: "sent no recovery report for e1 in 3000 ms".into(),
                })
            ),
        ]
    );
    // The next epoch's exchange starts with a clean slate.
    node.handle_group(ms(3300), change(2, &[1, 2], 1));
    node.handle_message(ms(3301), m(2), NodeMessage::Recovery(report(2, 2)));
    assert!(node.mode().is_active());
}

/// Member 1 of [1, 2, 3] with op 1 in flight (its frames sent).
fn interrupted() -> (TestNode, OpId) {
    let mut node = active(1, &[1, 2, 3], NodeConfig::default());
    node.handle_submit(ms(1), all_reduce(1, 1, &[1.0, 2.0]));
    assert!(!drain(&mut node).is_empty());
    (node, OpId::new(0, 1))
}

#[test]
fn an_interrupted_op_is_rerun_by_the_survivors_in_the_next_epoch() {
    let (mut node, op) = interrupted();
    node.handle_group(ms(10), change(2, &[1, 2], 1));
    let mine = RecoveryReport {
        epoch: Epoch(2),
        member: m(1),
        parked: vec![(op, members(&[1, 2, 3]))],
        completed: vec![],
        synced: vec![],
        returned: vec![],
        returning: vec![],
    };
    assert_eq!(
        drain(&mut node),
        vec![Action::Message {
            to: m(2),
            msg: NodeMessage::Recovery(mine),
        }]
    );
    assert_eq!(node.parked(), 1);
    let theirs = RecoveryReport {
        member: m(2),
        ..report(2, 2)
    };
    node.handle_message(ms(11), m(2), NodeMessage::Recovery(theirs));
    assert_eq!(
        drain(&mut node),
        vec![Action::Frame {
            to: m(2),
            header: header(op, 2, 1, PAIR, 2),
            payload: bytes(&[1.0, 2.0]),
        }],
        "the kept input runs again, in epoch 2, with the survivors"
    );
    node.handle_frame(ms(12), header(op, 2, 2, PAIR, 2), bytes(&[5.0, 5.0]));
    assert_eq!(
        drain(&mut node),
        vec![Action::Reply {
            id: RequestId(1),
            buffer: bytes(&[6.0, 7.0]),
            outcome: Ok(done(op, 2, &[1, 2])),
        }]
    );
}

#[test]
fn a_result_a_survivor_kept_is_broadcast_to_those_who_missed_it() {
    let (mut node, op) = interrupted();
    node.handle_group(ms(10), change(2, &[1, 2], 1));
    drain(&mut node);
    let theirs = RecoveryReport {
        completed: vec![KeptResult {
            op,
            contributors: members(&[1, 2, 3]),
            waiting: vec![],
            dtype: DType::F32,
            len: 2,
        }],
        ..report(2, 2)
    };
    node.handle_message(ms(11), m(2), NodeMessage::Recovery(theirs));
    assert_eq!(
        drain(&mut node),
        vec![],
        "a broadcast's receiver sends nothing"
    );
    // A chain broadcast's first hop: round 0.
    node.handle_frame(ms(12), header(op, 2, 2, 0, 2), bytes(&[9.0, 9.5]));
    assert_eq!(
        drain(&mut node),
        vec![Action::Reply {
            id: RequestId(1),
            buffer: bytes(&[9.0, 9.5]),
            outcome: Ok(done(op, 2, &[1, 2, 3])),
        }],
        "the kept result stands, naming whose inputs it holds"
    );
}

#[test]
fn a_removed_member_fails_its_interrupted_ops_with_the_reason() {
    let (mut node, _) = interrupted();
    let removed = GroupChange {
        removed: Some("removed for a test".into()),
        ..change(2, &[2, 3], 1)
    };
    node.handle_group(ms(10), removed);
    assert_eq!(
        drain(&mut node),
        vec![Action::Reply {
            id: RequestId(1),
            buffer: bytes(&[1.0, 2.0]),
            outcome: Err(OpError::NoQuorum("removed for a test".into())),
        }]
    );
    node.handle_submit(ms(11), all_reduce(2, 2, &[1.0]));
    assert_eq!(
        drain(&mut node),
        vec![Action::Reply {
            id: RequestId(2),
            buffer: bytes(&[1.0]),
            outcome: Err(OpError::NoQuorum("removed for a test".into())),
        }]
    );
}

#[test]
fn with_no_new_epoch_an_op_waiting_for_a_member_gone_gives_up() {
    let (mut node, _) = interrupted();
    node.handle_peer_down(ms(100), m(3), "connection lost");
    assert_eq!(
        drain(&mut node),
        vec![Action::Control(ControlRequest::Renew {
            reason: "the connection to m3 was lost while op1 ran over it".into()
        })],
        "a new epoch would finish it again; none comes"
    );
    node.handle_timeout(ms(5_099));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    node.handle_timeout(ms(5_100));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply { id: RequestId(1), outcome: Err(OpError::NoQuorum(why)), .. }]
                if why.contains("[m3] are unreachable")
        ),
        "{actions:?}"
    );
}

/// What a node does when peer `p` has been silent for the bound.
fn silent_for_400_ms(p: u32) -> Vec<Action<Vec<u8>>> {
    vec![
        Action::Control(ControlRequest::Suspect {
            member: m(p),
            reason: "no heartbeat for 400 ms".into(),
        }),
        Action::ResetLinks { member: m(p) },
    ]
}

fn hear(node: &mut TestNode, from: &[u32], at: Time) {
    for &p in from {
        node.handle_heartbeat(at, m(p));
    }
}

/// Heartbeats from `from` every 100 ms, from `start` up to `end` ms; the
/// actions are dropped. Returns the next heartbeat's time.
fn beat(node: &mut TestNode, from: &[u32], start: u64, end: u64) -> u64 {
    let mut t = start;
    while t <= end {
        hear(node, from, ms(t));
        t += 100;
    }
    drain(node);
    t
}

#[test]
fn a_silent_peer_is_suspected_after_the_start_up_grace() {
    let mut node = active(1, &[1, 2, 3], NodeConfig::default());
    let mut t = beat(&mut node, &[2, 3], 0, 2_000);
    // m3 falls silent at 2 s; m2 goes on.
    while t < 2_400 {
        hear(&mut node, &[2], ms(t));
        assert_eq!(without_progress(drain(&mut node)), vec![], "at {t} ms");
        t += 100;
    }
    assert_eq!(node.poll_timeout(), Some(ms(2_400)));
    node.handle_timeout(ms(2_400));
    let want = silent_for_400_ms(3);
    assert_eq!(without_progress(drain(&mut node)), want);
    hear(&mut node, &[2, 3], ms(2_450));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Control(ControlRequest::Cleared { member: m(3) })]
    );
}

// Found by the cluster simulator (`backup=1`, seed 837): this member's
// readiness went to the step's coordinator, the coordinator fell silent,
// this member reset the links to it — losing the cut the coordinator had
// sent — and heard from it again before any removal committed. The other
// members ran the step; this one waited for its cut for ever. Parked with
// the ops the reset interrupted, the trainer's call fails in time and its
// rejoin moves the group to a new epoch, which decides the step again.
#[test]
fn a_step_whose_coordinators_links_were_reset_gives_up_without_a_new_epoch() {
    give_up_a_step_as_its_coordinators_links_reset();
}

/// m2 of [1, 2, 3] under `backup=1`: its trainer's step op1 (input 1.0)
/// was ready, the links to m1 (the coordinator) were reset, and the call
/// failed with `NoQuorum` 5 s on, in epoch 2.
fn give_up_a_step_as_its_coordinators_links_reset() -> TestNode {
    let mut node = under_policy(2, &[1, 2, 3], "backup=1");
    let t = beat(&mut node, &[1, 3], 0, 2_000);
    node.handle_submit(ms(t), all_reduce(1, 1, &[1.0]));
    let sent = drain(&mut node);
    assert!(
        matches!(&sent[..], [Action::Message { to, msg: NodeMessage::StepReady { .. } }] if *to == m(1)),
        "{sent:?}"
    );
    // m1 falls silent; m3 goes on.
    beat(&mut node, &[3], t, 2_300);
    node.handle_timeout(ms(2_400));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![
            Action::Control(ControlRequest::Suspect {
                member: m(1),
                reason: "no heartbeat for 400 ms".into(),
            }),
            Action::ResetLinks { member: m(1) },
        ]
    );
    hear(&mut node, &[1, 3], ms(2_450));
    drain(&mut node);
    beat(&mut node, &[1, 3], 2_550, 7_350);
    node.handle_timeout(ms(7_400));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply { id: RequestId(1), outcome: Err(OpError::NoQuorum(why)), .. }]
                if why.contains("the step's coordinator, were reset")
        ),
        "{actions:?}"
    );
    node
}

// Found by the cluster simulator (a split with no majority side, after a
// pause and a partition, `backup=1`): the coordinator, in the same epoch
// after the heal, closed the step with this member's readiness from before
// its trainer's call failed. This member stood in with a neutral input, so
// the result named it as a contributor without its input, at every member.
// It runs with the input it was ready with.
#[test]
fn a_cut_naming_a_member_whose_call_failed_gets_the_input_it_was_ready_with() {
    let mut node = give_up_a_step_as_its_coordinators_links_reset();
    let op = OpId::new(0, 1);
    let cut = NodeMessage::StepCut {
        op,
        epoch: Epoch(2),
        reduce: ReduceOp::Sum,
        dtype: DType::F32,
        len: 1,
        participants: vec![(m(1), None), (m(2), None), (m(3), None)],
        left_out: vec![],
        reason: "every member ready".into(),
        changes: vec![],
        records: vec![],
    };
    node.handle_message(ms(7_500), m(1), cut);
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "waits for m1's fold"
    );
    // Recursive doubling over three: m1 folds into m2, which exchanges the
    // sum with m3.
    node.handle_frame(ms(7_501), header(op, 2, 1, 0, 1), bytes(&[3.0]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Frame {
            to: m(3),
            header: header(op, 2, 2, 1, 1),
            payload: bytes(&[4.0]),
        }]
    );
}

// Issue 13, item 6: a member killed within the start-up grace took ~2.4 s
// to be removed (and a lost quorum ~7.4 s to be reported): nobody was
// judged before the grace's end. A peer that has sent a heartbeat is up and
// linked, so it is judged from then on; one never heard from may still be
// starting and keeps the grace.
#[test]
fn during_the_start_up_grace_only_a_peer_heard_from_is_judged() {
    let mut node = active(1, &[1, 2, 3, 4], NodeConfig::default());
    // m2 and m3 beat from the start; m2 is killed at 300 ms; m4 never beats.
    let t = beat(&mut node, &[2, 3], 0, 300);
    let due = node.poll_timeout().expect("a deadline");
    assert!(due <= ms(700), "m2's silence, not the grace's end: {due:?}");
    hear(&mut node, &[3], ms(t));
    // (Heard within the suspicion bound: not in doubt of its own epoch.)
    hear(&mut node, &[3], ms(600));
    node.handle_timeout(ms(700));
    let want = silent_for_400_ms(2);
    assert_eq!(without_progress(drain(&mut node)), want);
    let mut t = 800;
    while t <= 2_300 {
        hear(&mut node, &[3], ms(t));
        node.handle_timeout(ms(t + 50));
        assert_eq!(
            without_progress(drain(&mut node)),
            vec![],
            "at {t} ms: m4 may still be starting"
        );
        t += 100;
    }
    node.handle_timeout(ms(2_400));
    let want = silent_for_400_ms(4);
    assert_eq!(
        without_progress(drain(&mut node)),
        want,
        "silent past the grace"
    );
}

#[test]
fn during_the_start_up_grace_a_peer_never_heard_from_is_not_suspected() {
    let mut node = active(1, &[1, 2, 3], NodeConfig::default());
    hear(&mut node, &[2], ms(10));
    hear(&mut node, &[2], ms(1_890));
    node.handle_timeout(ms(1_900));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    assert_eq!(node.poll_timeout(), Some(ms(2_000)), "the grace's end");
}

#[test]
fn waking_far_past_a_deadline_excuses_the_silence() {
    let mut node = active(1, &[1, 2, 3], NodeConfig::default());
    beat(&mut node, &[2, 3], 0, 2_100);
    let due = node.poll_timeout().expect("a deadline");
    assert!(due <= ms(2_500));
    // This daemon was stopped for three seconds: the silence is its own.
    hear(&mut node, &[2], ms(5_500));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
}

#[test]
fn a_peer_whose_trainer_is_stuck_is_suspected_with_the_reason() {
    let config = NodeConfig {
        stuck_after: Duration::from_secs(1),
        ..NodeConfig::default()
    };
    let mut node = active(1, &[1, 2], config);
    node.handle_message(
        ms(1),
        m(2),
        NodeMessage::Progress {
            streams: vec![(0, 0)],
        },
    );
    node.handle_submit(ms(2), all_reduce(1, 1, &[1.0]));
    drain(&mut node);
    node.handle_timeout(ms(1_001));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    node.handle_timeout(ms(1_002));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Control(ControlRequest::Suspect {
            member: m(2),
            reason:
                "no progress: its trainer has not issued op1 (stream 0 is at op 0) after 1000 ms"
                    .into(),
        })]
    );
}

#[test]
fn a_joiner_receives_the_state_and_checks_it() {
    for corrupt in [false, true] {
        let mut node = fresh(3, Incarnation(2));
        let mut admitted = change(2, &[1, 2, 3], 3);
        admitted.joined_at.insert(m(3), Epoch(2));
        node.handle_group(Time::ZERO, admitted);
        for p in [1, 2] {
            node.handle_message(Time::ZERO, m(p), NodeMessage::Recovery(report(2, p)));
        }
        drain(&mut node);
        assert_eq!(node.pending(0), members(&[3]));
        node.handle_join(ms(1), join_request());
        assert_eq!(
            drain(&mut node),
            vec![Action::Control(ControlRequest::WantIn)]
        );
        let state = bytes(&[4.0, 8.0]);
        let op = OpId::new(0, 5);
        node.handle_message(ms(2), m(1), join_point(op, 2, 1, &state, &[1, 2, 3]));
        assert_eq!(drain(&mut node), vec![]);
        let arrived = if corrupt {
            bytes(&[4.0, 8.5])
        } else {
            state.clone()
        };
        // A chain from m1 through m2: the last member receives from m2.
        node.handle_frame(ms(3), header(op, 2, 2, 1, 2), arrived.clone());
        let outcome = if corrupt {
            Err(OpError::Rejected(format!(
                "the state received fails its checksum ({:#x}, the root sent {:#x}); join again",
                state_checksum(&arrived),
                state_checksum(&state)
            )))
        } else {
            Ok(done(op, 2, &[1, 2, 3]))
        };
        assert_eq!(
            drain(&mut node),
            vec![Action::Reply {
                id: RequestId(9),
                buffer: arrived,
                outcome,
            }]
        );
    }
}

// Found by the cluster simulator (seed 294, `backup=1`): a hand-over re-run
// among the members of its first run (m1–m3) left out m4, admitted since.
// The joiner ran it as if among its whole ring, so it counted m4 as holding
// the state: its results told its trainer nobody was waiting, its trainer
// never handed the state to m4, and the group stopped.
#[test]
fn a_joiner_runs_its_hand_over_among_the_members_announced() {
    let mut node = fresh(3, Incarnation(2));
    let mut admitted = change(3, &[1, 2, 3, 4], 3);
    admitted.joined_at.insert(m(3), Epoch(2));
    admitted.joined_at.insert(m(4), Epoch(3));
    node.handle_group(Time::ZERO, admitted);
    for p in [1, 2, 4] {
        node.handle_message(Time::ZERO, m(p), NodeMessage::Recovery(report(3, p)));
    }
    drain(&mut node);
    assert_eq!(node.pending(0), members(&[3, 4]));
    node.handle_join(ms(1), join_request());
    drain(&mut node);
    let state = bytes(&[4.0, 8.0]);
    let op = OpId::new(0, 5);
    node.handle_message(ms(2), m(1), join_point(op, 3, 1, &state, &[1, 2, 3]));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    // The chain m1 → m2 → m3 of three members (of four, m3 would relay).
    node.handle_frame(ms(3), header(op, 3, 2, 1, 2), state.clone());
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(9),
            buffer: state,
            outcome: Ok(OpDone {
                waiting: members(&[4]),
                ..done(op, 3, &[1, 2, 3])
            }),
        }]
    );
    assert_eq!(node.pending(0), members(&[4]), "m4 still waits");
}

// Found by the cluster simulator (`backup=1`, seed 214): the holders finish
// a hand-over before its joiner and go on to the next step, whose
// coordinator is the joiner when its id is the lowest. Readiness that
// reached it before it had the state was dropped, and the step never closed.
#[test]
fn readiness_that_reaches_a_joiner_before_its_state_waits_for_it() {
    let mut node = fresh(1, Incarnation(2));
    let mut admitted = GroupChange {
        policy: "backup=1".parse().unwrap(),
        ..change(2, &[1, 2, 3], 1)
    };
    admitted.joined_at.insert(m(1), Epoch(2));
    node.handle_group(Time::ZERO, admitted);
    for p in [2, 3] {
        node.handle_message(Time::ZERO, m(p), NodeMessage::Recovery(report(2, p)));
    }
    drain(&mut node);
    node.handle_join(ms(1), join_request());
    drain(&mut node);
    let state = bytes(&[4.0, 8.0]);
    let op = OpId::new(0, 5);
    node.handle_message(ms(2), m(2), join_point(op, 2, 2, &state, &[1, 2, 3]));
    let next = OpId::new(0, 6);
    let ready = NodeMessage::StepReady {
        op: next,
        epoch: Epoch(2),
        reduce: ReduceOp::Sum,
        dtype: DType::F32,
        len: 1,
        samples: None,
    };
    node.handle_message(ms(3), m(3), ready.clone());
    assert_eq!(without_progress(drain(&mut node)), vec![], "held");
    // The chain m2 → m3 → m1.
    node.handle_frame(ms(4), header(op, 2, 3, 1, 2), state.clone());
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply {
                id: RequestId(9),
                outcome: Ok(_),
                ..
            }]
        ),
        "{actions:?}"
    );
    node.handle_message(ms(5), m(2), ready);
    let actions = without_progress(drain(&mut node));
    for to in [2, 3] {
        assert!(
            actions.iter().any(|a| matches!(a,
                Action::Message { to: t, msg: NodeMessage::StepCut { op, participants, .. } }
                    if *t == m(to) && *op == next && participants == &[(m(2), None), (m(3), None)]
            )),
            "the coordinator closes the step with the two ready, telling m{to}: {actions:?}"
        );
    }
}

#[test]
fn under_backup_workers_the_coordinator_closes_without_the_last() {
    let mut node = under_policy(1, &[1, 2, 3], "backup=1");
    let op = OpId::new(0, 1);
    node.handle_submit(ms(2), all_reduce(1, 1, &[1.0]));
    assert_eq!(drain(&mut node), vec![], "one ready of three: not yet");
    let ready = NodeMessage::StepReady {
        op,
        epoch: Epoch(2),
        reduce: ReduceOp::Sum,
        dtype: DType::F32,
        len: 1,
        samples: None,
    };
    node.handle_message(ms(3), m(2), ready);
    let actions = drain(&mut node);
    let cut = |to| Action::Message {
        to: m(to),
        msg: NodeMessage::StepCut {
            op,
            epoch: Epoch(2),
            reduce: ReduceOp::Sum,
            dtype: DType::F32,
            len: 1,
            participants: vec![(m(1), None), (m(2), None)],
            left_out: vec![(m(3), LeftOut::Backup)],
            reason: "backup workers: 2 of 3 ready".into(),
            changes: vec![],
            records: node_records(),
        },
    };
    assert_eq!(
        actions[..2],
        [cut(2), cut(3)],
        "announced before the reduction"
    );
    assert!(
        actions[2..]
            .iter()
            .all(|a| matches!(a, Action::Frame { .. }))
            && actions.len() > 2,
        "then the reduction over the whole ring: {actions:?}"
    );
}

/// The attribution the coordinator announces after one backup cut of m3.
fn node_records() -> Vec<crate::stragglers::StragglerRecord> {
    let mut a = crate::stragglers::Attribution::new(10, 3, 3, Duration::from_millis(20));
    a.record(&members(&[1, 2]), &members(&[3]), &[]);
    a.snapshot()
}

/// m1's cut of step `op` in epoch 2 of ring [1, 2] under `backup=1`,
/// leaving m2 out.
fn m2_left_out(op: OpId) -> NodeMessage {
    NodeMessage::StepCut {
        op,
        epoch: Epoch(2),
        reduce: ReduceOp::Sum,
        dtype: DType::F32,
        len: 1,
        participants: vec![(m(1), None)],
        left_out: vec![(m(2), LeftOut::Backup)],
        reason: "backup workers: 1 of 2 ready".into(),
        changes: vec![],
        records: vec![],
    }
}

#[test]
fn a_late_trainer_gets_the_result_its_daemon_stood_in_for() {
    let mut node = under_policy(2, &[1, 2], "backup=1");
    let op = OpId::new(0, 1);
    let cut = m2_left_out(op);
    node.handle_message(ms(2), m(1), cut);
    assert_eq!(
        drain(&mut node),
        vec![Action::Frame {
            to: m(1),
            header: header(op, 2, 2, PAIR, 1),
            payload: bytes(&[-0.0]),
        }],
        "a neutral input, standing in for the trainer"
    );
    node.handle_frame(ms(3), header(op, 2, 1, PAIR, 1), bytes(&[7.0]));
    assert_eq!(drain(&mut node), vec![], "the result waits for the trainer");
    node.handle_submit(ms(4), all_reduce(5, 1, &[100.0]));
    let mut want = done(op, 2, &[1]);
    want.meta.left_out = vec![(m(2), LeftOut::Backup.to_string())];
    assert_eq!(
        drain(&mut node),
        vec![
            Action::Message {
                to: m(1),
                msg: NodeMessage::StepLate {
                    op,
                    epoch: Epoch(2),
                },
            },
            Action::Reply {
                id: RequestId(5),
                buffer: bytes(&[7.0]),
                outcome: Ok(want),
            }
        ],
        "its lateness still counts for attribution; the result is exactly m1's input"
    );
}

// Issue 13, item 7, with the cluster simulator's new fault (one connection
// lost, as networks lose them): 9 of 400 seeds wedged, both ends of the
// lost connection waiting for frames that were in flight on it. The op is
// finished again only in a new epoch, so the daemon asks for one.
#[test]
fn a_connection_lost_while_an_op_runs_over_it_asks_for_a_new_epoch() {
    let mut node = active(1, &[1, 2, 3], NodeConfig::default());
    node.handle_submit(ms(1), all_reduce(1, 1, &[1.0]));
    drain(&mut node);
    node.handle_peer_down(ms(2), m(2), "the connection was lost");
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Control(ControlRequest::Renew {
            reason: "the connection to m2 was lost while op1 ran over it".into(),
        })]
    );
    // Back, and lost again with nothing running: nothing to finish again.
    let mut idle = active(1, &[1, 2, 3], NodeConfig::default());
    idle.handle_peer_down(ms(2), m(2), "the connection was lost");
    assert_eq!(without_progress(drain(&mut idle)), vec![]);
}

#[test]
fn a_connection_reset_after_a_suspicion_asks_for_no_new_epoch() {
    let mut node = active(1, &[1, 2, 3], NodeConfig::default());
    let t = beat(&mut node, &[2, 3], 0, 100);
    node.handle_submit(ms(t), all_reduce(1, 1, &[1.0]));
    drain(&mut node);
    // m3 falls silent: suspected, its links reset, the op parked.
    let mut t = t;
    while t < 700 {
        hear(&mut node, &[2], ms(t));
        t += 100;
    }
    node.handle_timeout(ms(t));
    let actions = without_progress(drain(&mut node));
    assert!(
        actions.contains(&Action::ResetLinks { member: m(3) }),
        "{actions:?}"
    );
    node.handle_peer_down(ms(t), m(3), "reset: reconnecting");
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "the removal is the new epoch"
    );
}

// Found by the cluster simulator (seed 531, `backup=1`): a partition
// parked the op this daemon stood in for while its late trainer waited for
// the stand-in's result; no epoch came, the op expired, and nothing answered
// the trainer, which waited for ever while the group went on after the heal.
#[test]
fn a_late_trainer_whose_stand_in_gives_up_is_told_why() {
    let mut node = under_policy(2, &[1, 2], "backup=1");
    let op = OpId::new(0, 1);
    let cut = m2_left_out(op);
    hear(&mut node, &[1], ms(2));
    node.handle_message(ms(2), m(1), cut);
    node.handle_submit(ms(4), all_reduce(5, 1, &[100.0]));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            actions.last(),
            Some(Action::Message {
                msg: NodeMessage::StepLate { .. },
                ..
            })
        ),
        "late: the trainer waits for the stand-in's result: {actions:?}"
    );
    // m1 falls silent before the result comes: the stand-in is parked.
    node.handle_timeout(ms(402));
    drain(&mut node);
    let limit = NodeConfig::default().recovery_timeout.as_millis() as u64;
    node.handle_timeout(ms(402 + limit - 1));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Control(ControlRequest::Confirm { asked: 1 })],
        "having heard nobody for 400 ms, it doubts its epoch"
    );
    node.handle_timeout(ms(402 + limit));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply { id: RequestId(5), outcome: Err(OpError::NoQuorum(why)), .. }]
                if why.contains("no new epoch")
        ),
        "{actions:?}"
    );
}

// The cluster simulator (seed 445): a bootstrap member paused as the group
// formed was removed, and its start-up request to be let in, retried as it
// resumed, readmitted it. Its trainer had never joined and issued its first
// step as if it held the group's state; the others waited for it to join.
#[test]
fn a_trainer_whose_member_came_in_after_the_last_hand_over_must_join() {
    let mut node = active(3, &[1, 2, 3], NodeConfig::default());
    let mut later = change(3, &[1, 2, 3], 3);
    later.joined_at.insert(m(3), Epoch(3));
    node.handle_group(ms(5), later);
    for p in [1, 2] {
        node.handle_message(ms(5), m(p), NodeMessage::Recovery(report(3, p)));
    }
    drain(&mut node);
    assert!(node.mode().is_active());
    assert_eq!(node.pending(0), vec![m(3)]);
    node.handle_submit(ms(6), all_reduce(7, 1, &[1.0]));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply { id: RequestId(7), outcome: Err(OpError::NoQuorum(why)), .. }]
                if why.contains("admitted in e3") && why.contains("must call join()")
        ),
        "{actions:?}"
    );
}

// Found by `phalanx-bench continuity`: the slow member's daemon stood in
// for the step after a hand-over its trainer had not run yet, and the kept
// result said the joiner still waited (this daemon's view then), while
// every other member's said nobody did. Its trainer handed the state over
// a second time, the group ran that op as a step, and the trainer failed.
// A cut step's waiting members are the ring less the cut's: what its
// coordinator counted, the same at every member.
#[test]
fn a_stand_in_result_says_who_waits_as_the_cut_does() {
    let policy: QuorumPolicy = "backup=1".parse().unwrap();
    let mut node = under_policy(2, &[1, 2, 3], "backup=1");
    let mut readmitted = GroupChange {
        policy,
        ..change(3, &[1, 2, 3], 2)
    };
    readmitted.joined_at.insert(m(3), Epoch(3));
    node.handle_group(ms(1), readmitted);
    for p in [1, 3] {
        node.handle_message(ms(1), m(p), NodeMessage::Recovery(report(3, p)));
    }
    drain(&mut node);
    assert_eq!(
        node.pending(0),
        members(&[3]),
        "its hand-over has not run here"
    );
    let op = OpId::new(0, 2);
    let cut = NodeMessage::StepCut {
        op,
        epoch: Epoch(3),
        reduce: ReduceOp::Sum,
        dtype: DType::F32,
        len: 1,
        participants: vec![(m(1), None), (m(3), None)],
        left_out: vec![(m(2), LeftOut::Observer)],
        reason: "every member ready".into(),
        changes: vec![],
        records: vec![],
    };
    node.handle_message(ms(2), m(1), cut);
    assert_eq!(
        drain(&mut node),
        vec![],
        "a stand-in: it waits for m1's fold"
    );
    // Recursive doubling over three: m1 folds into m2, m2 and m3 exchange,
    // m2 hands the sum back to m1.
    node.handle_frame(ms(3), header(op, 3, 1, 0, 1), bytes(&[3.0]));
    drain(&mut node);
    node.handle_frame(ms(3), header(op, 3, 3, 1, 1), bytes(&[5.0]));
    drain(&mut node);
    node.handle_submit(ms(4), all_reduce(5, 2, &[100.0]));
    let actions = without_progress(drain(&mut node));
    let mut want = done(op, 3, &[1, 3]);
    want.meta.left_out = vec![(m(2), LeftOut::Observer.to_string())];
    assert_eq!(
        actions.last(),
        Some(&Action::Reply {
            id: RequestId(5),
            buffer: bytes(&[8.0]),
            outcome: Ok(want),
        }),
        "nobody waits: the cut counted m3 in ({actions:?})"
    );
}

/// Found by the steps simulator with epoch changes: a trainer late for a
/// step its daemon (the coordinator) stood in for, after an epoch change
/// made the coordinator forget the step, must not cut it a second time.
#[test]
fn a_late_arrival_after_an_epoch_change_does_not_cut_the_step_again() {
    let mut node = under_policy(1, &[1, 2], "backup=1");
    let policy: QuorumPolicy = "backup=1".parse().unwrap();
    let op = OpId::new(0, 1);
    let ready = NodeMessage::StepReady {
        op,
        epoch: Epoch(2),
        reduce: ReduceOp::Sum,
        dtype: DType::F32,
        len: 1,
        samples: None,
    };
    node.handle_message(ms(2), m(2), ready);
    assert!(
        matches!(&drain(&mut node)[0], Action::Message { msg: NodeMessage::StepCut { participants, .. }, .. } if participants == &vec![(m(2), None)]),
        "m2 alone closes the step; m1 stands in"
    );
    node.handle_frame(ms(3), header(op, 2, 2, PAIR, 1), bytes(&[4.0]));
    assert_eq!(drain(&mut node), vec![], "the stand-in's result waits");
    // A policy change: a new epoch with the same ring.
    node.handle_group(
        ms(4),
        GroupChange {
            policy,
            ..change(3, &[1, 2], 1)
        },
    );
    let theirs = RecoveryReport {
        completed: vec![KeptResult {
            op,
            contributors: members(&[2]),
            waiting: vec![],
            dtype: DType::F32,
            len: 2,
        }],
        ..report(3, 2)
    };
    node.handle_message(ms(4), m(2), NodeMessage::Recovery(theirs));
    drain(&mut node);
    node.handle_submit(ms(5), all_reduce(3, 1, &[100.0]));
    let mut want = done(op, 2, &[2]);
    want.meta.left_out = vec![(m(1), LeftOut::Backup.to_string())];
    assert_eq!(
        drain(&mut node),
        vec![Action::Reply {
            id: RequestId(3),
            buffer: bytes(&[4.0]),
            outcome: Ok(want),
        }],
        "served from the stand-in; no second cut"
    );
}

#[test]
fn shutting_down_answers_everyone_waiting() {
    let (mut node, _) = interrupted();
    node.handle_submit(ms(2), all_reduce(2, 2, &[1.0]));
    drain(&mut node);
    node.shutdown();
    let ids: BTreeMap<u64, OpError> = drain(&mut node)
        .into_iter()
        .map(|a| match a {
            Action::Reply {
                id,
                outcome: Err(e),
                ..
            } => (id.0, e),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        ids,
        BTreeMap::from([(1, OpError::ShuttingDown), (2, OpError::ShuttingDown)])
    );
}

/// A trainer joining on stream 0 with room for two f32.
/// The announcement of hand-over `op` of `state` (two f32) on stream 0,
/// from `root` among `ring`.
fn join_point(op: OpId, epoch: u64, root: u32, state: &[u8], ring: &[u32]) -> NodeMessage {
    NodeMessage::JoinPoint {
        stream: 0,
        op,
        epoch: Epoch(epoch),
        root: m(root),
        dtype: DType::F32,
        len: 2,
        checksum: state_checksum(state),
        members: members(ring),
    }
}

fn join_request() -> JoinRequest<Vec<u8>> {
    JoinRequest {
        id: RequestId(9),
        stream: 0,
        dtype: DType::F32,
        len: 2,
        holds: None,
        buffer: vec![0; 8],
    }
}

/// Member `me` of ring [1, 2, 3] in epoch 2, where m3 was (re)admitted in
/// epoch 2 and waits for the state on stream 0.
fn with_a_joiner(me: u32) -> TestNode {
    let mut node = fresh(me, Incarnation(if me == 3 { 2 } else { 1 }));
    let mut admitted = change(2, &[1, 2, 3], me);
    admitted.joined_at.insert(m(3), Epoch(2));
    node.handle_group(Time::ZERO, admitted);
    for p in [1, 2, 3].into_iter().filter(|&p| p != me) {
        node.handle_message(Time::ZERO, m(p), NodeMessage::Recovery(report(2, p)));
    }
    assert!(node.mode().is_active());
    drain(&mut node);
    node
}

/// Epoch 3 drops m1, the hand-over's root; m2 and m3 both parked `op`.
fn lose_the_root(node: &mut TestNode, me: u32, op: OpId, at: Time) {
    let mut next = change(3, &[2, 3], me);
    next.joined_at.insert(m(3), Epoch(2));
    node.handle_group(at, next);
    let peer = 5 - me;
    let theirs = RecoveryReport {
        epoch: Epoch(3),
        member: m(peer),
        parked: vec![(op, members(&[1, 2, 3]))],
        completed: vec![],
        synced: vec![],
        returned: vec![],
        returning: vec![],
    };
    node.handle_message(at, m(peer), NodeMessage::Recovery(theirs));
}

#[test]
fn a_hand_over_whose_root_dies_goes_on_from_another_holder() {
    let mut node = with_a_joiner(2);
    let state = bytes(&[4.0, 8.0]);
    let op = OpId::new(0, 5);
    node.handle_submit(
        ms(1),
        Request {
            id: RequestId(4),
            op,
            kind: LocalKind::StateSync,
            dtype: DType::F32,
            len: 2,
            samples: None,
            buffer: state.clone(),
        },
    );
    // m1 is the root: m2 waits for its frames (none come: m1 dies).
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    lose_the_root(&mut node, 2, op, ms(10));
    let actions: Vec<_> = without_progress(drain(&mut node))
        .into_iter()
        .filter(|a| {
            !matches!(
                a,
                Action::Message {
                    msg: NodeMessage::Recovery(_),
                    ..
                }
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            Action::Message {
                to: m(3),
                msg: join_point(op, 3, 2, &state, &[2, 3]),
            },
            Action::Frame {
                to: m(3),
                header: header(op, 3, 2, 0, 2),
                payload: state.clone(),
            },
            Action::Reply {
                id: RequestId(4),
                buffer: state,
                outcome: Ok(done(op, 3, &[2, 3])),
            },
        ],
        "the next holder in the ring (m2) announces the hand-over and sends its copy"
    );
}

#[test]
fn a_joiner_whose_hand_over_lost_its_root_waits_for_the_next() {
    let mut node = with_a_joiner(3);
    node.handle_join(ms(1), join_request());
    drain(&mut node);
    let state = bytes(&[4.0, 8.0]);
    let op = OpId::new(0, 5);
    // Epoch 3 lost m1.
    let point = |epoch: u64, root: u32| {
        let ring: &[u32] = if epoch == 2 { &[1, 2, 3] } else { &[2, 3] };
        join_point(op, epoch, root, &state, ring)
    };
    node.handle_message(ms(2), m(1), point(2, 1));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    lose_the_root(&mut node, 3, op, ms(10));
    let actions = without_progress(drain(&mut node));
    assert!(
        actions.iter().all(|a| matches!(
            a,
            Action::Message {
                msg: NodeMessage::Recovery(_),
                ..
            }
        )),
        "the joiner's trainer is not failed: {actions:?}"
    );
    node.handle_message(ms(11), m(2), point(3, 2));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    node.handle_frame(ms(12), header(op, 3, 2, 0, 2), state.clone());
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(9),
            buffer: state,
            outcome: Ok(done(op, 3, &[2, 3])),
        }]
    );
}

// Issue 13, item 3: a restarted member asked in at once, was admitted
// before the member that dials it had reconnected to its new life, was
// suspected by that member ("no heartbeat for 400 ms") and removed again —
// three times in a row. Outside the ring, it asks once connected to every
// ring member.
#[test]
fn a_member_outside_asks_in_once_connected_to_the_whole_ring() {
    let mut node = fresh(3, Incarnation(2));
    node.handle_group(Time::ZERO, change(2, &[1, 2], 3));
    drain(&mut node);
    node.handle_join(ms(1), join_request());
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "m1 and m2 not heard yet"
    );
    node.handle_heartbeat(ms(2), m(2));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "m1 not heard yet"
    );
    node.handle_peer_up(ms(3), m(1));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![
            Action::Control(ControlRequest::Cleared { member: m(1) }),
            Action::Control(ControlRequest::WantIn),
        ]
    );
    node.handle_heartbeat(ms(4), m(1));
    assert_eq!(without_progress(drain(&mut node)), vec![], "asked once");
}

// Found by the cluster simulator (seed 107, with the join gate above): a
// joiner that installed the next epoch before the hand-over's announcement
// arrived dropped it, the hand-over completed without it, and its peers,
// counting it as holding the state, waited for its inputs until the stuck
// bound. Once a peer's trainer is past that hand-over, it leaves the ring
// to be readmitted as a joiner.
#[test]
fn a_joiner_that_missed_its_hand_over_leaves_to_be_readmitted() {
    let mut node = with_a_joiner(3);
    node.handle_join(ms(1), join_request());
    drain(&mut node);
    let mut next = change(3, &[1, 2, 3], 3);
    next.joined_at.insert(m(3), Epoch(2));
    node.handle_group(ms(2), next);
    for p in [1, 2] {
        node.handle_message(ms(2), m(p), NodeMessage::Recovery(report(3, p)));
    }
    drain(&mut node);
    let op = OpId::new(0, 5);
    node.handle_message(ms(3), m(1), join_point(op, 2, 1, &[0; 8], &[1, 2, 3]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "a re-run may announce again"
    );
    node.handle_message(
        ms(4),
        m(2),
        NodeMessage::Progress {
            streams: vec![(0, 5)],
        },
    );
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "m2 has not gone past it"
    );
    node.handle_message(
        ms(5),
        m(1),
        NodeMessage::Progress {
            streams: vec![(0, 6)],
        },
    );
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Control(ControlRequest::Suspect {
            member: m(3),
            reason: "its trainer missed the hand-over op5 of the group's state".into(),
        })]
    );
}

/// m3 joining in epoch 2 receives hand-over op5 from m1 (ring [1, 2, 3]).
fn receiving_a_hand_over(at: Time) -> (TestNode, OpId) {
    let mut node = with_a_joiner(3);
    node.handle_join(at, join_request());
    drain(&mut node);
    let op = OpId::new(0, 5);
    node.handle_message(at, m(1), join_point(op, 2, 1, &[0; 8], &[1, 2, 3]));
    drain(&mut node);
    (node, op)
}

// Found by the cluster simulator (a connection lost, then a partition): a
// joiner's hand-over failed here while it finished at the others, who then
// counted the joiner as holding the state; its trainer joined again and
// waited for a hand-over nobody would run, while their steps waited for it.
#[test]
fn a_joiner_whose_hand_over_failed_here_leaves_once_the_others_go_on() {
    let (mut node, op) = receiving_a_hand_over(ms(1));
    node.handle_peer_down(ms(2), m(2), "the connection was lost");
    drain(&mut node);
    let limit = NodeConfig::default().recovery_timeout.as_millis() as u64;
    node.handle_timeout(ms(2 + limit));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply {
                outcome: Err(OpError::NoQuorum(_)),
                ..
            }]
        ),
        "{actions:?}"
    );
    node.handle_join(ms(3 + limit), join_request());
    drain(&mut node);
    node.handle_message(
        ms(4 + limit),
        m(1),
        NodeMessage::Progress {
            streams: vec![(0, 6)],
        },
    );
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Control(ControlRequest::Suspect {
            member: m(3),
            reason: format!("its trainer missed the hand-over {op} of the group's state"),
        })]
    );
}

// Found by the cluster simulator: a member readmitted while its link to
// one peer was still down (since before a partition) failed its join at
// once, "no epoch without it within 2 s", though the group had just
// committed an epoch keeping that peer.
#[test]
fn the_recovery_bound_for_a_peer_down_counts_from_the_latest_epoch() {
    let mut node = active(1, &[1, 2, 3], NodeConfig::default());
    node.handle_peer_down(ms(10), m(2), "the connection was lost");
    drain(&mut node);
    let limit = NodeConfig::default().recovery_timeout.as_millis() as u64;
    // A new epoch keeps m2, just before the bound.
    let at = limit;
    node.handle_group(ms(at), change(2, &[1, 2, 3], 1));
    for p in [2, 3] {
        node.handle_message(ms(at), m(p), NodeMessage::Recovery(report(2, p)));
    }
    drain(&mut node);
    node.handle_submit(ms(at + 20), all_reduce(1, 1, &[1.0]));
    drain(&mut node);
    node.handle_timeout(ms(at + limit - 1));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "the bound runs from the epoch"
    );
    node.handle_timeout(ms(at + limit));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply { id: RequestId(1), outcome: Err(OpError::NoQuorum(why)), .. }]
                if why.contains("[m2] are unreachable")
        ),
        "{actions:?}"
    );
}

/// Member `me` of ring [1, 2] in epoch 3, where both were readmitted in
/// epoch 3 (a lost quorum fenced them): by the group's books neither holds
/// stream 0's state.
fn nobody_holding(me: u32) -> TestNode {
    let mut node = fresh(me, Incarnation(1));
    let mut readmitted = change(3, &[1, 2], me);
    readmitted.joined_at = BTreeMap::from([(m(1), Epoch(3)), (m(2), Epoch(3))]);
    node.handle_group(Time::ZERO, readmitted);
    let peer = 3 - me;
    node.handle_message(Time::ZERO, m(peer), NodeMessage::Recovery(report(3, peer)));
    assert!(node.mode().is_active());
    drain(&mut node);
    assert_eq!(node.pending(0), members(&[1, 2]));
    node
}

fn offer(holds: Option<Held>, seen: u64, state: &[u8]) -> NodeMessage {
    NodeMessage::StateOffer {
        stream: 0,
        epoch: Epoch(3),
        holds,
        seen,
        checksum: state_checksum(state),
        dtype: DType::F32,
        len: 2,
    }
}

fn held(seq: u64, epoch: u64) -> Option<Held> {
    Some(Held {
        seq,
        epoch: Epoch(epoch),
    })
}

// Issue 13, item 2: a lost quorum fenced every member; each trainer
// rejoined, nobody was left to hand the state over, and every join() failed
// after 60 s although the survivors' trainers held the same, current state.
// The joiners now offer their states; the most advanced one's holder hands
// it over, as the live trainers would.
#[test]
fn with_every_member_joining_the_most_advanced_state_is_handed_over() {
    let mut node = nobody_holding(1);
    let state = bytes(&[4.0, 8.0]);
    node.handle_join(
        ms(1),
        JoinRequest {
            holds: held(7, 2),
            buffer: state.clone(),
            ..join_request()
        },
    );
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![
            Action::Control(ControlRequest::WantIn),
            Action::Message {
                to: m(2),
                msg: offer(held(7, 2), 0, &state),
            },
        ]
    );
    // m2's trainer is one step behind (its call of op 7 failed), and its
    // daemon had seen op 8 (a stand-in, say): the hand-over is op 9.
    node.handle_message(ms(2), m(2), offer(held(6, 2), 8, &bytes(&[1.0, 1.0])));
    let op = OpId::new(0, 9);
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![
            Action::Message {
                to: m(2),
                msg: join_point(op, 3, 1, &state, &[1, 2]),
            },
            Action::Frame {
                to: m(2),
                header: header(op, 3, 1, 0, 2),
                payload: state.clone(),
            },
            Action::Reply {
                id: RequestId(9),
                buffer: state,
                outcome: Ok(done(op, 3, &[1, 2])),
            },
        ]
    );
    assert_eq!(node.pending(0), vec![], "both hold the state again");
}

#[test]
fn a_joiner_less_advanced_waits_for_the_holders_hand_over() {
    let mut node = nobody_holding(2);
    let mine = bytes(&[1.0, 1.0]);
    node.handle_join(
        ms(1),
        JoinRequest {
            holds: held(6, 2),
            buffer: mine.clone(),
            ..join_request()
        },
    );
    drain(&mut node);
    let state = bytes(&[4.0, 8.0]);
    node.handle_message(ms(2), m(1), offer(held(7, 2), 0, &state));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    let op = OpId::new(0, 8);
    node.handle_message(ms(3), m(1), join_point(op, 3, 1, &state, &[1, 2]));
    node.handle_frame(ms(4), header(op, 3, 1, 0, 2), state.clone());
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(9),
            buffer: state,
            outcome: Ok(done(op, 3, &[1, 2])),
        }]
    );
}

#[test]
fn with_no_state_anywhere_every_join_fails_saying_so() {
    let mut node = nobody_holding(2);
    node.handle_join(ms(1), join_request());
    drain(&mut node);
    node.handle_message(ms(2), m(1), offer(None, 5, &[0; 8]));
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(&actions[..], [Action::Reply { id: RequestId(9), outcome: Err(OpError::Rejected(why)), .. }]
            if why.contains("no trainer holds stream 0's state") && why.contains("checkpoint")),
        "{actions:?}"
    );
}

#[test]
fn the_state_to_resume_from_is_the_latest_result_and_must_agree() {
    let a = bytes(&[1.0, 2.0]);
    let b = bytes(&[3.0, 4.0]);
    let o = |holds, state: &[u8]| joins::Offer {
        epoch: Epoch(5),
        holds,
        seen: 0,
        checksum: state_checksum(state),
        dtype: DType::F32,
        len: 2,
    };
    let (fenced, rerun, fresh) = (o(held(7, 2), &a), o(held(7, 3), &b), o(None, &a));
    // m1 completed op 7 in epoch 2 as it was cut off; m2 and m3 re-ran it
    // without m1 in epoch 3: theirs is the group's.
    assert_eq!(
        joins::choose_state(0, &[(m(1), &fenced), (m(2), &rerun), (m(3), &rerun)]),
        Ok((m(2), 8))
    );
    assert_eq!(
        joins::choose_state(0, &[(m(1), &fresh), (m(2), &fenced)]),
        Ok((m(2), 8))
    );
    let differ = o(held(7, 3), &a);
    let err = joins::choose_state(0, &[(m(1), &rerun), (m(2), &differ)]).unwrap_err();
    assert!(
        err.contains("states after op 7 of stream 0 differ"),
        "{err}"
    );
    assert!(joins::choose_state(0, &[(m(1), &fresh)]).is_err());
}

fn kept_result(seq: u64, contributors: &[u32]) -> KeptResult {
    KeptResult {
        op: OpId::new(0, seq),
        contributors: members(contributors),
        waiting: vec![],
        dtype: DType::F32,
        len: 2,
    }
}

/// Member 2 of ring [1, 2] removed in epoch 2...
fn removed_for_a_test() -> GroupChange {
    GroupChange {
        removed: Some("removed for a test".into()),
        ..change(2, &[1], 2)
    }
}

/// ... and readmitted in epoch 3.
fn back_in_epoch_3() -> GroupChange {
    GroupChange {
        joined_at: [(m(1), Epoch(1)), (m(2), Epoch(3))].into_iter().collect(),
        ..change(3, &[1, 2], 2)
    }
}

/// Issue 13, item 3: removed while its trainer waits in an all-reduce, a
/// member whose trainer holds results of the group's history holds the call
/// instead of failing it, asks to come back, claims in the readmitting
/// epoch's report what its trainer holds, receives the results it missed
/// from the member that kept them and serves them in order; then it runs
/// the next op with the group again.
#[test]
fn a_member_removed_in_lockstep_holds_its_call_and_serves_the_results_it_missed() {
    let mut node = active(2, &[1, 2], NodeConfig::default());
    node.handle_peer_up(ms(1), m(1));
    drain(&mut node);
    let op = |seq| OpId::new(0, seq);
    node.handle_submit(ms(1), all_reduce(1, 1, &[1.0, 2.0]));
    drain(&mut node);
    node.handle_frame(ms(2), header(op(1), 1, 1, PAIR, 2), bytes(&[3.0, 3.0]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(1),
            buffer: bytes(&[4.0, 5.0]),
            outcome: Ok(done(op(1), 1, &[1, 2])),
        }]
    );
    node.handle_submit(ms(3), all_reduce(2, 2, &[1.0, 1.0]));
    drain(&mut node);
    removed_and_back_claiming_op_2(&mut node, ms(10));
    let theirs = RecoveryReport {
        completed: vec![
            kept_result(1, &[1, 2]),
            kept_result(2, &[1]),
            kept_result(3, &[1]),
        ],
        ..report(3, 1)
    };
    node.handle_message(ms(21), m(1), NodeMessage::Recovery(theirs));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    assert!(
        node.pending(0).is_empty(),
        "back in lockstep, not waiting for a state"
    );
    // Member 1 broadcasts the results it kept (a chain's first hop).
    node.handle_frame(ms(22), header(op(3), 3, 1, 0, 2), bytes(&[9.0, 9.0]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![],
        "kept for the trainer"
    );
    node.handle_frame(ms(23), header(op(2), 3, 1, 0, 2), bytes(&[7.0, 8.0]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(2),
            buffer: bytes(&[7.0, 8.0]),
            outcome: Ok(done(op(2), 3, &[1])),
        }],
        "the held call gets the group's result"
    );
    node.handle_submit(ms(24), all_reduce(3, 3, &[0.5, 0.5]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(3),
            buffer: bytes(&[9.0, 9.0]),
            outcome: Ok(done(op(3), 3, &[1])),
        }]
    );
    node.handle_submit(ms(25), all_reduce(4, 4, &[1.0, 1.0]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Frame {
            to: m(1),
            header: header(op(4), 3, 2, PAIR, 2),
            payload: bytes(&[1.0, 1.0]),
        }],
        "the next op runs with the group again"
    );
}

/// Member 2 of [1, 2], its trainer waiting for op 2 (of stream 0) and
/// holding op 1's result of both: removed at `at`, it holds the call and
/// asks to come back; readmitted 10 ms later, its report claims op 2 on.
fn removed_and_back_claiming_op_2(node: &mut TestNode, at: Time) {
    node.handle_group(at, removed_for_a_test());
    assert_eq!(
        without_progress(drain(node)),
        vec![Action::Control(ControlRequest::WantIn)],
        "the call is held, and the member asks to come back"
    );
    node.handle_group(at.after(Duration::from_millis(10)), back_in_epoch_3());
    let mine = RecoveryReport {
        returning: vec![crate::membership::ReturnClaim {
            stream: 0,
            next: 2,
            last: members(&[1, 2]),
        }],
        ..report(3, 2)
    };
    assert_eq!(
        without_progress(drain(node)),
        vec![Action::Message {
            to: m(1),
            msg: NodeMessage::Recovery(mine),
        }],
        "its report claims what its trainer holds"
    );
}

/// ... and with a result it needs gone from every member, its trainer is
/// told why and must join again.
#[test]
fn a_return_refused_fails_the_held_call_with_the_reason() {
    let mut node = active(2, &[1, 2], NodeConfig::default());
    node.handle_peer_up(ms(1), m(1));
    node.handle_submit(ms(1), all_reduce(1, 1, &[1.0, 2.0]));
    node.handle_frame(
        ms(2),
        header(OpId::new(0, 1), 1, 1, PAIR, 2),
        bytes(&[3.0, 3.0]),
    );
    node.handle_submit(ms(3), all_reduce(2, 2, &[1.0, 1.0]));
    node.handle_group(ms(10), removed_for_a_test());
    node.handle_group(ms(20), back_in_epoch_3());
    drain(&mut node);
    let theirs = RecoveryReport {
        completed: vec![kept_result(3, &[1])],
        ..report(3, 1)
    };
    node.handle_message(ms(21), m(1), NodeMessage::Recovery(theirs));
    let actions = without_progress(drain(&mut node));
    let [Action::Reply {
        id: RequestId(2),
        outcome: Err(OpError::NoQuorum(why)),
        ..
    }] = &actions[..]
    else {
        panic!("{actions:?}");
    };
    assert!(
        why.starts_with("removed for a test; it could not come back in lockstep: no member"),
        "{why}"
    );
    assert_eq!(node.pending(0), members(&[2]), "it waits for the state");
}

/// Issue 13, item 3: a daemon that did not run for its peers' suspicion
/// bound withholds what completes from its trainer (frames that waited in
/// its socket complete ops the others may have re-run without it) until
/// its control plane has read the group after the pause: two heartbeat
/// intervals on, it asks; still the same epoch, the result goes out.
#[test]
fn a_result_completed_after_a_pause_waits_for_the_epoch_to_be_confirmed() {
    let mut node = active(2, &[1, 2], NodeConfig::default());
    node.handle_peer_up(ms(1), m(1));
    drain(&mut node);
    let op = OpId::new(0, 1);
    node.handle_submit(ms(1), all_reduce(1, 1, &[1.0, 2.0]));
    drain(&mut node);
    // Stopped from 1 ms to 301 ms: the peer's frame waited meanwhile.
    node.handle_frame(ms(301), header(op, 1, 1, PAIR, 2), bytes(&[3.0, 3.0]));
    assert_eq!(without_progress(drain(&mut node)), vec![], "withheld");
    node.handle_heartbeat(ms(400), m(1));
    node.handle_timeout(ms(500));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    node.handle_timeout(ms(501));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Control(ControlRequest::Confirm { asked: 1 })]
    );
    // An older confirmation says nothing about this pause.
    let read = |asked| GroupChange {
        confirmed: Some(asked),
        ..change(1, &[1, 2], 2)
    };
    node.handle_group(ms(505), read(0));
    assert_eq!(without_progress(drain(&mut node)), vec![]);
    node.handle_group(ms(510), read(1));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(1),
            buffer: bytes(&[4.0, 5.0]),
            outcome: Ok(done(op, 1, &[1, 2])),
        }]
    );
    // Not in doubt any more: the next result goes out at once.
    node.handle_submit(ms(511), all_reduce(2, 2, &[1.0, 1.0]));
    drain(&mut node);
    node.handle_frame(
        ms(512),
        header(OpId::new(0, 2), 1, 1, PAIR, 2),
        bytes(&[1.0, 1.0]),
    );
    let actions = without_progress(drain(&mut node));
    assert!(
        matches!(
            &actions[..],
            [Action::Reply {
                id: RequestId(2),
                outcome: Ok(_),
                ..
            }]
        ),
        "{actions:?}"
    );
}

/// ... and removed meanwhile, it takes the result back: the call is held,
/// its input back in its buffer, and the return claims the op before it,
/// so the group's version comes by catch-up.
#[test]
fn a_result_withheld_after_a_pause_is_taken_back_when_the_member_was_removed() {
    let mut node = active(2, &[1, 2], NodeConfig::default());
    node.handle_peer_up(ms(1), m(1));
    let op = |seq| OpId::new(0, seq);
    node.handle_submit(ms(1), all_reduce(1, 1, &[1.0, 2.0]));
    node.handle_frame(ms(2), header(op(1), 1, 1, PAIR, 2), bytes(&[3.0, 3.0]));
    node.handle_submit(ms(3), all_reduce(2, 2, &[1.0, 1.0]));
    drain(&mut node);
    node.handle_frame(ms(400), header(op(2), 1, 1, PAIR, 2), bytes(&[5.0, 5.0]));
    assert_eq!(without_progress(drain(&mut node)), vec![], "withheld");
    // Taken back: it claims the op before the withheld one.
    removed_and_back_claiming_op_2(&mut node, ms(410));
    let theirs = RecoveryReport {
        completed: vec![kept_result(1, &[1, 2]), kept_result(2, &[1])],
        ..report(3, 1)
    };
    node.handle_message(ms(421), m(1), NodeMessage::Recovery(theirs));
    drain(&mut node);
    node.handle_frame(ms(422), header(op(2), 3, 1, 0, 2), bytes(&[7.0, 8.0]));
    assert_eq!(
        without_progress(drain(&mut node)),
        vec![Action::Reply {
            id: RequestId(2),
            buffer: bytes(&[7.0, 8.0]),
            outcome: Ok(done(op(2), 3, &[1])),
        }],
        "the held call gets the group's result, not the one withheld"
    );
}
