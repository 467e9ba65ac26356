//! Steps closed by the group's quorum policy (stragglers): the cut path of
//! an all-reduce.
//!
//! A trainer's all-reduce takes this path when the epoch's policy is not
//! plain `sync`, or when its trainer gives sample counts (the weights of the
//! mean are known only once the step's contributors are). Each member sends
//! `StepReady` to the step's coordinator, the lowest member of the step's
//! ring, which runs a [`Coordinator`] per stream and announces the cut with
//! `StepCut` before any reduction. Then every member of the ring runs the
//! same reduction over the whole ring: contributors with their input
//! (scaled for a mean: by `1/p`, or by their share of the samples), members
//! left out with the reduction's neutral element (-0, or ∓∞ for max/min),
//! so every replica — stragglers included — gets the same bytes and the
//! recovery exchange covers cut steps like any other op.
//!
//! A member left out whose trainer has not submitted the step yet is *stood
//! in for*: its daemon runs the step with a neutral input of its own and
//! keeps the result until the trainer asks for it, with how many later steps
//! already closed without it (`StepMeta::behind`), so a slow trainer can
//! skip their gradients and catch up.
//!
//! An epoch change decides interrupted cut steps again: if a member kept
//! the result it stands (`Plan::FromResult`); otherwise every member sends
//! `StepReady` again in the new epoch and the new coordinator cuts afresh.

use std::collections::BTreeMap;

use tracing::{debug, info, warn};

use super::op::{Queued, Role, Running, Task};
use super::types::{Buffer, Event, OpDone, OpError, Outcome};
use super::Node;
use crate::local::{LocalKind, StepMeta};
use crate::stragglers::{
    Announcement, Attribution, CloseReason, Coordinator, LatePolicy, LeftOut, Standing,
    StragglerRecord,
};
use crate::wire::{DType, NodeMessage, ReduceOp};
use crate::{MemberId, OpId};

/// What a member knows of a step's cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CutMeta {
    pub participants: Vec<(MemberId, Option<u64>)>,
    pub left_out: Vec<(MemberId, LeftOut)>,
}

/// The coordinator's view of one open step: what was submitted, by whom.
#[derive(Clone, Debug)]
pub(super) struct StepInfo {
    reduce: ReduceOp,
    dtype: DType,
    len: u64,
    samples: BTreeMap<MemberId, Option<u64>>,
}

/// A `StepCut` as received.
#[derive(Clone, Debug)]
struct CutMsg {
    op: OpId,
    reduce: ReduceOp,
    dtype: DType,
    len: u64,
    meta: CutMeta,
}

/// Withdrawn step inputs kept at most (the newest).
const WITHDRAWN_KEPT: usize = 8;

/// The cut path's state.
#[derive(Debug)]
pub(super) struct Steps<B> {
    /// Trainer all-reduces submitted here that wait for their step's cut.
    pub cutting: BTreeMap<OpId, Running<B>>,
    /// Per stream, the step coordinator (used while this member is the
    /// lowest of the stream's step ring).
    pub coordinators: BTreeMap<u32, Coordinator>,
    /// Open steps this member coordinates.
    pub open: BTreeMap<OpId, StepInfo>,
    /// Step messages for an epoch this daemon has not entered yet.
    pub early: Vec<(MemberId, NodeMessage)>,
    /// Results of steps run for the trainer before it asked (stood in for).
    pub delivered: BTreeMap<OpId, (Vec<u8>, OpDone)>,
    /// Trainer calls waiting for a stand-in's result.
    pub late: BTreeMap<OpId, Queued<B>>,
    /// Per stream, the last step whose cut was announced.
    pub closed_upto: BTreeMap<u32, u64>,
    /// The coordinator's attribution as last announced.
    pub records: Vec<StragglerRecord>,
    /// Per stream, this trainer's last late input (`late=fold`).
    pub folded: Folded,
    /// A hand-over completed here: held step messages may be this
    /// member's to handle now.
    pub replay: bool,
    /// Inputs of steps whose readiness was sent but whose trainer's call
    /// failed before the cut came (no epoch in time): a cut that still
    /// names this member runs with them, as it says.
    pub withdrawn: BTreeMap<OpId, Vec<u8>>,
}

