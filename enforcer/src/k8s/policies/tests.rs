//! The AgentPolicy watcher and the status writer against kube's mocked API
//! (tower-test): the requests the daemon sends, with their paths, field
//! manager and bodies, and the responses a real API server gives.
use std::{
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{Request, Response, StatusCode};
use kube::{client::Body, Client};
use serde_json::{json, Value};
use tower_test::mock;

use super::*;
use crate::k8s::mock_api::{events, query};

const PATH: &str = "/apis/enforcer.dev/v1alpha1/agentpolicies";

fn object(ns: &str, name: &str, uid: &str, rv: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "enforcer.dev/v1alpha1",
        "kind": "AgentPolicy",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": rv, "generation": 1},
        "spec": spec,
    })
}

fn list(rv: &str, items: Vec<Value>) -> Response<Body> {
    crate::k8s::mock_api::list("enforcer.dev/v1alpha1", "AgentPolicyList", rv, items)
}

async fn body_json(req: Request<Body>) -> Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn names(cache: &Mutex<PolicyCache>) -> Vec<String> {
    cache
        .lock()
        .unwrap()
        .objects()
        .map(|o| format!("{}/{}", o.namespace, o.name))
        .collect()
}

async fn wait_for(cache: &Mutex<PolicyCache>, want: &[&str]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    for _ in 0..500 {
        let mut got = names(cache);
        got.sort();
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cache {:?}, want {want:?}", names(cache));
}

#[tokio::test]
async fn watcher_lists_all_namespaces_follows_changes_and_relists_after_410() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let cache = Arc::new(Mutex::new(PolicyCache::default()));
    let changes = Arc::new(AtomicUsize::new(0));
    let (step_tx, mut step_rx) = tokio::sync::mpsc::channel::<()>(4);
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        // 1. The list, over all namespaces. `bad` has a value the typed spec
        //    refuses (host bits set): it must not break the list.
        let (req, send) = handle.next_request().await.expect("list");
        assert_eq!(req.uri().path(), PATH);
        assert!(!query(&req).contains("watch=true"), "{}", query(&req));
        send.send_response(list(
            "100",
            vec![
                object("agents", "research", "u1", "90", json!({"mode": "audit"})),
                object(
                    "team-b",
                    "bad",
                    "u2",
                    "95",
                    json!({"egress": [{"cidr": "10.0.0.1/8"}]}),
                ),
            ],
        ));
        // 2. The watch: modify, add, delete.
        let (req, send) = handle.next_request().await.expect("watch");
        assert_eq!(req.uri().path(), PATH);
        let q = query(&req);
        assert!(
            q.contains("watch=true") && q.contains("resourceVersion=100"),
            "{q}"
        );
        send.send_response(events(&[
            (
                "MODIFIED",
                object(
                    "agents",
                    "research",
                    "u1",
                    "101",
                    json!({"mode": "enforce"}),
                ),
            ),
            ("ADDED", object("agents", "coder", "u3", "102", json!({}))),
            ("DELETED", object("team-b", "bad", "u2", "103", json!({}))),
        ]));
        step_rx.recv().await;
        // 3. The watch resumes from 103 and gets 410 Gone.
        let (req, send) = handle.next_request().await.expect("rewatch");
        assert!(
            query(&req).contains("resourceVersion=103"),
            "{}",
            query(&req)
        );
        send.send_response(events(&[(
            "ERROR",
            json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                   "status": "Failure", "message": "too old resource version: 103 (250)",
                   "reason": "Expired", "code": 410}),
        )]));
        // 4. The relist: `coder` was deleted, `new` created meanwhile.
        let (req, send) = handle.next_request().await.expect("relist");
        assert_eq!(req.uri().path(), PATH);
        assert!(!query(&req).contains("watch=true"));
        send.send_response(list(
            "250",
            vec![
                object(
                    "agents",
                    "research",
                    "u1",
                    "101",
                    json!({"mode": "enforce"}),
                ),
                object("team-c", "new", "u4", "240", json!({})),
            ],
        ));
        let (_req, _send) = handle.next_request().await.expect("watch after relist");
        std::future::pending::<()>().await;
    });
    let runner = {
        let (cache, changes) = (cache.clone(), changes.clone());
        tokio::spawn(run(client, cache, move || {
            changes.fetch_add(1, Ordering::SeqCst);
        }))
    };
    wait_for(&cache, &["agents/research", "agents/coder"]).await;
    {
        let c = cache.lock().unwrap();
        let r = c.get("u1").unwrap();
        assert_eq!(r.spec, json!({"mode": "enforce"}), "the MODIFIED spec");
        assert_eq!(r.generation, Some(1));
    }
    step_tx.send(()).await.unwrap();
    wait_for(&cache, &["agents/research", "team-c/new"]).await;
    assert!(changes.load(Ordering::SeqCst) >= 3);
    runner.abort();
    server.abort();
}

