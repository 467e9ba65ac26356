//! The replicated group state: who the members are, which epoch is current and
//! which ring it runs. Raft commits [`Command`]s; every daemon applies them in
//! log order with [`GroupState::apply`], a pure function, so all daemons hold
//! the same state at the same log index.
//!
//! Commands carry the epoch they were decided in and are ignored when that
//! epoch is gone: two daemons suspecting the same member at once propose two
//! removals, and only the first committed one changes anything.

use std::collections::BTreeMap;
use std::fmt;

use bincode::{Decode, Encode};

use crate::checkpoint::{Catalog, CatalogChange, Report};
use crate::stragglers::QuorumPolicy;
use crate::{Epoch, Incarnation, MemberId};

/// A member's standing in the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Status {
    /// In the ring of the current epoch.
    Active,
    /// Out of the ring (crashed, hung, cut off, or left); may be readmitted.
    Removed,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Active => "active",
            Status::Removed => "removed",
        })
    }
}

/// One member as the group knows it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct MemberRecord {
    /// The DNS name its certificate carries (peers check it on connect).
    pub name: String,
    /// Where its daemon listens.
    pub addr: String,
    /// Active or removed.
    pub status: Status,
    /// Its life: a restarted daemon comes back with a higher one, and frames
    /// or votes of an older life are fenced off.
    pub incarnation: Incarnation,
    /// Why it last changed status.
    pub reason: String,
    /// The epoch of that change.
    pub since: Epoch,
}

/// A change to the group, proposed by a daemon and committed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum Command {
    /// Take `member` out of the ring, decided while `epoch` was current.
    Remove {
        /// The member.
        member: MemberId,
        /// Who suspects it: only a member of the current ring may remove
        /// another (a stale or fenced daemon, back from a pause, must not).
        by: MemberId,
        /// The epoch the suspicion was raised in.
        epoch: Epoch,
        /// Why, for logs and `phalanxctl members`.
        reason: String,
    },
    /// Record a new node (`phalanxd --join`): it is known from now on —
    /// peers connect to it, Raft replicates to it as a learner — but stays
    /// out of the ring until its trainer joins (`Admit`). Committed as the
    /// context of the conf change that adds it as a learner, so the two
    /// happen at one log index.
    Enroll {
        /// The member.
        member: MemberId,
        /// Its certificate's name.
        name: String,
        /// Its address.
        addr: String,
    },
    /// Put a removed `member` back in the ring in life `incarnation` (or
    /// record the first life of a bootstrap member, or start a new epoch
    /// for an active member that restarted in a newer life).
    Admit {
        /// The member.
        member: MemberId,
        /// Its current life; must not be older than the recorded one.
        incarnation: Incarnation,
        /// Its address.
        addr: String,
    },
    /// Close steps by `policy` from the next epoch on (`phalanxctl
    /// policy`). A new epoch, so every member switches at the same op
    /// boundary: ops in flight are finished by the recovery exchange.
    SetPolicy {
        /// The rule.
        policy: QuorumPolicy,
    },
    /// Start a new epoch with the same ring, asked for in `epoch` by ring
    /// member `by`: a connection between two live members was lost while
    /// ops ran over it, with what was in flight on it, and only an epoch
    /// change makes every member finish those ops again (the recovery
    /// exchange). Stale once any newer epoch is committed.
    Renew {
        /// Who asks.
        by: MemberId,
        /// The epoch the loss happened in.
        epoch: Epoch,
        /// Why, for logs.
        reason: String,
    },
    /// A holder's copy of a checkpoint is durable: counted towards its
    /// commit (see [`Catalog::apply`]). No new epoch.
    Checkpointed(Report),
}

/// What applying a command changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A new epoch is current, with this ring.
    NewEpoch {
        /// The epoch.
        epoch: Epoch,
        /// Its ring, ascending member ids.
        ring: Vec<MemberId>,
        /// Members that left the ring, and members that joined it.
        change: Change,
    },
    /// A member of the bootstrap roster recorded its first life; the ring
    /// and epoch are unchanged (no op can have run in the placeholder life).
    LifeRecorded {
        /// The member.
        member: MemberId,
        /// Its life.
        incarnation: Incarnation,
    },
    /// A new node is known (not in the ring yet).
    Enrolled {
        /// The member.
        member: MemberId,
    },
    /// The checkpoints changed (a report counted, a checkpoint committed).
    Checkpoint(CatalogChange),
    /// Nothing changed, and why (a stale or repeated command).
    Ignored(String),
}