impl<B> Default for Steps<B> {
    fn default() -> Self {
        Steps {
            cutting: BTreeMap::new(),
            coordinators: BTreeMap::new(),
            open: BTreeMap::new(),
            early: Vec::new(),
            delivered: BTreeMap::new(),
            late: BTreeMap::new(),
            closed_upto: BTreeMap::new(),
            records: Vec::new(),
            folded: Folded::default(),
            replay: false,
            withdrawn: BTreeMap::new(),
        }
    }
}

/// `late=fold`: per stream, this trainer's last input that missed its step,
/// and that step. It is added to the input of the step right after, if this
/// member contributes to that one (staleness 1), and dropped otherwise.
#[derive(Debug, Default)]
pub(super) struct Folded(BTreeMap<u32, (u64, Vec<u8>)>);

impl Folded {
    fn keep(&mut self, stream: u32, seq: u64, input: Vec<u8>) {
        self.0.insert(stream, (seq, input));
    }

    /// The late input to fold into step `seq`, if it missed step `seq - 1`.
    fn take_for(&mut self, stream: u32, seq: u64) -> Option<Vec<u8>> {
        self.0
            .remove(&stream)
            .filter(|(at, _)| at + 1 == seq)
            .map(|(_, input)| input)
    }
}

/// The neutral element of `reduce` for `dtype`, as `len` elements of bytes.
/// For a sum it is -0.0, not +0.0: `-0.0 + x` is `x` for every `x`, while
/// `+0.0 + -0.0` is `+0.0`, and a step's result must be exactly the sum over
/// its contributors.
pub fn neutral(reduce: ReduceOp, dtype: DType, len: usize) -> Vec<u8> {
    let one: &[u8] = match (reduce, dtype) {
        (ReduceOp::Sum | ReduceOp::Mean, DType::F32) => &(-0.0f32).to_le_bytes(),
        (ReduceOp::Sum | ReduceOp::Mean, DType::BF16 | DType::F16) => &[0x00, 0x80],
        (ReduceOp::Max, DType::F32) => &f32::NEG_INFINITY.to_le_bytes(),
        (ReduceOp::Min, DType::F32) => &f32::INFINITY.to_le_bytes(),
        (ReduceOp::Max, DType::BF16) => &[0x80, 0xff],
        (ReduceOp::Min, DType::BF16) => &[0x80, 0x7f],
        (ReduceOp::Max, DType::F16) => &[0x00, 0xfc],
        (ReduceOp::Min, DType::F16) => &[0x00, 0x7c],
    };
    one.repeat(len)
}

fn close_label(reason: &CloseReason) -> &'static str {
    match reason {
        CloseReason::AllReady => "all_ready",
        CloseReason::Backup { .. } => "backup",
        CloseReason::Deadline { .. } => "deadline",
    }
}

impl<B: Buffer> Node<B> {
    /// Whether a trainer's op closes by the quorum policy. It depends only
    /// on the epoch's policy and the request, so every member routes an op
    /// the same way — a first run, a re-run after an epoch change, or a
    /// late submission of a re-run alike.
    pub(super) fn cut_applies(&self, kind: LocalKind, samples: Option<u64>) -> bool {
        matches!(kind, LocalKind::AllReduce(_)) && (!self.policy.is_sync() || samples.is_some())
    }

    /// Whether this daemon ran (or runs) `op` for its trainer, which has
    /// not asked for it yet.
    pub(super) fn stood_in(&self, op: OpId) -> bool {
        self.steps.delivered.contains_key(&op)
            || self.ops.get(&op).is_some_and(Running::is_standin)
            || self.parked.get(&op).is_some_and(|p| p.run.is_standin())
    }

    /// The members of `stream`'s steps: the ring less those waiting for
    /// its state. The first is the coordinator.
    fn step_ring(&self, stream: u32) -> Vec<MemberId> {
        let pending = self.pending(stream);
        self.ring
            .iter()
            .copied()
            .filter(|m| !pending.contains(m))
            .collect()
    }

