//! The registry-facade binary's library: configuration, wiring and the CLI's commands, kept out
//! of `main.rs` so end-to-end tests run the same code in-process.

pub mod app;
pub mod backend;
pub mod config;
pub mod peer;
pub mod reload;
pub mod setup;

pub use app::App;
pub use config::Config;
