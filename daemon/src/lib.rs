//! # phalanx-daemon
//!
//! The IO shell around the sans-IO core: `phalanxd` (QUIC transport with
//! mutual TLS, the raft-rs loop, sled checkpoints, the trainer socket and the
//! metrics endpoint) and `phalanxctl`. This crate is reserved in the workspace
//! so its dependency edges are fixed from the start; the daemon itself lands
//! with the data-plane work (issue 3). Until then the simulator in
//! `phalanx-tests` drives the same core under a virtual clock.
#![deny(missing_docs)]
