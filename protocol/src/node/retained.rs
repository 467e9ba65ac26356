//! Results kept after an op completes: a member that did not see the op
//! complete (interrupted by an epoch change) may still need one, and the
//! recovery exchange finishes its op from it.

use std::collections::VecDeque;

use super::types::Buffer;
use super::Node;
use crate::membership::KeptResult;
use crate::wire::DType;
use crate::{MemberId, OpId};

/// A completed op's result, with what its trainer was told.
#[derive(Clone, Debug)]
pub(super) struct Retained {
    pub op: OpId,
    pub contributors: Vec<MemberId>,
    pub waiting: Vec<MemberId>,
    pub dtype: DType,
    pub len: usize,
    pub output: Vec<u8>,
}

impl<B: Buffer> Node<B> {
    /// Keeps a completed op's result; drops the ones every ring member's
    /// trainer has moved past (by their progress reports: a trainer that
    /// issued op `s` has the results before it), and the oldest beyond the
    /// bound. The newest is always kept.
    pub(super) fn keep_result(&mut self, stream: u32, r: Retained) {
        let oldest_needed = self
            .ring
            .iter()
            .map(|m| self.issued_by(*m, stream))
            .min()
            .unwrap_or(0);
        let bound = self.config.kept_results;
        let kept = self.retained.entry(stream).or_default();
        kept.retain(|k| k.op != r.op);
        kept.push_back(r);
        while kept.len() > 1 && (kept.len() > bound || kept[0].op.seq() < oldest_needed) {
            kept.pop_front();
        }
    }

    /// The result of `op`, if this daemon still holds it.
    pub(super) fn kept(&self, op: OpId) -> Option<&Retained> {
        self.retained
            .get(&op.stream())
            .and_then(|k| k.iter().find(|r| r.op == op))
    }

    /// What this daemon's recovery report lists as held.
    pub(super) fn kept_results(&self) -> Vec<KeptResult> {
        self.retained
            .values()
            .flat_map(VecDeque::iter)
            .map(|r| KeptResult {
                op: r.op,
                contributors: r.contributors.clone(),
                waiting: r.waiting.clone(),
            })
            .collect()
    }
}
