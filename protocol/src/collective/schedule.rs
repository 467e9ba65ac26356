//! Segment and piece arithmetic shared by every algorithm.
//!
//! A schedule is a list of rounds. In each round a member sends at most one
//! range of its working buffer to one peer, and receives at most one range
//! from one peer, which it either reduces into its buffer or copies over it.
//! Frames carry the round number, and the sender's and the receiver's round
//! numbers for one transfer are equal by construction.
//!
//! Every range a round touches is cut into the same number of pieces, so piece
//! `k` of one round and piece `k` of the next are the same elements whenever
//! data flows from one round to the next. Each piece index is then an
//! independent chain through the rounds, and chains pipeline: piece 0 can be
//! two rounds ahead of piece 5.

use std::ops::Range;

/// What a received piece does to the working buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// Combine element-wise with the op's reduction.
    Reduce,
    /// Overwrite.
    Copy,
}

/// One side of a transfer: the peer (as an index into the op's member list)
/// and the range of the working buffer, in elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// Index of the peer in the op's member list.
    pub peer: usize,
    /// Elements of the working buffer.
    pub range: Range<usize>,
}

/// What one member does in one round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundPlan {
    /// Sent first, before the receive of the same round is applied.
    pub send: Option<Transfer>,
    /// Received, then applied.
    pub recv: Option<(Transfer, Apply)>,
}

/// A member's whole schedule for one op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Rounds, numbered as in frame headers.
    pub rounds: Vec<RoundPlan>,
    /// The longest range any member's rounds touch; fixes the piece count.
    pub max_range_len: usize,
}

/// The `i`-th of `n` near-equal consecutive segments of `0..len` (the first
/// `len % n` segments are one element longer).
pub fn segment(len: usize, n: usize, i: usize) -> Range<usize> {
    assert!(n > 0 && i < n, "segment {i} of {n}");
    let base = len / n;
    let rem = len % n;
    let start = i * base + i.min(rem);
    let end = start + base + usize::from(i < rem);
    start..end
}

/// How many pieces each range is cut into: enough that none exceeds
/// `max_piece_elems`, at least one so that an empty op still exchanges a frame
/// (a zero-length all-reduce is a barrier).
pub fn piece_count(max_range_len: usize, max_piece_elems: usize) -> u32 {
    let per = max_piece_elems.max(1);
    let n = max_range_len.div_ceil(per).max(1);
    u32::try_from(n).expect("piece count fits u32")
}

/// Piece `k` of `pieces` of `range`.
pub fn piece(range: &Range<usize>, k: u32, pieces: u32) -> Range<usize> {
    let s = segment(range.len(), pieces as usize, k as usize);
    range.start + s.start..range.start + s.end
}

/// `(i + n - d) mod n` without underflow, for ring arithmetic.
pub fn ring_back(i: usize, d: usize, n: usize) -> usize {
    (i + n - (d % n)) % n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_partition_exactly() {
        for len in [0usize, 1, 2, 7, 10, 97, 1000] {
            for n in 1..=16 {
                let mut next = 0;
                for i in 0..n {
                    let s = segment(len, n, i);
                    assert_eq!(s.start, next, "len {len} n {n} i {i}");
                    assert!(s.len() == len / n || s.len() == len / n + 1);
                    next = s.end;
                }
                assert_eq!(next, len);
            }
        }
    }

    #[test]
    fn pieces_partition_ranges() {
        for (len, max) in [(0usize, 4usize), (1, 4), (9, 4), (8, 4), (1000, 7)] {
            let p = piece_count(len, max);
            let r = 5..5 + len;
            let mut next = r.start;
            for k in 0..p {
                let pr = piece(&r, k, p);
                assert_eq!(pr.start, next);
                assert!(pr.len() <= max);
                next = pr.end;
            }
            assert_eq!(next, r.end);
        }
        assert_eq!(piece_count(0, 10), 1);
    }
}