/// One membership change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The member left the ring.
    Removed(MemberId, String),
    /// The member joined the ring.
    Admitted(MemberId, Incarnation),
    /// Steps close by a new rule.
    Policy(QuorumPolicy),
    /// The same ring in a new epoch, asked for by the member, and why.
    Renewed(MemberId, String),
}

/// The replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct GroupState {
    /// Every member ever admitted, by id.
    pub members: BTreeMap<MemberId, MemberRecord>,
    /// The current epoch.
    pub epoch: Epoch,
    /// How steps close (the default: synchronous).
    pub policy: QuorumPolicy,
    /// The checkpoints: committed manifests, and reports waiting for
    /// holders.
    pub checkpoints: Catalog,
}

impl GroupState {
    /// The state every daemon starts from: the configured roster (id,
    /// certificate name, address), all active, epoch 1. All daemons must be
    /// given the same roster (or it is one node's: `phalanxd --bootstrap`).
    pub fn bootstrap(roster: impl IntoIterator<Item = (MemberId, String, String)>) -> GroupState {
        GroupState {
            members: roster
                .into_iter()
                .map(|(id, name, addr)| {
                    (
                        id,
                        MemberRecord {
                            name,
                            addr,
                            status: Status::Active,
                            // A placeholder: each daemon records its first
                            // life with an `Admit` before it runs any op.
                            incarnation: Incarnation(0),
                            reason: "bootstrap".into(),
                            since: Epoch(1),
                        },
                    )
                })
                .collect(),
            epoch: Epoch(1),
            policy: QuorumPolicy::SYNC,
            checkpoints: Catalog::default(),
        }
    }

    /// The current epoch's ring: active members, ascending ids.
    pub fn ring(&self) -> Vec<MemberId> {
        self.members
            .iter()
            .filter(|(_, r)| r.status == Status::Active)
            .map(|(&id, _)| id)
            .collect()
    }

    /// Whether `member` is in the current ring.
    pub fn is_active(&self, member: MemberId) -> bool {
        self.members
            .get(&member)
            .is_some_and(|r| r.status == Status::Active)
    }

