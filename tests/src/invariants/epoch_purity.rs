//! Safety: no output mixes data from two epochs (DESIGN.md: "a message from an
//! old epoch is ignored, never mixed into a newer result"). Every frame applied
//! to a run's buffer carries the run's own epoch.

use super::Violation;
use crate::sim::Sim;

/// Checks every run at every member, finished or not.
pub fn check(sim: &Sim) -> Vec<Violation> {
    let mut out = Vec::new();
    for (op_index, rec) in sim.ops.iter().enumerate() {
        for m in 0..sim.scenario.members {
            let Some(run) = sim.run_of(m, rec.id) else {
                continue;
            };
            for &e in &run.applied_epochs {
                if e != run.spec.epoch {
                    out.push(Violation::safety(format!(
                        "{}: op #{op_index} ({}) run in {} applied a frame of {e}",
                        sim.member_id(m),
                        rec.id,
                        run.spec.epoch
                    )));
                }
            }
        }
    }
    out
}
