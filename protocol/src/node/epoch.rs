//! Epochs and recovery: installing what the control plane committed, the
//! exchange of recovery reports, and finishing every interrupted op the way
//! [`Recovery::plans`] decides — identically at every member of the ring.

use tracing::{debug, info, warn};

use super::joins::Joiner;
use super::mode::{Judging, Mode};
use super::op::{KeptNames, Role, Running, Task};
use super::types::{Action, Buffer, Event, GroupChange, OpError};
use super::Node;
use crate::local::LocalKind;
use crate::membership::{Plan, Recovery, RecoveryReport};
use crate::wire::{AbortReason, NodeMessage};
use crate::{Epoch, MemberId, OpId, Time};

/// What was done about a peer's overdue recovery report (in this order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Overdue {
    /// Its connections were dropped and dialled again.
    LinksReset,
    /// It was suspected.
    Suspected,
}

fn plan_name(plan: &Plan) -> &'static str {
    match plan {
        Plan::Rerun { .. } => "rerun",
        Plan::FromResult { .. } => "kept_result",
        Plan::Superseded { .. } => "superseded",
    }
}

impl<B: Buffer> Node<B> {
    /// The control plane applied a new epoch (or this daemon's standing in
    /// it changed).
    pub fn handle_group(&mut self, now: Time, change: GroupChange) {
        self.enter(now);
        if change.joined_at.get(&self.me) != self.joined_at.get(&self.me) {
            // Admitted anew: the group's books count it as waiting for the
            // state again, so a hand-over it missed before says nothing now.
            self.missed.clear();
        }
        self.joined_at = change.joined_at;
        if change.policy != self.policy && change.epoch > self.epoch {
            info!(epoch = %change.epoch, from = %self.policy, to = %change.policy, "quorum policy changed");
            self.policy = change.policy;
        }
        self.install(change.epoch, change.ring, change.admitted, change.removed);
        if let Some(asked) = change.confirmed {
            self.on_confirmed(asked);
        }
        self.after_input();
    }

    /// Installs a newer epoch: ops of older ones are aborted and parked,
    /// then, in the ring, the recovery exchange starts.
    fn install(
        &mut self,
        epoch: Epoch,
        ring: Vec<MemberId>,
        admitted: bool,
        removed: Option<String>,
    ) {
        let was_admitted = self.mode.admitted();
        if epoch <= self.epoch
            && admitted == was_admitted
            && removed.as_deref() == self.mode.removed()
        {
            return;
        }
        let now = self.now;
        info!(%epoch, ?ring, admitted, parked = self.parked.len(), in_flight = self.ops.len(), "epoch installed");
        if admitted && !was_admitted {
            // Back in the ring (or first in it): what this daemon heard of
            // its peers while it was out says nothing about them now.
            self.detector.excuse(now);
            if self.judging == Judging::NotYet {
                self.judging = Judging::Grace {
                    until: now.after(self.config.startup_grace),
                };
            }
        }
        for &m in ring.iter().filter(|m| !self.ring.contains(m)) {
            // Newly (re)admitted: judge it from now on, not by the silence
            // it had while it was out.
            if m != self.me {
                self.detector.watch(m, now);
            }
        }
        self.epoch = epoch;
        // A peer down since before this epoch is one the group kept: the
        // recovery bound ("no epoch without it in time") counts from here
        // (found by the cluster simulator: a member readmitted while a
        // link was still down failed its join at once, the link having
        // been down for longer than the bound before its admission).
        self.down.retain(|m, _| ring.contains(m));
        for since in self.down.values_mut() {
            *since = (*since).max(now);
        }
        self.note_away(&ring);
        self.ring = ring;
        // Until the reports are in (or for good, out of the ring).
        self.mode = match &removed {
            Some(why) => Mode::Removed { why: why.clone() },
            None => Mode::Outside,
        };
        self.core.set_epoch(now, epoch);
        self.drain_core();
        self.new_epoch_steps();
        self.settle_doubt(admitted, removed.is_some());
        if let Some(why) = removed {
            self.leave_history(&why);
        }
        self.plans.clear();
        self.report = None;
        if !admitted && !self.joins.is_empty() {
            // Out of the ring again (removed just after its admission, say,
            // while it was still starting up) with a trainer waiting in
            // join(): ask to be readmitted again.
            self.ask_in();
        }
        if admitted {
            self.start_recovery();
        }
    }