    /// Applies one committed command.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        match cmd {
            Command::Remove {
                member,
                by,
                epoch,
                reason,
            } => {
                if !self.is_active(*by) {
                    return Applied::Ignored(format!(
                        "{by}, out of the ring, cannot remove {member}"
                    ));
                }
                if *epoch != self.epoch {
                    return Applied::Ignored(format!(
                        "removal of {member} decided in {epoch}, current is {}",
                        self.epoch
                    ));
                }
                if !self.is_active(*member) {
                    return Applied::Ignored(format!("{member} is not in the ring"));
                }
                if self.ring().len() == 1 {
                    // The last member stays: an empty ring has nobody to run
                    // the next epoch's ops or readmit anyone.
                    return Applied::Ignored(format!("{member} is the last member"));
                }
                self.epoch = self.epoch.next();
                let rec = self.members.get_mut(member).expect("active");
                rec.status = Status::Removed;
                rec.reason = reason.clone();
                rec.since = self.epoch;
                Applied::NewEpoch {
                    epoch: self.epoch,
                    ring: self.ring(),
                    change: Change::Removed(*member, reason.clone()),
                }
            }
            Command::Enroll { member, name, addr } => {
                if self.members.contains_key(member) {
                    return Applied::Ignored(format!("{member} is already known"));
                }
                self.members.insert(
                    *member,
                    MemberRecord {
                        name: name.clone(),
                        addr: addr.clone(),
                        status: Status::Removed,
                        incarnation: Incarnation(0),
                        reason: "new node: enters the ring when its trainer joins".into(),
                        since: self.epoch,
                    },
                );
                Applied::Enrolled { member: *member }
            }
            Command::Admit {
                member,
                incarnation,
                addr,
            } => {
                let name = self
                    .members
                    .get(member)
                    .map(|r| r.name.clone())
                    .unwrap_or_default();
                if let Some(rec) = self.members.get_mut(member) {
                    if rec.status == Status::Active && rec.incarnation == Incarnation(0) {
                        rec.incarnation = *incarnation;
                        return Applied::LifeRecorded {
                            member: *member,
                            incarnation: *incarnation,
                        };
                    }
                    if rec.status == Status::Active && *incarnation <= rec.incarnation {
                        return Applied::Ignored(format!("{member} is already in the ring"));
                    }
                    // An active member in a newer life restarted before anyone
                    // noticed: its old life's ops are gone, so it still needs
                    // a new epoch (same ring).
                    if *incarnation < rec.incarnation {
                        return Applied::Ignored(format!(
                            "{member} asked to rejoin in life {incarnation}, but life {} was seen",
                            rec.incarnation
                        ));
                    }
                }
                self.epoch = self.epoch.next();
                self.members.insert(
                    *member,
                    MemberRecord {
                        name,
                        addr: addr.clone(),
                        status: Status::Active,
                        incarnation: *incarnation,
                        reason: "admitted".into(),
                        since: self.epoch,
                    },
                );
                Applied::NewEpoch {
                    epoch: self.epoch,
                    ring: self.ring(),
                    change: Change::Admitted(*member, *incarnation),
                }
            }
            Command::SetPolicy { policy } => {
                if let Err(why) = policy.validate() {
                    return Applied::Ignored(format!("policy {policy}: {why}"));
                }
                if *policy == self.policy {
                    return Applied::Ignored(format!("the policy is already {policy}"));
                }
                self.epoch = self.epoch.next();
                self.policy = *policy;
                Applied::NewEpoch {
                    epoch: self.epoch,
                    ring: self.ring(),
                    change: Change::Policy(*policy),
                }
            }
            Command::Checkpointed(report) => {
                let ring_len = self.ring().len();
                let members = &self.members;
                let active =
                    |m: MemberId| members.get(&m).is_some_and(|r| r.status == Status::Active);
                match self.checkpoints.apply(report, active, ring_len) {
                    Ok(change) => Applied::Checkpoint(change),
                    Err(why) => Applied::Ignored(why),
                }
            }
            Command::Renew { by, epoch, reason } => {
                if *epoch != self.epoch {
                    return Applied::Ignored(format!(
                        "a new epoch for {epoch} asked by {by}: {} is current already",
                        self.epoch
                    ));
                }
                if !self.ring().contains(by) {
                    return Applied::Ignored(format!(
                        "a new epoch asked by {by}, which is not in the ring"
                    ));
                }
                self.epoch = self.epoch.next();
                Applied::NewEpoch {
                    epoch: self.epoch,
                    ring: self.ring(),
                    change: Change::Renewed(*by, reason.clone()),
                }
            }
        }
    }

    /// Encodes for a Raft snapshot.
    pub fn encode(&self) -> Vec<u8> {
        bincode::encode_to_vec(self, bincode::config::standard()).expect("in-memory encode")
    }

    /// Decodes a Raft snapshot's data.
    pub fn decode(bytes: &[u8]) -> Result<GroupState, String> {
        decode_all(bytes)
    }
}

impl Command {
    /// Encodes as a Raft entry's data.
    pub fn encode(&self) -> Vec<u8> {
        bincode::encode_to_vec(self, bincode::config::standard()).expect("in-memory encode")
    }

    /// Decodes a Raft entry's data.
    pub fn decode(bytes: &[u8]) -> Result<Command, String> {
        decode_all(bytes)
    }
}

