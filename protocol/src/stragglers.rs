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
//! - [`StepTimes`]: the recent arrival offsets the deadline is derived from.
//! - [`Attribution`]: per member, how often it was left out and by how much
//!   it missed; demotes a member that missed `k` of the last `m` steps (left
//!   out and then late by more than a tolerance) to a non-contributing
//!   observer and readmits it once it keeps up again.
//! - [`Coordinator`]: the above for one stream, fed arrivals and the time,
//!   returning the [`Announcement`] of each closed step.
//!
//! The daemon's node runs a coordinator per stream on the lowest member
//! of the step's ring, sends it each member's readiness and announces each
//! cut to every member before the reduction runs.

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
                "deadline=p{} floor_ms={} ceiling_ms={}",
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

/// The deadline's floor and ceiling when a policy names only its quantile.
pub const DEFAULT_DEADLINE: DeadlinePolicy = DeadlinePolicy {
    quantile_permille: 950,
    floor_ms: 5,
    ceiling_ms: 10_000,
};

impl std::str::FromStr for QuorumPolicy {
    type Err = String;

    /// Reads what `Display` writes: `sync`, or space-separated
    /// `backup=B`, `deadline=pQ` (a percentile, `p95` or `p99.9`),
    /// `floor_ms=F`, `ceiling_ms=C` and `late=drop|fold`.
    fn from_str(text: &str) -> Result<QuorumPolicy, String> {
        let mut policy = QuorumPolicy::SYNC;
        let mut deadline: Option<DeadlinePolicy> = None;
        let mut bounds: Vec<(&str, u32)> = Vec::new();
        for token in text.split_whitespace() {
            if token == "sync" {
                continue;
            }
            let (key, value) = token
                .split_once('=')
                .ok_or_else(|| format!("`{token}`: expected key=value (or `sync`)"))?;
            let number = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| format!("`{token}`: `{v}` is not a whole number"))
            };
            match key {
                "backup" => policy.backup = number(value)?,
                "deadline" => {
                    let q = value
                        .strip_prefix('p')
                        .and_then(|q| q.parse::<f64>().ok())
                        .filter(|q| *q > 0.0 && *q <= 100.0)
                        .ok_or_else(|| {
                            format!("`{token}`: the deadline is a percentile, like p95 or p99.9")
                        })?;
                    deadline = Some(DeadlinePolicy {
                        quantile_permille: (q * 10.0).round() as u16,
                        ..DEFAULT_DEADLINE
                    });
                }
                "floor_ms" | "ceiling_ms" => bounds.push((key, number(value)?)),
                "late" => {
                    policy.late = match value {
                        "drop" => LatePolicy::Drop,
                        "fold" => LatePolicy::FoldIntoNext,
                        _ => return Err(format!("`{token}`: late is `drop` or `fold`")),
                    }
                }
                _ => {
                    return Err(format!(
                        "`{token}`: unknown key (backup, deadline, floor_ms, ceiling_ms, late)"
                    ))
                }
            }
        }
        for (key, v) in bounds {
            let d = deadline
                .as_mut()
                .ok_or_else(|| format!("{key} needs a deadline=pQ"))?;
            match key {
                "floor_ms" => d.floor_ms = v,
                _ => d.ceiling_ms = v,
            }
        }
        policy.deadline = deadline;
        policy.validate()?;
        Ok(policy)
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum LeftOut {
    /// Not ready when the backup count was reached.
    Backup,
    /// Not ready when the deadline passed.
    Deadline,
    /// A demoted observer: it receives results, contributes nothing.
    Observer,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::AllReady => f.write_str("every member ready"),
            CloseReason::Backup { ready, expected } => {
                write!(f, "backup workers: {ready} of {expected} ready")
            }
            CloseReason::Deadline { after } => {
                write!(f, "deadline passed after {} ms", after.as_millis())
            }
        }
    }
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
                    (m, why)
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
    // Demoted members count against the backup allowance: at most `backup`
    // members of the ring are missing from a step (otherwise a demoted
    // straggler would let the policy cut a healthy member every step, and
    // attribution would demote it in turn).
    let demoted = ring.len() - expected.len();
    let backup = (policy.backup as usize).saturating_sub(demoted);
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

