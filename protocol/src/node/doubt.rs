//! In doubt after a pause: a daemon that did not run (stopped, starved) or
//! heard nobody for about as long as its peers wait before they suspect it
//! may have been removed meanwhile, and not know it yet: what Raft brought
//! while it was out is applied by its control task a moment after its data
//! path runs again. In that moment, frames that reached it before the stop
//! complete ops the others could not finish (they lack its frames; a
//! recursive-doubling exchange completes at a member from data that never
//! depends on its own), and which they re-run without it. Handed to the
//! trainer, such a result is not the group's, and the member cannot come
//! back in lockstep (issue 13: 4 of 5 daemons stopped mid-training).
//!
//! So, in doubt, results completed for this daemon's trainer are withheld
//! while its control plane reads the group at a point of the Raft log
//! later than the pause (a read index: [`ControlRequest::Confirm`]). Still
//! in the same epoch, or in a later one that kept it (whose recovery counts
//! the result as this member's kept one), they are handed over. Removed,
//! they are taken back: the calls wait as any held call (their inputs back
//! in their buffers) and the return claims the ops before them, so the
//! group's version comes by catch-up.
//!
//! The read is asked for two heartbeat intervals after the doubt begins,
//! not at once: a peer whose detector fired on the silence before this
//! daemon's first heartbeat reached it has parked the ops and proposed the
//! removal by then, and the removal commits before the read. (In the
//! simulator, before it modelled a daemon's heartbeat timer firing as soon
//! as the process runs again, a read asked at once was answered a few ms
//! before such a removal committed.) Meanwhile the frames this daemon sent
//! on resuming reach the peers still in the epoch, which complete the same
//! ops with them.
//!
//! A partition does not need this: cut off on one side only, a member that
//! still hears the others cannot complete an op whose later rounds need its
//! own frames to reach them; cut off on both, it hears nobody, which is
//! doubt too.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::op::{Queued, Running};
use super::types::{Action, Buffer, ControlRequest, Event, OpDone, OpError, Outcome};
use super::Node;
use crate::{Epoch, Time};

/// A result withheld from this daemon's trainer.
#[derive(Debug)]
pub(super) enum Withheld<B> {
    /// Its op completed here (the input is still in the run).
    Completed { run: Running<B>, done: OpDone },
    /// A stand-in's result for a call that came late, not copied into its
    /// buffer yet (which still holds the trainer's input).
    Served {
        q: Queued<B>,
        output: Vec<u8>,
        done: OpDone,
    },
}

/// This daemon's doubt about its standing in the group.
#[derive(Debug)]
pub(super) struct Doubt<B> {
    /// The confirmation asked for (0: not yet).
    pub asked: u64,
    /// When it is asked for.
    pub ask_at: Time,
    /// Since when (the bound of a return counts from here too).
    pub since: Time,
    /// The epoch and this member's admission it doubts.
    pub epoch: Epoch,
    pub joined: Option<Epoch>,
    /// Per stream, the last op answered to the trainer before the doubt:
    /// its result is what a return claims, and is kept until it is over.
    pub floor: BTreeMap<u32, u64>,
    /// Results withheld, in the order they came.
    pub held: Vec<Withheld<B>>,
}

impl<B: Buffer> Node<B> {
    /// The node's clock moved by `gap` since its last input: a daemon in a
    /// ring with peers hears a heartbeat every interval, so a gap that
    /// reaches the suspicion bound (less the interval its last heartbeat may
    /// have been sent before) is a pause or an isolation its peers may have
    /// acted on.
    pub(super) fn doubt_after(&mut self, gap: std::time::Duration) {
        let d = self.config.detector;
        let peers = self.ring.iter().any(|&m| m != self.me);
        if self.doubt.is_some()
            || !self.mode.admitted()
            || !peers
            || gap + d.heartbeat_interval < d.suspect_after
        {
            return;
        }
        info!(
            gap_ms = gap.as_millis() as u64,
            epoch = %self.epoch,
            "this daemon did not run or heard nobody for about its peers' suspicion bound: \
             withholding results from its trainer until the control plane confirms the epoch"
        );
        self.doubt = Some(Doubt {
            asked: 0,
            ask_at: self.now.after(d.heartbeat_interval * 2),
            since: self.now,
            epoch: self.epoch,
            joined: self.joined_at.get(&self.me).copied(),
            floor: self.answered.iter().map(|(&s, &(q, _))| (s, q)).collect(),
            held: Vec::new(),
        });
    }

    /// Asks the control plane to confirm the epoch once it is time.
    pub(super) fn ask_confirm(&mut self) {
        let now = self.now;
        let Some(d) = self
            .doubt
            .as_mut()
            .filter(|d| d.asked == 0 && now >= d.ask_at)
        else {
            return;
        };
        self.confirms += 1;
        d.asked = self.confirms;
        let asked = d.asked;
        self.actions
            .push_back(Action::Control(ControlRequest::Confirm { asked }));
    }

