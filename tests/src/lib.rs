//! # phalanx-tests
//!
//! The deterministic cluster simulator and the invariants it checks. The
//! sweep tests in `tests/` and the `phalanx-sim` binary drive it; a failing
//! seed prints the command that replays it.
#![deny(missing_docs)]

pub mod cluster_sim;
pub mod control_sim;
pub mod invariants;
pub mod scenario;
pub mod sim;
pub mod steps_sim;
pub mod tensor;
