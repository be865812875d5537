//! nftables mode: the `nft -f -` transaction of a first full sync.
use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr};

use super::{
    model::{NodeSettings, ProxyMode, Service},
    names::{nft_chains, nft_endpoint_chain_base},
    plan::{PortPlan, masquerade_mark, nodeport_ips},
};

/// The transaction kube-proxy's nftables proxier pipes to `nft -f -` on its
/// first (full) sync, when table `ip kube-proxy` holds nothing of its own.
pub fn render_nftables(services: &[Service], node: &NodeSettings) -> String {
    render_nftables_batches(services, node, usize::MAX).concat()
}

/// [`render_nftables`] cut at Service boundaries into transactions of at
/// most `services_per_batch` Services each (the first also sets the table
/// up), to be run one after the other: the same commands in the same order.
pub fn render_nftables_batches(
    services: &[Service],
    node: &NodeSettings,
    services_per_batch: usize,
) -> Vec<String> {
    const T: &str = "ip kube-proxy";
    let mark = masquerade_mark(node.masquerade_bit);
    let nodeport_ips = nodeport_ips(node, ProxyMode::Nftables);
    let per_batch = services_per_batch.max(1);
    let mut batches = Vec::new();
    let mut out = String::with_capacity(4096 + services.len().min(per_batch) * 1536);
    let mut created: HashSet<String> = HashSet::new();
    let ensure_chain = |out: &mut String, created: &mut HashSet<String>, chain: &str| {
        if created.insert(chain.to_string()) {
            let _ = writeln!(out, "add chain {T} {chain}");
            let _ = writeln!(out, "flush chain {T} {chain}");
        }
    };

    // setupNFTables.
    let _ = writeln!(
        out,
        "add table {T} {{ comment \"rules for kube-proxy\" ; }}"
    );
    // name, type, hook, priority (knftables writes priorities as numbers).
    const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
        ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
        ("filter-output-pre-dnat", "filter", "output", -110),
        ("filter-input", "filter", "input", 0),
        ("filter-forward", "filter", "forward", 0),
        ("filter-output", "filter", "output", 0),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ];
    // The first sync deletes and recreates the base chains.
    for (name, ..) in BASE_CHAINS {
        let _ = writeln!(out, "add chain {T} {name}");
        let _ = writeln!(out, "delete chain {T} {name}");
    }
    for (name, kind, hook, priority) in BASE_CHAINS {
        let _ = writeln!(
            out,
            "add chain {T} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        );
        let _ = writeln!(out, "flush chain {T} {name}");
    }
    const JUMP_CHAINS: [(&str, &str, &str); 11] = [
        ("nodeport-endpoints-check", "filter-input", "ct state new"),
        ("service-endpoints-check", "filter-input", "ct state new"),
        ("service-endpoints-check", "filter-forward", "ct state new"),
        ("service-endpoints-check", "filter-output", "ct state new"),
        (
            "firewall-check",
            "filter-prerouting-pre-dnat",
            "ct state new",
        ),
        ("firewall-check", "filter-output-pre-dnat", "ct state new"),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new"),
        ("cluster-ips-check", "filter-output", "ct state new"),
    ];
    for (dst, src, extra) in JUMP_CHAINS {
        ensure_chain(&mut out, &mut created, dst);
        let sep = if extra.is_empty() { "" } else { " " };
        let _ = writeln!(out, "add rule {T} {src} {extra}{sep}jump {dst}");
    }
    for chain in [
        "services",
        "cluster-ips-check",
        "masquerading",
        "mark-for-masquerade",
    ] {
        ensure_chain(&mut out, &mut created, chain);
    }
    let _ = writeln!(
        out,
        "add rule {T} mark-for-masquerade mark set mark or {mark}"
    );
    let _ = writeln!(out, "add rule {T} masquerading mark and {mark} == 0 return");
    let _ = writeln!(out, "add rule {T} masquerading mark set mark xor {mark}");
    let _ = writeln!(out, "add rule {T} masquerading masquerade fully-random");
    let _ = writeln!(
        out,
        "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    );
    if !node.service_cidrs.is_empty() {
        let cidrs: Vec<String> = node.service_cidrs.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            out,
            "add rule {T} cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            cidrs.join(",")
        );
    }
    let _ = writeln!(
        out,
        "add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    );
    match &nodeport_ips {
        None => {
            let _ = writeln!(out, "delete set {T} nodeport-ips");
        }
        Some(ips) => {
            let _ = writeln!(out, "flush set {T} nodeport-ips");
            for ip in ips {
                let _ = writeln!(out, "add element {T} nodeport-ips {{ {ip} }}");
            }
        }
    }
    let _ = writeln!(
        out,
        "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    );
    let _ = writeln!(
        out,
        "add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    );
    let _ = writeln!(out, "flush chain {T} reject-chain");
    let _ = writeln!(out, "add rule {T} reject-chain reject");
    let _ = writeln!(
        out,
        "add rule {T} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services"
    );
    match &nodeport_ips {
        None => {
            let _ = writeln!(
                out,
                "add rule {T} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"
            );
        }
        Some(_) => {
            let _ = writeln!(
                out,
                "add rule {T} nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
            );
        }
    }
    let _ = writeln!(
        out,
        "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    );
    ensure_chain(&mut out, &mut created, "firewall-check");
    let _ = writeln!(
        out,
        "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(
        out,
        "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    );
    let _ = writeln!(
        out,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    match &nodeport_ips {
        None => {
            let _ = writeln!(
                out,
                "add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"
            );
        }
        Some(_) => {
            let _ = writeln!(
                out,
                "add rule {T} services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
            );
        }
    }

    // syncProxyRules, per service port.
    let mut cluster_ips: HashSet<Ipv4Addr> = HashSet::new();
    for (i, svc) in services.iter().enumerate() {
        if i > 0 && i % per_batch == 0 {
            let next = String::with_capacity(out.capacity());
            batches.push(std::mem::replace(&mut out, next));
        }
        for port in &svc.ports {
            let plan = PortPlan::new(svc, port);
            let p = port.protocol.as_str();
            let chains = nft_chains(svc, port);
            let endpoint_chain =
                |ip| format!("endpoint-{}", nft_endpoint_chain_base(svc, port, ip));
            let affinity_set = |ip| format!("affinity-{}", nft_endpoint_chain_base(svc, port, ip));
            let has_endpoints = plan.has_endpoints();
            let has_external = plan.has_external_endpoints();
            let uses_external_chain = has_endpoints && plan.externally_accessible;
            let external_verdict = if has_endpoints {
                "drop"
            } else {
                "goto reject-chain"
            };
            let name = &plan.name;

            for &ip in &plan.cluster {
                ensure_chain(&mut out, &mut created, &endpoint_chain(ip));
            }
            if !plan.cluster.is_empty() {
                ensure_chain(&mut out, &mut created, &chains.service);
            }
            if !plan.local.is_empty() {
                ensure_chain(&mut out, &mut created, &chains.local);
            }
            if uses_external_chain {
                ensure_chain(&mut out, &mut created, &chains.external);
            }

            if cluster_ips.insert(svc.cluster_ip) {
                let _ = writeln!(out, "add element {T} cluster-ips {{ {} }}", svc.cluster_ip);
            }
            if has_endpoints {
                let _ = writeln!(
                    out,
                    "add element {T} service-ips {{ {} . {p} . {} : goto {} }}",
                    svc.cluster_ip, port.port, chains.service
                );
            } else {
                let _ = writeln!(
                    out,
                    "add element {T} no-endpoint-services {{ {} . {p} . {} comment \"{name}\" : goto reject-chain }}",
                    svc.cluster_ip, port.port
                );
            }
            if let Some(node_port) = port.node_port {
                if has_endpoints {
                    let _ = writeln!(
                        out,
                        "add element {T} service-nodeports {{ {p} . {node_port} : goto {} }}",
                        chains.external
                    );
                }
                if !has_external {
                    let _ = writeln!(
                        out,
                        "add element {T} no-endpoint-nodeports {{ {p} . {node_port} comment \"{name}\" : {external_verdict} }}"
                    );
                }
            }

            if has_endpoints {
                if node.masquerade_all {
                    let _ = writeln!(
                        out,
                        "add rule {T} {} ip daddr {} jump mark-for-masquerade",
                        chains.service, svc.cluster_ip
                    );
                } else if let Some(cidr) = node.cluster_cidr {
                    let _ = writeln!(
                        out,
                        "add rule {T} {} ip daddr {} ip saddr != {cidr} jump mark-for-masquerade",
                        chains.service, svc.cluster_ip
                    );
                }
            }
            if uses_external_chain {
                let ext = &chains.external;
                if !plan.external_local {
                    let _ = writeln!(out, "add rule {T} {ext} jump mark-for-masquerade");
                } else {
                    if let Some(cidr) = node.cluster_cidr {
                        let _ = writeln!(
                            out,
                            "add rule {T} {ext} ip saddr {cidr} goto {} comment \"short-circuit pod traffic\"",
                            chains.service
                        );
                    }
                    let _ = writeln!(
                        out,
                        "add rule {T} {ext} fib saddr type local jump mark-for-masquerade comment \"masquerade local traffic\""
                    );
                    let _ = writeln!(
                        out,
                        "add rule {T} {ext} fib saddr type local goto {} comment \"short-circuit local traffic\"",
                        chains.service
                    );
                }
                if has_external {
                    let policy = if plan.external_local {
                        &chains.local
                    } else {
                        &chains.service
                    };
                    let _ = writeln!(out, "add rule {T} {ext} goto {policy}");
                }
            }
            if let Some(seconds) = svc.session_affinity_seconds {
                for &ip in &plan.cluster {
                    let _ = writeln!(
                        out,
                        "add set {T} {} {{ type ipv4_addr ; flags dynamic,timeout ; timeout {seconds}s ; }}",
                        affinity_set(ip)
                    );
                }
            }
            let write_to_endpoints = |out: &mut String, chain: &str, endpoints: &[Ipv4Addr]| {
                if svc.session_affinity_seconds.is_some() {
                    for &ip in endpoints {
                        let _ = writeln!(
                            out,
                            "add rule {T} {chain} ip saddr @{} goto {}",
                            affinity_set(ip),
                            endpoint_chain(ip)
                        );
                    }
                }
                let elements: Vec<String> = endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, &ip)| format!("{i} : goto {}", endpoint_chain(ip)))
                    .collect();
                let _ = writeln!(
                    out,
                    "add rule {T} {chain} numgen random mod {} vmap {{ {} }}",
                    endpoints.len(),
                    elements.join(" , ")
                );
            };
            if !plan.cluster.is_empty() {
                write_to_endpoints(&mut out, &chains.service, &plan.cluster);
            }
            if !plan.local.is_empty() {
                write_to_endpoints(&mut out, &chains.local, &plan.local);
            }
            for &ip in &plan.cluster {
                let chain = endpoint_chain(ip);
                let _ = writeln!(
                    out,
                    "add rule {T} {chain} ip saddr {ip} jump mark-for-masquerade"
                );
                if svc.session_affinity_seconds.is_some() {
                    let _ = writeln!(
                        out,
                        "add rule {T} {chain} update @{} {{ ip saddr }}",
                        affinity_set(ip)
                    );
                }
                let _ = writeln!(
                    out,
                    "add rule {T} {chain} meta l4proto {p} dnat to {}",
                    plan.endpoint(ip)
                );
            }
        }
    }
    batches.push(out);
    batches
}

#[cfg(test)]
mod tests {
    use super::{
        super::{
            model::ServiceEndpoint,
            tests::{node, svc1},
        },
        *,
    };

    #[test]
    fn nftables_matches_kube_proxys_expected_dump() {
        // Base rules and svc1 of TestOverallNFTablesRules (with the real mark).
        let rules = render_nftables(&[svc1()], &node());
        for line in [
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }",
            "add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
            "add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }",
            "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }",
            "add chain ip kube-proxy reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
            "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }",
            "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
            "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
            "add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment \"Drop traffic to unallocated ClusterIPs\"",
            "add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check",
            "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check",
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000",
            "add rule ip kube-proxy masquerading mark and 0x00004000 == 0 return",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "add rule ip kube-proxy nat-prerouting jump services",
            "add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports",
            "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            "add element ip kube-proxy nodeport-ips { 192.168.0.2 }",
            "add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services",
            "add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }",
            "add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80",
            "add element ip kube-proxy cluster-ips { 172.30.0.41 }",
            "add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }",
        ] {
            assert!(rules.lines().any(|l| l == line), "missing {line}\n{rules}");
        }
        assert!(
            !rules.contains("ct state invalid"),
            "the nftables proxier drops no INVALID packets"
        );
    }

    #[test]
    fn nftables_two_endpoints_affinity_and_no_endpoints() {
        let ep = |d: u8| ServiceEndpoint {
            ip: Ipv4Addr::new(10, 180, 0, d),
            local: true,
            ready: true,
        };
        let mut svc = svc1();
        svc.namespace = "ns4".into();
        svc.name = "svc4".into();
        svc.endpoints = vec![ep(5), ep(4)];
        svc.session_affinity_seconds = Some(10800);
        let mut empty = svc1();
        empty.name = "svc6".into();
        empty.endpoints.clear();
        empty.ports[0].node_port = Some(3006);
        let rules = render_nftables(&[svc, empty], &node());
        for line in [
            // From TestOverallNFTablesRules (svc4).
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }",
            "add set ip kube-proxy affinity-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip saddr @affinity-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80",
            "add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 update @affinity-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 { ip saddr }",
            "add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment \"ns1/svc6:p80\" : goto reject-chain }",
            "add element ip kube-proxy no-endpoint-nodeports { tcp . 3006 comment \"ns1/svc6:p80\" : goto reject-chain }",
        ] {
            assert!(rules.lines().any(|l| l == line), "missing {line}\n{rules}");
        }
        // One cluster-ips element per address, however many ports share it.
        assert_eq!(
            rules
                .matches("add element ip kube-proxy cluster-ips { 172.30.0.41 }")
                .count(),
            1
        );
    }
}
