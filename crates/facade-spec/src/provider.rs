//! The provider trait and the table of providers by URL name (`remote`, `fixed`).

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::model::ImageSpec;

/// Answers "what is workspace `id` made of".
pub trait SpecProvider: Send + Sync {
    /// The spec of workspace `id`. `Error::NotFound` means the workspace does not exist.
    fn get_spec<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ImageSpec>>;
}

/// Providers by the name that is the first path segment of an image name.
#[derive(Clone, Default)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<dyn SpecProvider>>,
}

impl Providers {
    /// No providers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a provider under `name`.
    pub fn insert(&mut self, name: &str, provider: Arc<dyn SpecProvider>) {
        self.by_name.insert(name.to_string(), provider);
    }

    /// The provider called `name`.
    pub fn get(&self, name: &str) -> Result<&Arc<dyn SpecProvider>> {
        self.by_name.get(name).ok_or_else(|| Error::UnknownProvider { provider: name.to_string() })
    }

    /// The configured names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}
