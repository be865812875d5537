//! The Kubernetes Service source (watchers on Services and EndpointSlices
//! with kube-proxy's label selector) against recorded apiserver traffic
//! (fixtures/kube), down to the frontends the maps get.
use std::{collections::HashMap, net::Ipv4Addr, time::Duration};

use beeline_agent::{
    owners::services::desired_frontends,
    sources::services::{self, LABEL_SELECTOR},
};
use http::{Request, Response};
use kube::client::Body;
use tower_test::mock;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (backend address, port) of a frontend, for `node-a` at 192.168.50.10.
fn backends_of(
    objects: &[services::Object],
    addr: [u8; 4],
    port: u16,
    scope: u8,
) -> Option<Vec<(Ipv4Addr, u16)>> {
    desired_frontends(objects, "node-a", Some(Ipv4Addr::new(192, 168, 50, 10)))
        .into_iter()
        .find(|f| f.key.addr == addr && f.key.port == port.to_be_bytes() && f.key.scope == scope)
        .map(|f| f.backends.iter().map(|(a, p, _)| (*a, *p)).collect())
}

#[tokio::test]
async fn services_and_slices_follow_list_and_watch_with_kube_proxys_selector() {
    let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (mut rx, task) = services::from_kubernetes(kube::Client::new(service, "default"));
    // Each watcher lists, then watches from the list's resourceVersion.
    let mut script: HashMap<&str, Vec<&str>> = HashMap::from([
        (
            "/api/v1/services",
            vec!["list-services.json", "watch-services.jsonl"],
        ),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            vec!["list-endpointslices.json", "watch-endpointslices.jsonl"],
        ),
    ]);
    let served = tokio::spawn(async move {
        let mut queries = Vec::new();
        while script.values().any(|s| !s.is_empty()) {
            let (request, respond) =
                tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                    .await
                    .expect("the watchers stopped asking")
                    .expect("mock closed");
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let next = script
                .get_mut(path.as_str())
                .unwrap_or_else(|| panic!("unexpected request {path}?{query}"));
            let body = fixture(next.remove(0));
            respond.send_response(Response::builder().body(Body::from(body)).unwrap());
            queries.push((path, query));
        }
        // Leave the next watch requests pending.
        (queries, handle)
    });
    let (queries, _handle) = served.await.unwrap();
    let selector: String = form_urlencoded::byte_serialize(LABEL_SELECTOR.as_bytes()).collect();
    for (path, query) in &queries {
        assert!(
            query.contains(&format!("labelSelector={selector}")),
            "{path}?{query}"
        );
    }
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ] {
        let watches: Vec<&String> = queries
            .iter()
            .filter(|(p, q)| p == path && q.contains("watch=true"))
            .map(|(_, q)| q)
            .collect();
        assert_eq!(watches.len(), 1, "{path}: {queries:?}");
        assert!(
            watches[0].contains("resourceVersion=2000"),
            "{}",
            watches[0]
        );
    }

    // The last snapshot holds every event: the apiserver's Service, web
    // with externalTrafficPolicy Cluster, a CoreDNS endpoint terminating.
    let mut last = Vec::new();
    let done = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            last = rx.borrow_and_update().clone();
            if backends_of(&last, [10, 96, 0, 1], 443, 0).is_some()
                && backends_of(&last, [10, 96, 0, 10], 53, 0).is_some_and(|b| b.len() == 1)
                && desired_frontends(&last, "node-a", Some(Ipv4Addr::new(192, 168, 50, 10)))
                    .iter()
                    .any(|f| f.key.scope == 1 && f.flags != 0)
            {
                return;
            }
            rx.changed().await.unwrap();
        }
    })
    .await;
    assert!(done.is_ok(), "never saw every event: {last:#?}");
    assert_eq!(
        backends_of(&last, [10, 96, 0, 1], 443, 0),
        Some(vec![(Ipv4Addr::new(192, 168, 50, 10), 6443)])
    );
    // Ready endpoints only: the terminating one on node-b is out.
    assert_eq!(
        backends_of(&last, [10, 96, 0, 10], 53, 0),
        Some(vec![(Ipv4Addr::new(10, 244, 0, 5), 53)])
    );
    // The named target port "http" resolved through the slice: 8080.
    assert_eq!(
        backends_of(&last, [10, 96, 12, 34], 80, 0),
        Some(vec![(Ipv4Addr::new(10, 244, 0, 7), 8080)])
    );
    assert_eq!(
        backends_of(&last, [192, 168, 50, 10], 30080, 1),
        Some(vec![(Ipv4Addr::new(10, 244, 0, 7), 8080)])
    );
    task.abort();
}
