//! `GET|HEAD /v2/`: the version probe every client sends first.

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Response};

use crate::body::Body;
use crate::headers;

pub(crate) fn respond() -> Response<Body> {
    let mut resp = Response::new(Body::full("{}"));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(headers::JSON));
    h.insert(CONTENT_LENGTH, HeaderValue::from(2u64));
    resp
}