/// Recent arrival offsets: how long after a step opened (its first ready
/// member) each other member was ready. The deadline is a quantile of them
/// with a 1.5× margin, so members that arrive as usual make it and a member
/// far behind the usual does not.
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

    /// Records one arrival offset.
    pub fn record(&mut self, spread: Duration) {
        if self.spreads.len() == self.keep {
            self.spreads.pop_front();
        }
        self.spreads.push_back(spread);
    }

    /// The deadline `policy` asks for now: 1.5× the quantile of the
    /// recorded offsets, clamped to the floor and ceiling (the ceiling while
    /// nothing is recorded yet).
    pub fn deadline(&self, policy: &DeadlinePolicy) -> Duration {
        let floor = Duration::from_millis(u64::from(policy.floor_ms));
        let ceiling = Duration::from_millis(u64::from(policy.ceiling_ms));
        match self.quantile(policy.quantile_permille) {
            Some(q) => (q * 3 / 2).clamp(floor, ceiling),
            None => ceiling,
        }
    }

    /// The median of the recorded values, if any.
    pub fn median(&self) -> Option<Duration> {
        self.quantile(500)
    }

    /// Nearest rank: the smallest recorded value with at least `permille`
    /// of them at or below it.
    fn quantile(&self, permille: u16) -> Option<Duration> {
        if self.spreads.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = self.spreads.iter().copied().collect();
        sorted.sort();
        let q = usize::from(permille.min(1000));
        let rank = (q * sorted.len()).div_ceil(1000).max(1);
        Some(sorted[rank - 1])
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

/// Per member: which of the last `window` steps it missed, by how much,
/// and whether it is demoted. A step counts as *missed* only when the member
/// was left out and then became ready more than `tolerance` after the close:
/// under `backup = b` the last b arrivals are always left out, and a healthy
/// member that was last by a hair must not pile up misses and be demoted.
#[derive(Clone, Debug)]
pub struct Attribution {
    window: usize,
    demote_after: usize,
    readmit_after: usize,
    tolerance: Duration,
    /// How late an observer may be and still count as in time towards its
    /// readmission: the tolerance, or less when the group's pace says a
    /// wait that long would cost it more (see [`Attribution::set_pace`]).
    readmit_bar: Duration,
    members: BTreeMap<MemberId, MemberRecord>,
}

/// One member's record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberRecord {
    /// Last `window` steps, newest last: missed?
    recent: VecDeque<bool>,
    /// Left out of a step and not yet ready for it.
    awaiting: bool,
    /// Steps left out, ever.
    pub left_out: u64,
    /// Steps missed by more than the tolerance, ever.
    pub missed: u64,
    /// Sum of how late it was for the steps it was left out of.
    pub missed_by: Duration,
    /// Consecutive steps it was ready in time while an observer.
    on_time: usize,
    /// Demotions not yet forgiven: each doubles the in-time steps the next
    /// readmission takes, so a member that stays slow but is in time for a
    /// few steps now and then comes back ever more rarely, while one that
    /// recovered comes back.
    demotions: u32,
    /// Consecutive steps it took part in without a miss since its last
    /// demotion; every [`FORGIVE_AFTER`] of them forgives one.
    clean: usize,
    /// Demoted.
    pub observer: bool,
}

/// Steps in a row a readmitted member must take part in without a miss for
/// one of its demotions to be forgiven.
pub const FORGIVE_AFTER: usize = 200;

/// At most this many doublings of `readmit_after` (64 times as many steps).
const MAX_BACKOFF: u32 = 6;

/// An observer's arrival counts towards readmission if waiting for it would
/// have made the step longer by at most the group's pace divided by this.
pub const READMIT_COST: u32 = 4;

impl Attribution {
    /// Demotes a member that missed `demote_after` of the last `window`
    /// steps by more than `tolerance`; readmits an observer that was ready
    /// in time in `readmit_after` consecutive steps.
    pub fn new(
        window: usize,
        demote_after: usize,
        readmit_after: usize,
        tolerance: Duration,
    ) -> Attribution {
        Attribution {
            window: window.max(1),
            demote_after: demote_after.clamp(1, window.max(1)),
            readmit_after: readmit_after.max(1),
            tolerance,
            readmit_bar: tolerance,
            members: BTreeMap::new(),
        }
    }

    /// The group's pace: the usual time from one step's close to the next.
    /// An observer counts as in time for a step only if waiting for it
    /// would have stretched the step by at most 1/[`READMIT_COST`] of that
    /// (and by no more than the tolerance). The tolerance alone keeps a
    /// member last by a hair from being demoted; as the readmission bar it
    /// let a member three times slower than an 8 ms step count as keeping
    /// up, come back, and be demoted again every 50-70 steps (issue 13,
    /// item 8).
    pub fn set_pace(&mut self, pace: Duration) {
        self.readmit_bar = self.tolerance.min(pace / READMIT_COST);
    }