    /// When a confirmation is to be asked for.
    pub(super) fn confirm_deadline(&self) -> Option<Time> {
        self.doubt
            .as_ref()
            .filter(|d| d.asked == 0)
            .map(|d| d.ask_at)
    }

    /// Whether results are withheld from the trainer now.
    pub(super) fn in_doubt(&self) -> bool {
        self.doubt.is_some()
    }

    /// Withholds a result (see [`Node::in_doubt`]).
    pub(super) fn withhold(&mut self, w: Withheld<B>) {
        self.doubt.as_mut().expect("in doubt").held.push(w);
    }

    /// The oldest op of `stream` whose result a doubt keeps: the last one
    /// the trainer had before it.
    pub(super) fn doubt_floor(&self, stream: u32) -> Option<u64> {
        self.doubt.as_ref()?.floor.get(&stream).copied()
    }

    /// The control plane read the group after the ask `asked`: if it is
    /// still the epoch (and admission) doubted, the withheld results are
    /// the group's.
    pub(super) fn on_confirmed(&mut self, asked: u64) {
        let Some(d) = &self.doubt else {
            return;
        };
        let same = d.epoch == self.epoch
            && self.mode.admitted()
            && d.joined == self.joined_at.get(&self.me).copied();
        if d.asked > 0 && asked >= d.asked && same {
            info!(epoch = %self.epoch, held = d.held.len(), "the control plane confirms the epoch: handing the withheld results over");
            self.release_doubt("confirmed");
        }
    }

    /// A new epoch installed while in doubt (before anything else of it
    /// runs): kept in the ring with the same admission, the withheld
    /// results are this member's kept ones, which its recovery report
    /// makes the group's; removed, they are taken back and the calls held
    /// (see [`Node::start_return`]); readmitted since, the doubt cannot be
    /// settled and the calls fail.
    pub(super) fn settle_doubt(&mut self, admitted: bool, removed: bool) {
        let Some(d) = &self.doubt else {
            return;
        };
        let same = d.joined == self.joined_at.get(&self.me).copied();
        if admitted && same {
            info!(epoch = %self.epoch, held = d.held.len(), "a later epoch kept this member: handing the withheld results over");
            self.release_doubt("confirmed");
        } else if removed {
            let d = self.doubt.take().expect("checked");
            info!(held = d.held.len(), "removed while in doubt: taking the withheld results back, the group's come by catch-up");
            self.event(Event::Doubt { outcome: "removed" });
            for w in d.held {
                let q = match w {
                    Withheld::Completed { run, .. } => self.requeue(run),
                    Withheld::Served { q, .. } => Some(q),
                };
                self.waiting.extend(q);
            }
            self.waiting.sort_by_key(|q| q.req.op);
        } else if admitted {
            self.fail_doubt("it was removed and readmitted while it was paused");
        } else {
            self.fail_doubt("it is out of the group's ring now");
        }
    }

    fn release_doubt(&mut self, outcome: &'static str) {
        let d = self.doubt.take().expect("in doubt");
        self.event(Event::Doubt { outcome });
        for w in d.held {
            match w {
                Withheld::Completed { run, done } => {
                    let kind = run.name;
                    if let Some(caller) = run.into_caller() {
                        self.event(Event::Op {
                            outcome: Outcome::Completed,
                            kind,
                            elapsed: Some(self.now.since(caller.since)),
                        });
                        self.reply(caller.id, caller.buffer, Ok(done));
                    }
                }
                Withheld::Served { q, output, done } => self.serve_kept(q, output, done),
            }
        }
    }

    fn fail_doubt(&mut self, why: &str) {
        let Some(d) = self.doubt.take() else {
            return;
        };
        warn!(
            reason = why,
            held = d.held.len(),
            "failing the trainer's withheld results"
        );
        self.event(Event::Doubt { outcome: "failed" });
        let msg = format!(
            "this daemon did not run or heard nobody for longer than its peers' suspicion bound \
             in epoch {}, and {why}; the trainer must join again",
            d.epoch
        );
        for w in d.held {
            let (id, buffer) = match w {
                Withheld::Completed { run, .. } => match run.into_caller() {
                    Some(c) => (c.id, c.buffer),
                    None => continue,
                },
                Withheld::Served { q, .. } => (q.req.id, q.req.buffer),
            };
            self.reply(id, buffer, Err(OpError::NoQuorum(msg.clone())));
        }
    }

    /// Not confirmed within the recovery bound: the control plane cannot
    /// reach a leader, so the withheld calls fail as a cut-off member's do.
    pub(super) fn expire_doubt(&mut self) {
        let limit = self.config.recovery_timeout;
        if self
            .doubt
            .as_ref()
            .is_some_and(|d| self.now.since(d.since) >= limit)
        {
            let why = format!("the control plane could not confirm its epoch within {limit:?}");
            self.fail_doubt(&why);
        }
    }

    /// When a doubt gives up.
    pub(super) fn doubt_deadline(&self) -> Option<Time> {
        self.doubt
            .as_ref()
            .map(|d| d.since.after(self.config.recovery_timeout))
    }
}
