//! What the survivors do with the ops a membership change interrupted.
//!
//! When a new epoch is installed, every member of its ring sends every other
//! one a [`RecoveryReport`]: the ops it holds *parked* (in flight when the
//! epoch changed, inputs kept) and the ops whose *result* it still holds
//! (the last completed op of each stream). Once a member has the reports of
//! the whole ring, [`Recovery::plans`] decides, identically everywhere
//! because every member decides on the same reports:
//!
//! - if any survivor completed the op, its result stands — a member may
//!   already have handed it to its trainer, so a re-run could disagree with
//!   it — and is broadcast from the lowest such member ([`Plan::FromResult`]);
//! - otherwise the op is re-run from the kept inputs by the members of its
//!   old ring that are still in the new one ([`Plan::Rerun`]), including any
//!   whose trainer has not submitted it yet.
//!
//! A member removed while its trainer was in lockstep and readmitted in the
//! same life claims in its report what its trainer holds ([`ReturnClaim`]);
//! [`Recovery::returns`] decides, from the others' kept results, whether it
//! comes back with the results it missed ([`Return::CatchUp`], each sent by
//! a [`Plan::FromResult`]) or must join again.
//!
//! Completing op `n+1` of a stream needs every member's input to it, so every
//! member had finished op `n`: the last completed op per stream is the only
//! one another member can still be waiting for (broadcast, which needs only
//! its root's input, is the exception; see [`Plan`]).

use std::collections::{BTreeMap, BTreeSet};

use bincode::{Decode, Encode};

use crate::wire::DType;
use crate::{Epoch, MemberId, OpId};

/// The checksum a state hand-over is verified with end to end: FNV-1a (64
/// bit) over the bytes, eight at a time, then the tail and the length.
pub fn state_checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = h.wrapping_mul(PRIME);
    }
    for &b in words.remainder() {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    h ^= bytes.len() as u64;
    h.wrapping_mul(PRIME)
}

/// One member's holdings when it enters `epoch`.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct RecoveryReport {
    /// The epoch being entered.
    pub epoch: Epoch,
    /// The reporting member.
    pub member: MemberId,
    /// Ops in flight when an epoch changed, with the ring they ran in.
    pub parked: Vec<(OpId, Vec<MemberId>)>,
    /// Ops whose result the member still holds.
    pub completed: Vec<KeptResult>,
    /// Per stream, the epoch of the last hand-over the member counts (a
    /// member that returns takes the group's view of who holds the state).
    pub synced: Vec<(u32, Epoch)>,
    /// Per stream, the members the member counts as back in lockstep since
    /// an admission (they hold the state as if that admission had been
    /// synced): a member that returns takes this view too.
    pub returned: Vec<(u32, MemberId, Epoch)>,
    /// Streams on which this member was removed while its trainer was in
    /// lockstep and comes back with the trainer's history, not a new state.
    pub returning: Vec<ReturnClaim>,
}

/// A member removed while its trainer was in lockstep, readmitted in the
/// same life: its trainer holds the results of `stream` up to `next - 1`
/// (whose contributors were `last`), and continues once it has the ones
/// the group completed since.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ReturnClaim {
    /// The stream.
    pub stream: u32,
    /// The first op whose result the trainer does not have.
    pub next: u64,
    /// Whose inputs the last result it has combines: the group's result of
    /// that op must name the same, or the member completed a version the
    /// others re-ran without it.
    pub last: Vec<MemberId>,
}

/// What the group decides about a [`ReturnClaim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Return {
    /// The member is back in lockstep: it receives `results` (every op from
    /// the claim's `next` to the stream's latest completed one) and holds the
    /// stream's state as the others do, who count hand-overs from `synced`.
    CatchUp {
        /// The lowest member that holds them all. Each result comes by the
        /// [`Plan::FromResult`] that [`Recovery::plans`] makes for its op,
        /// broadcast from its lowest holder to every member that misses it.
        holder: MemberId,
        /// The results it misses, oldest first.
        results: Vec<KeptResult>,
        /// The holder's last hand-over on the stream.
        synced: Option<Epoch>,
    },
    /// The group no longer holds what it missed (or never had its last
    /// result): its trainer must join again, and is told why.
    Refused(String),
}

