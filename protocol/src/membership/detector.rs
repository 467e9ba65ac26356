//! Failure suspicion from liveness heartbeats.
//!
//! Every member sends a heartbeat to every peer each `heartbeat_interval`; a
//! peer not heard from for its bound is suspected. The bound is
//! `suspect_after`, stretched for a peer whose heartbeats have lately come
//! far apart (a starved machine, a loaded link) to twice the largest of its
//! last [`GAP_WINDOW`] gaps, up to `suspect_ceiling`: liveness then does not
//! depend on winning the CPU, and a peer that keeps time is still judged at
//! `suspect_after`. A gap longer than the bound it was judged by is an
//! outage (the peer was suspected, or stopped), not lateness, and teaches
//! nothing. `suspect_after` must cover several intervals (at least 3) so one
//! late or lost heartbeat on a busy machine does not raise a suspicion; the
//! transport's idle timeout should be longer than the ceiling, so the
//! detector, which gives a reason, speaks first. With the defaults (100 ms,
//! 400 ms, 1 s) a killed or stopped member that kept time is suspected
//! within 400–500 ms.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;

use crate::{MemberId, Time};

/// How many of a peer's latest heartbeat gaps its bound is drawn from (5 s
/// of heartbeats at the default interval): a starved patch is remembered
/// that long after it ends.
pub const GAP_WINDOW: usize = 50;

