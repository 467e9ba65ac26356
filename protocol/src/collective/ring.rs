//! Ring algorithms: reduce-scatter, all-gather, and all-reduce as the two in
//! sequence (bandwidth-optimal: each member sends 2(n-1)/n of the tensor).
//!
//! Member `i` sends to `i+1` and receives from `i-1` (indices in the op's
//! member list, modulo n). In reduce-scatter round `r`, member `i` sends
//! segment `i-r-1` and reduces the incoming segment `i-r-2`, so after n-1
//! rounds it holds the full reduction of its own segment `i`. In all-gather
//! round `r` it sends segment `i-r` and copies the incoming segment `i-r-1`.
//! In both phases the segment received in round `r` is the one sent in round
//! `r+1`, which is what lets pieces stream through the ring.

use super::schedule::{ring_back, segment, Apply, Plan, RoundPlan, Transfer};

fn reduce_scatter_rounds(len: usize, n: usize, me: usize) -> Vec<RoundPlan> {
    let next = (me + 1) % n;
    let prev = ring_back(me, 1, n);
    (0..n.saturating_sub(1))
        .map(|r| RoundPlan {
            send: Some(Transfer {
                peer: next,
                range: segment(len, n, ring_back(me, r + 1, n)),
            }),
            recv: Some((
                Transfer {
                    peer: prev,
                    range: segment(len, n, ring_back(me, r + 2, n)),
                },
                Apply::Reduce,
            )),
        })
        .collect()
}

fn all_gather_rounds(
    n: usize,
    me: usize,
    block: impl Fn(usize) -> std::ops::Range<usize>,
) -> Vec<RoundPlan> {
    let next = (me + 1) % n;
    let prev = ring_back(me, 1, n);
    (0..n.saturating_sub(1))
        .map(|r| RoundPlan {
            send: Some(Transfer {
                peer: next,
                range: block(ring_back(me, r, n)),
            }),
            recv: Some((
                Transfer {
                    peer: prev,
                    range: block(ring_back(me, r + 1, n)),
                },
                Apply::Copy,
            )),
        })
        .collect()
}

/// Ring reduce-scatter of a `len`-element buffer: member `me` ends holding the
/// reduction of `segment(len, n, me)`.
pub fn reduce_scatter(len: usize, n: usize, me: usize) -> Plan {
    Plan {
        rounds: reduce_scatter_rounds(len, n, me),
        max_range_len: len.div_ceil(n),
    }
}

/// Ring all-gather over a buffer of `n` blocks of `block_len` elements; member
/// `me` contributes block `me`.
pub fn all_gather(block_len: usize, n: usize, me: usize) -> Plan {
    Plan {
        rounds: all_gather_rounds(n, me, |b| b * block_len..(b + 1) * block_len),
        max_range_len: block_len,
    }
}

/// Ring all-reduce: reduce-scatter, then all-gather of the reduced segments.
pub fn all_reduce(len: usize, n: usize, me: usize) -> Plan {
    let mut rounds = reduce_scatter_rounds(len, n, me);
    rounds.extend(all_gather_rounds(n, me, |s| segment(len, n, s)));
    Plan {
        rounds,
        max_range_len: len.div_ceil(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// For every round, what member i sends is exactly what member i+1
    /// expects, and in each phase the range received in round r is the one
    /// sent in round r+1 (the property that makes pipelining correct).
    #[test]
    fn sends_match_receives_and_chain() {
        for n in 1..=9 {
            for len in [0usize, 1, 5, 17, 64] {
                let plans: Vec<Plan> = (0..n).map(|i| all_reduce(len, n, i)).collect();
                for (i, p) in plans.iter().enumerate() {
                    assert_eq!(p.rounds.len(), 2 * (n - 1));
                    for (r, round) in p.rounds.iter().enumerate() {
                        let send = round.send.as_ref().unwrap();
                        let (recv, _) = plans[send.peer].rounds[r].recv.as_ref().unwrap();
                        assert_eq!(recv.peer, i);
                        assert_eq!(recv.range, send.range);
                        if r + 1 < p.rounds.len() {
                            let next_send = p.rounds[r + 1].send.as_ref().unwrap();
                            assert_eq!(round.recv.as_ref().unwrap().0.range, next_send.range);
                        }
                    }
                }
            }
        }
    }
}
