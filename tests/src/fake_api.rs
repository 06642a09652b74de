//! A fake Kubernetes API server for the daemon's Kubernetes mode.
//!
//! No Kubernetes API server can run on these machines. The daemon's kube
//! client is pointed (`kubernetes.apiServer`) at this small HTTP server,
//! which answers the pod list of node `node-a` and streams watch events,
//! like the real one does for `GET /api/v1/pods?fieldSelector=
//! spec.nodeName=...`. It also serves `AgentPolicy` objects (list + watch
//! of `/apis/enforcer.dev/v1alpha1/agentpolicies`) and records the status
//! writes (server-side apply PATCH of `.../status`) and Events (POST) the
//! daemon sends.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde_json::{json, Value};

/// Watch streams by resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Res {
    Pods,
    Policies,
}

pub const POLICIES: &str = "/apis/enforcer.dev/v1alpha1/agentpolicies";

/// The fake API server: a pod list and an AgentPolicy list, watch streams
/// it can send events on, and the writes (PATCH, POST) it received.
pub struct FakeApi {
    pub addr: SocketAddr,
    pub pods: Arc<Mutex<Vec<Value>>>,
    pub policies: Arc<Mutex<Vec<Value>>>,
    pub watchers: Arc<Mutex<Vec<(Res, TcpStream)>>>,
    /// Request targets seen (path?query).
    pub seen: Arc<Mutex<Vec<String>>>,
    /// Writes: (method, path?query, JSON body).
    pub writes: Arc<Mutex<Vec<(String, String, Value)>>>,
    /// Whether the AgentPolicy CRD is installed (else 404, as a real API
    /// server answers for a resource it does not serve).
    pub crd: Arc<AtomicBool>,
}

#[derive(Clone)]
struct Shared {
    pods: Arc<Mutex<Vec<Value>>>,
    policies: Arc<Mutex<Vec<Value>>>,
    watchers: Arc<Mutex<Vec<(Res, TcpStream)>>>,
    seen: Arc<Mutex<Vec<String>>>,
    writes: Arc<Mutex<Vec<(String, String, Value)>>>,
    crd: Arc<AtomicBool>,
}

impl FakeApi {
    pub fn start(pods: Vec<Value>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let sh = Shared {
            pods: Arc::new(Mutex::new(pods)),
            policies: Arc::new(Mutex::new(Vec::new())),
            watchers: Arc::new(Mutex::new(Vec::new())),
            seen: Arc::new(Mutex::new(Vec::new())),
            writes: Arc::new(Mutex::new(Vec::new())),
            crd: Arc::new(AtomicBool::new(true)),
        };
        let s2 = sh.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let sh = s2.clone();
                std::thread::spawn(move || serve(conn, &sh));
            }
        });
        Self {
            addr,
            pods: sh.pods,
            policies: sh.policies,
            watchers: sh.watchers,
            seen: sh.seen,
            writes: sh.writes,
            crd: sh.crd,
        }
    }

    /// Send one watch event to every open watch of `res`.
    pub fn event(&self, res: Res, kind: &str, obj: &Value) {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap();
        line.push(b'\n');
        let chunk = [
            format!("{:x}\r\n", line.len()).into_bytes(),
            line,
            b"\r\n".to_vec(),
        ]
        .concat();
        for (r, s) in self.watchers.lock().unwrap().iter_mut() {
            if *r == res {
                let _ = s.write_all(&chunk).and_then(|()| s.flush());
            }
        }
    }

    pub fn watching(&self, res: Res) -> bool {
        self.watchers.lock().unwrap().iter().any(|(r, _)| *r == res)
    }

    /// Status writes so far to object `ns`/`name`, as (query, body).
    pub fn status_writes(&self, ns: &str, name: &str) -> Vec<(String, Value)> {
        let path =
            format!("/apis/enforcer.dev/v1alpha1/namespaces/{ns}/agentpolicies/{name}/status");
        self.writes
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, t, _)| m == "PATCH" && t.split('?').next() == Some(path.as_str()))
            .map(|(_, t, b)| (t.split('?').nth(1).unwrap_or("").to_string(), b.clone()))
            .collect()
    }

    /// Events posted in `ns`.
    pub fn events(&self, ns: &str) -> Vec<Value> {
        let path = format!("/apis/events.k8s.io/v1/namespaces/{ns}/events");
        self.writes
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, t, _)| m == "POST" && t.split('?').next() == Some(path.as_str()))
            .map(|(_, _, b)| b.clone())
            .collect()
    }
}

fn respond(conn: &mut TcpStream, code: &str, body: &Value) {
    let body = serde_json::to_vec(body).unwrap();
    let _ = conn.write_all(
        format!(
            "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let _ = conn.write_all(&body);
    let _ = conn.flush();
}

fn serve(mut conn: TcpStream, sh: &Shared) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        sh.seen.lock().unwrap().push(target.clone());
        let path = target.split('?').next().unwrap_or("").to_string();
        if method == "PATCH" || method == "POST" {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            sh.writes
                .lock()
                .unwrap()
                .push((method.clone(), target.clone(), v.clone()));
            respond(
                &mut conn,
                if method == "POST" {
                    "201 Created"
                } else {
                    "200 OK"
                },
                &v,
            );
            continue;
        }
        let res = if path == "/api/v1/pods" {
            Res::Pods
        } else if path == POLICIES && sh.crd.load(Ordering::SeqCst) {
            Res::Policies
        } else {
            respond(
                &mut conn,
                "404 Not Found",
                &json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                        "status": "Failure", "reason": "NotFound", "code": 404}),
            );
            continue;
        };
        if target.contains("watch=true") {
            let _ = conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            );
            let _ = conn.flush();
            sh.watchers
                .lock()
                .unwrap()
                .push((res, conn.try_clone().unwrap()));
            // Hold the watch open; events are written by FakeApi::event.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let (kind, items) = match res {
            Res::Pods if target.contains("fieldSelector=spec.nodeName%3Dnode-a") => {
                ("PodList", sh.pods.lock().unwrap().clone())
            }
            Res::Pods => ("PodList", vec![]),
            Res::Policies => ("AgentPolicyList", sh.policies.lock().unwrap().clone()),
        };
        respond(
            &mut conn,
            "200 OK",
            &json!({
                "apiVersion": if res == Res::Pods { "v1" } else { "enforcer.dev/v1alpha1" },
                "kind": kind,
                "metadata": {"resourceVersion": "100"},
                "items": items,
            }),
        );
    }
}
