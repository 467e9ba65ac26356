//! Where a node stands with its group.

use crate::membership::Recovery;
use crate::Time;

/// Where this daemon stands with the group's ring. Trainer ops run only
/// when [`Mode::Active`]; they wait while `Outside` or `Recovering`, and
/// fail while `Removed`.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Not in the ring in this life, and not told to stay out: no epoch
    /// yet, or restarted and not readmitted yet. Trainer ops wait (up to
    /// the recovery timeout).
    Outside,
    /// Out of the ring: removed, or enrolled by `--join` and never
    /// admitted. Trainer ops fail with `why` until the trainer joins.
    Removed {
        /// What the trainer is told.
        why: String,
    },
    /// In the ring, gathering the epoch's recovery reports before any op
    /// runs (interrupted ops are finished the same way everywhere).
    Recovering(Recovery),
    /// In the ring, the epoch's recovery done: ops run.
    Active,
}

impl Mode {
    /// In the ring in this life (recovering or running).
    pub fn admitted(&self) -> bool {
        matches!(self, Mode::Recovering(_) | Mode::Active)
    }

    /// Ops run now.
    pub fn is_active(&self) -> bool {
        matches!(self, Mode::Active)
    }

    /// What the trainer is told while out of the ring, if anything.
    pub fn removed(&self) -> Option<&str> {
        match self {
            Mode::Removed { why } => Some(why),
            _ => None,
        }
    }

    /// A label for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Outside => "outside",
            Mode::Removed { .. } => "removed",
            Mode::Recovering(_) => "recovering",
            Mode::Active => "active",
        }
    }
}

/// Whether peers are judged by their heartbeats yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judging {
    /// Never admitted in this life: while a daemon is out of the ring,
    /// silence says little (daemons starting, logs being synced) and it
    /// may not remove anyone anyway.
    NotYet,
    /// Admitted for the first time: a peer that has sent a heartbeat is
    /// judged from then on (its daemon is up and linked, so its silence
    /// means what it means later: a member killed just after the start is
    /// removed as fast as any other); one not heard from yet may still be
    /// starting, and is judged from `until` on.
    Grace {
        /// The end of the start-up grace.
        until: Time,
    },
    /// Peers are judged (while admitted).
    On,
}