/// A result a member holds, with what its trainer was told about it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct KeptResult {
    /// The op.
    pub op: OpId,
    /// Whose inputs it combines.
    pub contributors: Vec<MemberId>,
    /// The members its trainer was told are waiting for state: a member
    /// that receives this result later must be told the same, or the
    /// trainers' next ops diverge.
    pub waiting: Vec<MemberId>,
    /// The result's element type.
    pub dtype: DType,
    /// The result's elements.
    pub len: u64,
}

/// How an interrupted op is finished in the new epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Re-run it from the kept inputs among `members`.
    Rerun {
        /// The members that run it (ascending).
        members: Vec<MemberId>,
    },
    /// Broadcast the result `holder` kept to `members`; the op's result then
    /// names `contributors`, the members whose inputs it combined. A member
    /// whose trainer never submitted a broadcast that others completed is
    /// not waited for (a broadcast needs only its root).
    FromResult {
        /// The broadcast's root.
        holder: MemberId,
        /// Every member that takes part (ascending): those that parked the
        /// op and those that hold its result.
        members: Vec<MemberId>,
        /// Whose inputs the kept result combines.
        contributors: Vec<MemberId>,
        /// What the holder's trainer was told is waiting.
        waiting: Vec<MemberId>,
    },
    /// Nobody holds the result, but a member completed a later op of the
    /// same stream: the group went on without the parker (it was cut off or
    /// stopped), which must fail the op and rejoin.
    Superseded {
        /// The later op.
        later: OpId,
    },
}

/// Reports gathered for one epoch.
#[derive(Clone, Debug)]
pub struct Recovery {
    epoch: Epoch,
    ring: Vec<MemberId>,
    reports: BTreeMap<MemberId, RecoveryReport>,
}

