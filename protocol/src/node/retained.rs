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
    ///
    /// A member removed lately may come back with its trainer's history
    /// (see [`super::Node::start_return`]): from its last result on, which
    /// tells its version from the group's, the results go on being kept for
    /// it for the recovery bound, up to [`NodeConfig::return_kept_results`]
    /// of them and [`NodeConfig::return_kept_bytes`].
    ///
    /// [`NodeConfig::return_kept_results`]: super::NodeConfig::return_kept_results
    /// [`NodeConfig::return_kept_bytes`]: super::NodeConfig::return_kept_bytes
    pub(super) fn keep_result(&mut self, stream: u32, r: Retained) {
        let oldest_needed = self
            .ring
            .iter()
            .map(|m| self.issued_by(*m, stream))
            .min()
            .unwrap_or(0);
        let (now, limit) = (self.now, self.config.recovery_timeout);
        self.away.retain(|_, since| now.since(*since) < limit);
        // A doubt keeps the trainer's last result before it, which a return
        // would claim.
        let oldest_away = self
            .away
            .keys()
            .map(|m| self.issued_by(*m, stream).saturating_sub(1))
            .chain(self.doubt_floor(stream))
            .min();
        let bound = self.config.kept_results;
        let (away_bound, away_bytes) = (
            self.config.return_kept_results,
            self.config.return_kept_bytes,
        );
        let kept = self.retained.entry(stream).or_default();
        kept.retain(|k| k.op != r.op);
        kept.push_back(r);
        let mut bytes: usize = kept.iter().map(|k| k.output.len()).sum();
        while kept.len() > 1 && (kept.len() > bound || kept[0].op.seq() < oldest_needed) {
            let for_away = oldest_away.is_some_and(|o| kept[0].op.seq() >= o)
                && kept.len() <= away_bound
                && bytes <= away_bytes;
            if for_away {
                break;
            }
            bytes -= kept.pop_front().map_or(0, |k| k.output.len());
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
                dtype: r.dtype,
                len: (r.output.len() / r.dtype.size_bytes()) as u64,
            })
            .collect()
    }
}
