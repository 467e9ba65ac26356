//! Everything a daemon's control task decides around its [`ControlNode`]:
//! which removals to propose for the suspicions its node raised (retried
//! by [`Suspicions`]), the standing policy ([`Housekeeper`]: record this
//! life, leave the ring after a restart, ask to be readmitted when a
//! trainer joins, keep the voters alive), the bookkeeping of what was
//! applied, and what to tell the daemon's node ([`GroupChange`]). The
//! daemon's control task and the cluster simulator both run this.

use std::time::Duration;

use tracing::{debug, info, warn};

use super::control::{propose, ControlNode, Durable, Event, Housekeeper};
use super::group::{Applied, Change};
use super::suspicions::Suspicions;
use crate::node::{ControlRequest, GroupChange};
use crate::{Epoch, Incarnation, MemberId, Time};

/// What one [`ControlPlane::step`] produced.
#[derive(Debug, Default)]
pub struct PlaneOutput {
    /// Raft messages to send, each to its `to`.
    pub messages: Vec<raft::eraftpb::Message>,
    /// What changed, in order (for logs and metrics).
    pub events: Vec<Event>,
    /// The group as this daemon's node must see it, when that changed.
    pub change: Option<GroupChange>,
    /// Members removed on a suspicion this daemon proposed, with how long
    /// from its first accepted proposal to the commit.
    pub removals: Vec<(MemberId, Duration)>,
}

/// One daemon's control plane, without IO.
#[derive(Debug)]
pub struct ControlPlane {
    node: ControlNode,
    keeper: Housekeeper,
    suspicions: Suspicions,
    incarnation: Incarnation,
    addr: String,
    /// A trainer asked to join; cleared once in the ring.
    want_in: bool,
    /// A new epoch this daemon's node asks for (see
    /// [`ControlRequest::Renew`]): the epoch it is for, why, and when it may
    /// be proposed again.
    renew: Option<(Epoch, String, Time)>,
    retry: Duration,
    published: Option<GroupChange>,
    /// The node's latest [`ControlRequest::Confirm`], until answered.
    confirm: Option<Confirming>,
}

/// A read of the group the node asked for after a pause.
#[derive(Debug)]
struct Confirming {
    asked: u64,
    /// When the read index was last asked for (it is dropped without a
    /// leader, and asked for again every `retry`).
    sent: Option<Time>,
    /// The index the leader confirmed: the group is read once applied.
    index: Option<u64>,
}

impl Confirming {
    fn ctx(&self) -> Vec<u8> {
        format!("confirm-{}", self.asked).into_bytes()
    }
}

impl ControlPlane {
    /// Around `node`, for this daemon's `incarnation` listening at `addr`:
    /// proposals are retried every `retry`, and `voters` are kept voting.
    pub fn new(
        node: ControlNode,
        incarnation: Incarnation,
        addr: String,
        retry: Duration,
        voters: usize,
    ) -> ControlPlane {
        ControlPlane {
            node,
            keeper: Housekeeper::new(retry, voters),
            suspicions: Suspicions::new(retry),
            incarnation,
            addr,
            want_in: false,
            renew: None,
            retry,
            published: None,
            confirm: None,
        }
    }

    /// The Raft node.
    pub fn node(&self) -> &ControlNode {
        &self.node
    }

    /// The Raft node, to step messages, propose and tick.
    pub fn node_mut(&mut self) -> &mut ControlNode {
        &mut self.node
    }

    /// What the daemon's node asks.
    pub fn handle(&mut self, req: ControlRequest) {
        match req {
            ControlRequest::Suspect { member, reason } => {
                self.suspicions.raise(member, reason);
                self.take_over_from(member);
            }
            ControlRequest::Cleared { member } => self.suspicions.clear(member),
            // A local trainer is joining: ask to be in the ring.
            ControlRequest::WantIn => self.want_in = true,
            ControlRequest::Renew { reason } => {
                let epoch = self.node.group().epoch;
                if self.renew.as_ref().is_none_or(|(e, ..)| *e < epoch) {
                    self.renew = Some((epoch, reason, Time::ZERO));
                }
            }
            ControlRequest::Confirm { asked } => {
                self.confirm = Some(Confirming {
                    asked,
                    sent: None,
                    index: None,
                });
            }
        }
    }

    /// Asks for the read index of a confirmation (again, if unanswered for
    /// `retry`).
    fn ask_read(&mut self, now: Time) {
        let Some(c) = &mut self.confirm else {
            return;
        };
        if c.index.is_some() || c.sent.is_some_and(|t| now < t.after(self.retry)) {
            return;
        }
        c.sent = Some(now);
        let ctx = c.ctx();
        debug!(
            asked = c.asked,
            "reading the group at the leader's commit index"
        );
        self.node.read_index(ctx);
    }

    /// Whether the confirmation asked for is answered: its read index came
    /// back and the group is applied up to it.
    fn confirmed(&mut self, reads: &[(Vec<u8>, u64)]) -> Option<u64> {
        let c = self.confirm.as_mut()?;
        let ctx = c.ctx();
        if let Some(&(_, index)) = reads.iter().find(|(got, _)| *got == ctx) {
            c.index = Some(index);
        }
        let ready = c.index.is_some_and(|i| self.node.applied() >= i);
        let asked = c.asked;
        ready.then(|| {
            self.confirm = None;
            asked
        })
    }

