//! Composition over arbitrary upstream documents: errors, never panics, and a success is
//! deterministic.
#![no_main]
use facade_compose::{Addition, BaseInput, compose};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parts: Vec<&[u8]> = data.split(|&b| b == 0xff).collect();
    if parts.len() < 4 {
        return;
    }
    let base = BaseInput {
        base_ref: "r.test/base:1",
        manifest: parts[0],
        manifest_media_type: "application/vnd.oci.image.manifest.v1+json",
        config: parts[1],
    };
    let add = [Addition::Image {
        label: "ide",
        manifest: parts[2],
        manifest_media_type: "application/vnd.docker.distribution.manifest.v2+json",
        config: parts[3],
    }];
    if let Ok(a) = compose(&base, &add) {
        let b = compose(&base, &add).expect("deterministic");
        assert_eq!(a.manifest, b.manifest);
        assert_eq!(a.config, b.config);
    }
});
