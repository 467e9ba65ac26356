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
//! Completing op `n+1` of a stream needs every member's input to it, so every
//! member had finished op `n`: the last completed op per stream is the only
//! one another member can still be waiting for (broadcast, which needs only
//! its root's input, is the exception; see [`Plan`]).

use std::collections::{BTreeMap, BTreeSet};

use bincode::{Decode, Encode};

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

    /// The plan for every op some member parked. Call once complete.
    pub fn plans(&self) -> BTreeMap<OpId, Plan> {
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
                        members: old_ring.intersection(&ring).copied().collect(),
                    },
                },
            };
            plans.insert(op, plan);
        }
        plans
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
                })
                .collect(),
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
}
