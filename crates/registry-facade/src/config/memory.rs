//! Memory ceilings: `facade.maxBufferedResponseBytes` (facade-blob's response buffer budget),
//! `facade.imageCacheBytes` (the composed-image and fetched-image caches) and
//! `facade.specCacheBytes` (the spec cache). Each is a size; each has a floor, so a typo such
//! as "64" (bytes) cannot starve the facade of the memory it needs to work at all.

use facade_blob::{FetchConfig, ImagesConfig, ResponseBuffers};
use facade_spec::CacheConfig;

use super::file::FacadeSection;
use super::values::Checker;

/// The smallest value each key takes: one full read chunk, one big manifest and config.
const FLOOR: u64 = 1 << 20;

/// The process-wide memory settings that are not part of one crate's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimits {
    /// `facade.maxBufferedResponseBytes`.
    pub max_buffered_response_bytes: u64,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        MemoryLimits { max_buffered_response_bytes: ResponseBuffers::DEFAULT_MAX_BYTES }
    }
}

fn sized(c: &mut Checker<'_>, key: &str, v: &Option<serde_json::Value>) -> Option<u64> {
    let n = c.size(key, v, "64MiB")?;
    if n < FLOOR {
        c.problem(key, format_args!("{n} bytes is less than the floor of 1MiB"));
        return None;
    }
    Some(n)
}

/// `facade.maxBufferedResponseBytes` over the default.
pub(super) fn memory_limits(f: &FacadeSection, c: &mut Checker<'_>) -> MemoryLimits {
    let mut out = MemoryLimits::default();
    if let Some(n) = sized(c, "facade.maxBufferedResponseBytes", &f.max_buffered_response_bytes) {
        out.max_buffered_response_bytes = n;
    }
    out
}

/// `facade.imageCacheBytes` into both image caches, `facade.specCacheBytes` into the spec cache.
pub(super) fn cache_bytes(
    f: &FacadeSection,
    c: &mut Checker<'_>,
    fetch: &mut FetchConfig,
    images: &mut ImagesConfig,
    spec: &mut CacheConfig,
) {
    if let Some(n) = sized(c, "facade.imageCacheBytes", &f.image_cache_bytes) {
        images.max_bytes = n;
        fetch.max_bytes = n;
    }
    if let Some(n) = sized(c, "facade.specCacheBytes", &f.spec_cache_bytes) {
        spec.max_bytes = n;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use crate::config::{MapEnv, parse};

    fn parse_facade(facade: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("specs.json"), "{}").unwrap();
        let text = format!(r#"{{"registry": {{"fixedSpecFN": "specs.json"}}, "facade": {facade}}}"#);
        parse(&text, dir.path(), &MapEnv::default())
    }

    #[test]
    fn sizes_set_the_budget_and_the_cache_bounds() {
        let c = parse_facade(
            r#"{"maxBufferedResponseBytes": "256MiB", "imageCacheBytes": 8388608, "specCacheBytes": "2MiB"}"#,
        )
        .unwrap();
        assert_eq!(c.memory.max_buffered_response_bytes, 256 << 20);
        assert_eq!((c.images.max_bytes, c.fetch.max_bytes), (8 << 20, 8 << 20));
        assert_eq!(c.spec.cache.max_bytes, 2 << 20);
    }

    #[test]
    fn values_under_the_floor_or_not_sizes_are_refused_together() {
        let e =
            parse_facade(r#"{"maxBufferedResponseBytes": 64, "imageCacheBytes": "lots", "specCacheBytes": "1KiB"}"#)
                .unwrap_err()
                .to_string();
        for key in ["facade.maxBufferedResponseBytes", "facade.imageCacheBytes", "facade.specCacheBytes"] {
            assert!(e.contains(key), "{key} not named in: {e}");
        }
    }
}
