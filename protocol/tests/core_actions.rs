//! The collective core's exact action lists for small, hand-checked cases.

use std::time::Duration;

use phalanx_protocol::collective::{
    Action, Algorithm, Collectives, Config, FrameError, Kind, OpSpec, StartError,
};
use phalanx_protocol::wire::{AbortReason, DType, FrameHeader, ReduceOp};
use phalanx_protocol::{Epoch, Incarnation, MemberId, OpId, Step, Time};

const A: MemberId = MemberId(10);
const B: MemberId = MemberId(20);

fn spec(kind: Kind, algorithm: Algorithm, len: usize) -> OpSpec {
    OpSpec {
        op: OpId(7),
        epoch: Epoch(3),
        step: Step(1),
        kind,
        algorithm,
        dtype: DType::F32,
        len,
        members: vec![A, B],
    }
}

fn header(sender: MemberId, round: u32, chunk: u32, elems: u32) -> FrameHeader {
    FrameHeader {
        op: OpId(7),
        epoch: Epoch(3),
        step: Step(1),
        incarnation: Incarnation(0),
        sender,
        round,
        chunk,
        dtype: DType::F32,
        elem_count: elems,
    }
}

fn drain(core: &mut Collectives) -> Vec<Action> {
    std::iter::from_fn(|| core.poll_action()).collect()
}

fn small_chunks() -> Config {
    Config {
        chunk_bytes: 8, // two f32 per piece
        ..Config::default()
    }
}

#[test]
fn two_member_ring_streams_pieces_and_reduces_on_arrival() {
    let mut core = Collectives::new(A, small_chunks());
    core.start(
        Time(0),
        spec(Kind::AllReduce(ReduceOp::Sum), Algorithm::Ring, 6),
    )
    .unwrap();
    // A (index 0) owns segment 0 = 0..3; in round 0 it sends segment 1 = 3..6
    // cut into two pieces (3..5, 5..6) and waits for segment 0 from B.
    assert_eq!(
        drain(&mut core),
        vec![
            Action::Send {
                op: OpId(7),
                to: B,
                header: header(A, 0, 0, 2),
                range: 3..5
            },
            Action::Send {
                op: OpId(7),
                to: B,
                header: header(A, 0, 1, 1),
                range: 5..6
            },
        ]
    );
    // Piece 1 of round 0 arrives first: it is reduced at once, and the reduced
    // piece is forwarded in round 1 (all-gather) without waiting for piece 0.
    let h = header(B, 0, 1, 1);
    core.handle_frame(Time(5), h, vec![0; 4]).unwrap();
    assert_eq!(
        drain(&mut core),
        vec![
            Action::Reduce {
                op: OpId(7),
                range: 2..3,
                reduce: ReduceOp::Sum,
                payload: vec![0; 4],
                from: h
            },
            Action::Send {
                op: OpId(7),
                to: B,
                header: header(A, 1, 1, 1),
                range: 2..3
            },
        ]
    );
    let h0 = header(B, 0, 0, 2);
    core.handle_frame(Time(6), h0, vec![0; 8]).unwrap();
    let g0 = header(B, 1, 0, 2);
    core.handle_frame(Time(7), g0, vec![1; 8]).unwrap();
    let g1 = header(B, 1, 1, 1);
    core.handle_frame(Time(8), g1, vec![1; 4]).unwrap();
    assert_eq!(
        drain(&mut core),
        vec![
            Action::Reduce {
                op: OpId(7),
                range: 0..2,
                reduce: ReduceOp::Sum,
                payload: vec![0; 8],
                from: h0
            },
            Action::Send {
                op: OpId(7),
                to: B,
                header: header(A, 1, 0, 2),
                range: 0..2
            },
            Action::Copy {
                op: OpId(7),
                range: 3..5,
                payload: vec![1; 8],
                from: g0
            },
            Action::Copy {
                op: OpId(7),
                range: 5..6,
                payload: vec![1; 4],
                from: g1
            },
            Action::Complete {
                op: OpId(7),
                epoch: Epoch(3),
                contributors: vec![A, B]
            },
        ]
    );
    assert_eq!(core.in_flight(), 0);
    assert_eq!(core.stats().completed, 1);
}

