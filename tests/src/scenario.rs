//! What one simulation run does, derived entirely from a seed (or built by
//! hand for grid sweeps and the demo).

use std::fmt;
use std::time::Duration;

use phalanx_protocol::collective::{Algorithm, Kind};
use phalanx_protocol::rng::SplitMix64;
use phalanx_protocol::wire::{DType, ReduceOp};
use phalanx_protocol::MemberId;

use crate::tensor::Values;

/// One collective the members run.
#[derive(Clone, Debug, PartialEq)]
pub struct OpPlan {
    /// What it computes (a broadcast root is an index into the members).
    pub kind: KindPlan,
    /// All-reduce algorithm.
    pub algorithm: Algorithm,
    /// Element type.
    pub dtype: DType,
    /// Elements per member.
    pub len: usize,
    /// How inputs are drawn.
    pub values: Values,
}

/// A collective kind with the broadcast root as a member index, so the plan
/// stays valid when members are renamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KindPlan {
    /// All-reduce.
    AllReduce(ReduceOp),
    /// Broadcast from the member at this index of the initial member list.
    Broadcast(usize),
    /// All-gather.
    AllGather,
    /// Reduce-scatter.
    ReduceScatter(ReduceOp),
    /// Barrier.
    Barrier,
}

impl KindPlan {
    /// The core's kind for a member list (`initial` maps root indices).
    pub fn kind(&self, initial: &[MemberId]) -> Kind {
        match *self {
            KindPlan::AllReduce(op) => Kind::AllReduce(op),
            KindPlan::Broadcast(root) => Kind::Broadcast {
                root: initial[root],
            },
            KindPlan::AllGather => Kind::AllGather,
            KindPlan::ReduceScatter(op) => Kind::ReduceScatter(op),
            KindPlan::Barrier => Kind::Barrier,
        }
    }
}

/// A fault the simulator injects.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The member's processing is this many times slower.
    Slow {
        /// Member index.
        member: usize,
        /// Slowdown factor.
        factor: u32,
    },
    /// The member processes nothing in `[from, from + length)`; events queue.
    Pause {
        /// Member index.
        member: usize,
        /// Start, virtual time.
        from: Duration,
        /// How long.
        length: Duration,
    },
    /// The member dies at `at`; survivors learn it `detect_after` later.
    Kill {
        /// Member index.
        member: usize,
        /// When, virtual time.
        at: Duration,
        /// Failure-detection delay.
        detect_after: Duration,
    },
}

/// One simulation run.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    /// The seed everything else came from (0 for hand-built scenarios).
    pub seed: u64,
    /// Number of members.
    pub members: usize,
    /// Ops run concurrently.
    pub ops: Vec<OpPlan>,
    /// Group-wide piece size.
    pub chunk_bytes: usize,
    /// Pieces in flight per op.
    pub window: u32,
    /// Base one-way link latency.
    pub latency: Duration,
    /// Extra random delay per message (reorders messages on a link).
    pub jitter: Duration,
    /// Spread of the members' start times for each op.
    pub start_spread: Duration,
    /// Which members use the scalar engine (the others use SIMD).
    pub scalar_members: Vec<usize>,
    /// Injected faults.
    pub faults: Vec<Fault>,
    /// How to replay it, where the seed alone does not say.
    pub replay: Option<String>,
}

/// Tensor lengths the sweeps draw from: empty, one, primes, powers of two
/// and their neighbours (most do not divide by any member count).
pub const LENGTHS: [usize; 14] = [0, 1, 2, 3, 5, 7, 13, 31, 97, 256, 257, 1021, 4099, 16411];