    /// A trainer submitted a cut-path all-reduce.
    pub(super) fn submit_cut(&mut self, q: Queued<B>) {
        let op = q.req.op;
        // A rerun plan for it is moot: the step is cut again.
        self.plans.remove(&op);
        if self.stood_in(op) {
            return self.submit_late(q);
        }
        let Queued { req, since } = q;
        if !matches!(req.kind, LocalKind::AllReduce(_)) {
            let err = OpError::Rejected(
                "the group ran this op as an all-reduce; this trainer issued another collective"
                    .into(),
            );
            return self.reply(req.id, req.buffer, Err(err));
        }
        let need = req.len * req.dtype.size_bytes();
        if req.buffer.as_bytes().len() != need {
            let have = req.buffer.as_bytes().len();
            let err = OpError::Rejected(format!("buffer holds {have} bytes, the op needs {need}"));
            return self.reply(req.id, req.buffer, Err(err));
        }
        let input = req.buffer.as_bytes().to_vec();
        let (kind, dtype, len, samples) = (req.kind, req.dtype, req.len, req.samples);
        let run = Running {
            op,
            kind,
            name: "all_reduce",
            dtype,
            len,
            members: self.step_ring(op.stream()),
            started: since,
            role: Role::Trainer {
                caller: super::op::Caller {
                    id: req.id,
                    buffer: req.buffer,
                    since,
                },
                input,
                samples,
                task: Task::Collective,
            },
            kept: None,
            cut: None,
        };
        // In the map before the readiness goes out: at the coordinator, this
        // member's own readiness may close the step at once.
        self.steps.cutting.insert(op, run);
        self.send_ready(op, kind, dtype, len, samples);
    }

    /// Sends this member's readiness for `op` to the step's coordinator
    /// (itself included).
    fn send_ready(
        &mut self,
        op: OpId,
        kind: LocalKind,
        dtype: DType,
        len: usize,
        samples: Option<u64>,
    ) {
        let LocalKind::AllReduce(reduce) = kind else {
            return;
        };
        let Some(&coordinator) = self.step_ring(op.stream()).first() else {
            return;
        };
        let msg = NodeMessage::StepReady {
            op,
            epoch: self.epoch,
            reduce,
            dtype,
            len: len as u64,
            samples,
        };
        if coordinator == self.me {
            self.on_step(self.me, msg);
        } else {
            self.send(coordinator, msg);
        }
    }

    /// The trainer of a step that closed without it (this daemon stood in):
    /// its input is folded into its next step (`late=fold`) or dropped,
    /// the coordinator hears how late it was, and it gets the result.
    fn submit_late(&mut self, q: Queued<B>) {
        let op = q.req.op;
        if self.policy.late == LatePolicy::FoldIntoNext {
            let input = q.req.buffer.as_bytes().to_vec();
            self.steps.folded.keep(op.stream(), op.seq(), input);
        }
        debug!(%op, "late for the step: telling the coordinator");
        self.send_late(op);
        match self.steps.delivered.remove(&op) {
            Some((output, done)) => self.serve_kept(q, output, done),
            None => {
                debug!(%op, "the step closed without this member; its result is on the way");
                self.steps.late.insert(op, q);
            }
        }
    }

    /// Tells the step's coordinator (itself included) that this member's
    /// trainer arrived after `op`'s step closed without it.
    fn send_late(&mut self, op: OpId) {
        let Some(&coordinator) = self.step_ring(op.stream()).first() else {
            return;
        };
        let msg = NodeMessage::StepLate {
            op,
            epoch: self.epoch,
        };
        if coordinator == self.me {
            self.on_step(self.me, msg);
        } else {
            self.send(coordinator, msg);
        }
    }

    /// Re-enters the cut path after an epoch change decided to run the op
    /// again: the input goes back into the buffer and readiness to the new
    /// coordinator.
    pub(super) fn recut(&mut self, mut run: Running<B>) {
        if run.is_standin() {
            // Stood in for a trainer that had not submitted: the new cut
            // decides afresh, the trainer (if it is waiting) submits again.
            if let Some(q) = self.steps.late.remove(&run.op) {
                self.waiting.push(q);
            }
            return;
        }
        run.restore_input();
        run.cut = None;
        run.members = self.step_ring(run.op.stream());
        let Some(&coordinator) = run.members.first() else {
            return self.fail(run, OpError::NoQuorum("no member to close the step".into()));
        };
        info!(op = %run.op, %coordinator, "deciding an interrupted step again in the new epoch");
        let (op, kind, dtype, len, samples) = (run.op, run.kind, run.dtype, run.len, run.samples());
        self.steps.cutting.insert(op, run);
        self.send_ready(op, kind, dtype, len, samples);
    }