    /// Removed from the ring: this member's ops fail with `why`, and the
    /// results it kept no longer belong to the group's history (a rejoin
    /// starts from the live trainers' state).
    ///
    /// A member whose trainer is in lockstep holds its calls instead and
    /// comes back with its history if it can (see [`Node::start_return`]);
    /// what it kept goes all the same (it may differ from the group's).
    fn leave_history(&mut self, why: &str) {
        // Results on their way from an earlier return are fetched again,
        // or not at all.
        self.catch_up.clear();
        if self.start_return(why) {
            self.steps.delivered.clear();
            self.retained.clear();
            return;
        }
        warn!(epoch = %self.epoch, reason = %why, "out of the ring: failing this member's ops");
        for (_, p) in std::mem::take(&mut self.parked) {
            self.fail(p.run, OpError::NoQuorum(why.to_string()));
        }
        let late: Vec<_> = std::mem::take(&mut self.steps.late).into_values().collect();
        for q in std::mem::take(&mut self.waiting).into_iter().chain(late) {
            self.reply(
                q.req.id,
                q.req.buffer,
                Err(OpError::NoQuorum(why.to_string())),
            );
        }
        self.steps.delivered.clear();
        self.retained.clear();
        self.synced.clear();
    }

    /// Sends this daemon's report to the ring and starts gathering theirs.
    fn start_recovery(&mut self) {
        let report = RecoveryReport {
            epoch: self.epoch,
            member: self.me,
            parked: self
                .parked
                .iter()
                .map(|(&op, p)| (op, p.run.members.clone()))
                .collect(),
            completed: self.kept_results(),
            synced: self.synced.iter().map(|(&s, &e)| (s, e)).collect(),
            returned: self
                .returned
                .iter()
                .flat_map(|(&s, ms)| ms.iter().map(move |(&m, &e)| (s, m, e)))
                .collect(),
            returning: self
                .returning
                .as_ref()
                .map(|r| r.claims.clone())
                .unwrap_or_default(),
        };
        self.asked_reports = self.now;
        self.reported_at = self.now;
        self.overdue.clear();
        let mut rec = Recovery::new(self.epoch, self.ring.clone());
        rec.add(report.clone()).expect("own report");
        self.report = Some(report.clone());
        self.tell_ring(&NodeMessage::Recovery(report));
        for (from, r) in std::mem::take(&mut self.early_reports) {
            if r.epoch == self.epoch {
                let _ = rec.add(r);
            } else if r.epoch > self.epoch {
                self.early_reports.insert(from, r);
            }
        }
        self.mode = Mode::Recovering(rec);
        self.finish_recovery();
    }

    /// A peer's recovery report.
    pub(super) fn on_recovery(&mut self, from: MemberId, report: RecoveryReport) {
        if report.member != from {
            warn!(peer = %from, claimed = %report.member, "recovery report for another member: ignored");
            return;
        }
        match &mut self.mode {
            Mode::Recovering(rec) if rec.epoch() == report.epoch => {
                if let Err(e) = rec.add(report) {
                    debug!(peer = %from, error = %e, "recovery report ignored");
                }
                self.finish_recovery();
            }
            // For an epoch this daemon has not entered yet (not installed,
            // or installed before it was admitted).
            _ if report.epoch > self.recovered => {
                self.early_reports.insert(from, report);
            }
            _ => debug!(peer = %from, epoch = %report.epoch, "stale recovery report"),
        }
    }

    /// A peer misses this daemon's report for `epoch`.
    pub(super) fn on_recovery_ask(&mut self, from: MemberId, epoch: Epoch) {
        match self.report.clone() {
            Some(report) if report.epoch == epoch => {
                debug!(peer = %from, %epoch, "recovery report asked for: sending it again");
                self.send(from, NodeMessage::Recovery(report));
            }
            // Not there yet: this daemon sends its report when it installs
            // that epoch. Past it: the asker catches up.
            _ => debug!(peer = %from, %epoch, "recovery report asked for another epoch"),
        }
    }

