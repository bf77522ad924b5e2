//! The HTTP edge: arbitrary methods, paths and headers through the route table, reference and
//! digest parsing, Accept and Range handling. Every answer is a proper status.
#![no_main]
use std::sync::Arc;

use facade_server::{
    App, Backend, BackendError, BlobBody, BlobRequest, ManifestBody, ManifestRequest, ServerConfig, ServerMetrics,
};
use libfuzzer_sys::fuzz_target;

struct Nothing;

impl Backend for Nothing {
    async fn manifest(&self, req: ManifestRequest) -> Result<ManifestBody, BackendError> {
        Err(BackendError::manifest_unknown(format!("{}/{}", req.provider, req.id)))
    }
    async fn blob(&self, req: BlobRequest) -> Result<BlobBody, BackendError> {
        Err(BackendError::blob_unknown(req.digest.to_string()))
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or("GET");
    let path = lines.next().unwrap_or("/v2/");
    let Ok(mut builder) = http::Request::builder().method(method).uri(path).body(()) else { return };
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if let (Ok(k), Ok(v)) = (http::HeaderName::from_bytes(k.as_bytes()), http::HeaderValue::from_str(v.trim()))
            {
                builder.headers_mut().append(k, v);
            }
        }
    }
    let (parts, ()) = builder.into_parts();
    let req = http::Request::from_parts(parts, http_body_empty());
    let registry = prometheus_registry();
    let app =
        App::new(ServerConfig::default(), Arc::new(Nothing), ServerMetrics::register(&registry).expect("metrics"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let resp = rt.block_on(app.handle(req));
    assert!(resp.status().as_u16() >= 200 && resp.status().as_u16() < 600);
});

fn http_body_empty() -> http_body_util::Empty<bytes::Bytes> {
    http_body_util::Empty::new()
}

fn prometheus_registry() -> prometheus::Registry {
    prometheus::Registry::new()
}
