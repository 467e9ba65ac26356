//! The op lifecycle: what the node runs, in whose buffer, for whom; starting
//! an op in the collective core and executing the core's actions.

use tracing::{debug, info, warn};

use super::retained::Retained;
use super::steps::CutMeta;
use super::types::{Action, Buffer, Event, OpDone, OpError, Outcome, RequestId};
use super::Node;
use crate::collective::{Action as CoreAction, Algorithm, Kind, OpSpec};
use crate::local::LocalKind;
use crate::membership::state_checksum;
use crate::wire::{AbortReason, DType, NodeMessage, ReduceOp};
use crate::{MemberId, OpId, Step, Time};

/// A trainer's request while the node holds it.
#[derive(Debug)]
pub(super) struct Caller<B> {
    /// The shell's name for it.
    pub id: RequestId,
    /// The trainer's buffer.
    pub buffer: B,
    /// When the trainer asked.
    pub since: Time,
}

/// An op the node runs (or holds parked, or waits to cut).
#[derive(Debug)]
pub(super) struct Running<B> {
    pub op: OpId,
    /// What runs, in the trainer's terms (a broadcast from the holder when
    /// the op is finished from a kept result).
    pub kind: LocalKind,
    /// The metric label: what the trainer asked for.
    pub name: &'static str,
    pub dtype: DType,
    /// Elements per member.
    pub len: usize,
    /// The ring it runs (or ran) in.
    pub members: Vec<MemberId>,
    pub started: Time,
    pub role: Role<B>,
    /// Finished from a result a survivor kept: the result names what that
    /// member's trainer was told, not this run's ring.
    pub kept: Option<KeptNames>,
    /// The step's cut once announced (cut path): the reduction then runs
    /// over the whole ring, a mean as a sum of scaled inputs.
    pub cut: Option<CutMeta>,
}

/// What a result finished from a kept one names.
#[derive(Clone, Debug)]
pub(super) struct KeptNames {
    pub contributors: Vec<MemberId>,
    pub waiting: Vec<MemberId>,
}

/// Whose op it is, and so whose buffer it runs in and who hears of it.
#[derive(Debug)]
pub(super) enum Role<B> {
    /// A trainer's request, in its buffer; `input` is what it gave, kept
    /// to run the op again after an epoch change.
    Trainer {
        caller: Caller<B>,
        input: Vec<u8>,
        samples: Option<u64>,
        task: Task,
    },
    /// A step this daemon runs for its trainer, which has not submitted it
    /// yet (left out of the cut): a neutral input in the daemon's buffer;
    /// the result waits for the trainer.
    StandIn { buffer: Vec<u8> },
    /// A result this daemon kept, broadcast to members that missed it.
    Forward { buffer: Vec<u8> },
}

/// What a trainer's request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Task {
    /// A collective.
    Collective,
    /// A live trainer handing its state to joining members (`admit`).
    HandOver,
    /// This member's trainer receiving the state it joins with; the result
    /// must match the checksum its root announced.
    Join { checksum: u64 },
}

/// An op interrupted by an epoch change or a member's failure, with its
/// input, until the next epoch's recovery decides how it finishes.
#[derive(Debug)]
pub(super) struct Parked<B> {
    pub run: Running<B>,
    /// The wait for the next epoch counts from here.
    pub since: Time,
    pub reason: String,
}

/// A trainer's request waiting for this daemon to be in a running ring.
#[derive(Debug)]
pub(super) struct Queued<B> {
    pub req: super::types::Request<B>,
    pub since: Time,
}

/// The metric label of a trainer's op.
pub(super) fn kind_name(kind: LocalKind) -> &'static str {
    match kind {
        LocalKind::AllReduce(_) => "all_reduce",
        LocalKind::Broadcast(_) => "broadcast",
        LocalKind::AllGather => "all_gather",
        LocalKind::ReduceScatter(_) => "reduce_scatter",
        LocalKind::Barrier => "barrier",
        LocalKind::StateSync => "state_sync",
    }
}

/// What the collective core runs for `kind`. A cut step's mean runs as a
/// sum: every contributor scaled its input by its share first.
pub(super) fn core_kind(kind: LocalKind, cut: bool) -> Kind {
    match kind {
        LocalKind::AllReduce(ReduceOp::Mean) if cut => Kind::AllReduce(ReduceOp::Sum),
        LocalKind::AllReduce(op) => Kind::AllReduce(op),
        LocalKind::Broadcast(root) => Kind::Broadcast { root },
        LocalKind::AllGather => Kind::AllGather,
        LocalKind::ReduceScatter(op) => Kind::ReduceScatter(op),
        // A hand-over is resolved to a broadcast from its root before it runs.
        LocalKind::Barrier | LocalKind::StateSync => Kind::Barrier,
    }
}

