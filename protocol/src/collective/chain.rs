//! Pipelined chain broadcast: the root streams pieces to the next member,
//! which forwards each piece as soon as it has it. For a large tensor every
//! link carries it once and the time approaches one transfer plus n-1 pieces.
//!
//! The transfer from chain position `p` to `p+1` happens in round `p`, so the
//! sender and the receiver agree on round numbers.

use super::schedule::{Apply, Plan, RoundPlan, Transfer};

/// Broadcast of a `len`-element buffer from member index `root`.
pub fn broadcast(len: usize, n: usize, me: usize, root: usize) -> Plan {
    let mut rounds = vec![RoundPlan::default(); n.saturating_sub(1)];
    let pos = (me + n - root) % n;
    if pos > 0 {
        rounds[pos - 1].recv = Some((
            Transfer {
                peer: (me + n - 1) % n,
                range: 0..len,
            },
            Apply::Copy,
        ));
    }
    if pos + 1 < n {
        rounds[pos].send = Some(Transfer {
            peer: (me + 1) % n,
            range: 0..len,
        });
    }
    Plan {
        rounds,
        max_range_len: len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_visits_every_member_once() {
        for n in 1..=8 {
            for root in 0..n {
                let plans: Vec<Plan> = (0..n).map(|i| broadcast(4, n, i, root)).collect();
                let receivers = plans
                    .iter()
                    .filter(|p| p.rounds.iter().any(|r| r.recv.is_some()))
                    .count();
                assert_eq!(receivers, n - 1);
                assert!(plans[root].rounds.iter().all(|r| r.recv.is_none()));
                for (i, p) in plans.iter().enumerate() {
                    for (r, round) in p.rounds.iter().enumerate() {
                        if let Some(send) = &round.send {
                            let (recv, _) = plans[send.peer].rounds[r].recv.as_ref().unwrap();
                            assert_eq!(recv.peer, i);
                        }
                    }
                }
            }
        }
    }
}
