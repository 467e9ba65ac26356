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
//! left out with the reduction's neutral element (0, or ∓∞ for max/min), so
//! every replica — stragglers included — gets the same bytes and the
//! existing recovery exchange covers cut steps like any other op.
//!
//! A member left out whose trainer has not submitted the step yet is *stood
//! in for*: its daemon runs the step with a neutral input of its own and
//! keeps the result until the trainer asks for it, with how many later steps
//! already closed without it (`StepMeta::behind`), so a slow trainer can
//! skip their gradients and catch up.
//!
//! An epoch change decides interrupted cut steps again: if a member kept
//! the result it stands ([`Plan::FromResult`]); otherwise every member sends
//! `StepReady` again in the new epoch and the new coordinator cuts afresh.

use std::time::{Duration, Instant};

use phalanx_compute::scale_bytes;
use phalanx_protocol::collective::Kind;
use phalanx_protocol::local::{LocalKind, StepMeta};
use phalanx_protocol::stragglers::{
    Announcement, Attribution, Coordinator, LatePolicy, LeftOut, Standing, StragglerRecord,
};
use phalanx_protocol::wire::{ControlMessage, DType, ReduceOp};
use phalanx_protocol::{MemberId, OpId};
use tracing::{debug, info, warn};

use super::{fail, seq_of, stream_of, Buf, Driver, OpCtx, OpDone, OpError, OpRequest, Waiting};
use crate::metrics as m;

/// Attribution: a member is demoted when it missed `DEMOTE_AFTER` of the
/// last `WINDOW` steps, by more than `TOLERANCE` each, and readmitted after
/// `READMIT_AFTER` consecutive steps in time.
const WINDOW: usize = 10;
const DEMOTE_AFTER: usize = 3;
const READMIT_AFTER: usize = 3;
/// How late after a step's close a member left out may be and still count
/// as keeping up (backup workers always leave out the last arrival).
const TOLERANCE: Duration = Duration::from_millis(20);
/// Results a daemon keeps for its trainer before concluding the trainer
/// cannot keep up at all (then it leaves the ring and rejoins with state).
const MAX_KEPT_AHEAD: usize = 256;

/// What a member knows of a step's cut.
#[derive(Clone, Debug)]
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
    samples: std::collections::BTreeMap<MemberId, Option<u64>>,
}

/// A `StepCut` as received.
#[derive(Clone, Debug)]
pub(super) struct CutMsg {
    op: OpId,
    reduce: ReduceOp,
    dtype: DType,
    len: u64,
    meta: CutMeta,
}

