//! Judging peers: heartbeats (a peer connected but silent is suspected long
//! before QUIC's idle timeout), and the progress signal (a peer whose
//! daemon answers but whose trainer has not issued an op the others waited
//! on for `stuck_after` is suspected as stuck).

use std::collections::BTreeMap;

use tracing::{debug, info, warn};

use super::mode::Judging;
use super::types::{Action, Buffer, ControlRequest, Event};
use super::Node;
use crate::membership::{judge_progress, Decision};
use crate::wire::NodeMessage;
use crate::{MemberId, OpId, Time};

impl<B: Buffer> Node<B> {
    /// A heartbeat (or any sign of life) from `member`. A peer is judged from
    /// its first heartbeat on: a daemon still starting up (or a link still
    /// forming) is not silent.
    pub fn handle_heartbeat(&mut self, now: Time, member: MemberId) {
        self.enter(now);
        if self.detector.watches(member) {
            self.detector.heartbeat(member, now);
        } else {
            self.detector.watch(member, now);
        }
        self.connected.insert(member);
        self.heard_from.insert(member);
        self.after_input();
    }

    /// Every link to `member` is up (again).
    pub fn handle_peer_up(&mut self, now: Time, member: MemberId) {
        self.enter(now);
        self.down.remove(&member);
        self.connected.insert(member);
        if self.detector.watches(member) {
            // Reconnected: a fresh window, as after any sign of life.
            self.detector.watch(member, now);
        }
        self.actions
            .push_back(Action::Control(ControlRequest::Cleared { member }));
        // A report sent while the peer was not connected was dropped.
        if let Some(report) = self.report.clone() {
            if self.ring.contains(&member) {
                self.send(member, NodeMessage::Recovery(report));
            }
        }
        self.resend_offers(member);
        self.after_input();
    }

    /// `member`'s connection was lost. Not a suspicion by itself: the link
    /// may be redialled (after a reset, or a heal) and frames not yet
    /// written wait for the next connection. The detector keeps watching:
    /// a peer that stays silent is suspected with the reason, as any other.
    pub fn handle_peer_down(&mut self, now: Time, member: MemberId, reason: &str) {
        self.enter(now);
        warn!(peer = %member, %reason, "peer connection lost; reconnecting");
        self.down.entry(member).or_insert(now);
        self.connected.remove(&member);
        self.renew_after_loss(member);
        self.after_input();
    }

    /// A connection to `member` was lost while ops with it ran: what was in
    /// flight on it is gone (frames not yet written wait for the next
    /// connection, the others are lost), and both ends would wait for them
    /// for ever. Only an epoch change makes every member finish those ops
    /// again, so this daemon asks for one with the same ring. Not when it
    /// suspects the member (its removal is the new epoch) or reset the
    /// links itself (their ops are parked already).
    fn renew_after_loss(&mut self, member: MemberId) {
        if !self.mode.is_active()
            || self.detector.is_suspected(member)
            || self.stuck.contains(&member)
        {
            return;
        }
        let hit = self
            .ops
            .values()
            .chain(self.steps.cutting.values())
            .filter(|run| run.members.contains(&member))
            .map(|run| run.op)
            .min();
        if let Some(op) = hit {
            let reason = format!("the connection to {member} was lost while {op} ran over it");
            warn!(peer = %member, %op, "ops in flight lost frames with the connection: asking for a new epoch to finish them");
            self.actions
                .push_back(Action::Control(ControlRequest::Renew { reason }));
        }
    }

    /// A trainer waits in `join()`: asks the control plane to let this
    /// member in. In the ring already, at once; outside it, once this daemon
    /// is connected to every member of the ring — admitted earlier, a peer
    /// that has not reconnected to this life yet hears nothing from it,
    /// suspects it and the group removes it again (issue 13: restarted
    /// members were admitted and evicted three times in a row).
    pub(super) fn ask_in(&mut self) {
        self.want_in = true;
        let missing = self.unconnected();
        if !self.mode.admitted() && !missing.is_empty() {
            info!(
                ?missing,
                "waiting to be connected to every ring member before asking to be let in"
            );
        }
        self.ask_in_when_connected();
    }

    /// Ring members this daemon is not connected to.
    fn unconnected(&self) -> Vec<MemberId> {
        self.ring
            .iter()
            .copied()
            .filter(|&m| m != self.me && !self.connected.contains(&m))
            .collect()
    }

