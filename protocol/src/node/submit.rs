//! A trainer's collective: routed to the cut path or run as asked, with its
//! input kept for a re-run.

use super::op::{kind_name, Caller, Queued, Role, Running, Task};
use super::types::{Buffer, OpError, Request};
use super::Node;
use crate::collective::OpSpec;
use crate::local::LocalKind;
use crate::membership::Plan;
use crate::{MemberId, Time};

impl<B: Buffer> Node<B> {
    /// A trainer's collective. Answered with [`super::Action::Reply`] when it
    /// completes or fails, possibly much later (after an epoch change, it
    /// is finished in the next epoch).
    pub fn handle_submit(&mut self, now: Time, req: Request<B>) {
        self.enter(now);
        let (stream, seq) = (req.op.stream(), req.op.seq());
        let issued = self.issued.entry(stream).or_insert(0);
        *issued = (*issued).max(seq);
        self.submit(Queued { req, since: now });
        self.after_input();
    }

    pub(super) fn submit(&mut self, q: Queued<B>) {
        if let Some(why) = self.mode.removed() {
            if self.returning.is_some() {
                // Held until this member is back in lockstep (or gives up).
                return self.waiting.push(q);
            }
            let why = why.to_string();
            return self.reply(q.req.id, q.req.buffer, Err(OpError::NoQuorum(why)));
        }
        if !self.mode.is_active() {
            return self.waiting.push(q);
        }
        if self.catch_up.contains(&q.req.op) {
            return self.serve_missed(q);
        }
        let stream = q.req.op.stream();
        if self.pending(stream).contains(&self.me) {
            // Admitted after the group last agreed on the stream's state
            // (readmitted by a start-up request that outlived its removal,
            // say) while its trainer was not in join(): its state is not
            // the group's, and no op can include it before a hand-over.
            let why = format!(
                "this member was admitted in {}, after the group last agreed on stream {stream}'s \
                 state, and its trainer did not join: the trainer must call join() to receive the \
                 group's state",
                self.joined_at.get(&self.me).copied().unwrap_or(self.epoch)
            );
            return self.reply(q.req.id, q.req.buffer, Err(OpError::NoQuorum(why)));
        }
        // A step this daemon stood in for is served from that, whatever the
        // epoch's policy is now.
        if self.cut_applies(q.req.kind, q.req.samples) || self.stood_in(q.req.op) {
            return self.submit_cut(q);
        }
        let Queued { req, since } = q;
        let pending = self.pending(req.op.stream());
        let (kind, task) = match self.resolve(req.kind, &pending) {
            Ok(resolved) => resolved,
            Err(e) => return self.reply(req.id, req.buffer, Err(e)),
        };
        let members: Vec<MemberId> = match self.plans.remove(&req.op) {
            Some(Plan::Rerun { members }) => self.runners(req.op, members, Some(task)),
            // A hand-over includes the members waiting for it; every other
            // op runs without them until then.
            _ if task == Task::HandOver => self.ring.clone(),
            _ => self
                .ring
                .iter()
                .copied()
                .filter(|m| !pending.contains(m))
                .collect(),
        };
        let run = Running {
            op: req.op,
            kind,
            name: kind_name(req.kind),
            dtype: req.dtype,
            len: req.len,
            members,
            started: since,
            role: Role::Trainer {
                input: Vec::new(),
                samples: None,
                task,
                caller: Caller {
                    id: req.id,
                    buffer: req.buffer,
                    since,
                },
            },
            kept: None,
            cut: None,
        };
        let Some(run) = self.check_buffer(run) else {
            return;
        };
        // A member that is down or suspected is not waited for here: it
        // may be reconnecting (its frames wait in its queue), and if it is
        // gone the control plane removes it and the op is finished in that
        // epoch.
        self.start(run)
    }

    /// What runs for a trainer's `kind`: a hand-over is a broadcast from the
    /// lowest member that holds the state (not `pending`).
    fn resolve(&self, kind: LocalKind, pending: &[MemberId]) -> Result<(LocalKind, Task), OpError> {
        if kind != LocalKind::StateSync {
            return Ok((kind, Task::Collective));
        }
        match self.ring.iter().find(|m| !pending.contains(m)) {
            Some(&root) => Ok((LocalKind::Broadcast(root), Task::HandOver)),
            None => Err(OpError::Rejected("no member holds the state".into())),
        }
    }

    /// Keeps the trainer's input for a re-run, after checking its buffer
    /// fits the op (`None`: the trainer was told why not).
    pub(super) fn check_buffer(&mut self, mut run: Running<B>) -> Option<Running<B>> {
        let spec: OpSpec = run.spec(self.epoch);
        let need = spec.buffer_len() * spec.dtype.size_bytes();
        let have = run.bytes().len();
        if have != need {
            let n = spec.members.len();
            self.fail(
                run,
                OpError::Rejected(format!(
                    "buffer holds {have} bytes, the op needs {need} (the group has {n} members)"
                )),
            );
            return None;
        }
        let kept = run.bytes().to_vec();
        if let Role::Trainer { input, .. } = &mut run.role {
            *input = kept;
        }
        Some(run)
    }
}
