//! The watcher against kube's mocked API (tower-test): realistic pod
//! objects, a list, a watch with adds/updates/deletes, a `410 Gone` and the
//! relist that follows (no API server can run on these machines).
use std::{
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{Request, Response};
use kube::{client::Body, Client};
use serde_json::{json, Value};
use tower_test::mock;

use super::*;
use crate::k8s::mock_api::{events, query};

const NODE: &str = "node-a";

fn pod(name: &str, uid: &str, rv: &str, containers: &[(&str, Option<&str>)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "agents",
            "uid": uid,
            "resourceVersion": rv,
            "labels": {"app": name},
        },
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": "research",
            "initContainers": [{"name": "setup", "image": "busybox"}],
            "containers": containers.iter().map(|(n, _)| json!({"name": n, "image": "agent:1"})).collect::<Vec<_>>(),
        },
        "status": {
            "phase": "Running",
            "qosClass": "Burstable",
            "initContainerStatuses": [{
                "name": "setup", "image": "busybox", "imageID": "", "ready": true, "restartCount": 0,
                "containerID": format!("containerd://{}", "1".repeat(64)),
            }],
            "containerStatuses": containers.iter().map(|(n, id)| {
                let mut s = json!({"name": n, "image": "agent:1", "imageID": "", "ready": id.is_some(), "restartCount": 0});
                if let Some(id) = id {
                    s["containerID"] = json!(id);
                }
                s
            }).collect::<Vec<_>>(),
        }
    })
}

fn list(rv: &str, items: Vec<Value>) -> Response<Body> {
    crate::k8s::mock_api::list("v1", "PodList", rv, items)
}

fn uids(cache: &Mutex<PodCache>) -> Vec<String> {
    cache
        .lock()
        .unwrap()
        .pods()
        .map(|p| p.info.uid.clone())
        .collect()
}