#[tokio::test]
async fn a_bad_spec_value_in_the_list_is_kept_raw_for_the_validator() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let cache = Arc::new(Mutex::new(PolicyCache::default()));
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        let (_req, send) = handle.next_request().await.expect("list");
        send.send_response(list(
            "7",
            vec![object(
                "agents",
                "bad",
                "u9",
                "5",
                json!({"egress": [{"cidr": "10.0.0.1/8"}]}),
            )],
        ));
        let (_req, _send) = handle.next_request().await.expect("watch");
        std::future::pending::<()>().await;
    });
    let runner = tokio::spawn(run(client, cache.clone(), || {}));
    wait_for(&cache, &["agents/bad"]).await;
    let spec = cache.lock().unwrap().get("u9").unwrap().spec.clone();
    let e = crate::k8s::crd::object_policy("agents", "bad", &spec, "example.org")
        .unwrap_err()
        .to_string();
    assert!(e.contains("host bits"), "{e}");
    runner.abort();
    server.abort();
}

#[tokio::test]
async fn missing_crd_is_recognised_and_retried() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let cache = Arc::new(Mutex::new(PolicyCache::default()));
    let server = tokio::spawn(async move {
        let mut handle = pin!(handle);
        // The CRD is not installed: 404 (as a Status), then it is.
        let (req, send) = handle.next_request().await.expect("list");
        assert_eq!(req.uri().path(), PATH);
        let status = json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
            "status": "Failure", "message": "the server could not find the requested resource",
            "reason": "NotFound", "code": 404});
        send.send_response(
            Response::builder()
                .status(StatusCode::NOT_FOUND)
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap(),
        );
        let (req, send) = handle.next_request().await.expect("list again");
        assert_eq!(req.uri().path(), PATH);
        send.send_response(list(
            "3",
            vec![object("agents", "late", "u5", "2", json!({}))],
        ));
        let (_req, _send) = handle.next_request().await.expect("watch");
        std::future::pending::<()>().await;
    });
    // The stream reports the 404 as "not found" and goes on.
    let stream = all_policies(client);
    let mut stream = pin!(stream);
    loop {
        match stream.next().await.unwrap() {
            Err(e) => {
                assert!(is_not_found(&e), "{e:?}");
                break;
            }
            Ok(watcher::Event::Init) => {}
            Ok(ev) => panic!("expected the 404, got {ev:?}"),
        }
    }
    assert!(cache.lock().unwrap().is_empty());
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("retried after backoff")
            .unwrap();
        let done = matches!(ev, Ok(watcher::Event::InitDone));
        cache.lock().unwrap().apply(ev.unwrap());
        if done {
            break;
        }
    }
    assert_eq!(names(&cache), vec!["agents/late".to_string()]);
    server.abort();
}

fn report(verdict: Verdict, enforced: bool, current: Option<AgentPolicyStatus>) -> Report {
    Report {
        uid: "u1".into(),
        namespace: "agents".into(),
        name: "research".into(),
        generation: Some(4),
        current,
        verdict,
        node: NodeStatus {
            node: String::new(),
            enforced,
            policy_hash: enforced.then(|| "abc".to_string()),
            bound_pods: 1,
            message: None,
        },
    }
}

fn at(secs: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
}

