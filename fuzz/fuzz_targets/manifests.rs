//! Upstream manifests, indexes and configs.
#![no_main]
use facade_oci::{ImageConfigView, ParsedManifest, Platform};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ParsedManifest::Index(i)) = ParsedManifest::parse(data, None) {
        let _ = i.select(&Platform::host());
    }
    let _ = ParsedManifest::parse(data, Some("application/vnd.docker.distribution.manifest.v2+json"));
    let _ = ImageConfigView::parse(data);
});