fn decode_all<T: Decode<()>>(bytes: &[u8]) -> Result<T, String> {
    let config = bincode::config::standard().with_limit::<{ 16 << 20 }>();
    match bincode::decode_from_slice(bytes, config) {
        Ok((v, n)) if n == bytes.len() => Ok(v),
        Ok((_, n)) => Err(format!("{} trailing bytes", bytes.len() - n)),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(n: u32) -> GroupState {
        GroupState::bootstrap((0..n).map(|i| {
            (
                MemberId(i),
                format!("node{i}"),
                format!("127.0.0.{}:1", 10 + i),
            )
        }))
    }

    fn remove(m: u32, e: u64) -> Command {
        Command::Remove {
            member: MemberId(m),
            by: MemberId(if m == 0 { 1 } else { 0 }),
            epoch: Epoch(e),
            reason: "silent".into(),
        }
    }

    #[test]
    fn a_removal_starts_a_new_epoch_without_the_member() {
        let mut g = group(4);
        let out = g.apply(&remove(2, 1));
        assert_eq!(
            out,
            Applied::NewEpoch {
                epoch: Epoch(2),
                ring: vec![MemberId(0), MemberId(1), MemberId(3)],
                change: Change::Removed(MemberId(2), "silent".into()),
            }
        );
        assert_eq!(g.members[&MemberId(2)].status, Status::Removed);
    }

    #[test]
    fn concurrent_suspicions_of_one_member_change_the_group_once() {
        let mut g = group(4);
        assert!(matches!(g.apply(&remove(2, 1)), Applied::NewEpoch { .. }));
        assert!(matches!(g.apply(&remove(2, 1)), Applied::Ignored(_)));
        // A suspicion raised in an older epoch is stale even for another member.
        assert!(matches!(g.apply(&remove(3, 1)), Applied::Ignored(_)));
        assert_eq!(g.epoch, Epoch(2));
    }

    #[test]
    fn a_member_out_of_the_ring_cannot_remove_another() {
        let mut g = group(3);
        g.apply(&remove(2, 1));
        let stale = Command::Remove {
            member: MemberId(0),
            by: MemberId(2),
            epoch: Epoch(2),
            reason: "connection lost".into(),
        };
        assert!(matches!(g.apply(&stale), Applied::Ignored(_)));
        assert_eq!(g.ring(), vec![MemberId(0), MemberId(1)]);
    }

    #[test]
    fn the_last_member_is_never_removed() {
        let mut g = group(2);
        assert!(matches!(g.apply(&remove(0, 1)), Applied::NewEpoch { .. }));
        assert!(matches!(g.apply(&remove(1, 2)), Applied::Ignored(_)));
        assert_eq!(g.ring(), vec![MemberId(1)]);
    }

    #[test]
    fn a_removed_member_is_admitted_in_a_newer_life_only() {
        let mut g = group(3);
        g.apply(&remove(1, 1));
        let admit = |inc| Command::Admit {
            member: MemberId(1),
            incarnation: Incarnation(inc),
            addr: "127.0.0.11:1".into(),
        };
        // Member 0 records its first life without a new epoch.
        assert_eq!(
            g.apply(&Command::Admit {
                member: MemberId(0),
                incarnation: Incarnation(1),
                addr: "127.0.0.10:1".into()
            }),
            Applied::LifeRecorded {
                member: MemberId(0),
                incarnation: Incarnation(1)
            }
        );
        assert_eq!(g.epoch, Epoch(2));
        assert!(matches!(g.apply(&admit(2)), Applied::NewEpoch { .. }));
        assert!(matches!(g.apply(&admit(2)), Applied::Ignored(_)));
        // Restarted while still in the ring: same ring, new epoch, new life.
        assert!(
            matches!(g.apply(&admit(3)), Applied::NewEpoch { ref ring, .. } if ring.len() == 3)
        );
        assert_eq!(g.members[&MemberId(1)].incarnation, Incarnation(3));
        g.apply(&remove(1, 4));
        assert!(matches!(g.apply(&admit(1)), Applied::Ignored(_)));
        assert_eq!(g.ring(), vec![MemberId(0), MemberId(2)]);
    }

    #[test]
    fn a_renewal_is_a_new_epoch_with_the_same_ring_once() {
        let mut g = group(3);
        let renew = |by: u32, epoch: u64| Command::Renew {
            by: MemberId(by),
            epoch: Epoch(epoch),
            reason: "the connection to m2 was lost".into(),
        };
        let ring = g.ring();
        assert_eq!(
            g.apply(&renew(1, 1)),
            Applied::NewEpoch {
                epoch: Epoch(2),
                ring: ring.clone(),
                change: Change::Renewed(MemberId(1), "the connection to m2 was lost".into()),
            }
        );
        // Both ends of the connection ask: the second is stale.
        assert!(matches!(g.apply(&renew(2, 1)), Applied::Ignored(_)));
        assert_eq!(g.epoch, Epoch(2));
        g.apply(&remove(2, 2));
        assert!(
            matches!(g.apply(&renew(2, 3)), Applied::Ignored(why) if why.contains("not in the ring")),
            "a removed member cannot renew the epoch"
        );
        assert_eq!(g.epoch, Epoch(3));
        assert_eq!(g.members[&MemberId(1)].since, Epoch(1), "nobody rejoins");
        assert_eq!(GroupState::decode(&g.encode()).unwrap(), g);
    }

    #[test]
    fn an_enrolled_node_is_known_but_out_of_the_ring_until_admitted() {
        let mut g = group(2);
        let enroll = Command::Enroll {
            member: MemberId(7),
            name: "node7".into(),
            addr: "127.0.0.17:1".into(),
        };
        assert_eq!(
            g.apply(&enroll),
            Applied::Enrolled {
                member: MemberId(7)
            }
        );
        assert_eq!(g.epoch, Epoch(1), "knowing a node is no new epoch");
        assert_eq!(g.ring(), vec![MemberId(0), MemberId(1)]);
        assert_eq!(g.members[&MemberId(7)].status, Status::Removed);
        assert!(matches!(g.apply(&enroll), Applied::Ignored(_)));
        // Its trainer joins: admitted in its first life, its name kept.
        let admitted = g.apply(&Command::Admit {
            member: MemberId(7),
            incarnation: Incarnation(1),
            addr: "127.0.0.17:1".into(),
        });
        assert!(
            matches!(admitted, Applied::NewEpoch { ref ring, .. } if ring.len() == 3),
            "{admitted:?}"
        );
        assert_eq!(g.members[&MemberId(7)].name, "node7");
        // A known member cannot be enrolled again under another name.
        assert!(matches!(
            g.apply(&Command::Enroll {
                member: MemberId(0),
                name: "impostor".into(),
                addr: "127.0.0.99:1".into(),
            }),
            Applied::Ignored(_)
        ));
        assert_eq!(g.members[&MemberId(0)].name, "node0");
    }

    #[test]
    fn a_policy_change_is_a_new_epoch_with_the_same_ring() {
        let mut g = group(3);
        let policy: QuorumPolicy = "backup=1".parse().unwrap();
        let applied = g.apply(&Command::SetPolicy { policy });
        assert_eq!(
            applied,
            Applied::NewEpoch {
                epoch: Epoch(2),
                ring: g.ring(),
                change: Change::Policy(policy),
            }
        );
        assert_eq!(g.policy, policy);
        assert!(matches!(
            g.apply(&Command::SetPolicy { policy }),
            Applied::Ignored(_)
        ));
        let bad = QuorumPolicy {
            deadline: Some(crate::stragglers::DeadlinePolicy {
                quantile_permille: 0,
                floor_ms: 1,
                ceiling_ms: 2,
            }),
            ..QuorumPolicy::SYNC
        };
        assert!(matches!(
            g.apply(&Command::SetPolicy { policy: bad }),
            Applied::Ignored(_)
        ));
        assert_eq!(g.epoch, Epoch(2));
        assert_eq!(GroupState::decode(&g.encode()).unwrap(), g);
    }

    #[test]
    fn state_and_commands_round_trip() {
        let mut g = group(3);
        g.apply(&remove(1, 1));
        assert_eq!(GroupState::decode(&g.encode()).unwrap(), g);
        let c = remove(2, 7);
        assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        assert!(Command::decode(&[0xff, 0xff]).is_err());
        let mut bytes = c.encode();
        bytes.push(0);
        assert!(Command::decode(&bytes).is_err());
    }
}
