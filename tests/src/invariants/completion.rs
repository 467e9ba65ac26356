//! Liveness: after the faults stop and the queue drains, every member alive at
//! the end completed every op in the op's final epoch, with the members of
//! that epoch as contributors (DESIGN.md, fault model: "the survivors finish
//! the step without it").

use super::{completed, final_runs, Violation};
use crate::sim::{RunState, Sim};

/// Checks completion of every op at every surviving member.
pub fn check(sim: &Sim) -> Vec<Violation> {
    let mut out = Vec::new();
    for fr in final_runs(sim) {
        let rec = &sim.ops[fr.op];
        for &m in &rec.members {
            if !sim.is_alive(m) {
                continue;
            }
            let id = sim.member_id(m);
            match sim.run_of(m, rec.id) {
                None => out.push(Violation::liveness(format!(
                    "{id} never started {}",
                    rec.id
                ))),
                Some(run) if !completed(sim, fr.op, run) => out.push(Violation::liveness(format!(
                    "{id} did not complete {} in {}: {:?} in {}",
                    rec.id, rec.epoch, run.state, run.spec.epoch
                ))),
                Some(run) => {
                    if let RunState::Done(contributors) = &run.state {
                        if *contributors != run.spec.members {
                            out.push(Violation::safety(format!(
                                "{id}: {} reports contributors {contributors:?}, ran with {:?}",
                                rec.id, run.spec.members
                            )));
                        }
                    }
                }
            }
        }
    }
    out
}