async fn wait_for(cache: &Mutex<PodCache>, want: &[&str]) {
    let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    for _ in 0..500 {
        if uids(cache) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cache {:?}, want {want:?}", uids(cache));
}

#[tokio::test]
async fn watcher_follows_the_node_and_relists_after_410_gone() {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let cache = Arc::new(Mutex::new(PodCache::default()));
    let changes = Arc::new(AtomicUsize::new(0));
    let (step_tx, mut step_rx) = tokio::sync::mpsc::channel::<()>(4);
    let agent_id = format!("containerd://{}", "a".repeat(64));
    let server = {
        let agent_id = agent_id.clone();
        tokio::spawn(async move {
            let mut handle = pin!(handle);
            // 1. The initial list, scoped to the node.
            let (req, send) = handle.next_request().await.expect("list");
            assert_eq!(req.uri().path(), "/api/v1/pods");
            let q = query(&req);
            assert!(q.contains("fieldSelector=spec.nodeName%3Dnode-a"), "{q}");
            assert!(!q.contains("watch=true"), "{q}");
            send.send_response(list(
                "100",
                vec![
                    pod("agent", "uid-agent", "90", &[("main", None)]),
                    pod("other", "uid-other", "95", &[("main", None)]),
                ],
            ));
            // 2. The watch from the list's version: an update (the app
            // container got its ID), an add and a delete.
            let (req, send) = handle.next_request().await.expect("watch");
            let q = query(&req);
            assert!(q.contains("watch=true"), "{q}");
            assert!(q.contains("resourceVersion=100"), "{q}");
            assert!(q.contains("fieldSelector=spec.nodeName%3Dnode-a"), "{q}");
            send.send_response(events(&[
                (
                    "MODIFIED",
                    pod("agent", "uid-agent", "101", &[("main", Some(&agent_id))]),
                ),
                ("ADDED", pod("third", "uid-third", "102", &[("main", None)])),
                (
                    "DELETED",
                    pod("other", "uid-other", "103", &[("main", None)]),
                ),
            ]));
            // The test checks the cache, then lets the stream go on.
            step_rx.recv().await;
            // 3. The stream ended: the watcher watches again from the last
            // version and gets 410 Gone (the version expired).
            let (req, send) = handle.next_request().await.expect("rewatch");
            let q = query(&req);
            assert!(q.contains("resourceVersion=103"), "{q}");
            send.send_response(events(&[(
                "ERROR",
                json!({"apiVersion": "v1", "kind": "Status", "metadata": {},
                       "status": "Failure", "message": "too old resource version: 103 (250)",
                       "reason": "Expired", "code": 410}),
            )]));
            // 4. It relists: `third` was deleted and `fourth` added while
            // the watch was gone.
            let (req, send) = handle.next_request().await.expect("relist");
            assert!(!query(&req).contains("watch=true"), "{}", query(&req));
            send.send_response(list(
                "250",
                vec![
                    pod("agent", "uid-agent", "101", &[("main", Some(&agent_id))]),
                    pod("fourth", "uid-fourth", "240", &[("main", None)]),
                ],
            ));
            // 5. Keep the next watch open until the test ends.
            let (_req, _send) = handle.next_request().await.expect("watch after relist");
            std::future::pending::<()>().await;
        })
    };
    let runner = {
        let (cache, changes) = (cache.clone(), changes.clone());
        tokio::spawn(run(client, NODE.into(), cache, move || {
            changes.fetch_add(1, Ordering::SeqCst);
        }))
    };

    wait_for(&cache, &["uid-agent", "uid-third"]).await;
    {
        let c = cache.lock().unwrap();
        let agent = c.get("uid-agent").unwrap();
        assert_eq!(agent.info.namespace, "agents");
        assert_eq!(agent.info.service_account, "research");
        assert_eq!(
            agent.info.labels.get("app").map(String::as_str),
            Some("agent")
        );
        assert_eq!(agent.qos.as_deref(), Some("Burstable"));
        let kinds: Vec<(ContainerKind, Option<&str>)> = agent
            .containers
            .iter()
            .map(|c| (c.kind, c.container_id.as_deref()))
            .collect();
        let init_id = format!("containerd://{}", "1".repeat(64));
        assert_eq!(
            kinds,
            vec![
                (ContainerKind::Init, Some(init_id.as_str())),
                (ContainerKind::App, Some(agent_id.as_str())),
            ]
        );
    }
    step_tx.send(()).await.unwrap();
    // After the 410 and the relist, exactly the listed pods remain.
    wait_for(&cache, &["uid-agent", "uid-fourth"]).await;
    assert!(changes.load(Ordering::SeqCst) >= 3);
    runner.abort();
    server.abort();
}

#[test]
fn pod_entry_needs_identity_fields_and_reads_every_container_kind() {
    let mut p: Pod = serde_json::from_value(pod(
        "agent",
        "uid-1",
        "1",
        &[("main", Some("cri-o://abc")), ("sidecar", Some(""))],
    ))
    .unwrap();
    p.status.as_mut().unwrap().ephemeral_container_statuses = Some(vec![serde_json::from_value(
        json!({"name": "debug", "image": "busybox", "imageID": "",
            "ready": false, "restartCount": 0, "containerID": "cri-o://def"}),
    )
    .unwrap()]);
    let e = pod_entry(&p).unwrap();
    let got: Vec<(&str, ContainerKind, Option<&str>)> = e
        .containers
        .iter()
        .map(|c| (c.name.as_str(), c.kind, c.container_id.as_deref()))
        .collect();
    let init_id = format!("containerd://{}", "1".repeat(64));
    assert_eq!(
        got,
        vec![
            ("setup", ContainerKind::Init, Some(init_id.as_str())),
            ("main", ContainerKind::App, Some("cri-o://abc")),
            // An empty ID (not created yet) is no ID.
            ("sidecar", ContainerKind::App, None),
            ("debug", ContainerKind::Ephemeral, Some("cri-o://def")),
        ]
    );
    p.metadata.uid = None;
    assert!(pod_entry(&p).is_none());
}

#[test]
fn cache_replaces_its_content_at_the_end_of_a_relist() {
    let p = |name: &str, uid: &str| -> Pod {
        serde_json::from_value(pod(name, uid, "1", &[("main", None)])).unwrap()
    };
    let mut c = PodCache::default();
    assert!(c.apply(watcher::Event::Apply(p("a", "1"))));
    assert!(!c.apply(watcher::Event::Apply(p("a", "1"))), "no change");
    assert!(c.apply(watcher::Event::Apply(p("b", "2"))));
    assert!(!c.apply(watcher::Event::Init));
    assert!(!c.apply(watcher::Event::InitApply(p("b", "2"))));
    assert!(!c.apply(watcher::Event::InitApply(p("c", "3"))));
    // Until InitDone the old content stays visible.
    assert_eq!(c.len(), 2);
    assert!(c.get("1").is_some());
    assert!(c.apply(watcher::Event::InitDone));
    let uids: Vec<&str> = c.pods().map(|p| p.info.uid.as_str()).collect();
    assert_eq!(uids, vec!["2", "3"]);
    assert!(c.apply(watcher::Event::Delete(p("b", "2"))));
    assert!(!c.apply(watcher::Event::Delete(p("b", "2"))));
}
