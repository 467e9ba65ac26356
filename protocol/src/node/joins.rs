//! Joins and state hand-over: a trainer that (re)joins waits in `join()`
//! until a live member's trainer hands its state over (`StateSync`, run as a
//! broadcast from that member); the root announces the hand-over to the
//! joiners with the state's checksum, and the joiner checks what arrived.

use tracing::{info, warn};

use super::op::{Caller, Role, Running, Task};
use super::types::{Buffer, JoinRequest, OpError};
use super::Node;
use crate::local::LocalKind;
use crate::wire::DType;
use crate::{Epoch, MemberId, OpId, Time};

/// A trainer of this daemon waiting in `join()`.
#[derive(Debug)]
pub(super) struct Joiner<B> {
    pub caller: Caller<B>,
    pub dtype: DType,
    pub len: usize,
}

/// A hand-over a live member announced to this daemon.
#[derive(Clone, Debug)]
pub(super) struct JoinPoint {
    pub op: OpId,
    pub epoch: Epoch,
    pub root: MemberId,
    pub dtype: DType,
    pub len: u64,
    pub checksum: u64,
    pub members: Vec<MemberId>,
}

impl<B: Buffer> Node<B> {
    /// A trainer joins the group on `join.stream`. Answered when the live
    /// trainers' state has arrived in its buffer and checked out, with the
    /// hand-over's op (the stream goes on after it).
    pub fn handle_join(&mut self, now: Time, join: JoinRequest<B>) {
        self.enter(now);
        info!(
            stream = join.stream,
            "trainer joining: asking to be in the ring and for the state"
        );
        self.ask_in();
        let stream = join.stream;
        if self.mode.admitted() && !self.pending(stream).contains(&self.me) {
            // The group counts this member's trainer as holding the stream's
            // state, but it asks for it (its call failed after the group went
            // on, say): no live trainer hands state to a member that is not
            // waiting for it, so this daemon leaves the ring and is
            // readmitted as a joiner.
            warn!(
                stream,
                "trainer joining while this member is in the ring: leaving it to be readmitted with the group's state"
            );
            self.suspect(
                self.me,
                "its trainer asked to join again (it lost the group's state)".into(),
            );
        }
        let joiner = Joiner {
            caller: Caller {
                id: join.id,
                buffer: join.buffer,
                since: now,
            },
            dtype: join.dtype,
            len: join.len,
        };
        // A hand-over missed by an earlier join says nothing about this one.
        self.missed.remove(&stream);
        if let Some(old) = self.joins.insert(stream, joiner) {
            let err = OpError::Rejected("superseded by a newer join on the same stream".into());
            self.reply(old.caller.id, old.caller.buffer, Err(err));
        }
        self.try_joins();
        self.after_input();
    }

    /// A live member started handing state to this daemon.
    pub(super) fn on_join_point(&mut self, from: MemberId, stream: u32, jp: JoinPoint) {
        if from != jp.root {
            warn!(peer = %from, root = %jp.root, "join point from a member that is not its root: ignored");
            return;
        }
        self.join_points.insert(stream, jp);
        self.try_joins();
    }

    /// Members admitted after `stream` last agreed on its state: they take
    /// part only from the next hand-over (`StateSync`) on. Every live member
    /// computes the same set: it depends on the epoch's records and on the
    /// stream's agreed history only. Until a first hand-over, the group's
    /// bootstrap (epoch 1) is that agreement: every member admitted later
    /// came in through a trainer's `join()`, however early the stream's
    /// first op ran (the epoch of that op says nothing about who holds
    /// state: a joiner admitted before it is still waiting for state).
    pub fn pending(&self, stream: u32) -> Vec<MemberId> {
        let synced = self.synced.get(&stream).copied().unwrap_or(Epoch(1));
        self.ring
            .iter()
            .copied()
            .filter(|m| self.joined_at.get(m).is_some_and(|&at| at > synced))
            .collect()
    }

    /// Starts the hand-over op of every join whose announcement is here and
    /// current; drops announcements of older epochs (a re-run announces
    /// again).
    pub(super) fn try_joins(&mut self) {
        if !self.mode.is_active() {
            return;
        }
        let streams: Vec<u32> = self.join_points.keys().copied().collect();
        for stream in streams {
            let jp = self.join_points[&stream].clone();
            if jp.epoch < self.epoch {
                // A re-run announces again — unless the hand-over completed
                // without this member (see `check_missed_hand_overs`).
                self.join_points.remove(&stream);
                self.missed.insert(stream, jp.op);
                continue;
            }
            if jp.epoch > self.epoch {
                continue;
            }
            let Some(joiner) = self.joins.remove(&stream) else {
                continue;
            };
            self.join_points.remove(&stream);
            self.missed.remove(&stream);
            self.receive_state(joiner, jp);
        }
    }

    /// A joiner dropped the announcement of hand-over `op` (it came for an
    /// epoch this daemon had left) and a peer's trainer has since issued a
    /// later op of the stream: the hand-over finished without this member,
    /// which its peers now count as holding the state, so none hands it
    /// over again. It leaves the ring to be readmitted as a joiner (without
    /// this, its peers wait for its input until `stuck_after`).
    pub(super) fn check_missed_hand_overs(&mut self, from: MemberId) {
        let passed: Vec<(u32, OpId)> = self
            .missed
            .iter()
            .filter(|(stream, op)| {
                self.joins.contains_key(stream) && self.issued_by(from, **stream) > op.seq()
            })
            .map(|(&s, &op)| (s, op))
            .collect();
        for (stream, op) in passed {
            self.missed.remove(&stream);
            if !self.mode.admitted() {
                continue;
            }
            warn!(%op, peer = %from, "the group went on past a hand-over this member missed: leaving the ring to be readmitted as a joiner");
            self.suspect(
                self.me,
                format!("its trainer missed the hand-over {op} of the group's state"),
            );
        }
    }

    fn receive_state(&mut self, joiner: Joiner<B>, jp: JoinPoint) {
        let Joiner { caller, dtype, len } = joiner;
        if dtype != jp.dtype || len as u64 != jp.len {
            let err = OpError::Rejected(format!(
                "the live trainers hand over {} elements of {:?}, this trainer expects {len} of {dtype:?}",
                jp.len, jp.dtype
            ));
            return self.reply(caller.id, caller.buffer, Err(err));
        }
        if !jp.members.contains(&self.me) {
            // The announcement names the members the broadcast runs among;
            // one without this member cannot be run here.
            warn!(op = %jp.op, members = ?jp.members, "a hand-over announced to this member does not include it: waiting for the next");
            self.joins
                .insert(jp.op.stream(), Joiner { caller, dtype, len });
            return;
        }
        info!(op = %jp.op, root = %jp.root, "receiving the trainers' state");
        let run = Running {
            op: jp.op,
            kind: LocalKind::Broadcast(jp.root),
            name: "state_sync",
            dtype,
            len,
            // The hand-over's own members, not this ring: a re-run leaves
            // out members admitted after its first run, and a joiner that
            // counted them as holding the state after it never handed it
            // to them (cluster simulator, seed 294 with `backup=1`).
            members: jp.members,
            started: caller.since,
            role: Role::Trainer {
                caller,
                input: Vec::new(),
                samples: None,
                task: Task::Join {
                    checksum: jp.checksum,
                },
            },
            kept: None,
            cut: None,
        };
        self.start(run);
    }
}
