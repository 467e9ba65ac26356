//! Stragglers: when a step closes, and who is in it. Pure decisions, no IO,
//! no clock: the step's coordinator feeds them the arrival times it saw and
//! announces the outcome before the reduction runs, so every member runs the
//! same cut.
//!
//! - [`QuorumPolicy`]: the group's rule, replicated through Raft — `sync`
//!   (every contributing member), `backup = b` (the first n−b ready
//!   members, Chen et al. 2016), a `deadline` derived from the observed step
//!   times (a quantile, clamped to a floor and a ceiling), or both (whichever
//!   closes first).
//! - [`decide_cut`]: given who is ready since when, either wait (and until
//!   when) or close with the participants and, for everyone left out, why.
//! - [`StepTimes`]: the recent arrival spreads the deadline is derived from.
//! - [`Attribution`]: per member, how often it was left out and by how much
//!   it missed; demotes a member left out in `k` of the last `m` steps to a
//!   non-contributing observer and readmits it once it keeps up again.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Duration;

use bincode::{Decode, Encode};

use crate::{MemberId, Time};

/// The deadline part of a policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct DeadlinePolicy {
    /// Which quantile of recent step spreads, in per mille (900: p90).
    pub quantile_permille: u16,
    /// The deadline is never shorter than this, ms.
    pub floor_ms: u32,
    /// Nor longer than this, ms.
    pub ceiling_ms: u32,
}

/// What happens to a contribution that arrives after its step closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, Default)]
pub enum LatePolicy {
    /// Dropped (the default): a closed step never changes.
    #[default]
    Drop,
    /// Folded into the next step, with staleness 1.
    FoldIntoNext,
}

/// The group's rule for closing a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode, Default)]
pub struct QuorumPolicy {
    /// Close with the first n−`backup` ready members (0: wait for all).
    pub backup: u32,
    /// Close when this deadline passes (with whoever is ready).
    pub deadline: Option<DeadlinePolicy>,
    /// Late contributions.
    pub late: LatePolicy,
}

impl QuorumPolicy {
    /// Plain synchronous steps.
    pub const SYNC: QuorumPolicy = QuorumPolicy {
        backup: 0,
        deadline: None,
        late: LatePolicy::Drop,
    };

    /// Whether this is plain synchronous training.
    pub fn is_sync(&self) -> bool {
        self.backup == 0 && self.deadline.is_none()
    }

    /// Checks the numbers; the reason when they make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(d) = &self.deadline {
            if d.quantile_permille == 0 || d.quantile_permille > 1000 {
                return Err(format!(
                    "the deadline quantile is {}‰; it must be in 1..=1000",
                    d.quantile_permille
                ));
            }
            if d.floor_ms > d.ceiling_ms {
                return Err(format!(
                    "the deadline floor ({} ms) is above its ceiling ({} ms)",
                    d.floor_ms, d.ceiling_ms
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for QuorumPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_sync() {
            return f.write_str("sync");
        }
        let mut parts = Vec::new();
        if self.backup > 0 {
            parts.push(format!("backup={}", self.backup));
        }
        if let Some(d) = &self.deadline {
            parts.push(format!(
                "deadline=p{}[{}..{} ms]",
                f64::from(d.quantile_permille) / 10.0,
                d.floor_ms,
                d.ceiling_ms
            ));
        }
        if self.late == LatePolicy::FoldIntoNext {
            parts.push("late=fold".into());
        }
        f.write_str(&parts.join(" "))
    }
}

/// Why a step closed when it did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Every contributing member was ready.
    AllReady,
    /// The first `ready` of `expected` members (backup workers).
    Backup {
        /// Members in the step.
        ready: usize,
        /// Members expected.
        expected: usize,
    },
    /// The deadline passed.
    Deadline {
        /// How long the step waited.
        after: Duration,
    },
}

/// Why a member is not in a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeftOut {
    /// Not ready when the backup count was reached.
    Backup,
    /// Not ready when the deadline passed.
    Deadline,
    /// A demoted observer: it receives results, contributes nothing.
    Observer,
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeftOut::Backup => "not among the first ready (backup workers)",
            LeftOut::Deadline => "missed the deadline",
            LeftOut::Observer => "demoted to observer",
        })
    }
}