    /// The leader `member` was found silent: the lowest voter that is not
    /// suspected campaigns at once (one candidate, chosen alike by every
    /// member that suspects the leader, so the votes do not split), and the
    /// removal commits as soon as it leads.
    fn take_over_from(&mut self, member: MemberId) {
        if self.node.leader() != Some(member) {
            return;
        }
        let successor = self
            .node
            .roles()
            .voters
            .iter()
            .copied()
            .filter(|&v| v != member && !self.suspicions.contains(v))
            .min();
        if successor == Some(self.me()) && self.node.take_over() {
            info!(leader = %member, term = self.node.term(), "the leader is silent: campaigning now");
        }
    }

    /// Proposes what is due at `now`, runs the ready loop (persisting
    /// through `disk` before any message that depends on it is returned)
    /// and says what changed.
    pub fn step(&mut self, now: Time, disk: &mut dyn Durable) -> Result<PlaneOutput, String> {
        self.propose_due(now);
        self.ask_read(now);
        let out = self.node.process(disk)?;
        let confirmed = self.confirmed(&out.reads);
        let mut plane = PlaneOutput {
            messages: out.messages,
            ..PlaneOutput::default()
        };
        for ev in out.events {
            if let Event::Applied { applied, .. } = &ev {
                self.applied(applied, now, &mut plane.removals);
            }
            plane.events.push(ev);
        }
        let mut change = GroupChange::of(self.node.group(), self.me(), self.incarnation);
        let moved = self.published.as_ref().is_none_or(|last| {
            (last.epoch, last.admitted, &last.removed)
                != (change.epoch, change.admitted, &change.removed)
        });
        if moved || confirmed.is_some() {
            if let Some(asked) = confirmed {
                debug!(asked, epoch = %change.epoch, "group read after the node's ask: publishing it");
            }
            change.confirmed = confirmed;
            self.published = Some(change.clone());
            plane.change = Some(change);
        }
        Ok(plane)
    }

    fn me(&self) -> MemberId {
        self.node.me()
    }

    fn propose_due(&mut self, now: Time) {
        let group = self.node.group().clone();
        for cmd in self.suspicions.due(&group, self.me(), now) {
            let super::Command::Remove { member, reason, .. } = &cmd else {
                continue;
            };
            match self.node.propose(&cmd) {
                Ok(()) => {
                    self.suspicions.accepted(*member, now);
                    info!(%member, %reason, epoch = %group.epoch, "proposed removing a suspected member")
                }
                Err(e) => debug!(%member, error = %e, "removal not proposed yet"),
            }
        }
        self.propose_renewal(group.epoch, now);
        let proposals =
            self.keeper
                .poll(&self.node, self.incarnation, &self.addr, self.want_in, now);
        for p in proposals {
            match propose(&mut self.node, &p) {
                Ok(()) => info!(proposal = ?p, "proposed"),
                Err(e) => debug!(proposal = ?p, error = %e, "not proposed yet"),
            }
        }
    }

    /// Proposes the new epoch the node asked for until one is committed
    /// (this one or any other: the ops are finished again either way).
    fn propose_renewal(&mut self, current: Epoch, now: Time) {
        let me = self.me();
        let Some((epoch, reason, next)) = &mut self.renew else {
            return;
        };
        if *epoch < current {
            self.renew = None;
            return;
        }
        if now < *next {
            return;
        }
        let cmd = super::Command::Renew {
            by: me,
            epoch: *epoch,
            reason: reason.clone(),
        };
        match self.node.propose(&cmd) {
            Ok(()) => {
                info!(epoch = %epoch, %reason, "proposed a new epoch with the same ring");
                *next = now.after(self.retry);
            }
            Err(e) => debug!(error = %e, "new epoch not proposed yet"),
        }
    }

    fn applied(&mut self, applied: &Applied, now: Time, removals: &mut Vec<(MemberId, Duration)>) {
        let Applied::NewEpoch {
            epoch,
            ring,
            change,
        } = applied
        else {
            return;
        };
        match change {
            Change::Removed(member, reason) => {
                warn!(%epoch, %member, %reason, ?ring, "member removed: new epoch");
                // The suspicion took effect: a later life of the member
                // starts with a clean slate.
                if let Some(took) = self.suspicions.took_effect(*member, now) {
                    removals.push((*member, took));
                }
            }
            Change::Policy(policy) => info!(%epoch, %policy, "quorum policy changed: new epoch"),
            Change::Renewed(by, reason) => {
                warn!(%epoch, %by, %reason, "same ring, new epoch: ops in flight are finished again")
            }
            Change::Admitted(member, life) => {
                info!(%epoch, %member, life = life.0, ?ring, "member admitted: new epoch");
                if *member == self.me() && *life == self.incarnation {
                    self.want_in = false;
                    // What this daemon suspected while it was out of the
                    // ring is stale: the ring it rejoins is the majority's.
                    self.suspicions.clear_all();
                }
                self.suspicions.clear(*member);
            }
        }
    }
}