    /// One closed step: who was in it, who was left out, and which
    /// observers were ready before the close (they would have made the
    /// cut). Returns the readmissions it causes; misses are judged when the
    /// left-out members arrive ([`Attribution::late_arrival`]).
    pub fn record(
        &mut self,
        participants: &[MemberId],
        left_out: &[MemberId],
        in_time_observers: &[MemberId],
    ) -> Vec<Standing> {
        let mut changes = Vec::new();
        for &m in participants {
            let r = self.members.entry(m).or_default();
            push(&mut r.recent, false, self.window);
            r.clean += 1;
            if r.clean >= FORGIVE_AFTER {
                r.clean = 0;
                r.demotions = r.demotions.saturating_sub(1);
            }
        }
        for &m in left_out {
            let r = self.members.entry(m).or_default();
            // Observers count too: operators see every step a member was
            // not in.
            r.left_out += 1;
            if !r.observer {
                r.awaiting = true;
                continue;
            }
            if in_time_observers.contains(&m) {
                changes.extend(self.on_time(m));
            } else {
                // Judged when it arrives: within the tolerance it kept up.
                r.awaiting = true;
            }
        }
        changes
    }

    /// An observer was ready in time for a step; readmits it after enough.
    fn on_time(&mut self, member: MemberId) -> Vec<Standing> {
        let Some(r) = self.members.get_mut(&member) else {
            return Vec::new();
        };
        let backoff = r.demotions.saturating_sub(1).min(MAX_BACKOFF);
        let readmit_after = self.readmit_after << backoff;
        r.on_time += 1;
        if r.on_time < readmit_after {
            return Vec::new();
        }
        r.observer = false;
        r.on_time = 0;
        r.recent.clear();
        vec![Standing::Readmitted {
            member,
            reason: format!("ready in time in {readmit_after} consecutive steps"),
        }]
    }

    /// A member left out of a step became ready `by` after the step closed;
    /// returns its demotion when this miss is one too many.
    pub fn late_arrival(&mut self, member: MemberId, by: Duration) -> Vec<Standing> {
        let bar = self.readmit_bar;
        let Some(r) = self.members.get_mut(&member).filter(|r| r.awaiting) else {
            return Vec::new();
        };
        r.awaiting = false;
        if r.observer {
            if by <= bar {
                return self.on_time(member);
            }
            r.on_time = 0;
            return Vec::new();
        }
        r.missed_by += by;
        let missed = by > self.tolerance;
        if missed {
            r.clean = 0;
        }
        r.missed += u64::from(missed);
        push(&mut r.recent, missed, self.window);
        let count = r.recent.iter().filter(|&&x| x).count();
        if missed && !r.observer && count >= self.demote_after {
            r.observer = true;
            r.on_time = 0;
            r.demotions += 1;
            return vec![Standing::Demoted {
                member,
                reason: format!(
                    "missed {count} of the last {} steps (last by {} ms)",
                    r.recent.len(),
                    by.as_millis()
                ),
            }];
        }
        Vec::new()
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

    /// Every member's record.
    pub fn records(&self) -> impl Iterator<Item = (MemberId, &MemberRecord)> {
        self.members.iter().map(|(&m, r)| (m, r))
    }
}

/// One member's attribution as the coordinator announces it with each
/// step (for metrics and `phalanxctl members` at every daemon).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct StragglerRecord {
    /// The member.
    pub member: MemberId,
    /// Steps it was left out of.
    pub left_out: u64,
    /// Of those, steps it missed by more than the tolerance.
    pub missed: u64,
    /// How late it was in total for the steps it was left out of, ms.
    pub missed_by_ms: u64,
    /// Demoted to observer.
    pub observer: bool,
}

impl Attribution {
    /// Every member's record in wire form.
    pub fn snapshot(&self) -> Vec<StragglerRecord> {
        self.records()
            .map(|(member, r)| StragglerRecord {
                member,
                left_out: r.left_out,
                missed: r.missed,
                missed_by_ms: r.missed_by.as_millis() as u64,
                observer: r.observer,
            })
            .collect()
    }
}

/// A closed step, as the coordinator announces it to every member before
/// the reduction runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The step.
    pub step: u64,
    /// Who contributes (ascending).
    pub participants: Vec<MemberId>,
    /// Everyone else in the ring, and why.
    pub left_out: Vec<(MemberId, LeftOut)>,
    /// Why it closed when it did.
    pub reason: CloseReason,
    /// Demotions and readmissions this step caused (they apply from the
    /// next step on).
    pub standings: Vec<Standing>,
}

