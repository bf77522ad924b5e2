//! Workspace image specs: what a workspace image is made of.
//!
//! Owns the [`ImageSpec`] model, the [`SpecProvider`] trait, the providers (`fixed`: a JSON file;
//! `remote`: gRPC spec servers speaking `registryfacade.SpecProvider`), the spec cache, and the
//! mapping of gRPC status codes to [`Error`]. It knows nothing of HTTP or blobs.

pub mod error;
pub mod fixed;
pub mod model;
pub mod proto;
pub mod provider;

pub use error::{Error, Result};
pub use fixed::FixedSpecProvider;
pub use model::{ContentLayer, ImageSpec, RemoteContentLayer};
pub use provider::{Providers, SpecProvider};