    /// `StepReady` or `StepCut` from `from` (or from this daemon).
    pub(super) fn on_step(&mut self, from: MemberId, msg: NodeMessage) {
        let epoch = match &msg {
            NodeMessage::StepReady { epoch, .. }
            | NodeMessage::StepCut { epoch, .. }
            | NodeMessage::StepLate { epoch, .. } => *epoch,
            _ => return,
        };
        if epoch < self.epoch {
            debug!(peer = %from, %epoch, "step message of an old epoch: ignored");
            return;
        }
        if epoch > self.epoch || !self.mode.is_active() {
            // Handled once this daemon has entered that epoch.
            self.steps.early.push((from, msg));
            return;
        }
        match msg {
            NodeMessage::StepReady {
                op,
                reduce,
                dtype,
                len,
                samples,
                ..
            } => self.on_ready(from, op, reduce, dtype, len, samples),
            NodeMessage::StepLate { op, .. } => {
                let members = self.step_ring(op.stream());
                let now = self.now;
                if members.first() == Some(&self.me) {
                    if let Some(c) = self.steps.coordinators.get_mut(&op.stream()) {
                        c.late(op.seq(), from, now, &members);
                    }
                }
            }
            msg @ NodeMessage::StepCut { .. } => self.on_announced(msg),
            _ => {}
        }
    }

    /// A step's cut, as its coordinator announced it.
    fn on_announced(&mut self, msg: NodeMessage) {
        let NodeMessage::StepCut {
            op,
            reduce,
            dtype,
            len,
            participants,
            left_out,
            reason,
            changes,
            records,
            ..
        } = msg
        else {
            return;
        };
        let closed = self.steps.closed_upto.entry(op.stream()).or_insert(0);
        *closed = (*closed).max(op.seq());
        for (member, demoted, why) in &changes {
            if *demoted {
                warn!(%member, %op, reason = %why, "member demoted to observer: it receives results, its inputs are not waited for");
            } else {
                info!(%member, %op, reason = %why, "observer readmitted: it contributes again");
            }
        }
        if !left_out.is_empty() {
            debug!(%op, %reason, ?left_out, "step closed without some members");
        }
        self.set_records(records);
        let meta = CutMeta {
            participants,
            left_out,
        };
        self.on_cut(CutMsg {
            op,
            reduce,
            dtype,
            len,
            meta,
        });
    }

    /// Handles the step messages held back while this daemon was not in
    /// the epoch they belong to.
    pub(super) fn replay_early_steps(&mut self) {
        if !self.mode.is_active() {
            return;
        }
        for (from, msg) in std::mem::take(&mut self.steps.early) {
            self.on_step(from, msg);
        }
    }

    fn on_ready(
        &mut self,
        from: MemberId,
        op: OpId,
        reduce: ReduceOp,
        dtype: DType,
        len: u64,
        samples: Option<u64>,
    ) {
        let stream = op.stream();
        let members = self.step_ring(stream);
        let pending = self.pending(stream);
        // The members of a hand-over finish it at different times: one
        // that did goes on to the next step, whose ring holds the joiner,
        // while the joiner (the step's coordinator if its id is lowest) or
        // the coordinator still waits to finish it. Its readiness is held
        // until then; dropped, the step never closed (cluster simulator,
        // `backup=1` with a joiner of the lowest id).
        let early = (members.first() != Some(&self.me) && pending.contains(&self.me))
            || (!members.contains(&from) && pending.contains(&from));
        if early {
            debug!(peer = %from, %op, "readiness for a step after a hand-over not finished here: held");
            let msg = NodeMessage::StepReady {
                op,
                epoch: self.epoch,
                reduce,
                dtype,
                len,
                samples,
            };
            self.steps.early.push((from, msg));
            return;
        }
        if members.first() != Some(&self.me) {
            warn!(peer = %from, %op, "readiness for a step this member does not coordinate: ignored");
            return;
        }
        if !members.contains(&from) {
            debug!(peer = %from, %op, "readiness from outside the step's ring: ignored");
            return;
        }
        let info = self.steps.open.entry(op).or_insert_with(|| StepInfo {
            reduce,
            dtype,
            len,
            samples: BTreeMap::new(),
        });
        if (info.reduce, info.dtype, info.len) != (reduce, dtype, len) {
            warn!(peer = %from, %op, "members disagree on the step's reduction, type or length");
        }
        info.samples.insert(from, samples);
        let (now, policy, a) = (self.now, self.policy, self.config.attribution);
        let coordinator = self.steps.coordinators.entry(stream).or_insert_with(|| {
            Coordinator::new(
                policy,
                Attribution::new(a.window, a.demote_after, a.readmit_after, a.tolerance),
            )
        });
        if let Some(ann) = coordinator.ready(op.seq(), from, now, &members) {
            self.announce(stream, ann, &members);
        }
    }

