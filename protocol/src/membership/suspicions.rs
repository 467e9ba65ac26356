//! The suspicions a daemon raised, turned into removal proposals until they
//! take effect: a proposal is lost while there is no leader (or to a leader
//! change), so each is proposed again after `retry` as long as the member is
//! still in the ring. Only a member of the ring may remove others (a daemon
//! back from a pause must not evict a healthy one).

use std::collections::BTreeMap;
use std::time::Duration;

use super::group::{Command, GroupState};
use crate::{MemberId, Time};

#[derive(Clone, Debug)]
struct Suspicion {
    reason: String,
    /// The last proposal.
    last: Option<Time>,
    /// The first proposal Raft accepted (for the commit latency).
    first: Option<Time>,
}

/// The suspicions not yet taken effect.
#[derive(Clone, Debug)]
pub struct Suspicions {
    retry: Duration,
    open: BTreeMap<MemberId, Suspicion>,
}

impl Suspicions {
    /// Proposals retried every `retry`.
    pub fn new(retry: Duration) -> Suspicions {
        Suspicions {
            retry,
            open: BTreeMap::new(),
        }
    }

    /// `member` is suspected for `reason` (a repeated suspicion keeps the
    /// first reason).
    pub fn raise(&mut self, member: MemberId, reason: String) {
        self.open.entry(member).or_insert(Suspicion {
            reason,
            last: None,
            first: None,
        });
    }

    /// `member` is no longer suspected (heard from again, or readmitted).
    pub fn clear(&mut self, member: MemberId) {
        self.open.remove(&member);
    }

    /// Forgets every suspicion: this daemon rejoined the ring, and what it
    /// suspected while it was out is stale (the ring it rejoins is the
    /// majority's).
    pub fn clear_all(&mut self) {
        self.open.clear();
    }

    /// Whether `member` is suspected.
    pub fn contains(&self, member: MemberId) -> bool {
        self.open.contains_key(&member)
    }

    /// The removals to propose at `now`, as `me` (nothing while `me` is out
    /// of the ring; members already out are forgotten).
    pub fn due(&mut self, group: &GroupState, me: MemberId, now: Time) -> Vec<Command> {
        self.open.retain(|m, _| group.is_active(*m));
        if !group.is_active(me) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (&member, s) in self.open.iter_mut() {
            if s.last.is_some_and(|t| now.since(t) < self.retry) {
                continue;
            }
            s.last = Some(now);
            out.push(Command::Remove {
                member,
                by: me,
                epoch: group.epoch,
                reason: s.reason.clone(),
            });
        }
        out
    }

    /// Raft accepted a proposal to remove `member` at `now`.
    pub fn accepted(&mut self, member: MemberId, now: Time) {
        if let Some(s) = self.open.get_mut(&member) {
            s.first.get_or_insert(now);
        }
    }

    /// `member` was removed at `now`: the suspicion took effect (a later
    /// life of the member starts with a clean slate). Returns how long its
    /// removal took from the first accepted proposal, if this daemon made one.
    pub fn took_effect(&mut self, member: MemberId, now: Time) -> Option<Duration> {
        let first = self.open.remove(&member)?.first?;
        Some(now.since(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(active: &[u32], removed: &[u32]) -> GroupState {
        let mut g = GroupState::bootstrap(
            active
                .iter()
                .chain(removed)
                .map(|&i| (MemberId(i), format!("node{i}"), String::new())),
        );
        for &r in removed {
            g.members.get_mut(&MemberId(r)).unwrap().status = super::super::Status::Removed;
        }
        g
    }

    fn ms(v: u64) -> Time {
        Time(v * 1000)
    }

    #[test]
    fn a_suspicion_is_proposed_again_until_it_takes_effect() {
        let mut s = Suspicions::new(Duration::from_millis(300));
        let g = group(&[1, 2, 3], &[]);
        s.raise(MemberId(3), "silent".into());
        s.raise(MemberId(3), "stuck".into());
        let first = s.due(&g, MemberId(1), ms(0));
        assert_eq!(
            first,
            vec![Command::Remove {
                member: MemberId(3),
                by: MemberId(1),
                epoch: g.epoch,
                reason: "silent".into()
            }]
        );
        s.accepted(MemberId(3), ms(0));
        assert!(
            s.due(&g, MemberId(1), ms(299)).is_empty(),
            "not before the retry"
        );
        assert_eq!(s.due(&g, MemberId(1), ms(300)).len(), 1);
        assert_eq!(
            s.took_effect(MemberId(3), ms(420)),
            Some(Duration::from_millis(420))
        );
        assert!(!s.contains(MemberId(3)));
        assert!(s.due(&g, MemberId(1), ms(1000)).is_empty());
    }

    #[test]
    fn only_a_ring_member_proposes_and_members_already_out_are_forgotten() {
        let mut s = Suspicions::new(Duration::from_millis(300));
        s.raise(MemberId(2), "silent".into());
        s.raise(MemberId(3), "silent".into());
        assert!(s.due(&group(&[2, 3], &[1]), MemberId(1), ms(0)).is_empty());
        assert!(s.contains(MemberId(2)), "kept while this daemon is out");
        let g = group(&[1, 2], &[3]);
        let due = s.due(&g, MemberId(1), ms(10));
        assert_eq!(due.len(), 1);
        assert!(!s.contains(MemberId(3)), "already out of the ring");
        s.clear(MemberId(2));
        assert!(s.due(&g, MemberId(1), ms(1000)).is_empty());
    }
}