#[test]
fn frames_before_start_are_held_then_applied() {
    let mut core = Collectives::new(B, Config::default());
    let h = header(A, 1, 0, 4);
    core.handle_frame(Time(1), h, vec![9; 16]).unwrap();
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.stats().orphaned_frames, 1);
    core.start(
        Time(2),
        spec(
            Kind::AllReduce(ReduceOp::Mean),
            Algorithm::RecursiveDoubling,
            4,
        ),
    )
    .unwrap();
    // Two members: no fold (round 0 empty), one exchange in round 1, no unfold.
    assert_eq!(
        drain(&mut core),
        vec![
            Action::Send {
                op: OpId(7),
                to: A,
                header: header(B, 1, 0, 4),
                range: 0..4
            },
            Action::Reduce {
                op: OpId(7),
                range: 0..4,
                reduce: ReduceOp::Sum,
                payload: vec![9; 16],
                from: h
            },
            Action::Divide {
                op: OpId(7),
                range: 0..4,
                divisor: 2
            },
            Action::Complete {
                op: OpId(7),
                epoch: Epoch(3),
                contributors: vec![A, B]
            },
        ]
    );
}

#[test]
fn old_epoch_frames_are_dropped_and_never_applied() {
    let mut core = Collectives::new(B, Config::default());
    core.start(
        Time(0),
        spec(
            Kind::AllReduce(ReduceOp::Sum),
            Algorithm::RecursiveDoubling,
            1,
        ),
    )
    .unwrap();
    drain(&mut core);
    let mut stale = header(A, 1, 0, 1);
    stale.epoch = Epoch(2);
    core.handle_frame(Time(1), stale, vec![0; 4]).unwrap();
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.stats().stale_frames, 1);
    // The epoch moves on: the op is aborted, and its late frames are dropped.
    core.set_epoch(Time(2), Epoch(4));
    assert_eq!(
        drain(&mut core),
        vec![Action::Aborted {
            op: OpId(7),
            epoch: Epoch(3),
            reason: AbortReason::EpochChanged(Epoch(4))
        }]
    );
    core.handle_frame(Time(3), header(A, 1, 0, 1), vec![0; 4])
        .unwrap();
    assert!(drain(&mut core).is_empty());
    assert_eq!(core.stats().stale_frames, 2);
    let err = core
        .start(
            Time(4),
            spec(Kind::AllReduce(ReduceOp::Sum), Algorithm::Ring, 1),
        )
        .unwrap_err();
    assert_eq!(
        err,
        StartError::StaleEpoch {
            epoch: Epoch(3),
            installed: Epoch(4)
        }
    );
}

#[test]
fn schedule_violations_abort_the_op_and_name_the_sender() {
    let mut core = Collectives::new(A, Config::default());
    core.start(
        Time(0),
        spec(Kind::AllReduce(ReduceOp::Sum), Algorithm::Ring, 4),
    )
    .unwrap();
    drain(&mut core);
    let wrong_count = header(B, 0, 0, 3);
    let err = core
        .handle_frame(Time(1), wrong_count, vec![0; 12])
        .unwrap_err();
    assert!(
        matches!(err, FrameError::Violation { sender: B, .. }),
        "{err}"
    );
    assert_eq!(
        drain(&mut core),
        vec![Action::Aborted {
            op: OpId(7),
            epoch: Epoch(3),
            reason: AbortReason::ProtocolViolation(B)
        }]
    );
    // A payload that disagrees with its header is refused before routing.
    let err = core
        .handle_frame(Time(2), header(B, 0, 0, 2), vec![0; 3])
        .unwrap_err();
    assert_eq!(
        err,
        FrameError::PayloadLength {
            expected: 8,
            actual: 3
        }
    );
    // A frame for an op that already ended is refused, not held forever.
    assert!(core
        .handle_frame(Time(3), header(B, 0, 0, 2), vec![0; 8])
        .is_err());
}