    /// Closes the steps whose deadline passed.
    pub(super) fn poll_coordinators(&mut self) {
        if !self.mode.is_active() || self.steps.coordinators.is_empty() {
            return;
        }
        let streams: Vec<u32> = self.steps.coordinators.keys().copied().collect();
        for stream in streams {
            let members = self.step_ring(stream);
            if members.first() != Some(&self.me) {
                continue;
            }
            let now = self.now;
            let anns = self
                .steps
                .coordinators
                .get_mut(&stream)
                .expect("listed")
                .poll(now, &members);
            for ann in anns {
                self.announce(stream, ann, &members);
            }
        }
    }

    /// When the earliest step deadline passes.
    pub(super) fn coordinator_deadline(&self) -> Option<crate::Time> {
        self.steps
            .coordinators
            .values()
            .filter_map(Coordinator::next_deadline)
            .min()
    }

    /// Sends a closed step's cut to every member of its ring (this one
    /// included).
    fn announce(&mut self, stream: u32, ann: Announcement, members: &[MemberId]) {
        let op = OpId::new(stream, ann.step);
        let Some(info) = self.steps.open.remove(&op) else {
            warn!(%op, "a step closed that no readiness opened");
            return;
        };
        self.event(Event::StepClosed {
            reason: close_label(&ann.reason),
        });
        let changes: Vec<(MemberId, bool, String)> = ann
            .standings
            .iter()
            .map(|s| match s {
                Standing::Demoted { member, reason } => (*member, true, reason.clone()),
                Standing::Readmitted { member, reason } => (*member, false, reason.clone()),
            })
            .collect();
        let records = self.steps.coordinators[&stream].attribution().snapshot();
        let msg = NodeMessage::StepCut {
            op,
            epoch: self.epoch,
            reduce: info.reduce,
            dtype: info.dtype,
            len: info.len,
            participants: ann
                .participants
                .iter()
                .map(|m| (*m, info.samples.get(m).copied().flatten()))
                .collect(),
            left_out: ann.left_out.clone(),
            reason: ann.reason.to_string(),
            changes,
            records,
        };
        let me = self.me;
        for &peer in members.iter().filter(|&&p| p != me) {
            self.send(peer, msg.clone());
        }
        self.on_step(self.me, msg);
    }

    /// Runs a step as its cut says.
    fn on_cut(&mut self, cut: CutMsg) {
        let me = self.me;
        let op = cut.op;
        let mut members: Vec<MemberId> = cut
            .meta
            .participants
            .iter()
            .map(|(m, _)| *m)
            .chain(cut.meta.left_out.iter().map(|(m, _)| *m))
            .collect();
        members.sort();
        if !members.contains(&me) {
            return;
        }
        if self.parked.contains_key(&op) || self.ops.contains_key(&op) {
            // Parked when the links to the coordinator were reset (the next
            // epoch decides it), or running already: a cut that comes
            // after that is not this member's to act on (a sweep of 3000
            // cluster seeds, seed 2344: a stand-in started for the parked
            // op, which then ran twice).
            debug!(%op, "a cut for a step parked or running here: ignored");
            return;
        }
        let mut run = match self.steps.cutting.remove(&op) {
            Some(mut run) => {
                self.prepare_input(&mut run, &cut);
                run
            }
            None => {
                let named = cut.meta.participants.iter().any(|(m, _)| *m == me);
                let mut run = self.standin(&cut);
                match self.steps.withdrawn.remove(&op) {
                    // The result must hold what it says it holds: the
                    // coordinator counted the input readiness announced.
                    Some(input) if named && input.len() == run.bytes().len() => {
                        info!(%op, "named a contributor of a step whose call failed here: running it with the input it was ready with");
                        run.bytes_mut().copy_from_slice(&input);
                        self.prepare_input(&mut run, &cut);
                    }
                    _ if named => {
                        warn!(%op, "named a contributor of a step it holds no input for: standing in with a neutral input");
                    }
                    _ => {}
                }
                run
            }
        };
        run.members = members;
        run.cut = Some(cut.meta);
        self.start(run);
    }

