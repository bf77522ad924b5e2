//! Names, tags, digests and image references from URLs and specs: never panic, and whatever
//! parses must print back to something that parses to the same value.
#![no_main]
use facade_oci::{Digest, ImageRef, Reference, RepoName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(d) = Digest::parse(s) {
        assert_eq!(Digest::parse(d.as_str()).ok(), Some(d.clone()));
        assert!(!d.encoded().contains('/'));
    }
    if let Ok(r) = Reference::parse(s) {
        assert_eq!(Reference::parse(&r.to_string()).ok(), Some(r));
    }
    if let Ok(n) = RepoName::parse(s) {
        assert!(n.as_str().split('/').all(|c| c != ".." && c != "."));
    }
    if let Ok(i) = ImageRef::parse(s) {
        let again = ImageRef::parse(&i.to_string()).expect("a printed reference parses");
        assert_eq!(again, i);
    }
});