#[derive(Clone, Debug)]
struct OpenStep {
    /// The first contributing member's arrival (observers do not start a
    /// step's clock: one ready first would close it at a deadline with
    /// nobody in it).
    opened: Option<Time>,
    ready: BTreeMap<MemberId, Time>,
    closed: Option<Time>,
}

/// How many closed steps the coordinator remembers for late arrivals.
const REMEMBERED_STEPS: usize = 64;

/// The step coordinator of one stream: it hears when each member is ready
/// for a step, closes the step as the policy says, keeps the arrival times
/// the deadline comes from, and attributes who was left out. Pure: the
/// caller passes the time and the epoch's ring, and sends the
/// announcements.
#[derive(Clone, Debug)]
pub struct Coordinator {
    policy: QuorumPolicy,
    times: StepTimes,
    attribution: Attribution,
    steps: BTreeMap<u64, OpenStep>,
    /// Demotions judged on late arrivals, announced with the next step.
    pending: Vec<Standing>,
    /// Times from one step's close to the next step's (the group's pace).
    pace: StepTimes,
    /// The last step closed, and when.
    last_close: Option<(u64, Time)>,
}

impl Coordinator {
    /// A coordinator with `policy` and the demotion rule of `attribution`.
    pub fn new(policy: QuorumPolicy, attribution: Attribution) -> Coordinator {
        Coordinator {
            policy,
            times: StepTimes::new(256),
            attribution,
            steps: BTreeMap::new(),
            pending: Vec::new(),
            pace: StepTimes::new(64),
            last_close: None,
        }
    }

    /// A new policy (from the next decision on).
    pub fn set_policy(&mut self, policy: QuorumPolicy) {
        self.policy = policy;
    }

    /// A new epoch with `ring`: steps of the old one are forgotten (the
    /// interrupted ones are decided again from fresh arrivals), and so are
    /// members that left; the others keep their records and standing.
    pub fn new_epoch(&mut self, ring: &[MemberId]) {
        self.steps.clear();
        self.last_close = None;
        let gone: Vec<MemberId> = self
            .attribution
            .records()
            .map(|(m, _)| m)
            .filter(|m| !ring.contains(m))
            .collect();
        for m in gone {
            self.attribution.forget(m);
        }
        self.pending.retain(|s| match s {
            Standing::Demoted { member, .. } | Standing::Readmitted { member, .. } => {
                ring.contains(member)
            }
        });
    }

    /// The attribution so far.
    pub fn attribution(&self) -> &Attribution {
        &self.attribution
    }

    fn deadline(&self) -> Option<Duration> {
        self.policy.deadline.map(|d| self.times.deadline(&d))
    }

    /// `member` is ready for `step` at `now`; returns the announcement when
    /// this closes the step.
    pub fn ready(
        &mut self,
        step: u64,
        member: MemberId,
        now: Time,
        ring: &[MemberId],
    ) -> Option<Announcement> {
        let is_observer = |m: &MemberId| self.attribution.get(*m).is_some_and(|r| r.observer);
        // With every member demoted, the observers carry the step.
        let observer = is_observer(&member) && ring.iter().any(|m| !is_observer(m));
        let s = self.steps.entry(step).or_insert_with(|| OpenStep {
            opened: None,
            ready: BTreeMap::new(),
            closed: None,
        });
        if s.ready.contains_key(&member) {
            return None;
        }
        s.ready.insert(member, now);
        let closed = s.closed;
        match s.opened {
            // The deadline comes from the members that contribute: a
            // demoted straggler's arrivals would stretch it to its pace.
            Some(opened) if !observer => self.times.record(now.since(opened)),
            None if !observer => s.opened = Some(now),
            _ => {}
        }
        if let Some(closed) = closed {
            let changes = self.attribution.late_arrival(member, now.since(closed));
            self.pending.extend(changes);
            return None;
        }
        self.decide(step, now, ring)
    }

    /// `member` arrived at `now` for `step` after it closed without it:
    /// counted for attribution, if this coordinator closed that step. A
    /// step it does not know (forgotten at an epoch change) is left alone.
    pub fn late(&mut self, step: u64, member: MemberId, now: Time, ring: &[MemberId]) {
        if self.steps.get(&step).is_some_and(|s| s.closed.is_some()) {
            let closes = self.ready(step, member, now, ring);
            debug_assert!(closes.is_none(), "a closed step closed again");
        }
    }