#[test]
fn field_manager_is_per_node_and_short_enough() {
    assert_eq!(field_manager("node-a"), "enforcer-node-node-a");
    let long = "é".repeat(200);
    assert_eq!(field_manager(&long).chars().count(), 128);
}

#[test]
fn desired_status_writes_only_changes_and_keeps_transition_times() {
    let valid = Verdict::Valid("abc".into());
    // Nothing stored: write, with this node's entry.
    let want = desired_status("node-a", &report(valid.clone(), true, None), None, at(10)).unwrap();
    assert_eq!(want.observed_generation, Some(4));
    assert_eq!(want.policy_hash.as_deref(), Some("abc"));
    let c = want.accepted_condition().unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Valid"));
    assert_eq!(c.last_transition_time, at(10));
    assert_eq!(want.nodes.len(), 1);
    assert_eq!(want.nodes[0].node, "node-a");
    assert!(want.nodes[0].enforced);

    // Stored by another node at another time, plus that node's own entry:
    // the same for node-a, no write.
    let mut stored = want.clone();
    stored.conditions[0].last_transition_time = at(5);
    stored.nodes.push(NodeStatus {
        node: "node-b".into(),
        enforced: false,
        policy_hash: None,
        bound_pods: 0,
        message: Some("no BPF LSM".into()),
    });
    stored.nodes.reverse();
    assert_eq!(
        desired_status(
            "node-a",
            &report(valid.clone(), true, Some(stored.clone())),
            None,
            at(20)
        ),
        None
    );
    // Already written by this node (not echoed yet): no write either.
    assert_eq!(
        desired_status(
            "node-a",
            &report(valid.clone(), true, None),
            Some(&want),
            at(30)
        ),
        None
    );

    // This node's bound pods changed: write, the transition time kept.
    let mut r = report(valid.clone(), true, Some(stored.clone()));
    r.node.bound_pods = 2;
    let w = desired_status("node-a", &r, None, at(40)).unwrap();
    assert_eq!(w.accepted_condition().unwrap().last_transition_time, at(5));
    assert_eq!(w.nodes.len(), 1, "only its own entry: {w:?}");
    assert_eq!(w.nodes[0].bound_pods, 2);

    // Rejected: the condition flips, with a new transition time and the
    // errors; the old version is still enforced here.
    let errors = vec!["agentpolicy/agents/research:9:11: spec.egress[0].cidr: bad".to_string()];
    let w = desired_status(
        "node-a",
        &report(Verdict::Invalid(errors.clone()), true, Some(stored)),
        None,
        at(50),
    )
    .unwrap();
    let c = w.accepted_condition().unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
    assert_eq!(c.message, errors[0]);
    assert_eq!(c.last_transition_time, at(50));
    assert_eq!(w.policy_hash, None);
    assert!(w.nodes[0].enforced);
}