impl<B: Buffer> Running<B> {
    pub fn bytes(&self) -> &[u8] {
        match &self.role {
            Role::Trainer { caller, .. } => caller.buffer.as_bytes(),
            Role::StandIn { buffer } | Role::Forward { buffer } => buffer,
        }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.role {
            Role::Trainer { caller, .. } => caller.buffer.as_bytes_mut(),
            Role::StandIn { buffer } | Role::Forward { buffer } => buffer,
        }
    }

    /// Puts the input the trainer gave back into its buffer, for a re-run.
    /// (A joiner's hand-over keeps no input: it only receives.)
    pub fn restore_input(&mut self) {
        if let Role::Trainer { caller, input, .. } = &mut self.role {
            let bytes = caller.buffer.as_bytes_mut();
            if input.len() == bytes.len() {
                bytes.copy_from_slice(input);
            }
        }
    }

    /// The trainer's request it runs for, if any.
    pub fn into_caller(self) -> Option<Caller<B>> {
        match self.role {
            Role::Trainer { caller, .. } => Some(caller),
            _ => None,
        }
    }

    pub fn is_trainer(&self) -> bool {
        matches!(self.role, Role::Trainer { .. })
    }

    pub fn is_standin(&self) -> bool {
        matches!(self.role, Role::StandIn { .. })
    }

    pub fn samples(&self) -> Option<u64> {
        match &self.role {
            Role::Trainer { samples, .. } => *samples,
            _ => None,
        }
    }

    pub fn task(&self) -> Option<Task> {
        match &self.role {
            Role::Trainer { task, .. } => Some(*task),
            _ => None,
        }
    }

    pub fn spec(&self, epoch: crate::Epoch) -> OpSpec {
        OpSpec {
            op: self.op,
            epoch,
            step: Step(self.op.seq()),
            kind: core_kind(self.kind, self.cut.is_some()),
            algorithm: Algorithm::Auto,
            dtype: self.dtype,
            len: self.len,
            members: self.members.clone(),
        }
    }
}

impl<B: Buffer> Node<B> {
    /// Answers a trainer's request (does nothing for the daemon's own ops).
    /// A stand-in's failure is its trainer's, if it came late and waits for
    /// the stand-in's result: nothing else would answer it (found by the
    /// cluster simulator: a stand-in parked by a partition expired, and its
    /// trainer waited for ever in an epoch that went on).
    pub(super) fn fail(&mut self, run: Running<B>, err: OpError) {
        if matches!(run.task(), Some(Task::Join { .. })) && self.mode.admitted() {
            // The hand-over may have finished at its other members, which
            // now count this one as holding the state: once they go on
            // past it, this member leaves to be readmitted (see
            // `check_missed_hand_overs`; found by the cluster simulator).
            self.missed.insert(run.op.stream(), run.op);
        }
        match run.role {
            Role::Trainer { caller, .. } => self.reply(caller.id, caller.buffer, Err(err)),
            Role::StandIn { .. } => {
                if let Some(q) = self.steps.late.remove(&run.op) {
                    self.reply(q.req.id, q.req.buffer, Err(err));
                }
            }
            Role::Forward { .. } => {}
        }
    }

    pub(super) fn reply(&mut self, id: RequestId, buffer: B, outcome: Result<OpDone, OpError>) {
        if let Ok(done) = &outcome {
            let (stream, seq) = (done.op.stream(), done.op.seq());
            let last = self.answered.entry(stream).or_insert((seq, self.now));
            *last = (last.0.max(seq), self.now);
        }
        self.actions.push_back(Action::Reply {
            id,
            buffer,
            outcome,
        });
    }