    /// A contributor's input, folded and scaled as the cut says; a member
    /// left out contributes the neutral element (and keeps its input to
    /// fold into its next step under `late=fold`).
    fn prepare_input(&mut self, run: &mut Running<B>, cut: &CutMsg) {
        let me = self.me;
        let (op, dtype) = (run.op, run.dtype);
        let mine = cut.meta.participants.iter().find(|(m, _)| *m == me);
        let fold = self.policy.late == LatePolicy::FoldIntoNext;
        let Some(&(_, my_samples)) = mine else {
            if fold {
                if let Role::Trainer { input, .. } = &run.role {
                    self.steps.folded.keep(op.stream(), op.seq(), input.clone());
                }
            }
            let zero = neutral(cut.reduce, dtype, run.len);
            run.bytes_mut().copy_from_slice(&zero);
            return;
        };
        if fold && matches!(cut.reduce, ReduceOp::Sum | ReduceOp::Mean) {
            // Staleness 1: only the step right before this one.
            if let Some(stale) = self.steps.folded.take_for(op.stream(), op.seq()) {
                let bytes = run.bytes_mut();
                if stale.len() == bytes.len() {
                    let _ = self.arith.reduce(dtype, ReduceOp::Sum, bytes, &stale);
                }
            }
        }
        if cut.reduce == ReduceOp::Mean {
            let p = cut.meta.participants.len().max(1);
            let total: Option<u64> = cut
                .meta
                .participants
                .iter()
                .map(|(_, s)| *s)
                .sum::<Option<u64>>()
                .filter(|&t| t > 0);
            let factor = match (total, my_samples) {
                (Some(t), Some(s)) => s as f32 / t as f32,
                _ => 1.0 / p as f32,
            };
            let _ = self.arith.scale(dtype, run.bytes_mut(), factor);
        }
    }

    /// `run`, a step waiting for its cut, is failed: its readiness may
    /// have reached the coordinator, whose cut would then name this member
    /// (in the same epoch, after a heal), so its input is kept for that.
    pub(super) fn withdraw_step(&mut self, run: &Running<B>) {
        let Role::Trainer { samples, .. } = &run.role else {
            return;
        };
        if run.cut.is_some() || !self.cut_applies(run.kind, *samples) {
            return;
        }
        self.steps.withdrawn.insert(run.op, run.bytes().to_vec());
        while self.steps.withdrawn.len() > WITHDRAWN_KEPT {
            self.steps.withdrawn.pop_first();
        }
    }

    /// A stand-in for a step this daemon's trainer has not submitted.
    fn standin(&self, cut: &CutMsg) -> Running<B> {
        let len = cut.len as usize;
        Running {
            op: cut.op,
            kind: LocalKind::AllReduce(cut.reduce),
            name: "all_reduce",
            dtype: cut.dtype,
            len,
            members: Vec::new(),
            started: self.now,
            role: Role::StandIn {
                buffer: neutral(cut.reduce, cut.dtype, len),
            },
            kept: None,
            cut: None,
        }
    }

    /// The metadata of a completed cut step, as this member's trainer is
    /// told.
    pub(super) fn step_meta(&self, op: OpId, cut: Option<&CutMeta>) -> StepMeta {
        let Some(cut) = cut else {
            return StepMeta::default();
        };
        StepMeta {
            left_out: cut
                .left_out
                .iter()
                .map(|(m, why)| (*m, why.to_string()))
                .collect(),
            samples: cut
                .participants
                .iter()
                .filter_map(|(m, s)| s.map(|s| (*m, s)))
                .collect(),
            behind: self.behind(op),
            observer: self
                .steps
                .records
                .iter()
                .any(|r| r.member == self.me && r.observer),
        }
    }