    /// While the exchange waits, asks the members whose reports are missing
    /// again every two heartbeat intervals (a report can be lost with a
    /// connection, or to a partition healing on one side first); a member
    /// that stays silent is suspected and the next epoch drops it.
    pub(super) fn ask_reports(&mut self) {
        let Mode::Recovering(rec) = &self.mode else {
            return;
        };
        if self.now.since(self.asked_reports) < self.config.ask_interval() {
            return;
        }
        let (epoch, missing) = (rec.epoch(), rec.missing());
        self.asked_reports = self.now;
        let waited = self.now.since(self.reported_at);
        let overdue = self.config.report_overdue();
        for peer in missing {
            info!(%peer, %epoch, "recovery report missing: asking for it again");
            self.send(peer, NodeMessage::RecoveryAsk { epoch });
            let done = self.overdue.get(&peer).copied();
            if waited >= overdue * 2 && done < Some(Overdue::Suspected) {
                self.overdue.insert(peer, Overdue::Suspected);
                warn!(%peer, %epoch, waited_ms = waited.as_millis() as u64, "no recovery report from the peer although it was asked again and again: suspecting it, so the group goes on without it");
                self.event(Event::Suspected {
                    reason: "no_report",
                });
                self.suspect(
                    peer,
                    format!(
                        "sent no recovery report for {epoch} in {} ms",
                        waited.as_millis()
                    ),
                );
            } else if waited >= overdue && done.is_none() {
                // Heard, yet deaf or mute to the exchange: what was lost is
                // the connection's route, which a redial builds again
                // (issue 13: an abandoned connection's late hello took it
                // over, and only heartbeats got through for a minute).
                self.overdue.insert(peer, Overdue::LinksReset);
                warn!(%peer, %epoch, waited_ms = waited.as_millis() as u64, "no recovery report from the peer although it was asked again: dropping the connections to it and dialling again");
                self.actions.push_back(Action::ResetLinks { member: peer });
            }
        }
    }

    /// Once every member of the ring has reported: finishes parked ops,
    /// forwards kept results, then lets waiting requests run.
    pub(super) fn finish_recovery(&mut self) {
        let Mode::Recovering(rec) = &self.mode else {
            return;
        };
        if !rec.is_complete() {
            debug!(epoch = %rec.epoch(), missing = ?rec.missing(), "waiting for recovery reports");
            return;
        }
        let (returns, returned, plans) = (rec.returns(), rec.returned(), rec.plans());
        self.recovered = rec.epoch();
        self.mode = Mode::Active;
        self.apply_returns(returns, returned, &plans);
        for (op, plan) in plans {
            self.follow(op, plan);
        }
        for q in std::mem::take(&mut self.waiting) {
            self.submit(q);
        }
        self.try_joins();
        self.replay_early_steps();
    }

    /// This member's part in one plan.
    fn follow(&mut self, op: OpId, plan: Plan) {
        let me = self.me;
        if let Some(p) = self.parked.remove(&op) {
            self.event(Event::Recovered {
                plan: plan_name(&plan),
            });
            info!(%op, ?plan, "finishing an interrupted op in the new epoch");
            return self.resume(p.run, plan);
        }
        match plan {
            // Being received, as a result this daemon's returning trainer
            // missed (see `apply_returns`).
            Plan::FromResult { .. } if self.ops.contains_key(&op) => {}
            Plan::FromResult {
                holder, members, ..
            } if members.contains(&me) => self.forward_result(op, holder, members),
            Plan::Rerun { ref members } if members.contains(&me) => {
                // Its trainer has not submitted it yet: it runs among these.
                self.plans.insert(op, plan);
            }
            _ => {}
        }
    }

