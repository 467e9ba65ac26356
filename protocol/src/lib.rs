//! # phalanx-protocol
//!
//! The sans-IO core of Phalanx, shaped like `quinn-proto`: it holds the wire
//! types and the collective state machines, and performs no IO, reads no clock
//! and draws no randomness. The caller feeds it events together with `now` and
//! drains the actions it returns.
//!
//! ```
//! use phalanx_protocol::collective::{Action, Algorithm, Collectives, Kind, OpSpec};
//! use phalanx_protocol::wire::{DType, ReduceOp};
//! use phalanx_protocol::{Epoch, MemberId, OpId, Step, Time};
//!
//! // A group of one member: the all-reduce completes without any message.
//! let mut core = Collectives::new(MemberId(0), Default::default());
//! let spec = OpSpec {
//!     op: OpId(1),
//!     epoch: Epoch(1),
//!     step: Step(0),
//!     kind: Kind::AllReduce(ReduceOp::Sum),
//!     algorithm: Algorithm::Auto,
//!     dtype: DType::F32,
//!     len: 4,
//!     members: vec![MemberId(0)],
//! };
//! core.start(Time::ZERO, spec).unwrap();
//! let mut completed = false;
//! while let Some(action) = core.poll_action() {
//!     if let Action::Complete { op, .. } = action {
//!         assert_eq!(op, OpId(1));
//!         completed = true;
//!     }
//! }
//! assert!(completed);
//! ```
#![deny(missing_docs)]

pub mod checkpoint;
pub mod collective;
mod ids;
pub mod local;
pub mod membership;
pub mod node;
pub mod rng;
pub mod stragglers;
pub mod wire;

pub use ids::{Epoch, Incarnation, MemberId, OpId, Step, Time};
