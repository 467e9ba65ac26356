//! # phalanx-daemon
//!
//! `phalanxd`, the IO shell around the sans-IO core: the runner that feeds
//! the daemon's [`phalanx_protocol::node::Node`] and executes what it says,
//! the Raft task around [`phalanx_protocol::membership::control::ControlNode`],
//! a QUIC mesh with mutual TLS between daemons, the checkpoint store
//! ([`store`], sled), the trainer socket with
//! shared memory, and an HTTP endpoint for Prometheus and the admin API.
//! [`run`] is the whole daemon, so tests can start several in one process.
//!
//! Modules depend one way: [`run`] → the tasks ([`runner`], [`control`],
//! [`transport`], [`local`]) → [`bus`] (the types they exchange) and
//! [`metrics`] (names) → `phalanx-protocol`.
#![deny(missing_docs)]

pub mod bus;
pub mod checkpoints;
pub mod config;
pub mod control;
pub mod local;
pub mod metrics;
pub mod run;
pub mod runner;
pub mod store;
pub mod tls;
pub mod transport;

pub use run::{run, Sockets};