    pub(super) fn ask_in_when_connected(&mut self) {
        if !self.want_in || (!self.mode.admitted() && !self.unconnected().is_empty()) {
            return;
        }
        self.want_in = false;
        self.actions
            .push_back(Action::Control(ControlRequest::WantIn));
    }

    /// Asks the control plane to take `member` out of the ring.
    pub(super) fn suspect(&mut self, member: MemberId, reason: String) {
        if self.ring.contains(&member) {
            let suspect = ControlRequest::Suspect { member, reason };
            self.actions.push_back(Action::Control(suspect));
        }
    }

    /// Acts on the failure detector's new decisions (see [`Judging`]).
    pub(super) fn judge_peers(&mut self) {
        if !self.mode.admitted() {
            return;
        }
        let now = self.now;
        if let Judging::Grace { until } = self.judging {
            // Peers not heard from yet keep a window open to the grace's end.
            let unheard: Vec<MemberId> = self
                .ring
                .iter()
                .copied()
                .filter(|m| *m != self.me && !self.heard_from.contains(m))
                .collect();
            for m in unheard {
                self.detector.heard(m, now.min(until));
            }
            if now >= until {
                self.judging = Judging::On;
            }
        }
        for decision in self.detector.poll(now) {
            match decision {
                Decision::Suspect { member, reason } => {
                    self.down.entry(member).or_insert(now);
                    warn!(peer = %member, %reason, "peer suspected: parking its ops until the next epoch");
                    self.event(Event::Suspected { reason: "silent" });
                    self.suspect(member, reason.to_string());
                    self.core.handle_member_down(now, member);
                    self.park_steps_coordinated_by(member);
                    self.actions.push_back(Action::ResetLinks { member });
                }
                Decision::Cleared { member } => {
                    info!(peer = %member, "suspected peer heard from again");
                    self.down.remove(&member);
                    self.actions
                        .push_back(Action::Control(ControlRequest::Cleared { member }));
                }
            }
        }
    }

    /// This daemon woke `late` past a deadline it asked for: it was not
    /// running (starved or stopped), so the silence it saw is its own, not
    /// its peers'.
    pub(super) fn check_paused(&mut self) {
        let Some(due) = self.wake_at.take() else {
            return;
        };
        let late = self.now.since(due);
        if late > self.config.detector.heartbeat_interval {
            debug!(
                late_ms = late.as_millis() as u64,
                "daemon was paused; giving peers a fresh window"
            );
            self.detector.excuse(self.now);
        }
    }

    /// A peer's progress report: per stream, the last op its trainers issued.
    pub(super) fn on_progress(&mut self, from: MemberId, streams: Vec<(u32, u64)>) {
        let streams: BTreeMap<u32, u64> = streams.into_iter().collect();
        if self.peer_progress.get(&from) != Some(&streams) {
            self.stuck.remove(&from);
        }
        self.peer_progress.insert(from, streams);
        self.check_missed_hand_overs(from);
    }

    /// The last op of `stream` that `member`'s trainer issued, as known here.
    pub(super) fn issued_by(&self, member: MemberId, stream: u32) -> u64 {
        let issued = if member == self.me {
            &self.issued
        } else {
            match self.peer_progress.get(&member) {
                Some(p) => p,
                None => return 0,
            }
        };
        issued.get(&stream).copied().unwrap_or(0)
    }

    /// Sends this daemon's progress to the ring every few heartbeats, and
    /// suspects members whose trainers are behind an op waited on too long.
    pub(super) fn report_progress(&mut self) {
        let now = self.now;
        if now >= self.next_progress {
            self.next_progress = now.after(self.config.progress_interval());
            let streams: Vec<(u32, u64)> = self.issued.iter().map(|(&s, &q)| (s, q)).collect();
            self.tell_ring(&NodeMessage::Progress { streams });
        }
        if !self.mode.admitted() {
            return;
        }
        let waiting: Vec<(OpId, Vec<MemberId>, Time)> = self
            .ops
            .values()
            .chain(self.steps.cutting.values())
            .filter(|run| run.is_trainer())
            .map(|run| (run.op, run.members.clone(), run.started))
            .collect();
        let verdicts = judge_progress(&waiting, &self.peer_progress, self.config.stuck_after, now);
        for stuck in verdicts {
            if stuck.member == self.me || !self.stuck.insert(stuck.member) {
                continue;
            }
            warn!(peer = %stuck.member, reason = %stuck, "peer suspected: alive but stuck");
            self.event(Event::Suspected { reason: "stuck" });
            self.suspect(stuck.member, stuck.to_string());
            self.core.handle_member_down(now, stuck.member);
        }
    }
}