/// Detector bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorConfig {
    /// How often each member sends a heartbeat to each peer.
    pub heartbeat_interval: Duration,
    /// Silence after which a peer that keeps time is suspected.
    pub suspect_after: Duration,
    /// The most a peer's late heartbeats stretch its bound to.
    pub suspect_ceiling: Duration,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            heartbeat_interval: Duration::from_millis(100),
            suspect_after: Duration::from_millis(400),
            suspect_ceiling: Duration::from_millis(1000),
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
        if self.suspect_ceiling < self.suspect_after {
            return Err(format!(
                "suspect_ceiling ({:?}) must be at least suspect_after ({:?}); \
                 equal to it for a bound that never stretches",
                self.suspect_ceiling, self.suspect_after
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
        /// The largest recent gap between its heartbeats, when it stretched
        /// the bound past `suspect_after`.
        late_by: Option<Duration>,
    },
}

impl fmt::Display for SuspicionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SuspicionReason::Silent {
                last_heard: Some(_),
                silent_for,
                late_by,
            } => {
                write!(f, "no heartbeat for {} ms", silent_for.as_millis())?;
                if let Some(gap) = late_by {
                    write!(
                        f,
                        " (waited longer: its heartbeats came up to {} ms apart lately)",
                        gap.as_millis()
                    )?;
                }
                Ok(())
            }
            SuspicionReason::Silent {
                last_heard: None,
                silent_for,
                ..
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

/// The pure decision for one member judged by `bound`.
pub fn judge(
    last_heard: Option<Time>,
    started: Time,
    now: Time,
    bound: Duration,
) -> Option<Duration> {
    let silent_for = now.since(last_heard.unwrap_or(started));
    (silent_for >= bound).then_some(silent_for)
}

/// A peer's latest heartbeat gaps, the largest first to hand.
#[derive(Debug, Clone, Default)]
struct Gaps {
    recent: VecDeque<Duration>,
}

impl Gaps {
    fn push(&mut self, gap: Duration) {
        if self.recent.len() == GAP_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(gap);
    }

    fn largest(&self) -> Option<Duration> {
        self.recent.iter().max().copied()
    }
}

/// Tracks heartbeats of a set of peers.
#[derive(Debug, Clone)]
pub struct FailureDetector {
    config: DetectorConfig,
    started: Time,
    last: BTreeMap<MemberId, Option<Time>>,
    gaps: BTreeMap<MemberId, Gaps>,
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
            gaps: BTreeMap::new(),
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
        self.gaps.remove(&member);
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

    /// A sign of life from `member` that says nothing of how its
    /// heartbeats keep time. Unknown members are ignored.
    pub fn heard(&mut self, member: MemberId, now: Time) {
        if let Some(t) = self.last.get_mut(&member) {
            *t = Some(t.map_or(now, |prev| prev.max(now)));
        }
    }

    /// A heartbeat from `member`: a sign of life, and its gap since the last
    /// one teaches the member's bound, unless it was longer than the bound
    /// (an outage). Unknown members are ignored.
    pub fn heartbeat(&mut self, member: MemberId, now: Time) {
        if let Some(Some(prev)) = self.last.get(&member).copied() {
            let gap = now.since(prev);
            if !gap.is_zero() && gap <= self.bound(member) {
                self.gaps.entry(member).or_default().push(gap);
            }
        }
        self.heard(member, now);
    }

    /// How long `member` may be silent before it is suspected:
    /// `suspect_after`, or twice its largest recent heartbeat gap, up to
    /// the ceiling.
    pub fn bound(&self, member: MemberId) -> Duration {
        let floor = self.config.suspect_after;
        match self.gaps.get(&member).and_then(Gaps::largest) {
            Some(gap) => (gap * 2).clamp(floor, self.config.suspect_ceiling),
            None => floor,
        }
    }

    /// The largest recent gap of `member`'s, when it stretches its bound.
    fn late_by(&self, member: MemberId) -> Option<Duration> {
        let gap = self.gaps.get(&member).and_then(Gaps::largest)?;
        (gap * 2 > self.config.suspect_after).then_some(gap)
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
            .filter(|(&m, &last)| judge(last, self.started, now, self.bound(m)).is_some())
            .count();
        if self.last.len() >= 2 && silent == self.last.len() && self.suspected.is_empty() {
            self.excuse(now);
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&member, &last) in &self.last {
            match (
                judge(last, self.started, now, self.bound(member)),
                self.suspected.contains(&member),
            ) {
                (Some(silent_for), false) => {
                    self.suspected.insert(member);
                    let reason = SuspicionReason::Silent {
                        last_heard: last,
                        silent_for,
                        late_by: self.late_by(member),
                    };
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
            .map(|(&m, last)| last.unwrap_or(self.started).after(self.bound(m)))
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
                    silent_for: Duration::from_millis(400),
                    late_by: None,
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
            suspect_after: Duration::from_millis(250),
            ..DetectorConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("at least 3 heartbeat intervals"));
        let bad = DetectorConfig {
            suspect_ceiling: Duration::from_millis(300),
            ..DetectorConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("must be at least suspect_after"));
    }

    // Issue 13, item 3: a healthy member on a starved machine was removed
    // for "no heartbeat for 401 ms" although its heartbeats had been coming
    // 300 ms apart. Its bound now follows its recent gaps.
    #[test]
    fn late_heartbeats_stretch_the_bound_up_to_the_ceiling_and_outages_teach_nothing() {
        let mut d = FailureDetector::new(DetectorConfig::default(), [A, B], ms(0));
        // B keeps time throughout: the silence is A's alone.
        let keep_b = |d: &mut FailureDetector, to: u64| {
            for t in (0..=to).step_by(100) {
                d.heartbeat(B, ms(t));
            }
        };
        d.heartbeat(A, ms(0));
        d.heartbeat(A, ms(100));
        assert_eq!(d.bound(A), Duration::from_millis(400), "kept time so far");
        d.heartbeat(A, ms(400));
        assert_eq!(d.bound(A), Duration::from_millis(600));
        assert_eq!(d.bound(B), Duration::from_millis(400));
        keep_b(&mut d, 900);
        assert_eq!(d.next_deadline(), Some(ms(1000)));
        assert_eq!(
            d.poll(ms(850)),
            vec![],
            "450 ms of silence from a late peer"
        );
        keep_b(&mut d, 1000);
        let out = d.poll(ms(1000));
        assert_eq!(
            out,
            vec![Decision::Suspect {
                member: A,
                reason: SuspicionReason::Silent {
                    last_heard: Some(ms(400)),
                    silent_for: Duration::from_millis(600),
                    late_by: Some(Duration::from_millis(300)),
                }
            }]
        );
        let Decision::Suspect { reason, .. } = out[0] else {
            unreachable!()
        };
        assert_eq!(
            reason.to_string(),
            "no heartbeat for 600 ms (waited longer: its heartbeats came up to 300 ms apart lately)"
        );
        // Back after 1.1 s: an outage, which stretches nothing.
        d.heartbeat(A, ms(1500));
        assert_eq!(d.bound(A), Duration::from_millis(600));
        keep_b(&mut d, 1500);
        assert_eq!(d.poll(ms(1500)), vec![Decision::Cleared { member: A }]);
        // A gap within the bound stretches it, never past the ceiling.
        d.heartbeat(A, ms(2050));
        assert_eq!(d.bound(A), Duration::from_millis(1000));
        // Once it keeps time for a window, it is judged at the floor again.
        for i in 1..GAP_WINDOW as u64 {
            d.heartbeat(A, ms(2050 + 100 * i));
        }
        assert_eq!(
            d.bound(A),
            Duration::from_millis(1000),
            "the 550 ms gap is still in the window"
        );
        d.heartbeat(A, ms(2050 + 100 * GAP_WINDOW as u64));
        assert_eq!(d.bound(A), Duration::from_millis(400));
    }

    #[test]
    fn our_own_pauses_and_reconnects_teach_no_gaps() {
        let mut d = FailureDetector::new(DetectorConfig::default(), [], ms(0));
        d.watch(A, ms(0));
        d.heartbeat(A, ms(100));
        // We were paused until 2000; then A's next heartbeat comes.
        d.excuse(ms(2000));
        d.heartbeat(A, ms(2050));
        assert_eq!(d.bound(A), Duration::from_millis(400));
        // A reconnect starts a fresh window; the time it took is no gap.
        d.watch(A, ms(2390));
        d.heartbeat(A, ms(2400));
        assert_eq!(d.bound(A), Duration::from_millis(400));
        // A fixed bound: the ceiling at the floor.
        let fixed = DetectorConfig {
            suspect_ceiling: Duration::from_millis(400),
            ..DetectorConfig::default()
        };
        let mut d = FailureDetector::new(fixed, [A], ms(0));
        d.heartbeat(A, ms(0));
        d.heartbeat(A, ms(390));
        assert_eq!(d.bound(A), Duration::from_millis(400));
    }
}
