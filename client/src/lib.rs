//! # phalanx-client
//!
//! The library trainers link: [`Client`] connects to the node's `phalanxd`
//! over its Unix socket and runs collectives with the group; tensors travel
//! through shared memory (a sealed memfd registered once), never through the
//! socket. [`AsyncClient`] offers the same calls to tokio code. The compute
//! engines are re-exported so a trainer picks one by name.
//!
//! ```no_run
//! use phalanx_client::{Client, ReduceOp};
//!
//! let mut client = Client::connect("/run/phalanx/phalanxd.sock")?;
//! let mut grads = vec![0.5f32; 1 << 20];
//! let info = client.all_reduce(&mut grads, ReduceOp::Mean)?;
//! println!("averaged over {} members", info.contributors.len());
//! # Ok::<(), phalanx_client::ClientError>(())
//! ```
//!
//! ```
//! use phalanx_client::{engine_by_name, ReduceOp};
//!
//! let engine = engine_by_name("simd").unwrap();
//! let mut grads = vec![1.0f32; 8];
//! engine.reduce_f32(ReduceOp::Sum, &mut grads, &[2.0; 8]).unwrap();
//! assert_eq!(grads, [3.0; 8]);
//! assert!(engine_by_name("tpu").is_err());
//! ```
#![deny(missing_docs)]

mod client;
#[cfg(feature = "async")]
pub use client::AsyncClient;
pub use client::{Client, ClientError, Element, OpInfo};
pub use phalanx_protocol::local::{CheckpointInfo, StepMeta};
pub use phalanx_protocol::{Epoch, MemberId, OpId};

pub use phalanx_compute::{
    bf16, f16, AdamParams, ComputeEngine, ComputeError, MomentumParams, ScalarEngine, SgdParams,
    SimdEngine, SimdLevel,
};
pub use phalanx_protocol::wire::{DType, ReduceOp};

use thiserror::Error;

/// The engine names [`engine_by_name`] accepts.
pub const ENGINE_NAMES: [&str; 2] = ["scalar", "simd"];

/// An engine name that is not one of [`ENGINE_NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown compute engine {name:?}; choose one of: scalar, simd")]
pub struct UnknownEngine {
    /// The name asked for.
    pub name: String,
}

/// The engine a trainer asked for by name (`--engine scalar|simd`): `simd`
/// picks the best instruction set this CPU has.
pub fn engine_by_name(name: &str) -> Result<Box<dyn ComputeEngine>, UnknownEngine> {
    match name {
        "scalar" => Ok(Box::new(ScalarEngine)),
        "simd" => Ok(Box::new(SimdEngine::detect())),
        other => Err(UnknownEngine {
            name: other.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_engines() {
        assert_eq!(engine_by_name("scalar").unwrap().name(), "scalar");
        assert!(engine_by_name("simd").unwrap().name().starts_with("simd-"));
        let err = engine_by_name("cuda").unwrap_err();
        assert!(err.to_string().contains("choose one of"));
    }
}