#[test]
fn member_down_and_timeout_abort() {
    let mut core = Collectives::new(
        A,
        Config {
            op_timeout: Duration::from_millis(10),
            ..Config::default()
        },
    );
    core.start(Time(0), spec(Kind::Barrier, Algorithm::Auto, 0))
        .unwrap();
    let mut other = spec(Kind::AllGather, Algorithm::Auto, 2);
    other.op = OpId(8);
    core.start(Time(0), other).unwrap();
    drain(&mut core);
    assert_eq!(core.poll_timeout(), Some(Time(10_000)));
    core.handle_member_down(Time(1), B);
    let aborted = drain(&mut core);
    assert_eq!(aborted.len(), 2);
    assert!(aborted.iter().all(|a| matches!(
        a,
        Action::Aborted {
            reason: AbortReason::MemberDown(B),
            ..
        }
    )));

    let mut third = spec(Kind::Broadcast { root: B }, Algorithm::Auto, 3);
    third.op = OpId(9);
    core.start(Time(100), third).unwrap();
    drain(&mut core);
    core.handle_timeout(Time(10_099));
    assert!(drain(&mut core).is_empty());
    core.handle_timeout(Time(10_100));
    assert_eq!(
        drain(&mut core),
        vec![Action::Aborted {
            op: OpId(9),
            epoch: Epoch(3),
            reason: AbortReason::Timeout
        }]
    );
    assert_eq!(core.poll_timeout(), None);
}

#[test]
fn start_rejects_bad_specs() {
    let mut core = Collectives::new(
        A,
        Config {
            max_tensor_bytes: 16,
            ..Config::default()
        },
    );
    let mut s = spec(Kind::AllReduce(ReduceOp::Sum), Algorithm::Auto, 5);
    assert_eq!(
        core.start(Time(0), s.clone()).unwrap_err(),
        StartError::TooLarge { bytes: 20, max: 16 }
    );
    s.len = 4;
    s.members = vec![A, B, A];
    assert_eq!(
        core.start(Time(0), s.clone()).unwrap_err(),
        StartError::DuplicateMember(A)
    );
    s.members = vec![B];
    assert_eq!(
        core.start(Time(0), s.clone()).unwrap_err(),
        StartError::NotAMember(A)
    );
    s.members = vec![A, B];
    s.kind = Kind::Broadcast { root: MemberId(99) };
    assert_eq!(
        core.start(Time(0), s.clone()).unwrap_err(),
        StartError::UnknownRoot(MemberId(99))
    );
    s.kind = Kind::Barrier;
    core.start(Time(0), s.clone()).unwrap();
    assert_eq!(
        core.start(Time(0), s).unwrap_err(),
        StartError::AlreadyRunning(OpId(7))
    );
}

#[test]
fn early_frames_after_the_op_ended_are_dropped_without_panicking() {
    // Duplicates of a frame that completes the op on replay.
    let mut core = Collectives::new(B, Config::default());
    let h = header(A, 1, 0, 4);
    for _ in 0..3 {
        core.handle_frame(Time(1), h, vec![0; 16]).unwrap();
    }
    core.start(
        Time(2),
        spec(
            Kind::AllReduce(ReduceOp::Sum),
            Algorithm::RecursiveDoubling,
            4,
        ),
    )
    .unwrap();
    let actions = drain(&mut core);
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::Complete { .. }))
            .count(),
        1
    );
    assert_eq!(core.in_flight(), 0);

    // A bad early frame aborts the op; the good ones after it are moot.
    let mut core = Collectives::new(B, Config::default());
    core.handle_frame(Time(1), header(A, 1, 0, 3), vec![0; 12])
        .unwrap();
    core.handle_frame(Time(1), h, vec![0; 16]).unwrap();
    core.start(
        Time(2),
        spec(
            Kind::AllReduce(ReduceOp::Sum),
            Algorithm::RecursiveDoubling,
            4,
        ),
    )
    .unwrap();
    let actions = drain(&mut core);
    assert!(
        matches!(
            actions.last(),
            Some(Action::Aborted {
                reason: AbortReason::ProtocolViolation(A),
                ..
            })
        ),
        "{actions:?}"
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Reduce { .. })));
    assert_eq!(core.in_flight(), 0);
}
