//! Safety: every member's output is bit-for-bit identical (DESIGN.md: "all
//! replicas stay identical"). Applies to the kinds whose output is the same
//! tensor everywhere: all-reduce, broadcast, all-gather.

use phalanx_protocol::collective::Kind;

use super::{completed, final_runs, Violation};
use crate::sim::Sim;

/// Compares the output bytes of every completed final run of each op.
pub fn check(sim: &Sim) -> Vec<Violation> {
    let mut out = Vec::new();
    for fr in final_runs(sim) {
        let rec = &sim.ops[fr.op];
        if matches!(rec.kind, Kind::ReduceScatter(_) | Kind::Barrier) {
            continue;
        }
        let done: Vec<_> = fr
            .runs
            .iter()
            .filter(|(_, r)| completed(sim, fr.op, r))
            .collect();
        let Some((first_m, first)) = done.first() else {
            continue;
        };
        for (m, run) in &done[1..] {
            if run.buf != first.buf {
                let size = run.spec.dtype.size_bytes();
                let at = run
                    .buf
                    .iter()
                    .zip(&first.buf)
                    .position(|(a, b)| a != b)
                    .map_or(0, |b| b / size);
                out.push(Violation::safety(format!(
                    "{} ({:?}): output of {} differs from {} at element {at}",
                    rec.id,
                    rec.kind,
                    sim.member_id(*m),
                    sim.member_id(*first_m)
                )));
            }
        }
    }
    out
}
