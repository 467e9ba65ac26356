//! The executor of one collective: walks a [`Plan`] piece by piece.

use std::collections::{BTreeMap, VecDeque};

use super::schedule::{piece, piece_count, Apply, Plan};
use super::{Action, OpSpec};
use crate::wire::{FrameHeader, ReduceOp};
use crate::{Incarnation, Time};

/// State of one in-flight op at one member.
#[derive(Debug)]
pub(crate) struct OpState {
    pub spec: OpSpec,
    pub deadline: Time,
    /// This member's index in `spec.members`.
    me_index: usize,
    plan: Plan,
    pieces: u32,
    /// The element-wise combination for `Apply::Reduce`.
    accumulate: ReduceOp,
    incarnation: Incarnation,
    /// Per piece: the round it is in (`rounds.len()` when done).
    chain_round: Vec<u32>,
    /// Per piece: whether the send of its current round has been emitted.
    chain_sent: Vec<bool>,
    /// Frames that arrived before their piece reached their round.
    held: BTreeMap<(u32, u32), (FrameHeader, Vec<u8>)>,
    /// Pieces `0..started` have begun; the window bounds `started - completed_prefix`.
    started: u32,
    completed_prefix: u32,
    window: u32,
    remaining: u32,
}

impl OpState {
    pub fn new(
        spec: OpSpec,
        me_index: usize,
        plan: Plan,
        piece_elems: usize,
        window: u32,
        deadline: Time,
        incarnation: Incarnation,
    ) -> Self {
        let pieces = piece_count(plan.max_range_len, piece_elems);
        let accumulate = spec.kind.reduce_op().unwrap_or(ReduceOp::Sum).accumulate();
        OpState {
            spec,
            deadline,
            me_index,
            plan,
            pieces,
            accumulate,
            incarnation,
            chain_round: vec![0; pieces as usize],
            chain_sent: vec![false; pieces as usize],
            held: BTreeMap::new(),
            started: 0,
            completed_prefix: 0,
            window: window.max(1),
            remaining: pieces,
        }
    }

    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    fn rounds(&self) -> u32 {
        self.plan.rounds.len() as u32
    }

    /// Starts pieces the window allows and runs every runnable piece.
    pub fn pump(&mut self, out: &mut VecDeque<Action>) {
        loop {
            while self.completed_prefix < self.started
                && self.chain_round[self.completed_prefix as usize] == self.rounds()
            {
                self.completed_prefix += 1;
            }
            if self.started < self.pieces && self.started < self.completed_prefix + self.window {
                let k = self.started;
                self.started += 1;
                self.advance(k, out);
            } else {
                break;
            }
        }
    }

    /// Runs piece `k` through as many rounds as it can go without waiting.
    fn advance(&mut self, k: u32, out: &mut VecDeque<Action>) {
        let ki = k as usize;
        loop {
            let r = self.chain_round[ki];
            if r == self.rounds() {
                self.remaining -= 1;
                return;
            }
            let round = &self.plan.rounds[r as usize];
            if !self.chain_sent[ki] {
                if let Some(send) = &round.send {
                    let range = piece(&send.range, k, self.pieces);
                    let header = self.header(r, k, range.len());
                    out.push_back(Action::Send {
                        op: self.spec.op,
                        to: self.spec.members[send.peer],
                        header,
                        range,
                    });
                }
                self.chain_sent[ki] = true;
            }
            if let Some((recv, apply)) = &round.recv {
                let Some((from, payload)) = self.held.remove(&(r, k)) else {
                    return;
                };
                let range = piece(&recv.range, k, self.pieces);
                // Safety: frames of another epoch never reach an op (checked on
                // arrival); kept as an assertion in release builds too.
                assert_eq!(
                    from.epoch, self.spec.epoch,
                    "frame of another epoch applied"
                );
                out.push_back(match apply {
                    Apply::Reduce => Action::Reduce {
                        op: self.spec.op,
                        range,
                        reduce: self.accumulate,
                        payload,
                        from,
                    },
                    Apply::Copy => Action::Copy {
                        op: self.spec.op,
                        range,
                        payload,
                        from,
                    },
                });
            }
            self.chain_round[ki] += 1;
            self.chain_sent[ki] = false;
        }
    }

    fn header(&self, round: u32, chunk: u32, elems: usize) -> FrameHeader {
        FrameHeader {
            op: self.spec.op,
            epoch: self.spec.epoch,
            step: self.spec.step,
            incarnation: self.incarnation,
            sender: self.spec.members[self.me_index()],
            round,
            chunk,
            dtype: self.spec.dtype,
            elem_count: u32::try_from(elems).expect("piece fits u32"),
        }
    }

    fn me_index(&self) -> usize {
        self.me_index
    }

    /// Accepts a frame of this op's epoch. `Err` carries why the frame breaks
    /// the schedule; the caller aborts the op.
    pub fn on_frame(
        &mut self,
        header: FrameHeader,
        payload: Vec<u8>,
        out: &mut VecDeque<Action>,
    ) -> Result<(), String> {
        let (r, k) = (header.round, header.chunk);
        let Some(round) = self.plan.rounds.get(r as usize) else {
            return Err(format!("round {r} beyond the schedule's {}", self.rounds()));
        };
        if k >= self.pieces {
            return Err(format!("chunk {k} beyond the op's {} chunks", self.pieces));
        }
        let Some((recv, _)) = &round.recv else {
            return Err(format!("nothing is received in round {r}"));
        };
        let expected_sender = self.spec.members[recv.peer];
        if header.sender != expected_sender {
            return Err(format!(
                "round {r} is received from {expected_sender}, not {}",
                header.sender
            ));
        }
        if header.dtype != self.spec.dtype {
            return Err(format!(
                "dtype {} but the op is {}",
                header.dtype, self.spec.dtype
            ));
        }
        let expected = piece(&recv.range, k, self.pieces).len();
        if header.elem_count as usize != expected {
            return Err(format!(
                "round {r} chunk {k} has {} elements, expected {expected}",
                header.elem_count
            ));
        }
        if r < self.chain_round[k as usize] || self.held.contains_key(&(r, k)) {
            return Err(format!("duplicate frame for round {r} chunk {k}"));
        }
        self.held.insert((r, k), (header, payload));
        if k < self.started && r == self.chain_round[k as usize] {
            self.advance(k, out);
            self.pump(out);
        }
        Ok(())
    }

    /// Checks the executor's invariants; safety assertions stay on in release.
    pub fn check_invariants(&self) {
        assert!(self.completed_prefix <= self.started && self.started <= self.pieces);
        let mut not_done = 0;
        for (k, &r) in self.chain_round.iter().enumerate() {
            assert!(r <= self.rounds(), "piece {k} past the last round");
            if r < self.rounds() {
                not_done += 1;
            }
            if (k as u32) >= self.started {
                assert_eq!(r, 0, "piece {k} moved before it started");
            }
        }
        assert_eq!(not_done, self.remaining, "remaining-piece count drifted");
        for (&(r, k), (h, payload)) in &self.held {
            assert_eq!(h.epoch, self.spec.epoch, "held frame of another epoch");
            assert_eq!(payload.len() as u64, h.payload_len());
            let current = self.chain_round[k as usize];
            assert!(r >= current, "held frame for a round already passed");
            assert!(
                !(k < self.started && r == current),
                "a runnable piece is waiting on a frame it already has"
            );
        }
    }
}
