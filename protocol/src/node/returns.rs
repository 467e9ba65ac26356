//! Coming back in lockstep: a member removed while its trainer was in the
//! middle of training (a false suspicion on a starved machine, a short
//! partition) holds its trainer's calls instead of failing them, asks to be
//! readmitted in the same life, and — if the group still holds every result
//! it missed since its trainer's last one, and that last one is the group's
//! — receives those results from a member that holds them and serves them
//! to its trainer in order, as a stood-in straggler's daemon does. The
//! trainer sees slow calls, not an error, and no state is handed over:
//! its state is the group's once it has applied the same results.
//!
//! What decides is the readmitting epoch's recovery exchange (every member
//! decides the same from the same reports, [`Recovery::returns`]): the
//! returning member's report claims, per stream, the first op its trainer
//! lacks and the contributors of the last one it has. Refused, its trainer
//! is told why and joins again as before.
//!
//! [`Recovery::returns`]: crate::membership::Recovery::returns

use tracing::{info, warn};

use super::op::{KeptNames, Queued, Role, Running, Task};
use super::types::{Buffer, Event, OpError, Request};
use super::Node;
use crate::local::LocalKind;
use crate::membership::{KeptResult, Plan, Return, ReturnClaim};
use crate::{Epoch, MemberId, OpId, Time};
use std::collections::{BTreeMap, BTreeSet};

/// This member on its way back with its trainer's history.
#[derive(Debug)]
pub(super) struct Returning {
    /// Why it was removed (what the trainer is told if it cannot return).
    pub why: String,
    /// When it was removed: it gives up after the recovery bound.
    pub since: Time,
    /// Per stream, what its trainer holds.
    pub claims: Vec<ReturnClaim>,
}

impl<B: Buffer> Node<B> {
    /// Removed from the ring with `why`: whether this member comes back in
    /// lockstep instead of failing its trainer's calls. It does when its
    /// trainer holds results of the group's history (and is not joining)
    /// and is in the middle of training: a call is waiting, or one was
    /// answered within the recovery bound. Its trainer's calls are then
    /// held (a parked op's input goes back into its buffer, to be submitted
    /// again) and it asks to be readmitted.
    pub(super) fn start_return(&mut self, why: &str) -> bool {
        if self.returning.is_some() {
            // Still out (another epoch without it): already on its way.
            self.ask_in();
            return true;
        }
        let now = self.now;
        let lately = self
            .answered
            .values()
            .any(|&(_, at)| now.since(at) < self.config.recovery_timeout);
        let held = self
            .parked
            .values()
            .any(|p| matches!(p.run.role, Role::Trainer { .. }))
            || !self.waiting.is_empty()
            || !self.steps.late.is_empty();
        let joining = !self.joins.is_empty()
            || self
                .parked
                .values()
                .any(|p| matches!(p.run.task(), Some(Task::Join { .. })) || p.run.kept.is_some());
        let claims: Vec<ReturnClaim> = self
            .answered
            .iter()
            .filter_map(|(&stream, &(seq, _))| {
                let last = self.kept(OpId::new(stream, seq))?;
                Some(ReturnClaim {
                    stream,
                    next: seq + 1,
                    last: last.contributors.clone(),
                })
            })
            .collect();
        if joining || claims.is_empty() || !(held || lately) {
            return false;
        }
        info!(reason = %why, ?claims, "removed while the trainer is in lockstep: holding its calls and asking to come back with its history");
        for (_, p) in std::mem::take(&mut self.parked) {
            if let Some(q) = self.requeue(p.run) {
                self.waiting.push(q);
            }
        }
        let late: Vec<Queued<B>> = std::mem::take(&mut self.steps.late).into_values().collect();
        self.waiting.extend(late);
        self.waiting.sort_by_key(|q| q.req.op);
        self.returning = Some(Returning {
            why: why.to_string(),
            since: now,
            claims,
        });
        self.ask_in();
        true
    }

    /// A parked op of this daemon's trainer as the request it was, its
    /// input back in its buffer (a stand-in's is dropped: it is fetched
    /// again).
    pub(super) fn requeue(&mut self, mut run: Running<B>) -> Option<Queued<B>> {
        run.restore_input();
        let kind = match run.task()? {
            Task::HandOver => LocalKind::StateSync,
            _ => run.kind,
        };
        let samples = run.samples();
        let Role::Trainer { caller, .. } = run.role else {
            return None;
        };
        Some(Queued {
            req: Request {
                id: caller.id,
                op: run.op,
                kind,
                dtype: run.dtype,
                len: run.len,
                samples,
                buffer: caller.buffer,
            },
            since: caller.since,
        })
    }

