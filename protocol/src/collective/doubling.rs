//! Recursive doubling all-reduce: latency-optimal for small tensors
//! (ceil(log2 n) exchange rounds of the whole tensor instead of 2(n-1) rounds
//! of slivers).
//!
//! For n not a power of two, with p the largest power of two below n and
//! `rem = n - p`: in round 0 each even member below `2*rem` folds its tensor
//! into its odd neighbour and sits out; the p remaining members exchange and
//! reduce with partner `vrank ^ 2^s` in rounds 1..=log2(p); in the last round
//! the odd members hand the result back to their even neighbour. Fold and
//! unfold rounds are always present (empty when `rem == 0`) so every member
//! numbers rounds the same way.
//!
//! Partners compute `a + b` and `b + a`, which the engines make bit-identical
//! (sum is commutative in IEEE 754; min and max are defined symmetrically), so
//! every member ends with the same bits.

use super::schedule::{Apply, Plan, RoundPlan, Transfer};

/// Recursive doubling over the whole `len`-element buffer.
pub fn all_reduce(len: usize, n: usize, me: usize) -> Plan {
    let whole = 0..len;
    let to = |peer: usize| Transfer {
        peer,
        range: whole.clone(),
    };
    if n <= 1 {
        return Plan {
            rounds: Vec::new(),
            max_range_len: len,
        };
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let rem = n - p;
    let steps = p.trailing_zeros() as usize;
    let mut rounds = vec![RoundPlan::default(); steps + 2];
    let last = steps + 1;
    let real = |vrank: usize| {
        if vrank < rem {
            2 * vrank + 1
        } else {
            vrank + rem
        }
    };

    if me < 2 * rem && me.is_multiple_of(2) {
        rounds[0].send = Some(to(me + 1));
        rounds[last].recv = Some((to(me + 1), Apply::Copy));
    } else {
        let vrank = if me < 2 * rem { me / 2 } else { me - rem };
        if me < 2 * rem {
            rounds[0].recv = Some((to(me - 1), Apply::Reduce));
            rounds[last].send = Some(to(me - 1));
        }
        for s in 0..steps {
            let partner = real(vrank ^ (1 << s));
            rounds[1 + s].send = Some(to(partner));
            rounds[1 + s].recv = Some((to(partner), Apply::Reduce));
        }
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
    fn every_send_has_a_matching_receive() {
        for n in 1..=17 {
            let plans: Vec<Plan> = (0..n).map(|i| all_reduce(3, n, i)).collect();
            let mut sends = 0;
            for (i, p) in plans.iter().enumerate() {
                for (r, round) in p.rounds.iter().enumerate() {
                    if let Some(send) = &round.send {
                        sends += 1;
                        let (recv, _) = plans[send.peer].rounds[r].recv.as_ref().unwrap();
                        assert_eq!(recv.peer, i, "n {n} round {r}");
                    }
                    if let Some((recv, _)) = &round.recv {
                        let send = plans[recv.peer].rounds[r].send.as_ref().unwrap();
                        assert_eq!(send.peer, i, "n {n} round {r}");
                    }
                }
            }
            let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
            let rem = n - p;
            let expected = if n == 1 {
                0
            } else {
                2 * rem + p * p.trailing_zeros() as usize
            };
            assert_eq!(sends, expected, "n {n}");
        }
    }
}
