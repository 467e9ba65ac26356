//! Transports between daemons: the QUIC mesh, and an in-memory one for
//! in-process tests of the runner. Both implement [`crate::bus::Links`].

mod fault;
pub mod mem;
mod newest;
pub mod quic;
