//! The OCI vocabulary shared by every registry-facade crate.
//!
//! Owns validated newtypes ([`Digest`], [`Reference`], [`RepoName`], [`ImageRef`]), media-type
//! constants, read-only views of manifests, indexes and configs that keep the original bytes,
//! platform matching, and the OCI error-code vocabulary. It does no I/O and nothing async.
#![warn(missing_docs)]

pub mod digest;
pub mod errcode;
pub mod error;
pub mod image_ref;
pub mod manifest;
pub mod media_types;
pub mod platform;
pub mod reference;

pub use digest::{Digest, DigestHasher};
pub use errcode::{ErrorCode, ErrorEnvelope};
pub use error::{Error, Result, clip_untrusted};
pub use image_ref::ImageRef;
pub use manifest::{Descriptor, ImageConfigView, IndexView, ManifestView, ParsedManifest};
pub use platform::Platform;
pub use reference::{Reference, RepoName};
