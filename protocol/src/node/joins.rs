//! Joins and state hand-over: a trainer that (re)joins waits in `join()`
//! until a live member's trainer hands its state over (`StateSync`, run as a
//! broadcast from that member); the root announces the hand-over to the
//! joiners with the state's checksum, and the joiner checks what arrived.
//!
//! With no live trainer left (a lost quorum fenced every member, and each
//! trainer rejoined), the joiners offer the states they hold: once every
//! ring member's offer is in, the most advanced state's holder hands it to
//! the others the same way.

use tracing::{info, warn};

use super::op::{Caller, Role, Running, Task};
use super::types::{Buffer, JoinRequest, OpError};
use super::Node;
use crate::local::LocalKind;
use crate::membership::state_checksum;
use crate::wire::{DType, Held, NodeMessage};
use crate::{Epoch, MemberId, OpId, Time};

/// A trainer of this daemon waiting in `join()`.
#[derive(Debug)]
pub(super) struct Joiner<B> {
    pub caller: Caller<B>,
    pub dtype: DType,
    pub len: usize,
    /// The last op whose result the state in its buffer includes; `None`
    /// once the buffer no longer holds the trainer's state (a hand-over
    /// into it was interrupted).
    pub holds: Option<Held>,
}

/// A joining trainer's state, as its daemon offers it to the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Offer {
    pub epoch: Epoch,
    pub holds: Option<Held>,
    pub seen: u64,
    pub checksum: u64,
    pub dtype: DType,
    pub len: u64,
}

impl Offer {
    fn message(&self, stream: u32) -> NodeMessage {
        NodeMessage::StateOffer {
            stream,
            epoch: self.epoch,
            holds: self.holds,
            seen: self.seen,
            checksum: self.checksum,
            dtype: self.dtype,
            len: self.len,
        }
    }
}

