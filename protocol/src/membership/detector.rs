//! Failure suspicion from liveness heartbeats.
//!
//! Every member sends a heartbeat to every peer each `heartbeat_interval`; a
//! peer not heard from for `suspect_after` is suspected. `suspect_after` must
//! cover several intervals (at least 3) so one late or lost heartbeat on a
//! busy machine does not raise a suspicion; the transport's idle timeout
//! should be longer still, so the detector, which gives a reason, speaks first.
//! With the defaults (100 ms, 400 ms) a killed or stopped member is suspected
//! within 400–500 ms.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use crate::{MemberId, Time};

/// Detector bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorConfig {
    /// How often each member sends a heartbeat to each peer.
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is suspected.
    pub suspect_after: Duration,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            heartbeat_interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(400),
        }
    }
}

impl DetectorConfig {
    /// Checks the relation between the bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() {
            return Err("heartbeat_interval must be positive".into());
        }
        if self.suspect_after < self.heartbeat_interval * 3 {
            return Err(format!(
                "suspect_after ({:?}) must be at least 3 heartbeat intervals ({:?}), \
                 or a single late heartbeat raises a suspicion",
                self.suspect_after,
                self.heartbeat_interval * 3
            ));
        }
        Ok(())
    }
}

/// Why a member is suspected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SuspicionReason {
    /// Nothing heard since `since` (or since the detector started, if never).
    Silent {
        /// The last heartbeat, if any.
        last_heard: Option<Time>,
        /// How long the silence has lasted.
        silent_for: Duration,
    },
}

impl fmt::Display for SuspicionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuspicionReason::Silent {
                last_heard: Some(_),
                silent_for,
            } => {
                write!(f, "no heartbeat for {} ms", silent_for.as_millis())
            }
            SuspicionReason::Silent {
                last_heard: None,
                silent_for,
            } => {
                write!(f, "never heard from in {} ms", silent_for.as_millis())
            }
        }
    }
}

/// A change the caller acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Newly suspected.
    Suspect {
        /// The member.
        member: MemberId,
        /// Why.
        reason: SuspicionReason,
    },
    /// A suspected member was heard from again.
    Cleared {
        /// The member.
        member: MemberId,
    },
}

/// The pure decision for one member.
pub fn judge(
    last_heard: Option<Time>,
    started: Time,
    now: Time,
    config: &DetectorConfig,
) -> Option<SuspicionReason> {
    let silent_for = now.since(last_heard.unwrap_or(started));
    (silent_for >= config.suspect_after).then_some(SuspicionReason::Silent {
        last_heard,
        silent_for,
    })
}

/// Tracks heartbeats of a set of peers.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    config: DetectorConfig,
    started: Time,
    last: BTreeMap<MemberId, Option<Time>>,
    suspected: BTreeSet<MemberId>,
}

impl FailureDetector {
    /// Watches `peers` from `now` on.
    pub fn new(
        config: DetectorConfig,
        peers: impl IntoIterator<Item = MemberId>,
        now: Time,
    ) -> Self {
        FailureDetector {
            config,
            started: now,
            last: peers.into_iter().map(|p| (p, None)).collect(),
            suspected: BTreeSet::new(),
        }
    }

    /// Starts (or restarts) watching `member`, as if heard from at `now`:
    /// a peer is judged only while connected, so a slow start-up or a
    /// reconnect is not mistaken for silence.
    pub fn watch(&mut self, member: MemberId, now: Time) {
        self.last.insert(member, Some(now));
        self.suspected.remove(&member);
    }

    /// Stops watching `member` (its connection is gone, which is reported
    /// on its own).
    pub fn unwatch(&mut self, member: MemberId) {
        self.last.remove(&member);
        self.suspected.remove(&member);
    }

    /// This member itself was paused (descheduled, stopped) until `now`:
    /// silence it could not have observed says nothing about the peers, so
    /// every watched peer gets a fresh window from `now`.
    pub fn excuse(&mut self, now: Time) {
        for last in self.last.values_mut() {
            *last = Some(last.map_or(now, |t| t.max(now)));
        }
    }

    /// A heartbeat (or any sign of life) from `member`. Unknown members are ignored.
    pub fn heard(&mut self, member: MemberId, now: Time) {
        if let Some(t) = self.last.get_mut(&member) {
            *t = Some(t.map_or(now, |prev| prev.max(now)));
        }
    }

