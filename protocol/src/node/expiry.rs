//! Giving up: a member that cannot reach a majority sees no new epoch, so
//! what waits for one fails with [`OpError::NoQuorum`] after the recovery
//! timeout, and a join that no live trainer answers fails after the op
//! timeout. The trainer then joins again.

use tracing::warn;

use super::types::{Buffer, Event, OpError, Outcome};
use super::Node;
use crate::{MemberId, OpId, Time};

impl<B: Buffer> Node<B> {
    /// Fails parked and waiting ops that saw no new epoch in time, running
    /// ops that wait for a member gone that long, and stale joins.
    pub(super) fn expire(&mut self) {
        self.expire_running();
        self.expire_parked();
        self.expire_joins();
        self.expire_return();
        self.expire_doubt();
        self.expire_waiting();
    }

    fn where_am_i(&self) -> &'static str {
        if self.mode.admitted() {
            "in the ring"
        } else {
            "out of the ring"
        }
    }

    fn expire_running(&mut self) {
        let (now, limit) = (self.now, self.config.recovery_timeout);
        let gone: Vec<MemberId> = self
            .down
            .iter()
            .filter(|(_, &since)| now.since(since) >= limit)
            .map(|(&m, _)| m)
            .collect();
        if gone.is_empty() {
            return;
        }
        let stuck: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, run)| run.members.iter().any(|m| gone.contains(m)))
            .map(|(&op, _)| op)
            .collect();
        for op in stuck {
            let run = self.ops.remove(&op).expect("listed");
            self.core.cancel(op);
            warn!(%op, ?gone, "members gone and no new epoch in time: failing the op");
            self.event(Event::Op {
                outcome: Outcome::NoQuorum,
                kind: run.name,
                elapsed: None,
            });
            let names: Vec<String> = gone.iter().map(MemberId::to_string).collect();
            let msg = format!(
                "members [{}] are unreachable and no epoch without them was committed \
                 within {limit:?} (epoch {}): this member cannot reach a majority of the group",
                names.join(", "),
                self.epoch
            );
            self.fail(run, OpError::NoQuorum(msg));
        }
    }

    fn expire_parked(&mut self) {
        let (now, limit) = (self.now, self.config.recovery_timeout);
        let expired: Vec<OpId> = self
            .parked
            .iter()
            .filter(|(_, p)| now.since(p.since) >= limit)
            .map(|(&op, _)| op)
            .collect();
        for op in expired {
            let p = self.parked.remove(&op).expect("listed");
            warn!(%op, reason = %p.reason, "no new epoch in time: failing the op");
            self.withdraw_step(&p.run);
            self.event(Event::Op {
                outcome: Outcome::NoQuorum,
                kind: p.run.name,
                elapsed: None,
            });
            let msg = format!(
                "{} and no new epoch was committed within {limit:?} (epoch {}, this member {}): \
                 this member cannot reach a majority of the group",
                p.reason,
                self.epoch,
                self.where_am_i()
            );
            self.fail(p.run, OpError::NoQuorum(msg));
        }
    }

    fn expire_joins(&mut self) {
        let (now, limit) = (self.now, self.config.collectives.op_timeout);
        let stale: Vec<u32> = self
            .joins
            .iter()
            .filter(|(_, j)| now.since(j.caller.since) >= limit)
            .map(|(&s, _)| s)
            .collect();
        for stream in stale {
            let j = self.joins.remove(&stream).expect("listed");
            let msg = format!(
                "no live trainer handed over its state within {limit:?} (epoch {}, this member {}): \
                 the live trainers must call admit() when a result says members are waiting",
                self.epoch,
                if self.mode.admitted() {
                    "in the ring"
                } else {
                    "not readmitted"
                }
            );
            self.reply(j.caller.id, j.caller.buffer, Err(OpError::NoQuorum(msg)));
        }
    }

    fn expire_waiting(&mut self) {
        if self.returning.is_some() {
            // Held calls of a member on its way back: its own bound.
            return;
        }
        let (now, limit) = (self.now, self.config.recovery_timeout);
        let (old, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|q| now.since(q.since) >= limit);
        self.waiting = keep;
        for q in old {
            self.event(Event::Op {
                outcome: Outcome::NoQuorum,
                kind: super::op::kind_name(q.req.kind),
                elapsed: None,
            });
            let msg = format!(
                "this member has not been in the group's ring for {limit:?} (epoch {}): \
                 it cannot reach a majority, or is waiting to be readmitted",
                self.epoch
            );
            self.reply(q.req.id, q.req.buffer, Err(OpError::NoQuorum(msg)));
        }
    }

    /// The earliest time something here gives up.
    pub(super) fn expiry_deadline(&self) -> Option<Time> {
        let limit = self.config.recovery_timeout;
        let parked = self
            .parked
            .values()
            .map(|p| p.since)
            .chain(self.waiting.iter().map(|q| q.since))
            .min()
            .map(|t| t.after(limit));
        let joins = self
            .joins
            .values()
            .map(|j| j.caller.since)
            .min()
            .map(|t| t.after(self.config.collectives.op_timeout));
        // Past deadlines were acted on; later ops are checked on the next
        // wake-up, and heartbeats wake the node every interval.
        let gone = (!self.ops.is_empty())
            .then(|| {
                self.down
                    .values()
                    .map(|since| since.after(limit))
                    .filter(|&at| at > self.now)
                    .min()
            })
            .flatten();
        [
            parked,
            joins,
            gone,
            self.return_deadline(),
            self.doubt_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
