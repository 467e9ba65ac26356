//! Transports between daemons.

pub mod quic;
