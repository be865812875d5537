//! kube-proxy's netfilter rules, written into a simulated node's network
//! namespace exactly as kube-proxy writes them, without a kube-proxy.
//!
//! Source of the shapes: kubernetes/kubernetes `pkg/proxy/iptables/proxier.go`
//! and `pkg/proxy/nftables/proxier.go` as of commit 531be81208e2 (master,
//! read through the code search; the rule-writing code there is that of
//! v1.34). The iptables shapes have been stable since v1.29 (the
//! conditional `--ctstate INVALID -j DROP`); the nftables base chains
//! (`filter-prerouting-pre-dnat` and `filter-output-pre-dnat` at -110,
//! `filter-input/forward/output` at 0) are the v1.34 ones
//! (kubernetes/kubernetes#132456, also cherry-picked into 1.33 patch
//! releases; v1.31-1.32 had `filter-*` at -110 and `filter-output-post-dnat`).
//! The nft text follows sigs.k8s.io/knftables v0.0.22's `Transaction`
//! writer (what kube-proxy pipes to `nft -f -`), checked against the
//! expected dumps in `pkg/proxy/{iptables,nftables}/proxier_test.go`, where
//! the chain-name vectors of the unit tests in `names.rs` come from.
//!
//! Modelled: one IPv4 proxier; ClusterIP and NodePort Services (TCP, UDP),
//! ready endpoints, `externalTrafficPolicy: Local` (KUBE-SVL-/KUBE-EXT- and
//! `local-`/`external-` chains with the short-circuit rules),
//! `sessionAffinity: ClientIP` (`-m recent` / nft affinity sets), Services
//! without endpoints (REJECT in filter / `reject-chain`), the masquerade mark
//! (bit 14, `--random-fully`), `--cluster-cidr` local-traffic detection,
//! `masqueradeAll`, `--nodeport-addresses` (default: all local addresses in
//! iptables mode, the node IPs ("primary") in nftables mode), iptables
//! `localhostNodePorts` (KUBE-FIREWALL's localnet rule, `route_localnet=1`),
//! `nf_conntrack_tcp_be_liberal` (no INVALID rule), "large cluster mode" (no
//! per-endpoint comments past 1,000 endpoints), the jump rules and canary
//! chains kube-proxy adds with `iptables -N/-C/-I`, the ServiceCIDR "drop
//! unallocated ClusterIPs" rule, and endpoint order (kube-proxy sorts
//! endpoints by "ip:port").
//!
//! Not modelled: IPv6 and dual stack; SCTP; LoadBalancer ingress IPs,
//! `loadBalancerSourceRanges` (no KUBE-FW-/`firewall-` chains; the
//! `firewall-ips` map stays empty) and health-check node ports; externalIPs;
//! `internalTrafficPolicy: Local`; topology-aware hints;
//! serving-but-terminating endpoints (only `ready` counts); named target
//! ports; nfacct counters (kube-proxy's nfacct runner is taken as
//! unavailable: no `-m nfacct` rules, no 127.0.0.0/8 NodePort accounting
//! rule); loopback addresses in `--nodeport-addresses`; kube-proxy's
//! partial syncs and the element bookkeeping of its later nftables syncs
//! (`install` removes what is there and writes a first full sync);
//! conntrack sysctls and stale UDP conntrack flushing; the other
//! detect-local modes (bridge, interface name prefix). kube-proxy iterates a
//! Go map, so its order of Services is random; here it is the input's.
//!
//! Loading differs from kube-proxy in one way: the restore input / nft
//! transaction is fed in slices of Services rather than one call (see
//! [`InstallOptions`]), because one call is quadratic in both loaders; the
//! rules left behind are the same, chain by chain and in order.
//!
//! The nftables proxier writes no `ct state invalid drop` rule: only the
//! iptables one drops INVALID packets (KUBE-FORWARD, FORWARD hook).
mod install;
mod iptables;
mod model;
mod names;
mod nftables;
mod plan;
mod synthetic;