impl Recovery {
    /// Gathering for `epoch`, whose ring is `ring`.
    pub fn new(epoch: Epoch, ring: Vec<MemberId>) -> Recovery {
        Recovery {
            epoch,
            ring,
            reports: BTreeMap::new(),
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Adds a report; one for another epoch or from outside the ring is
    /// refused with the reason.
    pub fn add(&mut self, report: RecoveryReport) -> Result<(), String> {
        if report.epoch != self.epoch {
            return Err(format!(
                "report of {} is for {}, gathering for {}",
                report.member, report.epoch, self.epoch
            ));
        }
        if !self.ring.contains(&report.member) {
            return Err(format!(
                "{} is not in the ring of {}",
                report.member, self.epoch
            ));
        }
        self.reports.insert(report.member, report);
        Ok(())
    }

    /// Members whose report is still missing.
    pub fn missing(&self) -> Vec<MemberId> {
        self.ring
            .iter()
            .copied()
            .filter(|m| !self.reports.contains_key(m))
            .collect()
    }

    /// Whether every member of the ring reported.
    pub fn is_complete(&self) -> bool {
        self.missing().is_empty()
    }

    /// A completed op of `op`'s stream that comes after it, if any member
    /// reported one.
    fn later_op_of_stream(&self, op: OpId) -> Option<OpId> {
        self.reports
            .values()
            .flat_map(|r| r.completed.iter().map(|k| k.op))
            .filter(|o| o.stream() == op.stream() && o.seq() > op.seq())
            .max()
    }

    /// The latest op of `stream` a member other than a returning one
    /// completed.
    fn latest_completed(&self, stream: u32) -> Option<u64> {
        self.reports
            .values()
            .filter(|r| r.returning.is_empty())
            .flat_map(|r| r.completed.iter())
            .filter(|k| k.op.stream() == stream)
            .map(|k| k.op.seq())
            .max()
    }

    /// Every member's view of who came back in lockstep, and since which
    /// admission, by stream. A member that did not finish the exchange of
    /// the epoch that decided a return (a newer epoch came first) ran no op
    /// in it, and learns of the return here: every member that did reports
    /// it, and so does the member that returned.
    pub fn returned(&self) -> BTreeSet<(u32, MemberId, Epoch)> {
        self.reports
            .values()
            .flat_map(|r| r.returned.iter().copied())
            .collect()
    }

    /// What the group decides about each returning member's claims, by
    /// (member, stream). Call once complete.
    pub fn returns(&self) -> BTreeMap<(MemberId, u32), Return> {
        let mut out = BTreeMap::new();
        for r in self.reports.values() {
            for claim in &r.returning {
                out.insert((r.member, claim.stream), self.decide_return(claim));
            }
        }
        out
    }

    fn decide_return(&self, claim: &ReturnClaim) -> Return {
        let stream = claim.stream;
        let Some(last) = claim.next.checked_sub(1) else {
            return Return::Refused("its trainer holds no result of the stream".into());
        };
        let latest = self.latest_completed(stream).unwrap_or(0);
        if latest < last {
            return Return::Refused(format!(
                "no other member completed op {last} of stream {stream}, whose result its trainer \
                 has (the group re-runs it without this member)"
            ));
        }
        // A holder's result of the claim's last op must name what the
        // claimant's trainer got; with one that names others, the claimant
        // completed a version the group re-ran without it.
        let mut differs: Option<Vec<MemberId>> = None;
        let holder = self
            .reports
            .values()
            .filter(|h| h.returning.is_empty() && self.ring.contains(&h.member))
            .find_map(|h| {
                let of = |seq: u64| {
                    h.completed
                        .iter()
                        .find(|k| k.op.stream() == stream && k.op.seq() == seq)
                };
                match of(last) {
                    Some(k) if k.contributors == claim.last => {}
                    Some(k) => {
                        differs = Some(k.contributors.clone());
                        return None;
                    }
                    None => return None,
                }
                let results: Option<Vec<KeptResult>> =
                    (claim.next..=latest).map(|seq| of(seq).cloned()).collect();
                let synced = h.synced.iter().find(|(s, _)| *s == stream).map(|&(_, e)| e);
                results.map(|results| (h.member, results, synced))
            });
        match (holder, differs) {
            (Some((holder, results, synced)), _) => Return::CatchUp {
                holder,
                results,
                synced,
            },
            (None, Some(theirs)) => Return::Refused(format!(
                "its trainer's result of op {last} of stream {stream} combines {:?}, the group's \
                 {theirs:?}: this member completed a version the others re-ran without it",
                claim.last
            )),
            (None, None) => Return::Refused(format!(
                "no member still holds every result of stream {stream} from op {last} to op \
                 {latest}"
            )),
        }
    }

    /// The plan for every op some member parked. Call once complete. A
    /// member that returns on the op's stream runs a re-run with the others
    /// (its trainer submits it once it has caught up), and receives a kept
    /// result broadcast to parkers if its trainer misses it.
    pub fn plans(&self) -> BTreeMap<OpId, Plan> {
        // Each claim decided once, here as in `returns`.
        let returns = self.returns();
        let returned: Vec<(MemberId, u32, u64)> = self
            .reports
            .values()
            .flat_map(|r| r.returning.iter().map(move |c| (r.member, c)))
            .filter(|(m, c)| {
                matches!(returns.get(&(*m, c.stream)), Some(Return::CatchUp { .. }))
                    && self.ring.contains(m)
            })
            .map(|(m, c)| (m, c.stream, c.next))
            .collect();
        let returners = |op: OpId| {
            returned
                .iter()
                .filter(move |&&(_, s, next)| s == op.stream() && op.seq() >= next)
                .map(|&(m, _, _)| m)
        };
        // Back in lockstep in an earlier epoch, a member runs every op its
        // catch-up did not cover, though a member that parked the op before
        // it was back ran it without it (the node leaves out a member that
        // is waiting for a state again; found by the cluster simulator).
        let back = self.returned();
        let back_on = |op: OpId| {
            back.iter()
                .filter(move |&&(s, m, _)| s == op.stream() && self.ring.contains(&m))
                .map(|&(_, m, _)| m)
        };
        let ring: BTreeSet<MemberId> = self.ring.iter().copied().collect();
        let mut parked: BTreeMap<OpId, (BTreeSet<MemberId>, BTreeSet<MemberId>)> = BTreeMap::new();
        for r in self.reports.values() {
            for (op, members) in &r.parked {
                let e = parked
                    .entry(*op)
                    .or_insert_with(|| (BTreeSet::new(), members.iter().copied().collect()));
                e.0.insert(r.member);
                // Parked in different epochs by different members: only the
                // members in every one of those rings can all run it.
                let theirs: BTreeSet<MemberId> = members.iter().copied().collect();
                e.1 = e.1.intersection(&theirs).copied().collect();
            }
        }
        let mut plans = BTreeMap::new();
        for (op, (parkers, old_ring)) in parked {
            let holders: Vec<(MemberId, &KeptResult)> = self
                .reports
                .values()
                .filter_map(|r| {
                    r.completed
                        .iter()
                        .find(|k| k.op == op)
                        .map(|k| (r.member, k))
                })
                .collect();
            let plan = match holders.first() {
                Some(&(holder, kept)) => Plan::FromResult {
                    holder,
                    members: parkers
                        .iter()
                        .copied()
                        .chain(holders.iter().map(|(m, _)| *m))
                        .chain(returners(op))
                        .filter(|m| ring.contains(m))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                    contributors: kept.contributors.clone(),
                    waiting: kept.waiting.clone(),
                },
                None => match self.later_op_of_stream(op) {
                    Some(later) => Plan::Superseded { later },
                    None => Plan::Rerun {
                        members: old_ring
                            .intersection(&ring)
                            .copied()
                            .chain(returners(op))
                            .chain(back_on(op))
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect(),
                    },
                },
            };
            plans.insert(op, plan);
        }
        // The results returning members missed that nobody parked: each is
        // broadcast once, from its lowest holder to every member that
        // misses it (one op may not run twice at a member).
        for ret in returns.into_values() {
            let Return::CatchUp { results, .. } = ret else {
                continue;
            };
            for r in results {
                if plans.contains_key(&r.op) {
                    continue;
                }
                let Some((holder, kept)) = self.lowest_holder(r.op) else {
                    continue;
                };
                let members = std::iter::once(holder)
                    .chain(returners(r.op))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let plan = Plan::FromResult {
                    holder,
                    members,
                    contributors: kept.contributors.clone(),
                    waiting: kept.waiting.clone(),
                };
                plans.insert(r.op, plan);
            }
        }
        plans
    }

    /// The lowest member of the ring, not returning, that holds `op`'s
    /// result.
    fn lowest_holder(&self, op: OpId) -> Option<(MemberId, &KeptResult)> {
        self.reports
            .values()
            .filter(|r| r.returning.is_empty() && self.ring.contains(&r.member))
            .find_map(|r| {
                r.completed
                    .iter()
                    .find(|k| k.op == op)
                    .map(|k| (r.member, k))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(v: &[u32]) -> Vec<MemberId> {
        v.iter().map(|&i| MemberId(i)).collect()
    }

    fn report(member: u32, parked: &[u64], completed: &[u64]) -> RecoveryReport {
        RecoveryReport {
            epoch: Epoch(2),
            member: MemberId(member),
            parked: parked
                .iter()
                .map(|&o| (OpId(o), m(&[0, 1, 2, 3])))
                .collect(),
            completed: completed
                .iter()
                .map(|&o| KeptResult {
                    op: OpId(o),
                    contributors: m(&[0, 1, 2, 3]),
                    waiting: vec![],
                    dtype: DType::F32,
                    len: 4,
                })
                .collect(),
            synced: vec![],
            returned: vec![],
            returning: vec![],
        }
    }

    #[test]
    fn an_op_nobody_completed_is_rerun_by_the_survivors_of_its_ring() {
        let mut r = Recovery::new(Epoch(2), m(&[0, 1, 3]));
        r.add(report(0, &[7], &[6])).unwrap();
        assert!(!r.is_complete());
        assert_eq!(r.missing(), m(&[1, 3]));
        r.add(report(1, &[7], &[6])).unwrap();
        // Member 3's trainer has not submitted op 7 yet: it still runs it.
        r.add(report(3, &[], &[6])).unwrap();
        assert!(r.is_complete());
        let plans = r.plans();
        assert_eq!(plans.len(), 1);
        assert_eq!(
            plans[&OpId(7)],
            Plan::Rerun {
                members: m(&[0, 1, 3])
            }
        );
    }

    #[test]
    fn an_op_a_survivor_completed_keeps_that_result() {
        let mut r = Recovery::new(Epoch(2), m(&[0, 1, 3]));
        r.add(report(0, &[7], &[6])).unwrap();
        r.add(report(1, &[], &[7])).unwrap();
        r.add(report(3, &[], &[7])).unwrap();
        assert_eq!(
            r.plans()[&OpId(7)],
            Plan::FromResult {
                holder: MemberId(1),
                members: m(&[0, 1, 3]),
                contributors: m(&[0, 1, 2, 3]),
                waiting: vec![],
            }
        );
    }

    #[test]
    fn the_state_checksum_sees_every_byte_and_the_length() {
        let a = vec![7u8; 1003];
        let base = state_checksum(&a);
        for i in [0, 7, 8, 999, 1002] {
            let mut b = a.clone();
            b[i] ^= 1;
            assert_ne!(state_checksum(&b), base, "byte {i}");
        }
        assert_ne!(state_checksum(&a[..1002]), base);
        assert_eq!(state_checksum(&a.clone()), base);
    }

    #[test]
    fn an_op_the_group_went_past_is_superseded() {
        let mut r = Recovery::new(Epoch(2), m(&[0, 1]));
        r.add(report(0, &[], &[9])).unwrap();
        r.add(report(1, &[7], &[6])).unwrap();
        assert_eq!(r.plans()[&OpId(7)], Plan::Superseded { later: OpId(9) });
    }

    #[test]
    fn reports_for_other_epochs_or_outsiders_are_refused() {
        let mut r = Recovery::new(Epoch(2), m(&[0, 1]));
        let mut old = report(0, &[], &[]);
        old.epoch = Epoch(1);
        assert!(r.add(old).is_err());
        assert!(r.add(report(2, &[], &[])).is_err());
        assert!(r.plans().is_empty());
    }

    #[test]
    fn a_newly_admitted_member_is_not_part_of_a_rerun() {
        let mut r = Recovery::new(Epoch(3), m(&[0, 1, 2, 3, 4]));
        for i in 0..4 {
            let mut rep = report(i, &[9], &[]);
            rep.epoch = Epoch(3);
            r.add(rep).unwrap();
        }
        let mut new = report(4, &[], &[]);
        new.epoch = Epoch(3);
        r.add(new).unwrap();
        assert_eq!(
            r.plans()[&OpId(9)],
            Plan::Rerun {
                members: m(&[0, 1, 2, 3])
            }
        );
    }

    fn returning(member: u32, next: u64, last: &[u32]) -> RecoveryReport {
        let mut r = report(member, &[], &[]);
        r.returning = vec![ReturnClaim {
            stream: 0,
            next,
            last: m(last),
        }];
        r
    }

    #[test]
    fn a_returning_member_gets_every_result_it_missed_from_the_lowest_holder_of_all() {
        let mut r = Recovery::new(Epoch(2), m(&[0, 1, 2, 3]));
        // Member 0 no longer holds op 5; member 1 holds 5 to 8; member 3
        // parked op 9, which nobody completed.
        r.add(report(0, &[], &[6, 7, 8])).unwrap();
        let mut one = report(1, &[], &[5, 6, 7, 8]);
        one.synced = vec![(0, Epoch(1))];
        r.add(one).unwrap();
        r.add(returning(2, 6, &[0, 1, 2, 3])).unwrap();
        // (It ran in the epoch without member 2.)
        let mut three = report(3, &[9], &[5, 6, 7, 8]);
        three.parked[0].1 = m(&[0, 1, 3]);
        r.add(three).unwrap();
        let returns = r.returns();
        let Return::CatchUp {
            holder,
            results,
            synced,
            ..
        } = &returns[&(MemberId(2), 0)]
        else {
            panic!("refused: {returns:?}");
        };
        assert_eq!(*holder, MemberId(1));
        assert_eq!(
            results.iter().map(|k| k.op).collect::<Vec<_>>(),
            [6, 7, 8].map(OpId)
        );
        assert_eq!(*synced, Some(Epoch(1)));
        // The op in flight runs with the returning member too.
        assert_eq!(
            r.plans()[&OpId(9)],
            Plan::Rerun {
                members: m(&[0, 1, 2, 3])
            }
        );
    }

    #[test]
    fn a_return_is_refused_when_a_missed_result_is_gone_or_its_last_one_is_not_the_groups() {
        let mut gone = Recovery::new(Epoch(2), m(&[0, 1, 2]));
        gone.add(report(0, &[], &[5, 7, 8])).unwrap();
        gone.add(report(1, &[], &[8])).unwrap();
        gone.add(returning(2, 6, &[0, 1, 2, 3])).unwrap();
        assert!(matches!(
            &gone.returns()[&(MemberId(2), 0)],
            Return::Refused(why) if why.starts_with("no member still holds every result")
        ));
        // Its trainer got op 5 combining member 2's input; the others re-ran
        // it without member 2.
        let mut other = Recovery::new(Epoch(2), m(&[0, 1, 2]));
        other.add(report(0, &[], &[5, 6])).unwrap();
        other.add(report(1, &[], &[5, 6])).unwrap();
        other.add(returning(2, 6, &[0, 1, 2])).unwrap();
        assert!(matches!(
            &other.returns()[&(MemberId(2), 0)],
            Return::Refused(why) if why.ends_with("a version the others re-ran without it")
        ));
        // Nobody completed op 5 yet: refused too.
        let mut behind = Recovery::new(Epoch(2), m(&[0, 1, 2]));
        for i in 0..2 {
            let mut rep = report(i, &[5], &[4]);
            rep.parked[0].1 = m(&[0, 1]);
            behind.add(rep).unwrap();
        }
        behind.add(returning(2, 6, &[0, 1, 2, 3])).unwrap();
        assert!(matches!(
            behind.returns()[&(MemberId(2), 0)],
            Return::Refused(_)
        ));
        // Refused, it runs no re-run with the others.
        assert_eq!(
            behind.plans()[&OpId(5)],
            Plan::Rerun {
                members: m(&[0, 1])
            }
        );
    }

    #[test]
    fn a_returning_member_at_the_groups_frontier_misses_nothing() {
        let mut r = Recovery::new(Epoch(2), m(&[0, 1, 2]));
        for i in 0..2 {
            let mut rep = report(i, &[6], &[5]);
            rep.parked[0].1 = m(&[0, 1]);
            r.add(rep).unwrap();
        }
        r.add(returning(2, 6, &[0, 1, 2, 3])).unwrap();
        assert_eq!(
            r.returns()[&(MemberId(2), 0)],
            Return::CatchUp {
                holder: MemberId(0),
                results: vec![],
                synced: None,
            }
        );
        assert_eq!(
            r.plans()[&OpId(6)],
            Plan::Rerun {
                members: m(&[0, 1, 2])
            }
        );
    }

    #[test]
    fn a_returning_member_receives_a_kept_result_broadcast_to_a_parker() {
        let mut r = Recovery::new(Epoch(2), m(&[0, 1, 2]));
        r.add(report(0, &[7], &[6])).unwrap();
        r.add(report(1, &[], &[6, 7])).unwrap();
        r.add(returning(2, 7, &[0, 1, 2, 3])).unwrap();
        assert!(matches!(
            &r.returns()[&(MemberId(2), 0)],
            Return::CatchUp { holder, results, .. }
                if *holder == MemberId(1) && results.len() == 1
        ));
        assert_eq!(
            r.plans()[&OpId(7)],
            Plan::FromResult {
                holder: MemberId(1),
                members: m(&[0, 1, 2]),
                contributors: m(&[0, 1, 2, 3]),
                waiting: vec![],
            }
        );
    }

    #[test]
    fn a_member_back_in_lockstep_earlier_runs_a_rerun_parked_before_it_was_back() {
        let mut r = Recovery::new(Epoch(5), m(&[0, 1, 2]));
        for i in 0..3 {
            let mut rep = report(i, &[9], &[8]);
            rep.epoch = Epoch(5);
            // Member 1 parked op 9 while member 2 was out; member 0 reports
            // member 2 back since its admission in epoch 4.
            rep.parked[0].1 = if i == 1 { m(&[0, 1]) } else { m(&[0, 1, 2]) };
            if i == 0 {
                rep.returned = vec![(0, MemberId(2), Epoch(4))];
            }
            r.add(rep).unwrap();
        }
        assert_eq!(
            r.returned().into_iter().collect::<Vec<_>>(),
            [(0, MemberId(2), Epoch(4))]
        );
        assert_eq!(
            r.plans()[&OpId(9)],
            Plan::Rerun {
                members: m(&[0, 1, 2])
            }
        );
    }
}
