//! Composition of a workspace image: the base image's manifest and config plus the layers of
//! added images and single layers, turned into new manifest and config bytes (README,
//! "Composition").
//!
//! This crate owns the composition rules: layer order, the skip-n label, the `GITPOD_ENV_*`
//! environment rules, raw-JSON editing of the config (unknown and Docker-only fields survive),
//! the manifest's media-type family and the `io.gitpod.workspace-image.*` annotations.
//!
//! It deliberately does no I/O and nothing async: the caller resolves references, picks the
//! platform out of indexes, fetches manifests and configs, and computes digests of local
//! layer files. The output is a pure function of the input bytes, so every replica produces
//! the same manifest digest for the same inputs.
#![warn(missing_docs)]

mod compose;
mod config;
mod env;
mod error;
mod manifest;
mod order;
mod skip_n;
mod types;

pub use compose::compose;
pub use env::apply_env_rules;
pub use error::{Error, Result};
pub use order::{LayerSource, layer_sources};
pub use skip_n::skip_n;
pub use types::{
    Addition, BaseInput, Composed, ComposedLayer, LayerInput, LayerOrigin, REF_ANNOTATION, SIZE_ANNOTATION,
    SKIP_N_LABEL,
};