/// What [`decide_cut`] says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Keep waiting; decide again at `until` (a deadline) or on the next
    /// arrival.
    Wait {
        /// When the deadline passes, if there is one.
        until: Option<Time>,
    },
    /// Close the step now.
    Close {
        /// Who contributes (ascending).
        participants: Vec<MemberId>,
        /// Everyone else in the ring, and why.
        left_out: Vec<(MemberId, LeftOut)>,
        /// Why now.
        reason: CloseReason,
    },
}

/// Decides whether the step that opened at `opened` closes at `now`.
/// `ring` is the epoch's ring, `observers` its demoted members, `ready`
/// the members ready (with when), and `deadline` the current deadline
/// length (from [`StepTimes::deadline`]) when the policy has one.
pub fn decide_cut(
    policy: &QuorumPolicy,
    ring: &[MemberId],
    observers: &[MemberId],
    ready: &BTreeMap<MemberId, Time>,
    opened: Time,
    now: Time,
    deadline: Option<Duration>,
) -> Cut {
    let expected: Vec<MemberId> = ring
        .iter()
        .copied()
        .filter(|m| !observers.contains(m))
        .collect();
    // With every contributor demoted, the observers carry the step.
    let expected = if expected.is_empty() {
        ring.to_vec()
    } else {
        expected
    };
    let in_step: Vec<MemberId> = expected
        .iter()
        .copied()
        .filter(|m| ready.contains_key(m))
        .collect();
    let close = |reason: CloseReason, why: LeftOut| {
        let left_out = ring
            .iter()
            .copied()
            .filter(|m| !in_step.contains(m))
            .map(|m| {
                if observers.contains(&m) && expected.len() < ring.len() {
                    (m, LeftOut::Observer)
                } else {
                    (m, why.clone())
                }
            })
            .collect();
        Cut::Close {
            participants: in_step.clone(),
            left_out,
            reason,
        }
    };
    if in_step.len() == expected.len() {
        return close(CloseReason::AllReady, LeftOut::Observer);
    }
    if in_step.is_empty() {
        // Nobody to close with: wait for the first arrival.
        return Cut::Wait { until: None };
    }
    let backup = policy.backup as usize;
    if backup > 0 && in_step.len() >= expected.len().saturating_sub(backup).max(1) {
        return close(
            CloseReason::Backup {
                ready: in_step.len(),
                expected: expected.len(),
            },
            LeftOut::Backup,
        );
    }
    if let (Some(_), Some(length)) = (policy.deadline, deadline) {
        let due = opened.after(length);
        if now >= due {
            return close(
                CloseReason::Deadline {
                    after: now.since(opened),
                },
                LeftOut::Deadline,
            );
        }
        return Cut::Wait { until: Some(due) };
    }
    Cut::Wait { until: None }
}

/// Recent step spreads: from a step's opening (its first ready member) to
/// its last expected member's readiness. The deadline is a quantile of them.
#[derive(Clone, Debug, Default)]
pub struct StepTimes {
    spreads: VecDeque<Duration>,
    keep: usize,
}

impl StepTimes {
    /// Keeps the last `keep` spreads.
    pub fn new(keep: usize) -> StepTimes {
        StepTimes {
            spreads: VecDeque::new(),
            keep: keep.max(1),
        }
    }

    /// Records one step's spread (for a step cut early, the time until the
    /// last member was ready, as far as the coordinator saw it).
    pub fn record(&mut self, spread: Duration) {
        if self.spreads.len() == self.keep {
            self.spreads.pop_front();
        }
        self.spreads.push_back(spread);
    }