    /// Later steps of `op`'s stream already closed.
    fn behind(&self, op: OpId) -> u64 {
        self.steps
            .closed_upto
            .get(&op.stream())
            .map_or(0, |&c| c.saturating_sub(op.seq()))
    }

    /// A stand-in finished: its result waits for the trainer.
    pub(super) fn keep_for_trainer(&mut self, output: Vec<u8>, done: OpDone) {
        let op = done.op;
        if let Some(q) = self.steps.late.remove(&op) {
            return self.serve_kept(q, output, done);
        }
        self.steps.delivered.insert(op, (output, done));
        if self.stood_in_ahead() > self.config.max_kept_ahead {
            let max = self.config.max_kept_ahead;
            warn!(
                kept = self.stood_in_ahead(),
                "this member's trainer is too far behind the group: leaving the ring to rejoin with its state"
            );
            self.steps.delivered.clear();
            self.suspect(
                self.me,
                format!("its trainer fell more than {max} steps behind the group"),
            );
        }
    }

    /// Results of steps run ahead of the trainer, less those a returning
    /// member receives (bounded by the holder's `return_kept_results`).
    pub(super) fn stood_in_ahead(&self) -> usize {
        self.steps
            .delivered
            .keys()
            .filter(|op| !self.catch_up.contains(op))
            .count()
    }

    /// Hands a kept result to the trainer that asked for it.
    pub(super) fn serve_kept(&mut self, q: Queued<B>, output: Vec<u8>, mut done: OpDone) {
        if self.in_doubt() {
            let w = super::doubt::Withheld::Served { q, output, done };
            return self.withhold(w);
        }
        let Queued { mut req, since } = q;
        let bytes = req.buffer.as_bytes_mut();
        if bytes.len() != output.len() {
            let err = OpError::Rejected(format!(
                "buffer holds {} bytes, the step's result has {}",
                bytes.len(),
                output.len()
            ));
            return self.reply(req.id, req.buffer, Err(err));
        }
        bytes.copy_from_slice(&output);
        done.meta.behind = self.behind(done.op);
        self.event(Event::Op {
            outcome: Outcome::Completed,
            kind: "all_reduce",
            elapsed: Some(self.now.since(since)),
        });
        self.reply(req.id, req.buffer, Ok(done));
    }

    /// The coordinator's attribution as last announced: metrics, and what
    /// `phalanxctl members` shows.
    fn set_records(&mut self, records: Vec<StragglerRecord>) {
        self.event(Event::Stragglers(records.clone()));
        self.steps.records = records;
    }

    /// The links to `member` are being reset: readiness sent to it, and the
    /// cut it announced, may be lost with what was in flight. The steps it
    /// coordinates are parked like the ops the reset interrupts, for the
    /// next epoch to decide. Left waiting, a step whose cut was lost never
    /// started here while its other members ran it, and — the suspicion
    /// cleared before any removal — nothing ended the wait (cluster
    /// simulator, seed 837 with `backup=1`).
    pub(super) fn park_steps_coordinated_by(&mut self, member: MemberId) {
        let lost: Vec<OpId> = self
            .steps
            .cutting
            .iter()
            .filter(|(_, run)| run.members.first() == Some(&member))
            .map(|(&op, _)| op)
            .collect();
        for op in lost {
            let run = self.steps.cutting.remove(&op).expect("listed");
            self.park(
                run,
                format!("interrupted: the links to {member}, the step's coordinator, were reset"),
            );
        }
    }

    /// A new epoch: cut steps not started are parked like interrupted ops
    /// (the recovery exchange decides them), coordinators forget open steps.
    pub(super) fn new_epoch_steps(&mut self) {
        for (_, run) in std::mem::take(&mut self.steps.cutting) {
            self.park(
                run,
                "interrupted: the epoch changed before the step closed".into(),
            );
        }
        self.steps.open.clear();
        let (ring, policy, epoch) = (self.ring.clone(), self.policy, self.epoch);
        for c in self.steps.coordinators.values_mut() {
            c.new_epoch(&ring);
            c.set_policy(policy);
        }
        self.steps.early.retain(|(_, msg)| match msg {
            NodeMessage::StepReady { epoch: e, .. } | NodeMessage::StepCut { epoch: e, .. } => {
                *e >= epoch
            }
            // A late arrival belongs to the epoch it was sent in.
            _ => false,
        });
    }
}