    /// Restarts a parked op as `plan` says.
    fn resume(&mut self, mut run: Running<B>, plan: Plan) {
        let me = self.me;
        match plan {
            Plan::Rerun { .. } if run.is_standin() => self.recut(run),
            Plan::Rerun { members }
                if members.contains(&me) && self.cut_applies(run.kind, run.samples()) =>
            {
                self.recut(run)
            }
            Plan::Rerun { members } if members.contains(&me) => {
                // Run directly, as every member does under this epoch's
                // policy (a cut step of a `sync` epoch runs plain again).
                run.cut = None;
                if let LocalKind::Broadcast(root) = run.kind {
                    if !members.contains(&root) {
                        match run.task() {
                            // Every trainer that handed over holds the same
                            // state: the hand-over goes on from one of them.
                            Some(Task::HandOver) => match self.holder(run.op, &members) {
                                Some(holder) => {
                                    info!(op = %run.op, gone = %root, root = %holder, "hand-over source is gone: handing over from another holder");
                                    run.kind = LocalKind::Broadcast(holder);
                                }
                                None => {
                                    return self
                                        .fail(run, OpError::Aborted(AbortReason::MemberDown(root)))
                                }
                            },
                            // The new root announces the hand-over again.
                            Some(Task::Join { .. }) => return self.wait_for_state(run),
                            _ => {
                                return self
                                    .fail(run, OpError::Aborted(AbortReason::MemberDown(root)))
                            }
                        }
                    }
                }
                run.restore_input();
                run.members = self.runners(run.op, members, run.task());
                self.start(run);
            }
            Plan::FromResult {
                holder,
                members,
                contributors,
                waiting,
            } if members.contains(&me) => {
                // (A cut step's reduction is over: the kept result stands.)
                run.kind = LocalKind::Broadcast(holder);
                run.members = members;
                run.kept = Some(KeptNames {
                    contributors,
                    waiting,
                });
                self.start(run);
            }
            _ if run.is_standin() => self.give_up_standin(run),
            Plan::Superseded { later } => self.fail(
                run,
                OpError::NoQuorum(format!(
                    "the group went on without this member (it finished {later}); \
                     the trainer must join again to get the current state"
                )),
            ),
            _ => self.fail(
                run,
                OpError::NoQuorum("the new epoch's ring runs this op without this member".into()),
            ),
        }
    }

    /// Who re-runs `op` of a plan's `members`. A hand-over runs with the
    /// members waiting for the state; every other op runs without them, as
    /// its first run did: a member that was removed and readmitted since
    /// holds no part of it (its trainer is in `join()`). Every member
    /// computes the same set: the op's kind is the same everywhere, and so
    /// is the stream's pending set.
    pub(super) fn runners(
        &self,
        op: OpId,
        mut members: Vec<MemberId>,
        task: Option<Task>,
    ) -> Vec<MemberId> {
        if !matches!(task, Some(Task::HandOver | Task::Join { .. })) {
            let pending = self.pending(op.stream());
            members.retain(|m| !pending.contains(m));
        }
        members
    }

    /// The root a re-run hand-over of `op` among `members` takes: the first
    /// member of the ring that holds the stream's state, as at its first
    /// run (every member computes the same one).
    fn holder(&self, op: OpId, members: &[MemberId]) -> Option<MemberId> {
        let pending = self.pending(op.stream());
        self.ring
            .iter()
            .copied()
            .find(|m| members.contains(m) && !pending.contains(m))
    }

    /// A joiner whose hand-over lost its root waits in `join()` again for
    /// the new root's announcement (unless its trainer joined anew since).
    fn wait_for_state(&mut self, run: Running<B>) {
        let (stream, dtype, len) = (run.op.stream(), run.dtype, run.len);
        let Role::Trainer { caller, .. } = run.role else {
            unreachable!("a join is its trainer's");
        };
        info!(op = %run.op, "the hand-over's source is gone: waiting for another holder to hand over");
        if self.joins.contains_key(&stream) {
            let err = OpError::Rejected("superseded by a newer join on the same stream".into());
            return self.reply(caller.id, caller.buffer, Err(err));
        }
        // What arrived of the state overwrote the trainer's own.
        let joiner = Joiner {
            caller,
            dtype,
            len,
            holds: None,
        };
        self.joins.insert(stream, joiner);
    }

    /// A step this daemon ran for its lagging trainer, whose result nobody
    /// holds any more: the trainer cannot catch up, so this member leaves
    /// the ring and its trainer, told so, rejoins with the group's state.
    fn give_up_standin(&mut self, run: Running<B>) {
        warn!(op = %run.op, "the result of a step this member's trainer still needs is gone: leaving the ring to rejoin");
        if let Some(q) = self.steps.late.remove(&run.op) {
            self.waiting.push(q);
        }
        self.suspect(
            self.me,
            format!(
                "its trainer is behind step {}, whose result the group no longer holds",
                run.op
            ),
        );
    }

    /// Takes part in broadcasting a result this daemon kept.
    fn forward_result(&mut self, op: OpId, holder: MemberId, members: Vec<MemberId>) {
        let Some(kept) = self.kept(op) else {
            warn!(%op, "asked to forward a result this daemon no longer holds");
            return;
        };
        let run = Running {
            op,
            kind: LocalKind::Broadcast(holder),
            name: "broadcast",
            dtype: kept.dtype,
            len: kept.len,
            members,
            started: self.now,
            role: Role::Forward {
                buffer: kept.output.clone(),
            },
            kept: None,
            cut: None,
        };
        self.start(run);
    }
}
