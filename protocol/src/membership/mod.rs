//! Membership decisions: pure functions of what was observed and `now`,
//! returning a reason, so tests move time by editing inputs and logs say why.

mod detector;

pub use detector::{Decision, DetectorConfig, FailureDetector, SuspicionReason};
