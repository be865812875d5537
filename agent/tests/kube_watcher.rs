//! The Kubernetes node source (a reflector keeping each Node's route)
//! against recorded apiserver traffic
//! (fixtures/kube): list, watch events (modify, add, bookmark, delete), a
//! 410 Expired that forces a relist. The test plays the apiserver through a
//! tower-test mock and checks each request the watcher makes.
use std::time::Duration;

use beeline_agent::sources::{self, nodes::NodeRoute};
use http::{Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::{Api, client::Body, runtime::watcher};
use tokio::sync::watch;
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Answers the watcher's next request with `fixture` and returns the query.
async fn answer(handle: &mut Handle, fixture_name: &str) -> String {
    let (request, respond) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
        .await
        .expect("the watcher made no request")
        .expect("mock closed");
    assert_eq!(request.uri().path(), "/api/v1/nodes");
    let query = request.uri().query().unwrap_or_default().to_string();
    respond.send_response(
        Response::builder()
            .body(Body::from(fixture(fixture_name)))
            .unwrap(),
    );
    query
}

async fn next_snapshot(rx: &mut watch::Receiver<Vec<NodeRoute>>) -> Vec<(String, Vec<String>)> {
    tokio::time::timeout(Duration::from_secs(5), rx.changed())
        .await
        .expect("no snapshot published")
        .unwrap();
    rx.borrow_and_update()
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                n.pod_cidrs.iter().map(|c| c.to_string()).collect(),
            )
        })
        .collect()
}

fn named(entries: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    entries
        .iter()
        .map(|(n, c)| (n.to_string(), c.iter().map(|s| s.to_string()).collect()))
        .collect()
}

#[tokio::test]
async fn follows_list_then_watch_events_and_relists_after_expiry() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<Node> = Api::all(kube::Client::new(service, "default"));
    let (tx, mut rx) = watch::channel(Vec::new());
    let task = tokio::spawn(sources::reflect(
        watcher(api, watcher::Config::default()),
        NodeRoute::from_node,
        tx,
    ));

    // Initial list: node-b has no podCIDR yet.
    let query = answer(&mut handle, "list-nodes.json").await;
    assert!(
        !query.contains("watch=true"),
        "expected a list first: {query}"
    );
    assert_eq!(
        next_snapshot(&mut rx).await,
        named(&[("node-a", &["10.244.0.0/24"]), ("node-b", &[])])
    );

    // The watch resumes from the list's resourceVersion; node-b gets a podCIDR.
    let query = answer(&mut handle, "watch-1-podcidr-assigned.jsonl").await;
    assert!(
        query.contains("watch=true") && query.contains("resourceVersion=1000"),
        "{query}"
    );
    assert_eq!(
        next_snapshot(&mut rx).await,
        named(&[
            ("node-a", &["10.244.0.0/24"]),
            ("node-b", &["10.244.1.0/24"])
        ])
    );

    // The stream ended: the watcher reconnects from the last event; a node joins.
    let query = answer(&mut handle, "watch-2-node-added.jsonl").await;
    assert!(query.contains("resourceVersion=1001"), "{query}");
    assert_eq!(
        next_snapshot(&mut rx).await,
        named(&[
            ("node-a", &["10.244.0.0/24"]),
            ("node-b", &["10.244.1.0/24"]),
            ("node-c", &["10.244.2.0/24"]),
        ])
    );

    // Resumes from the bookmark; node-a is deleted.
    let query = answer(&mut handle, "watch-3-node-deleted.jsonl").await;
    assert!(query.contains("resourceVersion=1003"), "{query}");
    assert_eq!(
        next_snapshot(&mut rx).await,
        named(&[
            ("node-b", &["10.244.1.0/24"]),
            ("node-c", &["10.244.2.0/24"])
        ])
    );

    // 410 Expired: the watcher relists; the snapshot is replaced, not merged
    // (node-c vanished while the watch was down, node-d appeared).
    let query = answer(&mut handle, "watch-4-expired.jsonl").await;
    assert!(query.contains("resourceVersion=1004"), "{query}");
    let query = answer(&mut handle, "relist-nodes.json").await;
    assert!(!query.contains("watch=true"), "expected a relist: {query}");
    assert_eq!(
        next_snapshot(&mut rx).await,
        named(&[
            ("node-b", &["10.244.1.0/24"]),
            ("node-d", &["10.244.3.0/24"])
        ])
    );
    task.abort();
}
