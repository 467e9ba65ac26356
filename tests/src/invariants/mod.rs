//! Invariants checked after every simulation, one file each. Each names the
//! property and where it comes from; a violation says which member and op.

mod completion;
mod epoch_purity;
mod identical_outputs;
mod reference_bound;

use std::fmt;

use crate::sim::{Run, RunState, Sim};

/// Safety: something wrong happened. Liveness: something right did not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// A wrong result or a broken rule.
    Safety,
    /// A deadlock, timeout or missing completion.
    Liveness,
}

/// One broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which class.
    pub severity: Severity,
    /// What, where.
    pub message: String,
}

impl Violation {
    /// A safety violation.
    pub fn safety(message: String) -> Violation {
        Violation {
            severity: Severity::Safety,
            message,
        }
    }
    /// A liveness violation.
    pub fn liveness(message: String) -> Violation {
        Violation {
            severity: Severity::Liveness,
            message,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:?}] {}", self.severity, self.message)
    }
}

/// The final runs of one op at the members that must have completed it.
#[derive(Debug)]
pub struct FinalRuns<'a> {
    /// Index into `sim.ops`.
    pub op: usize,
    /// `(member index, run)` for every member of the op's last run still alive.
    pub runs: Vec<(usize, &'a Run)>,
}

/// Every op's final runs at its surviving members; ops lost by design (a
/// broadcast whose root died) are skipped.
pub fn final_runs(sim: &Sim) -> Vec<FinalRuns<'_>> {
    sim.ops
        .iter()
        .enumerate()
        .filter(|(_, rec)| rec.lost.is_none())
        .map(|(op, rec)| FinalRuns {
            op,
            runs: rec
                .members
                .iter()
                .filter(|&&m| sim.is_alive(m))
                .filter_map(|&m| sim.run_of(m, rec.id).map(|r| (m, r)))
                .collect(),
        })
        .collect()
}

/// Whether a run completed in its op's final epoch.
pub fn completed(sim: &Sim, op: usize, run: &Run) -> bool {
    matches!(run.state, RunState::Done(_)) && run.spec.epoch == sim.ops[op].epoch
}

/// Runs every invariant.
pub fn check_all(sim: &Sim) -> Vec<Violation> {
    let mut v = Vec::new();
    v.extend(completion::check(sim));
    v.extend(epoch_purity::check(sim));
    v.extend(identical_outputs::check(sim));
    v.extend(reference_bound::check(sim));
    v
}
