//! The progress signal: heartbeats say a member's daemon is alive; progress
//! reports say how far its trainers got. A member whose daemon answers but
//! whose trainer has not issued an op the others have waited on for
//! `stuck_after` is stuck (a hung trainer, a deadlocked step) and is
//! suspected like a silent one, with its own reason.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::{MemberId, OpId, Time};

/// Why a member is suspected of being stuck.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stuck {
    /// The member.
    pub member: MemberId,
    /// The op the others wait for.
    pub op: OpId,
    /// The last op of that stream its trainer issued (0: none).
    pub last_issued: u64,
    /// How long this daemon has waited.
    pub waited: Duration,
}

impl fmt::Display for Stuck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no progress: its trainer has not issued {} (stream {} is at op {}) after {} ms",
            self.op,
            self.op.stream(),
            self.last_issued,
            self.waited.as_millis()
        )
    }
}

/// Members of `waiting_ops` (op, its members, when this daemon started it)
/// whose latest progress report (`issued`: per member, per stream, the last
/// op seq its trainer issued) is behind an op waited on for `stuck_after` at
/// `now`. A member with no report is not judged (heartbeats cover it).
pub fn judge_progress(
    waiting_ops: &[(OpId, Vec<MemberId>, Time)],
    issued: &BTreeMap<MemberId, BTreeMap<u32, u64>>,
    stuck_after: Duration,
    now: Time,
) -> Vec<Stuck> {
    let mut out: Vec<Stuck> = Vec::new();
    for (op, members, started) in waiting_ops {
        let waited = now.since(*started);
        if waited < stuck_after {
            continue;
        }
        let (stream, seq) = (op.stream(), op.seq());
        for m in members {
            let Some(report) = issued.get(m) else {
                continue;
            };
            let last = report.get(&stream).copied().unwrap_or(0);
            if last < seq && !out.iter().any(|s| s.member == *m) {
                out.push(Stuck {
                    member: *m,
                    op: *op,
                    last_issued: last,
                    waited,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(stream: u64, seq: u64) -> OpId {
        OpId::new(stream as u32, seq)
    }

    #[test]
    fn a_member_whose_trainer_is_behind_an_op_waited_on_too_long_is_stuck() {
        let m = |i| MemberId(i);
        let ops = vec![(op(0, 7), vec![m(1), m(2), m(3)], Time(0))];
        let mut issued = BTreeMap::new();
        issued.insert(m(1), BTreeMap::from([(0, 7)]));
        issued.insert(m(2), BTreeMap::from([(0, 6)]));
        // m3 never reported: heartbeats judge it, not this.
        let early = judge_progress(&ops, &issued, Duration::from_secs(2), Time(1_000_000));
        assert!(early.is_empty(), "not waited long enough yet");
        let late = judge_progress(&ops, &issued, Duration::from_secs(2), Time(2_500_000));
        assert_eq!(late.len(), 1);
        assert_eq!(late[0].member, m(2));
        assert_eq!(late[0].last_issued, 6);
        assert!(
            late[0].to_string().contains("has not issued"),
            "{}",
            late[0]
        );
    }

    #[test]
    fn other_streams_do_not_count() {
        let m = |i| MemberId(i);
        let ops = vec![(op(3, 2), vec![m(1), m(2)], Time(0))];
        let issued = BTreeMap::from([(m(2), BTreeMap::from([(0, 100), (3, 2)]))]);
        assert!(judge_progress(&ops, &issued, Duration::from_secs(1), Time(5_000_000)).is_empty());
    }
}
