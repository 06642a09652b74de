//! Responses of kube's mocked API (tower-test) as a real API server gives
//! them, shared by the watcher tests (no API server can run here).
use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

/// A list response (`<Kind>List`) at resource version `rv`.
pub fn list(api_version: &str, kind: &str, rv: &str, items: Vec<Value>) -> Response<Body> {
    let body = json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {"resourceVersion": rv},
        "items": items,
    });
    Response::new(Body::from(serde_json::to_vec(&body).unwrap()))
}

/// A watch response: one JSON event per line.
pub fn events(evs: &[(&str, Value)]) -> Response<Body> {
    let mut body = Vec::new();
    for (t, o) in evs {
        serde_json::to_writer(&mut body, &json!({"type": t, "object": o})).unwrap();
        body.push(b'\n');
    }
    Response::new(Body::from(body))
}

/// The query string of a request.
pub fn query(r: &Request<Body>) -> String {
    r.uri().query().unwrap_or("").to_string()
}