impl Scenario {
    /// The scenario for `seed`: member count, ops, network and faults all
    /// follow from it, and so does every later random draw of the run.
    pub fn from_seed(seed: u64) -> Scenario {
        let mut rng = SplitMix64::new(seed);
        let members = rng.range_inclusive(1, 16) as usize;
        let op_count = rng.range_inclusive(1, 3) as usize;
        let ops = (0..op_count)
            .map(|_| random_op(&mut rng, members))
            .collect();
        let mut faults = Vec::new();
        if members > 1 && rng.chance(0.3) {
            faults.push(Fault::Slow {
                member: rng.below(members as u64) as usize,
                factor: rng.range_inclusive(2, 10) as u32,
            });
        }
        if members > 1 && rng.chance(0.3) {
            faults.push(Fault::Pause {
                member: rng.below(members as u64) as usize,
                from: Duration::from_micros(rng.below(2_000)),
                length: Duration::from_micros(rng.range_inclusive(100, 20_000)),
            });
        }
        if members > 1 && rng.chance(0.4) {
            let kills = rng.range_inclusive(1, (members as u64 - 1).min(2));
            let mut victims: Vec<usize> = (0..members).collect();
            for _ in 0..kills {
                let v = victims.remove(rng.below(victims.len() as u64) as usize);
                faults.push(Fault::Kill {
                    member: v,
                    at: Duration::from_micros(rng.below(3_000)),
                    detect_after: Duration::from_micros(rng.range_inclusive(200, 5_000)),
                });
            }
        }
        let scalar_members = (0..members).filter(|_| rng.chance(0.5)).collect();
        Scenario {
            seed,
            members,
            ops,
            chunk_bytes: *rng.pick(&[8usize, 64, 256, 4096, 65536]),
            window: rng.range_inclusive(1, 8) as u32,
            latency: Duration::from_micros(rng.range_inclusive(5, 200)),
            jitter: Duration::from_micros(rng.below(400)),
            start_spread: Duration::from_micros(rng.below(1_000)),
            scalar_members,
            faults,
            replay: None,
        }
    }

    /// A fault-free scenario with one op, for grid sweeps.
    pub fn single(members: usize, op: OpPlan, chunk_bytes: usize) -> Scenario {
        Scenario {
            seed: 0,
            members,
            ops: vec![op],
            chunk_bytes,
            window: 4,
            latency: Duration::from_micros(20),
            jitter: Duration::from_micros(50),
            start_spread: Duration::from_micros(100),
            scalar_members: (0..members).step_by(2).collect(),
            faults: Vec::new(),
            replay: None,
        }
    }

    /// The command that replays this scenario.
    pub fn replay_command(&self) -> String {
        self.replay.clone().unwrap_or_else(|| {
            format!(
                "cargo run --release --locked -p phalanx-tests --bin phalanx-sim -- run --seed {} --trace",
                self.seed
            )
        })
    }

    /// The members' ids: not 0..n, so no code can confuse ids with indices.
    pub fn member_ids(&self) -> Vec<MemberId> {
        (0..self.members)
            .map(|i| MemberId(100 + 7 * i as u32))
            .collect()
    }
}

fn random_op(rng: &mut SplitMix64, members: usize) -> OpPlan {
    let reduce = *rng.pick(&ReduceOp::ALL);
    let kind = match rng.below(6) {
        0 | 1 => KindPlan::AllReduce(reduce),
        2 => KindPlan::Broadcast(rng.below(members as u64) as usize),
        3 => KindPlan::AllGather,
        4 => KindPlan::ReduceScatter(reduce),
        _ => KindPlan::Barrier,
    };
    let mut len = *rng.pick(&LENGTHS);
    if rng.chance(0.3) {
        // A length that leaves a remainder for this member count.
        len =
            members * rng.range_inclusive(0, 40) as usize + 1 + rng.below(members as u64) as usize;
    }
    OpPlan {
        kind,
        algorithm: *rng.pick(&[
            Algorithm::Auto,
            Algorithm::Ring,
            Algorithm::RecursiveDoubling,
        ]),
        dtype: *rng.pick(&DType::ALL),
        len,
        values: if rng.chance(0.5) {
            Values::Exact
        } else {
            Values::Random
        },
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} members, chunk {} B, window {}, latency {:?} + jitter {:?}",
            self.seed, self.members, self.chunk_bytes, self.window, self.latency, self.jitter
        )?;
        for op in &self.ops {
            write!(
                f,
                "\n  op {:?} {:?} {} x {} ({:?} values)",
                op.kind, op.algorithm, op.dtype, op.len, op.values
            )?;
        }
        for fault in &self.faults {
            write!(f, "\n  fault {fault:?}")?;
        }
        Ok(())
    }
}