    /// Closes the steps whose deadline passed.
    pub fn poll(&mut self, now: Time, ring: &[MemberId]) -> Vec<Announcement> {
        let open: Vec<u64> = self
            .steps
            .iter()
            .filter(|(_, s)| s.closed.is_none())
            .map(|(&k, _)| k)
            .collect();
        open.into_iter()
            .filter_map(|step| self.decide(step, now, ring))
            .collect()
    }

    /// When the earliest open step's deadline passes.
    pub fn next_deadline(&self) -> Option<Time> {
        let length = self.deadline()?;
        self.steps
            .values()
            .filter(|s| s.closed.is_none())
            .filter_map(|s| s.opened.map(|o| o.after(length)))
            .min()
    }

    fn decide(&mut self, step: u64, now: Time, ring: &[MemberId]) -> Option<Announcement> {
        let deadline = self.deadline();
        let observers = self.attribution.observers();
        let s = self.steps.get_mut(&step)?;
        let opened = s.opened?;
        let Cut::Close {
            participants,
            left_out,
            reason,
        } = decide_cut(
            &self.policy,
            ring,
            &observers,
            &s.ready,
            opened,
            now,
            deadline,
        )
        else {
            return None;
        };
        s.closed = Some(now);
        if let Some((_, at)) = self.last_close.filter(|&(last, _)| last + 1 == step) {
            self.pace.record(now.since(at));
            if let Some(pace) = self.pace.median() {
                self.attribution.set_pace(pace);
            }
        }
        self.last_close = Some((step, now));
        let in_time: Vec<MemberId> = observers
            .iter()
            .copied()
            .filter(|m| s.ready.contains_key(m))
            .collect();
        let out: Vec<MemberId> = left_out.iter().map(|&(m, _)| m).collect();
        let mut standings = std::mem::take(&mut self.pending);
        standings.extend(self.attribution.record(&participants, &out, &in_time));
        while self.steps.len() > REMEMBERED_STEPS {
            self.steps.pop_first();
        }
        Some(Announcement {
            step,
            participants,
            left_out,
            reason,
            standings,
        })
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
        assert_eq!(t.deadline(&p), Duration::from_millis(135), "1.5 × p90");
        // Old spreads age out.
        for _ in 0..10 {
            t.record(Duration::from_millis(2));
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
    fn a_member_that_misses_too_often_is_demoted_then_readmitted_when_it_keeps_up() {
        let mut a = Attribution::new(10, 3, 2, Duration::from_millis(2));
        let all = m(&[0, 1, 2]);
        let others = m(&[0, 1]);
        let slow = MemberId(2);
        let ms = Duration::from_millis;
        assert!(a.record(&all, &[], &[]).is_empty());
        // Left out but last by a hair: not a miss.
        for _ in 0..5 {
            assert!(a.record(&others, &[slow], &[]).is_empty());
            assert!(a.late_arrival(slow, ms(1)).is_empty());
        }
        assert!(a.observers().is_empty());
        // Missed by far, three times.
        a.record(&others, &[slow], &[]);
        assert!(a.late_arrival(slow, ms(5)).is_empty());
        a.record(&others, &[slow], &[]);
        assert!(a.late_arrival(slow, ms(7)).is_empty());
        a.record(&others, &[slow], &[]);
        let changes = a.late_arrival(slow, ms(9));
        assert!(
            matches!(&changes[..], [Standing::Demoted { member, .. }] if *member == slow),
            "{changes:?}"
        );
        assert!(
            a.late_arrival(slow, ms(9)).is_empty(),
            "one arrival per step"
        );
        assert_eq!(a.observers(), vec![slow]);
        let r = a.get(slow).unwrap();
        assert_eq!((r.left_out, r.missed), (8, 3));
        assert_eq!(r.missed_by, ms(26));
        // As an observer: late once (no change), then in time twice.
        assert!(a.record(&others, &[slow], &[]).is_empty());
        assert!(a.record(&others, &[slow], &[slow]).is_empty());
        let back = a.record(&others, &[slow], &[slow]);
        assert!(
            matches!(&back[..], [Standing::Readmitted { member, .. }] if *member == slow),
            "{back:?}"
        );
        assert!(a.observers().is_empty());
        // Readmitted with a clean window: one miss does not demote again.
        a.record(&others, &[slow], &[]);
        assert!(a.late_arrival(slow, ms(50)).is_empty());
    }

    /// Misses `slow` three steps in a row (demoted on the third).
    fn demote(a: &mut Attribution, others: &[MemberId], slow: MemberId) {
        for k in 0..3 {
            a.record(others, &[slow], &[]);
            let changes = a.late_arrival(slow, Duration::from_millis(50));
            assert_eq!(
                matches!(&changes[..], [Standing::Demoted { .. }]),
                k == 2,
                "{changes:?}"
            );
        }
    }

    /// In time `n - 1` steps as an observer without a change, then readmitted.
    fn readmitted_after(a: &mut Attribution, others: &[MemberId], slow: MemberId, n: usize) {
        for k in 1..n {
            assert!(a.record(others, &[slow], &[slow]).is_empty(), "step {k}");
        }
        let back = a.record(others, &[slow], &[slow]);
        assert!(
            matches!(&back[..], [Standing::Readmitted { reason, .. }] if reason.contains(&format!("in {n} consecutive"))),
            "{back:?}"
        );
    }

    // Issue 13, item 8: a member that stayed 3x slow was readmitted after 3
    // in-time steps (the group slow for a moment, or it skipped steps it was
    // behind on) and demoted again every 50-70 steps. Each demotion doubles
    // the next readmission's bar; a long clean run forgives one.
    #[test]
    fn each_demotion_doubles_the_next_readmissions_bar_and_a_clean_run_forgives_one() {
        let mut a = Attribution::new(10, 3, 3, Duration::from_millis(2));
        let others = m(&[0, 1]);
        let slow = MemberId(2);
        let all = m(&[0, 1, 2]);
        demote(&mut a, &others, slow);
        readmitted_after(&mut a, &others, slow, 3);
        demote(&mut a, &others, slow);
        readmitted_after(&mut a, &others, slow, 6);
        demote(&mut a, &others, slow);
        readmitted_after(&mut a, &others, slow, 12);
        // Recovered for good: a clean run forgives a demotion.
        for _ in 0..FORGIVE_AFTER {
            a.record(&all, &[], &[]);
        }
        demote(&mut a, &others, slow);
        readmitted_after(&mut a, &others, slow, 12);
    }

    /// Four members, one three times slower: arrivals at 10 ms for the
    /// healthy ones and `slow_ms` for member 3 after each step opens.
    fn run_steps(
        c: &mut Coordinator,
        ring: &[MemberId],
        first: u64,
        steps: u64,
        slow_ms: u64,
    ) -> Vec<Announcement> {
        let mut out = Vec::new();
        for step in first..first + steps {
            let base = step * 1000;
            let mut arrivals: Vec<(MemberId, u64)> = ring
                .iter()
                .map(|&m| (m, if m == MemberId(3) { slow_ms } else { 10 }))
                .collect();
            arrivals.sort_by_key(|&(m, t)| (t, m));
            // Member 0 opens the step at its start.
            out.extend(c.ready(step, MemberId(0), at(base), ring));
            for (m, t) in arrivals.into_iter().filter(|&(m, _)| m != MemberId(0)) {
                let now = at(base + t);
                // The caller's timer fires at the deadline.
                if let Some(due) = c.next_deadline().filter(|&d| d <= now) {
                    out.extend(c.poll(due, ring));
                }
                out.extend(c.ready(step, m, now, ring));
            }
            out.extend(c.poll(at(base + 999), ring));
        }
        out
    }

    #[test]
    fn backup_cuts_the_slow_member_then_demotes_and_readmits_it() {
        let ring = m(&[0, 1, 2, 3]);
        let mut c = Coordinator::new(
            QuorumPolicy {
                backup: 1,
                ..QuorumPolicy::SYNC
            },
            Attribution::new(10, 3, 2, Duration::from_millis(5)),
        );
        let slow = run_steps(&mut c, &ring, 0, 6, 30);
        assert_eq!(slow.len(), 6, "every step closes once");
        for a in &slow {
            assert_eq!(a.participants, m(&[0, 1, 2]), "{a:?}");
        }
        assert_eq!(slow[0].left_out, vec![(MemberId(3), LeftOut::Backup)]);
        // Its third miss is judged when it arrives (20 ms late) and
        // announced with the next step; from then on it only observes, and
        // the backup allowance it uses up is not spent on a healthy member.
        assert!(matches!(
            &slow[3].standings[..],
            [Standing::Demoted { member, .. }] if *member == MemberId(3)
        ));
        assert_eq!(slow[3].left_out, vec![(MemberId(3), LeftOut::Observer)]);
        assert_eq!(slow[3].reason, CloseReason::AllReady);
        let record = c.attribution().get(MemberId(3)).unwrap();
        assert_eq!(record.missed, 3);
        assert_eq!(record.missed_by, Duration::from_millis(60));
        // It keeps up again: ready before the close in two steps.
        let fast = run_steps(&mut c, &ring, 6, 3, 5);
        assert!(fast
            .iter()
            .any(|a| a.standings.iter().any(
                |s| matches!(s, Standing::Readmitted { member, .. } if *member == MemberId(3))
            )));
        // A contributor again. Backup workers now leave out whoever is last,
        // by a hair: that is no miss, and nobody is demoted for it.
        let last = fast.last().unwrap();
        assert!(last.participants.contains(&MemberId(3)), "{last:?}");
        assert_eq!(last.participants.len(), 3);
        assert!(c.attribution().observers().is_empty());
        let run = run_steps(&mut c, &ring, 9, 20, 5);
        assert!(run.iter().all(|a| a.standings.is_empty()), "{run:?}");
    }

    #[test]
    fn a_deadline_learnt_from_arrivals_cuts_the_slow_member() {
        let ring = m(&[0, 1, 2, 3]);
        let mut c = Coordinator::new(
            QuorumPolicy {
                deadline: Some(DeadlinePolicy {
                    quantile_permille: 500,
                    floor_ms: 1,
                    ceiling_ms: 500,
                }),
                ..QuorumPolicy::SYNC
            },
            Attribution::new(100, 100, 2, Duration::from_millis(5)),
        );
        // The deadline is learnt from the arrivals as they come: 1.5 × the
        // median offset (10 ms), 15 ms, already in the first step.
        let steps = run_steps(&mut c, &ring, 0, 6, 30);
        assert_eq!(steps.len(), 6);
        for a in &steps {
            assert_eq!(a.participants, m(&[0, 1, 2]), "{a:?}");
            assert_eq!(a.left_out, vec![(MemberId(3), LeftOut::Deadline)]);
            assert!(
                matches!(a.reason, CloseReason::Deadline { after } if after == Duration::from_millis(15)),
                "{a:?}"
            );
        }
        assert_eq!(c.next_deadline(), None, "nothing open");
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
        assert_eq!(
            p.to_string(),
            "backup=1 deadline=p95 floor_ms=5 ceiling_ms=500 late=fold"
        );
        assert_eq!(p.to_string().parse::<QuorumPolicy>(), Ok(p));
        assert_eq!("sync".parse::<QuorumPolicy>(), Ok(QuorumPolicy::SYNC));
        assert_eq!(
            "deadline=p99.9".parse::<QuorumPolicy>().map(|p| p.deadline),
            Ok(Some(DeadlinePolicy {
                quantile_permille: 999,
                ..DEFAULT_DEADLINE
            }))
        );
        for bad in [
            "backup",
            "backup=x",
            "deadline=95",
            "floor_ms=3",
            "late=maybe",
            "speed=2",
        ] {
            assert!(bad.parse::<QuorumPolicy>().is_err(), "{bad}");
        }
        assert!("deadline=p90 floor_ms=9 ceiling_ms=3"
            .parse::<QuorumPolicy>()
            .unwrap_err()
            .contains("above its ceiling"));
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

    #[test]
    fn a_late_arrival_never_opens_a_step() {
        let ring = [MemberId(1), MemberId(2), MemberId(3)];
        let policy: QuorumPolicy = "backup=1".parse().unwrap();
        let mut c = Coordinator::new(
            policy,
            Attribution::new(10, 3, 3, Duration::from_millis(20)),
        );
        let t = |ms: u64| Time(ms * 1000);
        assert!(c.ready(5, MemberId(1), t(0), &ring).is_none());
        let closed = c
            .ready(5, MemberId(2), t(1), &ring)
            .expect("backup=1 closes");
        assert_eq!(closed.left_out, vec![(MemberId(3), LeftOut::Backup)]);
        // Late within the epoch: counted against it, nothing closes.
        c.late(5, MemberId(3), t(100), &ring);
        assert_eq!(c.attribution().get(MemberId(3)).map(|r| r.missed), Some(1));
        // After an epoch change the step is forgotten: a late arrival is
        // ignored, where a readiness would open the step again.
        c.new_epoch(&ring);
        c.late(6, MemberId(3), t(200), &ring);
        c.late(5, MemberId(3), t(200), &ring);
        assert_eq!(c.next_deadline(), None);
        assert!(c.poll(t(10_000), &ring).is_empty());
    }

    /// A trainer loop against one coordinator under `backup=1`: a result
    /// comes 3 ms after its step closes; members 0-3 then compute 8 ms
    /// (member k 0.5 ms more per k), member 4 `slow_ms(step)`, and skips
    /// computing as many steps as it is told it is behind, as the README's
    /// loop does. Returns member 4's standings, with the step announcing
    /// each.
    fn train_with_a_straggler(steps: u64, slow_ms: impl Fn(u64) -> u64) -> Vec<(u64, Standing)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let ring = m(&[0, 1, 2, 3, 4]);
        let slow = MemberId(4);
        let mut c = Coordinator::new(
            QuorumPolicy {
                backup: 1,
                ..QuorumPolicy::SYNC
            },
            Attribution::new(10, 3, 3, Duration::from_millis(20)),
        );
        // (when in µs, member, step): members ready.
        let mut events = BinaryHeap::new();
        for k in 0..4u64 {
            events.push(Reverse((k * 500, k as u32, 0u64)));
        }
        events.push(Reverse((slow_ms(0) * 1000, 4, 0)));
        let mut closes: BTreeMap<u64, u64> = BTreeMap::new();
        // The slow member's step whose result it waits for, and its skips.
        let (mut waits_for, mut skip): (Option<u64>, u64) = (None, 0);
        let mut standings = Vec::new();
        // It is ready for `step` and has its result at `now`: the next.
        const REDUCE: u64 = 3000;
        let next_of_slow = |step: u64, now: u64, closes: &BTreeMap<u64, u64>, skip: &mut u64| {
            let now = now.max(closes[&step] + REDUCE);
            let behind = closes
                .keys()
                .next_back()
                .map_or(0, |&l| l.saturating_sub(step));
            *skip = (*skip).max(behind);
            let compute = if *skip > 0 {
                *skip -= 1;
                0
            } else {
                slow_ms(step + 1) * 1000
            };
            Reverse((now + compute, 4u32, step + 1))
        };
        while let Some(Reverse((now, who, step))) = events.pop() {
            if step >= steps {
                continue;
            }
            let member = MemberId(who);
            let announced = if closes.contains_key(&step) {
                c.late(step, member, at(0).after(Duration::from_micros(now)), &ring);
                None
            } else {
                c.ready(step, member, at(0).after(Duration::from_micros(now)), &ring)
            };
            if member == slow {
                if closes.contains_key(&step) {
                    events.push(next_of_slow(step, now, &closes, &mut skip));
                } else {
                    waits_for = Some(step);
                }
            }
            if let Some(a) = announced {
                closes.insert(a.step, now);
                for s in a.standings {
                    standings.push((a.step, s));
                }
                for k in 0..4u64 {
                    events.push(Reverse((
                        now + REDUCE + 8000 + k * 500,
                        k as u32,
                        a.step + 1,
                    )));
                }
                if waits_for == Some(a.step) {
                    waits_for = None;
                    events.push(next_of_slow(a.step, now, &closes, &mut skip));
                }
            }
        }
        assert_eq!(closes.len() as u64, steps, "every step closes");
        standings
            .into_iter()
            .filter(|(_, s)| matches!(s, Standing::Demoted { member, .. } | Standing::Readmitted { member, .. } if *member == slow))
            .collect()
    }

    /// Three times the others' 8 ms, a little more or less, and for three
    /// steps in every 40 slower still.
    fn three_times_slow(step: u64) -> u64 {
        24 + step * 7 % 5 + if step % 40 < 3 { 20 } else { 0 }
    }

    // Issue 13, item 8: a member 3x slower than an 8 ms step was late by
    // less than the 20 ms tolerance, so it counted as keeping up, was
    // readmitted, and demoted again at its next slow patch. Waiting for it
    // would have cost the group more than a quarter of its pace: it stays
    // demoted.
    #[test]
    fn a_member_that_stays_slow_stays_demoted() {
        let changes = train_with_a_straggler(1000, three_times_slow);
        assert!(
            matches!(&changes[..], [(_, Standing::Demoted { .. })]),
            "demoted once, never readmitted: {changes:?}"
        );
    }

    #[test]
    fn a_straggler_that_recovers_is_readmitted_soon_after() {
        let changes = train_with_a_straggler(1000, |step| {
            if step < 300 {
                three_times_slow(step)
            } else {
                8
            }
        });
        assert!(
            matches!(
                &changes[..],
                [(_, Standing::Demoted { .. }), (back, Standing::Readmitted { .. })] if (300..320).contains(back)
            ),
            "demoted, then readmitted within 20 steps of keeping up: {changes:?}"
        );
    }
}