pub use install::{
    InstallOptions, InstallReport, InstalledRules, dump, install, install_guarded,
    install_guarded_with, install_with, netns_path, remove,
};
pub use iptables::{
    IPTABLES_CANARY_CHAIN, JumpRule, iptables_jump_rules, render_iptables_restore,
    render_iptables_restore_batches,
};
pub use model::{NodeSettings, Protocol, ProxyMode, Service, ServiceEndpoint, ServicePort};
pub use names::{
    IptablesChains, NftChains, iptables_chains, iptables_endpoint_chain, nft_chains,
    nft_endpoint_chain_base, port_proto_hash, service_port_name,
};
pub use nftables::{render_nftables, render_nftables_batches};
pub use plan::{masquerade_mark, probability};
pub use synthetic::synthetic_services;

/// Fixtures shared by the submodules' tests, and the tests that span both
/// renderers.
#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        time::{Duration, Instant},
    };

    use super::*;

    pub(super) fn svc1() -> Service {
        Service {
            namespace: "ns1".into(),
            name: "svc1".into(),
            cluster_ip: Ipv4Addr::new(172, 30, 0, 41),
            ports: vec![ServicePort {
                name: "p80".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 80,
                node_port: None,
            }],
            endpoints: vec![ServiceEndpoint {
                ip: Ipv4Addr::new(10, 180, 0, 1),
                local: false,
                ready: true,
            }],
            external_traffic_policy_local: false,
            session_affinity_seconds: None,
        }
    }

    pub(super) fn node() -> NodeSettings {
        NodeSettings {
            node_ips: vec![Ipv4Addr::new(192, 168, 0, 2)],
            cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
            service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
            ..NodeSettings::default()
        }
    }

    /// Each chain's lines (declarations and rules) in order, per table.
    fn iptables_chain_contents(inputs: &[String]) -> Vec<(String, String)> {
        let mut table = String::new();
        let mut lines: Vec<(String, String)> = Vec::new();
        for input in inputs {
            for line in input.lines() {
                if let Some(t) = line.strip_prefix('*') {
                    table = t.to_string();
                } else if line != "COMMIT" {
                    lines.push((table.clone(), line.to_string()));
                }
            }
        }
        // Order matters within a chain, not between chains.
        let chain = |l: &str| {
            let l = l.trim_start_matches(':').trim_start_matches("-A ");
            l.split_whitespace().next().unwrap_or("").to_string()
        };
        lines.sort_by_key(|(t, l)| (t.clone(), chain(l), !l.starts_with(':')));
        lines
    }

    #[test]
    fn batches_hold_the_same_rules_as_one_call() {
        let mut services = synthetic_services(25, 3);
        services[3].endpoints.clear();
        services[7].ports[0].node_port = Some(30007);
        services[8].ports[0].node_port = Some(30008);
        services[8].external_traffic_policy_local = true;
        let node = node();
        let one = render_iptables_restore(&services, &node);
        let batches = render_iptables_restore_batches(&services, &node, 4);
        assert_eq!(batches.len(), 7);
        assert_eq!(
            iptables_chain_contents(&batches),
            iptables_chain_contents(&[one])
        );
        // Only the first batch declares (and so flushes) the top-level chains.
        assert!(batches[1..].iter().all(|b| !b.contains(":KUBE-SERVICES")));
        let one = render_nftables(&services, &node);
        let batches = render_nftables_batches(&services, &node, 4);
        assert_eq!(batches.len(), 7);
        assert_eq!(batches.concat(), one);
    }

    #[test]
    fn ten_thousand_services_render_quickly() {
        let services = synthetic_services(10_000, 2);
        let node = node();
        let start = Instant::now();
        let ipt = render_iptables_restore(&services, &node);
        let nft = render_nftables(&services, &node);
        let took = start.elapsed();
        // Past 1,000 endpoints kube-proxy drops the per-endpoint comments.
        assert!(!ipt.contains("-> 10.244."));
        assert!(ipt.lines().count() > 80_000);
        assert!(nft.lines().count() > 80_000);
        assert!(took < Duration::from_secs(10), "{took:?}");
    }
}
