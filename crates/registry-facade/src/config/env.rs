//! Environment lookups, injected so that parsing is testable without touching the process
//! environment.

use std::collections::BTreeMap;

/// The registry's listen address when `facade.listenHost` is not set.
pub const LISTEN_HOST_ENV: &str = "REGISTRY_FACADE_LISTEN_HOST";

/// Looks up environment variables.
pub trait Env {
    /// The value of `name`.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// Environment for tests.
#[derive(Default)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}