    /// The readmitting epoch's decisions on returning members (before its
    /// plans are followed: who holds a stream's state decides who runs).
    pub(super) fn apply_returns(
        &mut self,
        returns: BTreeMap<(MemberId, u32), Return>,
        returned: BTreeSet<(u32, MemberId, Epoch)>,
        plans: &BTreeMap<OpId, Plan>,
    ) {
        let mine = self.returning.take();
        // First the group's view of who holds each state: hand-overs as
        // the holder counts them (some may have run while this member was
        // out), and every return the ring reports; then every member back
        // in this epoch, this one among them.
        for ((member, stream), ret) in &returns {
            if let (true, Return::CatchUp { synced, .. }) = (*member == self.me, ret) {
                match synced {
                    Some(e) => self.synced.insert(*stream, *e),
                    None => self.synced.remove(stream),
                };
            }
        }
        for (stream, member, at) in returned {
            if self.joined_at.get(&member) == Some(&at) {
                self.returned.entry(stream).or_default().insert(member, at);
            }
        }
        for ((member, stream), ret) in &returns {
            if let (Return::CatchUp { .. }, Some(&at)) = (ret, self.joined_at.get(member)) {
                self.returned
                    .entry(*stream)
                    .or_default()
                    .insert(*member, at);
            }
        }
        for ((member, stream), ret) in returns {
            let me = member == self.me;
            match ret {
                Return::CatchUp {
                    holder, results, ..
                } => {
                    if me {
                        info!(stream, %holder, missed = results.len(), "back in lockstep: receiving the results the trainer missed");
                        self.event(Event::Returned {
                            caught_up: true,
                            missed: results.len(),
                        });
                        for r in &results {
                            self.receive_missed(r, plans);
                        }
                    }
                }
                Return::Refused(reason) if me => {
                    let why = mine.as_ref().map_or("", |r| r.why.as_str());
                    warn!(stream, %reason, "cannot come back in lockstep: the trainer must join again");
                    self.event(Event::Returned {
                        caught_up: false,
                        missed: 0,
                    });
                    let msg = format!("{why}; it could not come back in lockstep: {reason}");
                    self.fail_stream(stream, &msg);
                }
                Return::Refused(_) => {}
            }
        }
    }

    /// Receives a result this daemon's trainer missed, as the op's plan
    /// broadcasts it (see [`crate::membership::Recovery::plans`]).
    fn receive_missed(&mut self, r: &KeptResult, plans: &BTreeMap<OpId, Plan>) {
        let Some(Plan::FromResult {
            holder: root,
            members,
            ..
        }) = plans.get(&r.op).cloned()
        else {
            warn!(op = %r.op, "no plan sends a result this member's trainer missed");
            return;
        };
        self.catch_up.insert(r.op);
        let run = Running {
            op: r.op,
            kind: LocalKind::Broadcast(root),
            name: "catch_up",
            dtype: r.dtype,
            len: r.len as usize,
            members,
            started: self.now,
            role: Role::StandIn {
                buffer: vec![0; r.len as usize * r.dtype.size_bytes()],
            },
            kept: Some(KeptNames {
                contributors: r.contributors.clone(),
                waiting: r.waiting.clone(),
            }),
            cut: None,
        };
        self.start(run);
    }

    /// A trainer's call for an op whose result comes by catch-up: served
    /// once it is here.
    pub(super) fn serve_missed(&mut self, q: Queued<B>) {
        let op = q.req.op;
        self.catch_up.remove(&op);
        match self.steps.delivered.remove(&op) {
            Some((output, done)) => self.serve_kept(q, output, done),
            None => {
                self.steps.late.insert(op, q);
            }
        }
    }

    /// Fails the held calls of `stream` with `msg`.
    fn fail_stream(&mut self, stream: u32, msg: &str) {
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|q| q.req.op.stream() == stream);
        self.waiting = keep;
        for q in gone {
            self.reply(q.req.id, q.req.buffer, Err(OpError::NoQuorum(msg.into())));
        }
    }

    /// Not back within the recovery bound: the held calls fail as a
    /// removal's do.
    pub(super) fn expire_return(&mut self) {
        let limit = self.config.recovery_timeout;
        let Some(r) = &self.returning else {
            return;
        };
        if self.now.since(r.since) < limit {
            return;
        }
        let r = self.returning.take().expect("checked");
        warn!(reason = %r.why, "not readmitted within the recovery bound: failing the trainer's held calls");
        let msg = format!(
            "{} (it was not readmitted within {limit:?} to come back in lockstep)",
            r.why
        );
        for q in std::mem::take(&mut self.waiting) {
            self.reply(q.req.id, q.req.buffer, Err(OpError::NoQuorum(msg.clone())));
        }
    }

    /// When a return gives up.
    pub(super) fn return_deadline(&self) -> Option<Time> {
        self.returning
            .as_ref()
            .map(|r| r.since.after(self.config.recovery_timeout))
    }

    /// Whether `member` came back with its trainer's history on `stream`
    /// for its current admission.
    pub(super) fn returned_on(&self, stream: u32, member: MemberId) -> bool {
        let at = self.joined_at.get(&member);
        at.is_some() && self.returned.get(&stream).and_then(|r| r.get(&member)) == at
    }

    /// Records who left the ring (results are kept for them a while) and
    /// who is back.
    pub(super) fn note_away(&mut self, ring: &[MemberId]) {
        let now = self.now;
        for &m in self.ring.iter().filter(|m| !ring.contains(m)) {
            if m != self.me {
                self.away.insert(m, now);
            }
        }
    }
}