#[tokio::test]
async fn status_writer_applies_the_status_per_node_records_an_event_and_skips_no_change() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let errors = vec!["agentpolicy/agents/research:9:11: spec.egress[0].cidr: bad".to_string()];
    let rejected = report(Verdict::Invalid(errors.clone()), true, None);
    let valid = report(Verdict::Valid("abc".into()), true, None);
    let server = {
        let errors = errors.clone();
        tokio::spawn(async move {
            let mut handle = pin!(handle);
            // 1. Server-side apply of the status subresource, as node-a.
            let (req, send) = handle.next_request().await.expect("status patch");
            assert_eq!(req.method(), http::Method::PATCH);
            assert_eq!(
                req.uri().path(),
                "/apis/enforcer.dev/v1alpha1/namespaces/agents/agentpolicies/research/status"
            );
            let q = query(&req);
            assert!(q.contains("fieldManager=enforcer-node-node-a"), "{q}");
            assert!(q.contains("force=true"), "{q}");
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let body = body_json(req).await;
            assert_eq!(body["apiVersion"], "enforcer.dev/v1alpha1");
            assert_eq!(body["kind"], "AgentPolicy");
            assert_eq!(body["metadata"]["name"], "research");
            assert_eq!(body["metadata"]["namespace"], "agents");
            assert!(body.get("spec").is_none(), "no spec in a status apply");
            let st = &body["status"];
            assert_eq!(st["observedGeneration"], 4);
            assert_eq!(st["conditions"][0]["type"], "Accepted");
            assert_eq!(st["conditions"][0]["status"], "False");
            assert_eq!(st["conditions"][0]["reason"], "Invalid");
            assert_eq!(st["conditions"][0]["message"], errors[0].as_str());
            assert_eq!(
                st["nodes"],
                json!([{"node": "node-a", "enforced": true, "policyHash": "abc", "boundPods": 1}])
            );
            let mut echo = body.clone();
            echo["metadata"]["uid"] = json!("u1");
            echo["metadata"]["resourceVersion"] = json!("12");
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&echo).unwrap(),
            )));
            // 2. The rejection event, regarding the object.
            let (req, send) = handle.next_request().await.expect("event");
            assert_eq!(req.method(), http::Method::POST);
            assert_eq!(
                req.uri().path(),
                "/apis/events.k8s.io/v1/namespaces/agents/events"
            );
            let ev = body_json(req).await;
            assert_eq!(ev["type"], "Warning");
            assert_eq!(ev["reason"], "PolicyRejected");
            assert_eq!(ev["regarding"]["kind"], "AgentPolicy");
            assert_eq!(ev["regarding"]["name"], "research");
            assert_eq!(ev["regarding"]["uid"], "u1");
            assert_eq!(ev["reportingInstance"], "node-a");
            let note = ev["note"].as_str().unwrap();
            assert!(
                note.contains("previously accepted version stays") && note.contains(":9:11:"),
                "{note}"
            );
            send.send_response(Response::new(Body::from(serde_json::to_vec(&ev).unwrap())));
            // 3. The next request is the valid version's status (the
            //    unchanged report in between sent nothing): no event.
            let (req, send) = handle.next_request().await.expect("second status patch");
            assert_eq!(req.method(), http::Method::PATCH);
            let body = body_json(req).await;
            assert_eq!(body["status"]["conditions"][0]["status"], "True");
            assert_eq!(body["status"]["policyHash"], "abc");
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&body).unwrap(),
            )));
            // Nothing else may arrive.
            let more =
                tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await;
            assert!(more.is_err(), "unexpected request after the last write");
        })
    };
    let mut w = StatusWriter::new(client, "node-a");
    assert_eq!(w.sync(std::slice::from_ref(&rejected)).await, 1);
    assert_eq!(
        w.sync(std::slice::from_ref(&rejected)).await,
        0,
        "no change"
    );
    assert_eq!(w.sync(std::slice::from_ref(&valid)).await, 1);
    assert_eq!(w.sync(std::slice::from_ref(&valid)).await, 0);
    server.await.unwrap();
}

#[test]
fn cache_ignores_status_only_changes_but_keeps_the_status() {
    let o = |spec: Value, status: Option<Value>| -> DynamicObject {
        let mut v = object("agents", "research", "u1", "1", spec);
        if let Some(st) = status {
            v["status"] = st;
        }
        serde_json::from_value(v).unwrap()
    };
    let mut c = PolicyCache::default();
    assert!(c.apply(watcher::Event::Apply(o(json!({}), None))));
    let st = json!({"observedGeneration": 1, "policyHash": "abc"});
    assert!(
        !c.apply(watcher::Event::Apply(o(json!({}), Some(st)))),
        "status only"
    );
    assert_eq!(
        c.get("u1")
            .unwrap()
            .status
            .as_ref()
            .unwrap()
            .policy_hash
            .as_deref(),
        Some("abc")
    );
    assert!(c.apply(watcher::Event::Apply(o(json!({"mode": "audit"}), None))));
    // A relist with the same objects is no change; with one less, it is.
    assert!(!c.apply(watcher::Event::Init));
    assert!(!c.apply(watcher::Event::InitApply(o(json!({"mode": "audit"}), None))));
    assert!(!c.apply(watcher::Event::InitDone));
    assert!(!c.apply(watcher::Event::Init));
    assert!(c.apply(watcher::Event::InitDone));
    assert!(c.is_empty());
}
