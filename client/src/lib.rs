//! # phalanx-client
//!
//! The library trainers link. This release carries the pieces a trainer
//! plugs in: the compute-engine trait and its engines, and the wire-level
//! element and reduction types. The connection to the local `phalanxd` and
//! the collective calls arrive with the daemon.
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