/// From every ring member's offer: the member whose state the group
/// resumes from (the most advanced; the lowest id among equals) and the
/// seq of the hand-over (past every seq any member has seen), or why
/// there is nothing to resume from.
pub(super) fn choose_state(
    stream: u32,
    offers: &[(MemberId, &Offer)],
) -> Result<(MemberId, u64), String> {
    let best = offers
        .iter()
        .filter_map(|&(m, o)| o.holds.map(|h| (h, m)))
        .max_by_key(|&(h, m)| (h, std::cmp::Reverse(m)));
    let Some((held, root)) = best else {
        return Err(format!(
            "no trainer holds stream {stream}'s state: every member of the ring is joining, none \
             with a state the group ran (restore() the trainers' state from a checkpoint, then \
             join(), or start training over)"
        ));
    };
    let same: Vec<(MemberId, u64)> = offers
        .iter()
        .filter(|(_, o)| o.holds == Some(held))
        .map(|&(m, o)| (m, o.checksum))
        .collect();
    if same.iter().any(|&(_, c)| c != same[0].1) {
        let list: Vec<String> = same.iter().map(|(m, c)| format!("{m} {c:#x}")).collect();
        return Err(format!(
            "the joining trainers' states after op {} of stream {stream} differ ({}): there is \
             no one state to resume from",
            held.seq,
            list.join(", ")
        ));
    }
    let seen = offers.iter().map(|(_, o)| o.seen).max().unwrap_or(0);
    Ok((root, seen.max(held.seq) + 1))
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
            holds: join.holds,
        };
        // (A hand-over an earlier join missed still counts: it may have
        // finished at the others, who then count this member as holding
        // the state. Its readmission clears it; see `handle_group`.)
        // An offer of an earlier join's state says nothing about this one.
        self.offered.remove(&stream);
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
            .filter(|&m| !self.returned_on(stream, m))
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
        self.offer_states();
    }

    /// Whether no member of the ring holds `stream`'s state by the group's
    /// books: every one was admitted after its last hand-over.
    fn nobody_holds(&self, stream: u32) -> bool {
        !self.ring.is_empty() && self.pending(stream).len() == self.ring.len()
    }

    /// The highest seq of `stream` this daemon has seen: issued by its
    /// trainer, closed by a step coordinator, or kept as a result.
    fn seen_seq(&self, stream: u32) -> u64 {
        let issued = self.issued.get(&stream).copied().unwrap_or(0);
        let closed = self.steps.closed_upto.get(&stream).copied().unwrap_or(0);
        let kept = self
            .retained
            .get(&stream)
            .and_then(|k| k.back())
            .map_or(0, |r| r.op.seq());
        issued.max(closed).max(kept)
    }

    /// Offers the state of each trainer joining a stream that no member of
    /// the ring holds, once per epoch, to the whole ring. Without this a lost
    /// quorum wedged the group: every trainer rejoined, nobody was left to
    /// hand over, and every `join()` failed although the survivors' trainers
    /// held identical, current states (issue 13, item 2).
    pub(super) fn offer_states(&mut self) {
        if !self.mode.is_active() {
            return;
        }
        let epoch = self.epoch;
        let streams: Vec<u32> = self
            .joins
            .keys()
            .copied()
            .filter(|&s| self.offered.get(&s) != Some(&epoch) && self.nobody_holds(s))
            .collect();
        for stream in streams {
            let j = &self.joins[&stream];
            let offer = Offer {
                epoch,
                holds: j.holds,
                seen: self.seen_seq(stream),
                checksum: state_checksum(j.caller.buffer.as_bytes()),
                dtype: j.dtype,
                len: j.len as u64,
            };
            info!(stream, holds = ?offer.holds, checksum = offer.checksum, "no member of the ring holds the state: offering this trainer's");
            self.offered.insert(stream, epoch);
            self.tell_ring(&offer.message(stream));
            self.offers
                .entry(stream)
                .or_default()
                .insert(self.me, offer);
            self.try_resume(stream);
        }
    }

    /// Sends `to` (connected again) the offers of this epoch it may have
    /// missed: one sent while it was not connected was dropped.
    pub(super) fn resend_offers(&mut self, to: MemberId) {
        if !self.ring.contains(&to) {
            return;
        }
        let (me, epoch) = (self.me, self.epoch);
        let mine: Vec<NodeMessage> = self
            .offers
            .iter()
            .filter(|(s, _)| self.offered.get(s) == Some(&epoch) && self.joins.contains_key(s))
            .filter_map(|(&s, o)| {
                o.get(&me)
                    .filter(|o| o.epoch == epoch)
                    .map(|o| o.message(s))
            })
            .collect();
        for msg in mine {
            self.send(to, msg);
        }
    }

    /// A ring member's trainer offers its state.
    pub(super) fn on_state_offer(&mut self, from: MemberId, stream: u32, offer: Offer) {
        self.offers.entry(stream).or_default().insert(from, offer);
        self.try_resume(stream);
    }

    /// With every ring member's offer of this epoch in, and still nobody
    /// holding the state: the chosen holder hands its state to the others
    /// (the others wait for its announcement), or every joiner is told why
    /// there is nothing to resume from. Every member decides the same.
    fn try_resume(&mut self, stream: u32) {
        if !self.mode.is_active() || !self.joins.contains_key(&stream) || !self.nobody_holds(stream)
        {
            return;
        }
        let epoch = self.epoch;
        let Some(offers) = self.offers.get(&stream) else {
            return;
        };
        let current: Vec<(MemberId, &Offer)> = self
            .ring
            .iter()
            .filter_map(|&m| offers.get(&m).filter(|o| o.epoch == epoch).map(|o| (m, o)))
            .collect();
        if current.len() < self.ring.len() {
            return;
        }
        match choose_state(stream, &current) {
            Err(why) => {
                let j = self.joins.remove(&stream).expect("checked");
                self.offered.remove(&stream);
                warn!(stream, %why, "the group cannot resume");
                self.reply(j.caller.id, j.caller.buffer, Err(OpError::Rejected(why)));
            }
            Ok((root, seq)) if root == self.me => {
                let Joiner {
                    caller, dtype, len, ..
                } = self.joins.remove(&stream).expect("checked");
                self.offered.remove(&stream);
                let op = OpId::new(stream, seq);
                let issued = self.issued.entry(stream).or_insert(0);
                *issued = (*issued).max(seq);
                info!(%op, "every member is joining: the group resumes from this trainer's state, the most advanced");
                let run = Running {
                    op,
                    kind: LocalKind::Broadcast(root),
                    name: "state_sync",
                    dtype,
                    len,
                    members: self.ring.clone(),
                    started: caller.since,
                    role: Role::Trainer {
                        caller,
                        input: Vec::new(),
                        samples: None,
                        task: Task::HandOver,
                    },
                    kept: None,
                    cut: None,
                };
                if let Some(run) = self.check_buffer(run) {
                    self.start(run);
                }
            }
            Ok((root, seq)) => {
                info!(stream, %root, seq, "every member is joining: the group resumes from the most advanced state, held by {root}");
            }
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
        let Joiner {
            caller,
            dtype,
            len,
            holds,
        } = joiner;
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
            self.joins.insert(
                jp.op.stream(),
                Joiner {
                    caller,
                    dtype,
                    len,
                    holds,
                },
            );
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