    /// The deadline `policy` asks for now: the quantile of the recorded
    /// spreads, clamped to the floor and ceiling (the ceiling while nothing
    /// is recorded yet).
    pub fn deadline(&self, policy: &DeadlinePolicy) -> Duration {
        let floor = Duration::from_millis(u64::from(policy.floor_ms));
        let ceiling = Duration::from_millis(u64::from(policy.ceiling_ms));
        if self.spreads.is_empty() {
            return ceiling;
        }
        let mut sorted: Vec<Duration> = self.spreads.iter().copied().collect();
        sorted.sort();
        // Nearest rank: the smallest value with at least q of the samples
        // at or below it.
        let q = usize::from(policy.quantile_permille.min(1000));
        let rank = (q * sorted.len()).div_ceil(1000).max(1);
        sorted[rank - 1].clamp(floor, ceiling)
    }
}

/// A change of a member's standing, with the reason for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Left out too often: it now only observes.
    Demoted {
        /// The member.
        member: MemberId,
        /// Why.
        reason: String,
    },
    /// Kept up again: it contributes from the next step.
    Readmitted {
        /// The member.
        member: MemberId,
        /// Why.
        reason: String,
    },
}

/// Per member: which of the last `window` steps left it out, by how much it
/// missed, and whether it is demoted.
#[derive(Clone, Debug)]
pub struct Attribution {
    window: usize,
    demote_after: usize,
    readmit_after: usize,
    members: BTreeMap<MemberId, MemberRecord>,
}

/// One member's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberRecord {
    /// Last `window` steps, newest last: left out?
    recent: VecDeque<bool>,
    /// Steps left out, ever.
    pub left_out: u64,
    /// Sum of how late it was when left out.
    pub missed_by: Duration,
    /// Consecutive steps it was ready in time while an observer.
    on_time: usize,
    /// Demoted.
    pub observer: bool,
}

impl Attribution {
    /// Demotes a member left out in `demote_after` of the last `window`
    /// steps; readmits an observer that was ready in time in
    /// `readmit_after` consecutive steps.
    pub fn new(window: usize, demote_after: usize, readmit_after: usize) -> Attribution {
        Attribution {
            window: window.max(1),
            demote_after: demote_after.clamp(1, window.max(1)),
            readmit_after: readmit_after.max(1),
            members: BTreeMap::new(),
        }
    }

    /// One closed step: who was in it, who was left out, and when each
    /// left-out member became ready (None: not yet) relative to the close.
    /// `in_time` lists observers that were ready before the close (they
    /// would have made the cut). Returns the standings that changed.
    pub fn record(
        &mut self,
        participants: &[MemberId],
        left_out: &[(MemberId, Option<Duration>)],
        in_time_observers: &[MemberId],
    ) -> Vec<Standing> {
        let mut changes = Vec::new();
        for &m in participants {
            let r = self.members.entry(m).or_default();
            push(&mut r.recent, false, self.window);
        }
        for &(m, late) in left_out {
            let r = self.members.entry(m).or_default();
            if r.observer {
                if in_time_observers.contains(&m) {
                    r.on_time += 1;
                    if r.on_time >= self.readmit_after {
                        r.observer = false;
                        r.on_time = 0;
                        r.recent.clear();
                        changes.push(Standing::Readmitted {
                            member: m,
                            reason: format!(
                                "ready in time in {} consecutive steps",
                                self.readmit_after
                            ),
                        });
                    }
                } else {
                    r.on_time = 0;
                }
                continue;
            }
            push(&mut r.recent, true, self.window);
            r.left_out += 1;
            r.missed_by += late.unwrap_or_default();
            let count = r.recent.iter().filter(|&&x| x).count();
            if count >= self.demote_after {
                r.observer = true;
                r.on_time = 0;
                changes.push(Standing::Demoted {
                    member: m,
                    reason: format!("left out in {count} of the last {} steps", r.recent.len()),
                });
            }
        }
        changes
    }

    /// The demoted members.
    pub fn observers(&self) -> Vec<MemberId> {
        self.members
            .iter()
            .filter(|(_, r)| r.observer)
            .map(|(&m, _)| m)
            .collect()
    }

    /// A member's record.
    pub fn get(&self, member: MemberId) -> Option<&MemberRecord> {
        self.members.get(&member)
    }

    /// Forgets a member (it left the ring).
    pub fn forget(&mut self, member: MemberId) {
        self.members.remove(&member);
    }
}