    pub(super) fn event(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// Starts `run` in the collective core, in the current epoch.
    pub(super) fn start(&mut self, run: Running<B>) {
        let spec = run.spec(self.epoch);
        let need = spec.buffer_len() * spec.dtype.size_bytes();
        let have = run.bytes().len();
        if have != need {
            let n = spec.members.len();
            return self.fail(
                run,
                OpError::Rejected(format!(
                    "the group changed to {n} members while this op ran and its output size \
                     changed ({have} bytes given, {need} needed); issue it again"
                )),
            );
        }
        if let Err(e) = self.core.start(self.now, spec) {
            return self.fail(run, OpError::Rejected(e.to_string()));
        }
        debug!(op = %run.op, kind = run.name, bytes = need, epoch = %self.epoch, "op started");
        if let (Some(Task::HandOver), LocalKind::Broadcast(root)) = (run.task(), run.kind) {
            if root == self.me {
                self.announce_join_point(&run, root);
            }
        }
        self.ops.insert(run.op, run);
    }

    /// The root of a hand-over tells each joiner in its ring what to
    /// expect (the broadcast has not touched the root's copy yet).
    fn announce_join_point(&mut self, run: &Running<B>, root: MemberId) {
        let checksum = state_checksum(run.bytes());
        let pending = self.pending(run.op.stream());
        for &j in run
            .members
            .iter()
            .filter(|&&m| m != root && pending.contains(&m))
        {
            info!(joiner = %j, op = %run.op, "handing the trainers' state to a joining member");
            self.send(
                j,
                NodeMessage::JoinPoint {
                    stream: run.op.stream(),
                    op: run.op,
                    epoch: self.epoch,
                    root,
                    dtype: run.dtype,
                    len: run.len as u64,
                    checksum,
                    members: run.members.clone(),
                },
            );
        }
    }

    pub(super) fn send(&mut self, to: MemberId, msg: NodeMessage) {
        self.actions.push_back(Action::Message { to, msg });
    }

    /// Sends `msg` to every other member of the ring.
    pub(super) fn tell_ring(&mut self, msg: &NodeMessage) {
        let peers: Vec<MemberId> = self
            .ring
            .iter()
            .copied()
            .filter(|&p| p != self.me)
            .collect();
        for peer in peers {
            self.send(peer, msg.clone());
        }
    }

    /// Holds an interrupted op until the next epoch decides it (the
    /// daemon's own forwarding ops are dropped: the next recovery redoes
    /// them).
    pub(super) fn park(&mut self, run: Running<B>, reason: String) {
        if matches!(run.role, Role::Forward { .. }) {
            return;
        }
        debug!(op = %run.op, %reason, "op parked until the next epoch");
        self.parked.insert(
            run.op,
            Parked {
                since: self.now,
                run,
                reason,
            },
        );
    }

    /// Executes the collective core's actions, in order.
    pub(super) fn drain_core(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                CoreAction::Send {
                    op,
                    to,
                    header,
                    range,
                } => {
                    let Some(run) = self.ops.get(&op) else {
                        continue;
                    };
                    let payload = run.bytes()[run.dtype.byte_range(&range)].to_vec();
                    self.actions.push_back(Action::Frame {
                        to,
                        header,
                        payload,
                    });
                }
                CoreAction::Complete {
                    op,
                    epoch,
                    contributors,
                } => {
                    if let Some(run) = self.ops.remove(&op) {
                        self.completed(run, epoch, contributors);
                    }
                }
                CoreAction::Aborted { op, reason, .. } => {
                    if let Some(run) = self.ops.remove(&op) {
                        self.aborted(run, reason);
                    }
                }
                piece => self.apply_piece(piece),
            }
        }
    }

    /// A received piece, combined into or copied to its op's buffer, or a
    /// mean's division.
    fn apply_piece(&mut self, action: CoreAction) {
        let (op, range) = match &action {
            CoreAction::Reduce { op, range, .. }
            | CoreAction::Copy { op, range, .. }
            | CoreAction::Divide { op, range, .. } => (*op, range.clone()),
            _ => return,
        };
        let Some(run) = self.ops.get_mut(&op) else {
            return;
        };
        let dtype = run.dtype;
        let bytes = &mut run.bytes_mut()[dtype.byte_range(&range)];
        let applied = match action {
            CoreAction::Reduce {
                reduce, payload, ..
            } => self.arith.reduce(dtype, reduce, bytes, &payload),
            CoreAction::Copy { payload, .. } if payload.len() == bytes.len() => {
                bytes.copy_from_slice(&payload);
                Ok(())
            }
            CoreAction::Copy { .. } => Err("the piece does not fit its range".into()),
            CoreAction::Divide { divisor, .. } => {
                self.arith.scale(dtype, bytes, 1.0 / divisor as f32)
            }
            _ => Ok(()),
        };
        if let Err(e) = applied {
            warn!(%op, error = %e, "applying a received piece failed");
        }
    }

    fn completed(&mut self, run: Running<B>, epoch: crate::Epoch, core: Vec<MemberId>) {
        if matches!(run.role, Role::Forward { .. }) {
            debug!(op = %run.op, "kept result forwarded");
            return;
        }
        let (op, stream) = (run.op, run.op.stream());
        if matches!(run.task(), Some(Task::HandOver | Task::Join { .. })) {
            // Finished from a kept result in a later epoch, the hand-over
            // counts for the members of its first run, as at those that
            // finished it then: a member's own view of who holds the state
            // decides who runs the next ops, and views that differ run one
            // op with two member sets (found by the cluster simulator: a
            // split over a crash, every trainer resuming from one state).
            let holders = run.kept.as_ref().map_or(&run.members, |k| &k.contributors);
            self.handed_over(stream, &holders.clone());
        }
        let (contributors, waiting) = self.result_names(&run, core);
        let output = run.bytes().to_vec();
        if let Err(e) = verify(&run, &output) {
            return self.fail(run, e);
        }
        let done = OpDone {
            op,
            epoch,
            contributors: contributors.clone(),
            waiting: waiting.clone(),
            meta: self.step_meta(op, run.cut.as_ref()),
        };
        let kept = Retained {
            op,
            contributors,
            waiting,
            dtype: run.dtype,
            len: run.len,
            output,
        };
        self.keep_result(stream, kept);
        // After a pause, this result may be one the group re-ran without
        // this member (see `doubt.rs`): kept, it reaches the trainer once
        // the epoch is confirmed. (A hand-over's is not its history.)
        if self.in_doubt() && run.task() == Some(Task::Collective) {
            return self.withhold(super::doubt::Withheld::Completed { run, done });
        }
        match run.role {
            Role::Trainer { caller, .. } => {
                self.event(Event::Op {
                    outcome: Outcome::Completed,
                    kind: run.name,
                    elapsed: Some(self.now.since(caller.since)),
                });
                self.reply(caller.id, caller.buffer, Ok(done));
            }
            Role::StandIn { buffer } => self.keep_for_trainer(buffer, done),
            // (Forwarding ops returned above.)
            Role::Forward { .. } => {}
        }
    }

    /// A hand-over of `stream` among `members` completed: they hold its
    /// state from now on. A member admitted after the latest of them was
    /// not in it (a re-run runs among those of its first run) and still
    /// waits: the stream counts as agreed up to that admission, the same at
    /// every member of the epoch.
    fn handed_over(&mut self, stream: u32, members: &[MemberId]) {
        let agreed = members
            .iter()
            .filter_map(|m| self.joined_at.get(m).copied())
            .max()
            .unwrap_or(self.epoch);
        self.synced.insert(stream, agreed);
        self.offers.remove(&stream);
        self.steps.replay = true;
        if let Some(j) = self.joins.remove(&stream) {
            let err = "superseded: this stream's state was handed over meanwhile";
            self.reply(
                j.caller.id,
                j.caller.buffer,
                Err(OpError::Rejected(err.into())),
            );
        }
    }

    /// Whose inputs a completed op's result holds, and who waits for the
    /// stream's state, as its trainer is told: what the kept result's
    /// holder was told, else the step's cut, else the ring it ran in.
    fn result_names(
        &self,
        run: &Running<B>,
        core: Vec<MemberId>,
    ) -> (Vec<MemberId>, Vec<MemberId>) {
        match (&run.kept, &run.cut) {
            (Some(k), _) => (k.contributors.clone(), k.waiting.clone()),
            (None, Some(cut)) => {
                let contributors = cut.participants.iter().map(|(m, _)| *m).collect();
                // Who waits is who the coordinator left out of the step's
                // ring: the same at every member. This daemon's own view
                // may lag — a stand-in runs ahead of its trainer, before
                // the trainer has run an earlier hand-over here.
                let cut_members: Vec<MemberId> = cut
                    .participants
                    .iter()
                    .map(|(m, _)| *m)
                    .chain(cut.left_out.iter().map(|(m, _)| *m))
                    .collect();
                let waiting = self
                    .ring
                    .iter()
                    .copied()
                    .filter(|m| !cut_members.contains(m))
                    .collect();
                (contributors, waiting)
            }
            (None, None) => (core, self.pending(run.op.stream())),
        }
    }

    fn aborted(&mut self, run: Running<B>, reason: AbortReason) {
        match reason {
            AbortReason::MemberDown(_) | AbortReason::EpochChanged(_) => {
                self.event(Event::Op {
                    outcome: Outcome::Interrupted,
                    kind: run.name,
                    elapsed: None,
                });
                self.park(run, format!("interrupted: {reason}"));
            }
            _ => {
                warn!(op = %run.op, %reason, "op aborted");
                self.event(Event::Op {
                    outcome: Outcome::Aborted,
                    kind: run.name,
                    elapsed: None,
                });
                self.fail(run, OpError::Aborted(reason));
            }
        }
    }
}

/// A joiner's received state must have the checksum its root announced.
fn verify<B: Buffer>(run: &Running<B>, output: &[u8]) -> Result<(), OpError> {
    let Some(Task::Join { checksum }) = run.task() else {
        return Ok(());
    };
    let got = state_checksum(output);
    if got != checksum {
        warn!(op = %run.op, want = checksum, got, "received state fails its checksum");
        return Err(OpError::Rejected(format!(
            "the state received fails its checksum ({got:#x}, the root sent {checksum:#x}); \
             join again"
        )));
    }
    info!(op = %run.op, bytes = output.len(), "received state verified");
    Ok(())
}
