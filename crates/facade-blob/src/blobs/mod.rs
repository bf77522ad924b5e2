//! Blob bytes: the chain of sources a request reads from ([`chain`]), single-flight fills
//! ([`fill`]) writing through a [`spool`], and the readers that follow a file while it grows
//! ([`read`]), taking the newest bytes from the fill's in-memory [`tail`] when they keep pace.
//! A digest's path reads top-down: chain → fill → spool → store commit.

pub mod chain;
pub mod fill;
pub(crate) mod passthrough;
pub(crate) mod possession;
pub mod read;
pub(crate) mod spool;
pub mod tail;