fn push(v: &mut VecDeque<bool>, x: bool, window: usize) {
    if v.len() == window {
        v.pop_front();
    }
    v.push_back(x);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(ids: &[u32]) -> Vec<MemberId> {
        ids.iter().map(|&i| MemberId(i)).collect()
    }

    fn ready(pairs: &[(u32, u64)]) -> BTreeMap<MemberId, Time> {
        pairs
            .iter()
            .map(|&(id, ms)| (MemberId(id), Time(ms * 1000)))
            .collect()
    }

    fn at(ms: u64) -> Time {
        Time(ms * 1000)
    }

    #[test]
    fn sync_waits_for_every_member() {
        let ring = m(&[0, 1, 2, 3]);
        let p = QuorumPolicy::SYNC;
        let some = ready(&[(0, 0), (1, 1), (2, 2)]);
        assert_eq!(
            decide_cut(&p, &ring, &[], &some, at(0), at(500), None),
            Cut::Wait { until: None }
        );
        let all = ready(&[(0, 0), (1, 1), (2, 2), (3, 900)]);
        match decide_cut(&p, &ring, &[], &all, at(0), at(900), None) {
            Cut::Close {
                participants,
                left_out,
                reason,
            } => {
                assert_eq!(participants, ring);
                assert!(left_out.is_empty());
                assert_eq!(reason, CloseReason::AllReady);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backup_closes_with_the_first_n_minus_b() {
        let ring = m(&[0, 1, 2, 3]);
        let p = QuorumPolicy {
            backup: 1,
            ..QuorumPolicy::SYNC
        };
        let two = ready(&[(0, 0), (2, 1)]);
        assert_eq!(
            decide_cut(&p, &ring, &[], &two, at(0), at(1), None),
            Cut::Wait { until: None }
        );
        let three = ready(&[(0, 0), (2, 1), (3, 4)]);
        assert_eq!(
            decide_cut(&p, &ring, &[], &three, at(0), at(4), None),
            Cut::Close {
                participants: m(&[0, 2, 3]),
                left_out: vec![(MemberId(1), LeftOut::Backup)],
                reason: CloseReason::Backup {
                    ready: 3,
                    expected: 4
                },
            }
        );
    }

    #[test]
    fn a_deadline_closes_with_whoever_is_ready_and_says_when_to_look_again() {
        let ring = m(&[0, 1, 2]);
        let p = QuorumPolicy {
            deadline: Some(DeadlinePolicy {
                quantile_permille: 900,
                floor_ms: 10,
                ceiling_ms: 1000,
            }),
            ..QuorumPolicy::SYNC
        };
        let one = ready(&[(1, 0)]);
        let d = Some(Duration::from_millis(50));
        assert_eq!(
            decide_cut(&p, &ring, &[], &one, at(0), at(20), d),
            Cut::Wait {
                until: Some(at(50))
            }
        );
        match decide_cut(&p, &ring, &[], &one, at(0), at(50), d) {
            Cut::Close {
                participants,
                left_out,
                reason,
            } => {
                assert_eq!(participants, m(&[1]));
                assert_eq!(
                    left_out,
                    vec![
                        (MemberId(0), LeftOut::Deadline),
                        (MemberId(2), LeftOut::Deadline)
                    ]
                );
                assert_eq!(
                    reason,
                    CloseReason::Deadline {
                        after: Duration::from_millis(50)
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        // Nobody ready: no step to close, whatever the clock says.
        assert_eq!(
            decide_cut(&p, &ring, &[], &BTreeMap::new(), at(0), at(5000), d),
            Cut::Wait { until: None }
        );
    }

    #[test]
    fn observers_are_not_waited_for_and_are_named() {
        let ring = m(&[0, 1, 2]);
        let all_but_observer = ready(&[(0, 0), (1, 3)]);
        assert_eq!(
            decide_cut(
                &QuorumPolicy::SYNC,
                &ring,
                &m(&[2]),
                &all_but_observer,
                at(0),
                at(3),
                None
            ),
            Cut::Close {
                participants: m(&[0, 1]),
                left_out: vec![(MemberId(2), LeftOut::Observer)],
                reason: CloseReason::AllReady,
            }
        );
        // An observer that is ready anyway still does not contribute.
        let everyone = ready(&[(0, 0), (1, 3), (2, 1)]);
        assert!(matches!(
            decide_cut(&QuorumPolicy::SYNC, &ring, &m(&[2]), &everyone, at(0), at(3), None),
            Cut::Close { ref participants, .. } if *participants == m(&[0, 1])
        ));
    }

    #[test]
    fn the_deadline_is_a_clamped_quantile_of_recent_spreads() {
        let p = DeadlinePolicy {
            quantile_permille: 900,
            floor_ms: 20,
            ceiling_ms: 400,
        };
        let mut t = StepTimes::new(10);
        assert_eq!(
            t.deadline(&p),
            Duration::from_millis(400),
            "no data: ceiling"
        );
        for ms in [30, 10, 50, 40, 20, 60, 90, 70, 80, 100] {
            t.record(Duration::from_millis(ms));
        }
        assert_eq!(t.deadline(&p), Duration::from_millis(90));
        // Old spreads age out.
        for _ in 0..10 {
            t.record(Duration::from_millis(5));
        }
        assert_eq!(t.deadline(&p), Duration::from_millis(20), "floor");
        t.record(Duration::from_secs(9));
        let p100 = DeadlinePolicy {
            quantile_permille: 1000,
            ..p
        };
        assert_eq!(t.deadline(&p100), Duration::from_millis(400), "ceiling");
    }

    #[test]
    fn a_member_left_out_too_often_is_demoted_then_readmitted_when_it_keeps_up() {
        let mut a = Attribution::new(10, 3, 2);
        let all = m(&[0, 1, 2]);
        let others = m(&[0, 1]);
        let slow = MemberId(2);
        assert!(a.record(&all, &[], &[]).is_empty());
        assert!(a
            .record(&others, &[(slow, Some(Duration::from_millis(5)))], &[])
            .is_empty());
        assert!(a.record(&others, &[(slow, None)], &[]).is_empty());
        let changes = a.record(&others, &[(slow, Some(Duration::from_millis(7)))], &[]);
        assert!(
            matches!(&changes[..], [Standing::Demoted { member, .. }] if *member == slow),
            "{changes:?}"
        );
        assert_eq!(a.observers(), vec![slow]);
        let r = a.get(slow).unwrap();
        assert_eq!(r.left_out, 3);
        assert_eq!(r.missed_by, Duration::from_millis(12));
        // As an observer: late once (no change), then in time twice.
        assert!(a.record(&others, &[(slow, None)], &[]).is_empty());
        assert!(a
            .record(&others, &[(slow, Some(Duration::ZERO))], &[slow])
            .is_empty());
        let back = a.record(&others, &[(slow, Some(Duration::ZERO))], &[slow]);
        assert!(
            matches!(&back[..], [Standing::Readmitted { member, .. }] if *member == slow),
            "{back:?}"
        );
        assert!(a.observers().is_empty());
        // Readmitted with a clean window: one miss does not demote again.
        assert!(a.record(&others, &[(slow, None)], &[]).is_empty());
    }

    #[test]
    fn policies_validate_and_print() {
        assert_eq!(QuorumPolicy::SYNC.to_string(), "sync");
        let p = QuorumPolicy {
            backup: 1,
            deadline: Some(DeadlinePolicy {
                quantile_permille: 950,
                floor_ms: 5,
                ceiling_ms: 500,
            }),
            late: LatePolicy::FoldIntoNext,
        };
        assert_eq!(p.to_string(), "backup=1 deadline=p95[5..500 ms] late=fold");
        assert!(p.validate().is_ok());
        let bad = QuorumPolicy {
            deadline: Some(DeadlinePolicy {
                quantile_permille: 900,
                floor_ms: 600,
                ceiling_ms: 500,
            }),
            ..p
        };
        assert!(bad.validate().unwrap_err().contains("floor"));
    }
}
