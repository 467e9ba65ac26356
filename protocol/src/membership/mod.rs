//! Membership decisions: pure functions of what was observed and `now`,
//! returning a reason, so tests move time by editing inputs and logs say why.

pub mod control;
mod detector;
pub mod group;
mod plane;
mod progress;
pub mod recovery;
mod suspicions;

pub use detector::{Decision, DetectorConfig, FailureDetector, SuspicionReason};
pub use group::{Applied, Change, Command, GroupState, MemberRecord, Status};
pub use plane::{ControlPlane, PlaneOutput};
pub use progress::{judge_progress, Stuck};
pub use recovery::{
    state_checksum, KeptResult, Plan, Recovery, RecoveryReport, Return, ReturnClaim,
};
pub use suspicions::Suspicions;