    /// New suspicions and clearances at `now`.
    ///
    /// When every watched peer (two or more) falls silent at the same moment,
    /// the likelier cause is this member (starved, paused, cut off), not all
    /// of them at once: it suspects no one and gives everyone a fresh window.
    /// A cut-off member learns of its isolation from the control plane, which
    /// needs a majority.
    pub fn poll(&mut self, now: Time) -> Vec<Decision> {
        let silent = self
            .last
            .iter()
            .filter(|(_, &last)| judge(last, self.started, now, &self.config).is_some())
            .count();
        if self.last.len() >= 2 && silent == self.last.len() && self.suspected.is_empty() {
            self.excuse(now);
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&member, &last) in &self.last {
            match (
                judge(last, self.started, now, &self.config),
                self.suspected.contains(&member),
            ) {
                (Some(reason), false) => {
                    self.suspected.insert(member);
                    out.push(Decision::Suspect { member, reason });
                }
                (None, true) => {
                    self.suspected.remove(&member);
                    out.push(Decision::Cleared { member });
                }
                _ => {}
            }
        }
        out
    }

    /// Whether `member` is watched.
    pub fn watches(&self, member: MemberId) -> bool {
        self.last.contains_key(&member)
    }

    /// Whether `member` is suspected now (as of the last poll).
    pub fn is_suspected(&self, member: MemberId) -> bool {
        self.suspected.contains(&member)
    }

    /// The next time a poll can raise a suspicion.
    pub fn next_deadline(&self) -> Option<Time> {
        self.last
            .iter()
            .filter(|(m, _)| !self.suspected.contains(m))
            .map(|(_, last)| {
                last.unwrap_or(self.started)
                    .after(self.config.suspect_after)
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MemberId = MemberId(1);
    const B: MemberId = MemberId(2);

    fn ms(v: u64) -> Time {
        Time(v * 1000)
    }

    #[test]
    fn silence_is_suspected_with_its_length_and_cleared_by_a_heartbeat() {
        let mut d = FailureDetector::new(DetectorConfig::default(), [A, B], ms(0));
        d.heard(A, ms(50));
        d.heard(B, ms(60));
        assert_eq!(d.poll(ms(300)), vec![]);
        assert_eq!(d.next_deadline(), Some(ms(450)));
        d.heard(A, ms(420));
        assert_eq!(
            d.poll(ms(460)),
            vec![Decision::Suspect {
                member: B,
                reason: SuspicionReason::Silent {
                    last_heard: Some(ms(60)),
                    silent_for: Duration::from_millis(400)
                }
            }]
        );
        assert!(d.is_suspected(B));
        assert_eq!(d.poll(ms(470)), vec![], "a suspicion is reported once");
        d.heard(B, ms(500));
        assert_eq!(d.poll(ms(501)), vec![Decision::Cleared { member: B }]);
        assert!(!d.is_suspected(B));
        // Heartbeats delivered out of order never move the clock back.
        d.heard(A, ms(700));
        d.heard(A, ms(650));
        assert_eq!(d.next_deadline(), Some(ms(900)));
    }

    #[test]
    fn a_member_never_heard_from_is_suspected_after_the_bound() {
        let mut d = FailureDetector::new(DetectorConfig::default(), [A], ms(1000));
        assert_eq!(d.poll(ms(1399)), vec![]);
        let out = d.poll(ms(1400));
        assert!(
            matches!(&out[..], [Decision::Suspect { member: A, reason }] if reason.to_string() == "never heard from in 400 ms")
        );
        d.heard(MemberId(9), ms(1500)); // not watched: ignored
        assert_eq!(d.poll(ms(1500)), vec![]);
    }

    #[test]
    fn watch_unwatch_and_our_own_pauses() {
        let mut d = FailureDetector::new(DetectorConfig::default(), [], ms(0));
        assert_eq!(d.next_deadline(), None);
        d.watch(A, ms(1000));
        assert_eq!(d.poll(ms(1399)), vec![]);
        // We were paused from 1100 to 2000: no verdict on A from that.
        d.excuse(ms(2000));
        assert_eq!(d.poll(ms(2001)), vec![]);
        assert_eq!(d.next_deadline(), Some(ms(2400)));
        assert!(matches!(
            d.poll(ms(2400))[..],
            [Decision::Suspect { member: A, .. }]
        ));
        d.unwatch(A);
        assert_eq!(d.poll(ms(5000)), vec![]);
        assert!(!d.is_suspected(A));
    }

    #[test]
    fn everyone_silent_at_once_is_our_own_problem() {
        let mut d = FailureDetector::new(DetectorConfig::default(), [], ms(0));
        d.watch(A, ms(0));
        d.watch(B, ms(0));
        assert_eq!(
            d.poll(ms(500)),
            vec![],
            "all peers silent together: no one is suspected"
        );
        assert_eq!(d.next_deadline(), Some(ms(900)));
        d.heard(A, ms(800));
        assert!(
            matches!(d.poll(ms(900))[..], [Decision::Suspect { member: B, .. }]),
            "one silent peer among live ones is"
        );
    }

    #[test]
    fn bounds_must_leave_room_for_late_heartbeats() {
        assert!(DetectorConfig::default().validate().is_ok());
        let bad = DetectorConfig {
            heartbeat_interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(250),
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("at least 3 heartbeat intervals"));
    }
}