/// The neutral element of `reduce` for `dtype`, as `len` elements of bytes.
/// For a sum it is -0.0, not +0.0: `-0.0 + x` is `x` for every `x`, while
/// `+0.0 + -0.0` is `+0.0`, and a step's result must be exactly the sum over
/// its contributors.
fn neutral(reduce: ReduceOp, dtype: DType, len: usize) -> Vec<u8> {
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

impl Driver {
    /// Whether a trainer's op closes by the quorum policy.
    pub(super) fn takes_cut_path(&self, req: &OpRequest) -> bool {
        self.cut_applies(req.kind, req.samples)
    }

    /// The rule behind [`Driver::takes_cut_path`]. It depends only on the
    /// epoch's policy and the request, so every member routes an op the
    /// same way — a first run, a re-run after an epoch change, or a late
    /// submission of a re-run alike.
    pub(super) fn cut_applies(&self, kind: LocalKind, samples: Option<u64>) -> bool {
        matches!(kind, LocalKind::AllReduce(_)) && (!self.policy.is_sync() || samples.is_some())
    }

    /// Whether this daemon ran (or runs) `op` for its trainer, which has
    /// not asked for it yet.
    pub(super) fn stood_in(&self, op: OpId) -> bool {
        self.delivered.contains_key(&op)
            || self.ops.get(&op).is_some_and(|c| c.standin)
            || self.parked.get(&op).is_some_and(|p| p.ctx.standin)
    }

    /// The members of `stream`'s steps: the ring less those waiting for
    /// its state. The first is the coordinator.
    fn step_ring(&self, stream: u64) -> Vec<MemberId> {
        let pending = self.pending(stream);
        self.ring
            .iter()
            .copied()
            .filter(|m| !pending.contains(m))
            .collect()
    }

    /// A trainer submitted a cut-path all-reduce.
    pub(super) fn submit_cut(&mut self, w: Waiting) {
        let op = w.req.op;
        // A rerun plan for it is moot: the step is cut again.
        self.plans.remove(&op);
        if self.stood_in(op) {
            // Late: the step closed without this input.
            if self.policy.late == LatePolicy::FoldIntoNext {
                let mut buf = Buf::Shared(w.req.region.clone());
                // SAFETY: the request owns its region until it is answered.
                let input = unsafe { buf.bytes_mut() }.to_vec();
                self.folded.insert(stream_of(op), (seq_of(op), input));
            }
            // For attribution: how late this member was.
            debug!(%op, "late for the step: telling the coordinator");
            let r = &w.req;
            self.send_ready(op, r.kind, r.dtype, r.len, r.samples);
        }
        if let Some((output, mut done)) = self.delivered.remove(&op) {
            return self.serve_kept(w, output, &mut done);
        }
        if self.stood_in(op) {
            debug!(%op, "the step closed without this member; its result is on the way");
            self.late.insert(op, w);
            return;
        }
        let Waiting { req, reply, since } = w;
        let members = self.step_ring(stream_of(op));
        if !matches!(req.kind, LocalKind::AllReduce(_)) {
            let _ = reply.send(Err(OpError::Rejected(
                "the group ran this op as an all-reduce; this trainer issued another collective"
                    .into(),
            )));
            return;
        }
        let need = req.len * req.dtype.size_bytes();
        if req.region.len != need {
            let _ = reply.send(Err(OpError::Rejected(format!(
                "buffer holds {} bytes, the op needs {need}",
                req.region.len
            ))));
            return;
        }
        let mut buf = Buf::Shared(req.region);
        // SAFETY: this op owns the region from now until it ends.
        let input = unsafe { buf.bytes_mut() }.to_vec();
        let ctx = OpCtx {
            op,
            kind: req.kind,
            dtype: req.dtype,
            len: req.len,
            buf,
            reply: Some(reply),
            started: since,
            kind_name: "all_reduce",
            input,
            contributors: None,
            waiting: None,
            members,
            sync: false,
            expect_checksum: None,
            samples: req.samples,
            cut: None,
            standin: false,
            core_kind: None,
        };
        // In the map before the readiness goes out: at the coordinator, this
        // member's own readiness may close the step at once.
        self.cutting.insert(op, ctx);
        self.send_ready(op, req.kind, req.dtype, req.len, req.samples);
    }

    /// Sends this member's readiness to the step's coordinator (itself
    /// included). `now_ready`: false for a late arrival, which only counts
    /// for attribution.
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
        let members = self.step_ring(stream_of(op));
        let Some(&coordinator) = members.first() else {
            return;
        };
        let msg = ControlMessage::StepReady {
            op,
            epoch: self.epoch,
            reduce,
            dtype,
            len: len as u64,
            samples,
        };
        if coordinator == self.me() {
            self.on_step(self.me(), msg);
        } else {
            self.wiring.peers.send(coordinator, msg);
        }
    }

    /// Re-enters the cut path after an epoch change decided to run the op
    /// again: the input goes back into the buffer and readiness to the new
    /// coordinator.
    pub(super) fn recut(&mut self, mut ctx: OpCtx) {
        if ctx.standin {
            // Stood in for a trainer that had not submitted: the new cut
            // decides afresh, the trainer (if it is waiting) submits again.
            if let Some(w) = self.late.remove(&ctx.op) {
                self.waiting.push(w);
            }
            return;
        }
        // SAFETY: this op owns its buffer until it ends.
        let bytes = unsafe { ctx.buf.bytes_mut() };
        if ctx.input.len() == bytes.len() {
            bytes.copy_from_slice(&ctx.input);
        }
        ctx.cut = None;
        ctx.core_kind = None;
        ctx.members = self.step_ring(stream_of(ctx.op));
        let Some(&coordinator) = ctx.members.first() else {
            return fail(ctx, OpError::NoQuorum("no member to close the step".into()));
        };
        info!(op = %ctx.op, %coordinator, "deciding an interrupted step again in the new epoch");
        let (op, kind, dtype, len, samples) = (ctx.op, ctx.kind, ctx.dtype, ctx.len, ctx.samples);
        self.cutting.insert(op, ctx);
        self.send_ready(op, kind, dtype, len, samples);
    }

    /// `StepReady` or `StepCut` from `from` (or from this daemon).
    pub(super) fn on_step(&mut self, from: MemberId, msg: ControlMessage) {
        let epoch = match &msg {
            ControlMessage::StepReady { epoch, .. } | ControlMessage::StepCut { epoch, .. } => {
                *epoch
            }
            _ => return,
        };
        if epoch < self.epoch {
            debug!(peer = %from, %epoch, "step message of an old epoch: ignored");
            return;
        }
        if epoch > self.epoch || self.recovery.is_some() || !self.admitted {
            // Handled once this daemon has entered that epoch.
            self.early_steps.push((from, msg));
            return;
        }
        match msg {
            ControlMessage::StepReady {
                op,
                reduce,
                dtype,
                len,
                samples,
                ..
            } => self.on_ready(from, op, reduce, dtype, len, samples),
            ControlMessage::StepCut {
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
            } => {
                let stream = stream_of(op);
                let seq = seq_of(op);
                let e = self.closed_upto.entry(stream).or_insert(0);
                *e = (*e).max(seq);
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
                self.on_cut(CutMsg {
                    op,
                    reduce,
                    dtype,
                    len,
                    meta: CutMeta {
                        participants,
                        left_out,
                    },
                });
            }
            _ => {}
        }
    }

    /// Handles the step messages held back while this daemon was not in
    /// the epoch they belong to.
    pub(super) fn replay_early_steps(&mut self) {
        if self.recovery.is_some() || !self.admitted {
            return;
        }
        let early = std::mem::take(&mut self.early_steps);
        for (from, msg) in early {
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
        let stream = stream_of(op);
        let members = self.step_ring(stream);
        if members.first() != Some(&self.me()) {
            warn!(peer = %from, %op, "readiness for a step this member does not coordinate: ignored");
            return;
        }
        if !members.contains(&from) {
            debug!(peer = %from, %op, "readiness from outside the step's ring: ignored");
            return;
        }
        let info = self.step_info.entry(op).or_insert_with(|| StepInfo {
            reduce,
            dtype,
            len,
            samples: Default::default(),
        });
        if (info.reduce, info.dtype, info.len) != (reduce, dtype, len) {
            warn!(peer = %from, %op, "members disagree on the step's reduction, type or length");
        }
        info.samples.insert(from, samples);
        let now = self.now();
        let policy = self.policy;
        let coordinator = self.coordinators.entry(stream).or_insert_with(|| {
            Coordinator::new(
                policy,
                Attribution::new(WINDOW, DEMOTE_AFTER, READMIT_AFTER, TOLERANCE),
            )
        });
        if let Some(ann) = coordinator.ready(seq_of(op), from, now, &members) {
            self.announce(stream, ann, &members);
        }
    }

    /// Closes the steps whose deadline passed.
    pub(super) fn poll_coordinators(&mut self) {
        if !self.admitted || self.recovery.is_some() || self.coordinators.is_empty() {
            return;
        }
        let now = self.now();
        let streams: Vec<u64> = self.coordinators.keys().copied().collect();
        for stream in streams {
            let members = self.step_ring(stream);
            if members.first() != Some(&self.me()) {
                continue;
            }
            let anns = self
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
    pub(super) fn coordinator_deadline(&self) -> Option<phalanx_protocol::Time> {
        self.coordinators
            .values()
            .filter_map(|c| c.next_deadline())
            .min()
    }

    /// Sends a closed step's cut to every member of its ring (this one
    /// included).
    fn announce(&mut self, stream: u64, ann: Announcement, members: &[MemberId]) {
        let op = OpId((stream << 40) | ann.step);
        let Some(info) = self.step_info.remove(&op) else {
            warn!(%op, "a step closed that no readiness opened");
            return;
        };
        let reason_label = match ann.reason {
            phalanx_protocol::stragglers::CloseReason::AllReady => "all_ready",
            phalanx_protocol::stragglers::CloseReason::Backup { .. } => "backup",
            phalanx_protocol::stragglers::CloseReason::Deadline { .. } => "deadline",
        };
        metrics::counter!(m::STEPS_CLOSED, "reason" => reason_label).increment(1);
        let changes: Vec<(MemberId, bool, String)> = ann
            .standings
            .iter()
            .map(|s| match s {
                Standing::Demoted { member, reason } => (*member, true, reason.clone()),
                Standing::Readmitted { member, reason } => (*member, false, reason.clone()),
            })
            .collect();
        let records = self.coordinators[&stream].attribution().snapshot();
        let msg = ControlMessage::StepCut {
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
        for &peer in members {
            if peer != self.me() {
                self.wiring.peers.send(peer, msg.clone());
            }
        }
        self.on_step(self.me(), msg);
    }

    /// Runs a step as its cut says.
    fn on_cut(&mut self, cut: CutMsg) {
        let me = self.me();
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
        let contributes = cut.meta.participants.iter().any(|(m, _)| *m == me);
        let p = cut.meta.participants.len().max(1);
        let total: Option<u64> = cut
            .meta
            .participants
            .iter()
            .map(|(_, s)| *s)
            .sum::<Option<u64>>()
            .filter(|&t| t > 0);
        let core_kind = match cut.reduce {
            ReduceOp::Mean => Kind::AllReduce(ReduceOp::Sum),
            other => Kind::AllReduce(other),
        };
        let stream = stream_of(op);
        let len = cut.len as usize;
        let ctx = match self.cutting.remove(&op) {
            Some(mut ctx) => {
                // SAFETY: this op owns its buffer until it ends.
                let bytes = unsafe { ctx.buf.bytes_mut() };
                if contributes {
                    if self.policy.late == LatePolicy::FoldIntoNext
                        && matches!(cut.reduce, ReduceOp::Sum | ReduceOp::Mean)
                    {
                        // Staleness 1: only the step right before this one.
                        if let Some((_, stale)) = self
                            .folded
                            .remove(&stream)
                            .filter(|(at, _)| at + 1 == seq_of(op))
                        {
                            if stale.len() == bytes.len() {
                                let _ = phalanx_compute::reduce_bytes(
                                    self.engine.as_ref(),
                                    ctx.dtype,
                                    ReduceOp::Sum,
                                    bytes,
                                    &stale,
                                );
                            }
                        }
                    }
                    if cut.reduce == ReduceOp::Mean {
                        let mine = cut
                            .meta
                            .participants
                            .iter()
                            .find(|(m, _)| *m == me)
                            .and_then(|(_, s)| *s);
                        let factor = match (total, mine) {
                            (Some(t), Some(s)) => s as f32 / t as f32,
                            _ => 1.0 / p as f32,
                        };
                        let _ = scale_bytes(self.engine.as_ref(), ctx.dtype, bytes, factor);
                    }
                } else {
                    if self.policy.late == LatePolicy::FoldIntoNext {
                        self.folded.insert(stream, (seq_of(op), ctx.input.clone()));
                    }
                    bytes.copy_from_slice(&neutral(cut.reduce, ctx.dtype, ctx.len));
                }
                ctx
            }
            None if contributes => {
                warn!(%op, "named a contributor of a step it holds no input for: standing in with a neutral input");
                self.standin_ctx(&cut, len)
            }
            None => self.standin_ctx(&cut, len),
        };
        let mut ctx = ctx;
        ctx.members = members;
        ctx.cut = Some(cut.meta);
        ctx.core_kind = Some(core_kind);
        self.start(ctx);
    }

    fn standin_ctx(&self, cut: &CutMsg, len: usize) -> OpCtx {
        OpCtx {
            op: cut.op,
            kind: LocalKind::AllReduce(cut.reduce),
            dtype: cut.dtype,
            len,
            buf: Buf::Owned(neutral(cut.reduce, cut.dtype, len)),
            reply: None,
            started: Instant::now(),
            kind_name: "all_reduce",
            input: neutral(cut.reduce, cut.dtype, len),
            contributors: None,
            waiting: None,
            members: Vec::new(),
            sync: false,
            expect_checksum: None,
            samples: None,
            cut: None,
            standin: true,
            core_kind: None,
        }
    }

    /// The metadata of a completed cut step, as this member's trainer is
    /// told.
    pub(super) fn step_meta(&self, op: OpId, cut: &Option<CutMeta>) -> StepMeta {
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
                .records
                .iter()
                .any(|r| r.member == self.me() && r.observer),
        }
    }

    /// Later steps of `op`'s stream already closed.
    fn behind(&self, op: OpId) -> u64 {
        self.closed_upto
            .get(&stream_of(op))
            .map_or(0, |&c| c.saturating_sub(seq_of(op)))
    }

    /// A stand-in finished: its result waits for the trainer.
    pub(super) fn keep_for_trainer(&mut self, output: Vec<u8>, done: OpDone) {
        let op = done.op;
        self.delivered.insert(op, (output, done));
        if let Some(w) = self.late.remove(&op) {
            let (output, mut done) = self.delivered.remove(&op).expect("just kept");
            return self.serve_kept(w, output, &mut done);
        }
        if self.delivered.len() > MAX_KEPT_AHEAD {
            warn!(
                kept = self.delivered.len(),
                "this member's trainer is too far behind the group: leaving the ring to rejoin with its state"
            );
            self.delivered.clear();
            self.suspect(
                self.me(),
                format!("its trainer fell more than {MAX_KEPT_AHEAD} steps behind the group"),
            );
        }
    }

    /// Hands a kept result to the trainer that asked for it.
    fn serve_kept(&mut self, w: Waiting, output: Vec<u8>, done: &mut OpDone) {
        let mut buf = Buf::Shared(w.req.region);
        // SAFETY: the request owns its region until it is answered.
        let bytes = unsafe { buf.bytes_mut() };
        if bytes.len() != output.len() {
            let _ = w.reply.send(Err(OpError::Rejected(format!(
                "buffer holds {} bytes, the step's result has {}",
                bytes.len(),
                output.len()
            ))));
            return;
        }
        bytes.copy_from_slice(&output);
        done.meta.behind = self.behind(done.op);
        metrics::histogram!(m::OP_SECONDS, "kind" => "all_reduce")
            .record(w.since.elapsed().as_secs_f64());
        metrics::counter!(m::OPS, "outcome" => "completed").increment(1);
        let _ = w.reply.send(Ok(done.clone()));
    }

    /// The coordinator's attribution as last announced: metrics, and what
    /// `phalanxctl members` shows.
    fn set_records(&mut self, records: Vec<StragglerRecord>) {
        for r in &records {
            let member = r.member.to_string();
            metrics::gauge!(m::STRAGGLER_LEFT_OUT, "member" => member.clone())
                .set(r.left_out as f64);
            metrics::gauge!(m::STRAGGLER_MISSED, "member" => member.clone()).set(r.missed as f64);
            metrics::gauge!(m::STRAGGLER_MISSED_SECONDS, "member" => member.clone())
                .set(r.missed_by_ms as f64 / 1000.0);
            metrics::gauge!(m::STRAGGLER_OBSERVER, "member" => member).set(if r.observer {
                1.0
            } else {
                0.0
            });
        }
        if let Some(tx) = &self.wiring.stragglers {
            tx.send_replace(records.clone());
        }
        self.records = records;
    }

    /// A new epoch: cut steps not started are parked like interrupted ops
    /// (the recovery exchange decides them), coordinators forget open steps.
    pub(super) fn new_epoch_steps(&mut self) {
        for (_, ctx) in std::mem::take(&mut self.cutting) {
            self.park(
                ctx,
                "interrupted: the epoch changed before the step closed".into(),
            );
        }
        self.step_info.clear();
        let ring = self.ring.clone();
        let policy = self.policy;
        for c in self.coordinators.values_mut() {
            c.new_epoch(&ring);
            c.set_policy(policy);
        }
        self.early_steps.retain(|(_, msg)| match msg {
            ControlMessage::StepReady { epoch, .. } | ControlMessage::StepCut { epoch, .. } => {
                *epoch >= self.epoch
            }
            _ => false,
        });
    }
}
