//! Safety: every output equals the reference computation over the inputs of
//! the members that contributed, exactly for min, max, broadcast and
//! all-gather, and within `phalanx_compute::sum_error_bound` for sum and mean
//! (the bound documented in phalanx-compute).

use phalanx_compute::sum_error_bound;
use phalanx_protocol::collective::Kind;
use phalanx_protocol::wire::ReduceOp;

use super::{completed, final_runs, Violation};
use crate::sim::Sim;
use crate::tensor::to_f64;

/// Checks each completed final run against the reference.
pub fn check(sim: &Sim) -> Vec<Violation> {
    let mut out = Vec::new();
    for fr in final_runs(sim) {
        let rec = &sim.ops[fr.op];
        let dtype = sim.scenario.ops[fr.op].dtype;
        for (m, run) in &fr.runs {
            if !completed(sim, fr.op, run) {
                continue;
            }
            let me = sim.member_id(*m);
            let contributors: Vec<usize> = run
                .spec
                .members
                .iter()
                .map(|id| {
                    (0..sim.scenario.members)
                        .find(|&i| sim.member_id(i) == *id)
                        .expect("known member")
                })
                .collect();
            let inputs: Vec<Vec<f64>> = contributors
                .iter()
                .map(|&c| to_f64(dtype, &rec.inputs[c]))
                .collect();
            let range = run.spec.output_range(me).expect("member of its run");
            let got = to_f64(dtype, &run.buf);
            let got = &got[range.clone()];
            let mut fail = |what: String| {
                out.push(Violation::safety(format!(
                    "{} ({:?}) at {me}: {what}",
                    rec.id, rec.kind
                )))
            };
            match run.spec.kind {
                Kind::Barrier => {}
                Kind::Broadcast { root } => {
                    let r = run
                        .spec
                        .members
                        .iter()
                        .position(|&x| x == root)
                        .expect("root");
                    if got != inputs[r].as_slice() {
                        fail("broadcast output differs from the root's input".into());
                    }
                }
                Kind::AllGather => {
                    let want: Vec<f64> = inputs.concat();
                    if got != want.as_slice() {
                        fail("all-gather output is not the members' inputs in order".into());
                    }
                }
                Kind::AllReduce(op) | Kind::ReduceScatter(op) => {
                    for (k, i) in range.clone().enumerate() {
                        let xs: Vec<f64> = inputs.iter().map(|v| v[i]).collect();
                        let g = got[k];
                        let (want, bound) = match op {
                            ReduceOp::Min => {
                                (xs.iter().copied().fold(f64::INFINITY, f64::min), 0.0)
                            }
                            ReduceOp::Max => {
                                (xs.iter().copied().fold(f64::NEG_INFINITY, f64::max), 0.0)
                            }
                            ReduceOp::Sum | ReduceOp::Mean => {
                                let n = xs.len();
                                let exact: f64 = xs.iter().sum();
                                let abs: f64 = xs.iter().map(|x| x.abs()).sum();
                                let mean = op == ReduceOp::Mean;
                                let want = if mean { exact / n as f64 } else { exact };
                                (want, sum_error_bound(dtype, n, abs, g, mean))
                            }
                        };
                        if (g - want).abs() > bound {
                            fail(format!(
                                "element {i} is {g}, reference {want} over {} inputs, error bound {bound:e}",
                                xs.len()
                            ));
                            break;
                        }
                    }
                }
            }
        }
    }
    out
}
