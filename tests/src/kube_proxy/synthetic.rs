//! Synthetic Services: a benchmark's load.
use std::net::Ipv4Addr;

use super::model::{Protocol, Service, ServiceEndpoint, ServicePort};

/// `n` ClusterIP Services in 10.96.0.0/12 (from 10.96.1.0), each with one
/// TCP port 80 -> 8080 and `endpoints_each` ready endpoints from 10.244.0.0/16,
/// the first of them local: a load like a benchmark's.
pub fn synthetic_services(n: usize, endpoints_each: usize) -> Vec<Service> {
    let ip = |base: u32, i: usize| Ipv4Addr::from(base + i as u32);
    (0..n)
        .map(|i| Service {
            namespace: format!("ns{}", i % 100),
            name: format!("svc{i}"),
            cluster_ip: ip(u32::from(Ipv4Addr::new(10, 96, 1, 0)), i),
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
                node_port: None,
            }],
            endpoints: (0..endpoints_each)
                .map(|j| ServiceEndpoint {
                    ip: ip(
                        u32::from(Ipv4Addr::new(10, 244, 0, 2)),
                        (i * endpoints_each + j) % 65000,
                    ),
                    local: j == 0,
                    ready: true,
                })
                .collect(),
            external_traffic_policy_local: false,
            session_affinity_seconds: None,
        })
        .collect()
}
