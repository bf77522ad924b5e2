//! The `fixed` provider: specs from a JSON file `{ "<id>": <ImageSpec in protobuf-JSON> }`.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::model::ImageSpec;
use crate::provider::SpecProvider;

/// Specs read from a file once; every entry is validated up front so a bad file is a startup
/// error, not a failed pull later.
#[derive(Clone, Debug, Default)]
pub struct FixedSpecProvider {
    specs: Arc<HashMap<String, ImageSpec>>,
}

impl FixedSpecProvider {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Config(format!("spec file is not JSON: {e}")))?;
        let serde_json::Value::Object(map) = v else {
            return Err(Error::Config("spec file must be a JSON object of id → spec".into()));
        };
        let mut specs = HashMap::with_capacity(map.len());
        for (id, spec) in map {
            let parsed = ImageSpec::from_json_value(&id, spec).map_err(|e| Error::Config(e.to_string()))?;
            specs.insert(id, parsed);
        }
        Ok(FixedSpecProvider { specs: Arc::new(specs) })
    }

    /// Reads and parses a file.
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read spec file {}: {e}", path.display())))?;
        Self::parse(&text)
    }

    /// Number of specs.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether the file had no specs.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }
}

impl SpecProvider for FixedSpecProvider {
    fn get_spec<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<ImageSpec>> {
        Box::pin(async move {
            self.specs.get(id).cloned().ok_or_else(|| Error::NotFound { provider: "fixed".into(), id: id.to_string() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_specs_by_id() {
        let p = FixedSpecProvider::parse(r#"{"demo": {"baseRef": "127.0.0.1:1/base:latest"}}"#).unwrap();
        assert_eq!(p.get_spec("demo").await.unwrap().base_ref.repository.as_str(), "base");
        assert!(matches!(p.get_spec("nope").await, Err(Error::NotFound { .. })));
    }

    #[test]
    fn bad_files_are_config_errors() {
        assert!(matches!(FixedSpecProvider::parse("[]"), Err(Error::Config(_))));
        assert!(matches!(FixedSpecProvider::parse("{"), Err(Error::Config(_))));
        let e = FixedSpecProvider::parse(r#"{"a": {"baseRef": ""}}"#).unwrap_err().to_string();
        assert!(e.contains("baseRef"), "{e}");
    }
}
