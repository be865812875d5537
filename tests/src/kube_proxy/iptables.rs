//! iptables mode: the jump rules kube-proxy ensures one by one, and the
//! `iptables-restore` input of a full sync.
use std::{fmt::Write as _, net::Ipv4Addr};

use super::{
    model::{NodeSettings, ProxyMode, Service},
    names::{iptables_chains, iptables_endpoint_chain},
    plan::{PortPlan, localhost_nodeports, masquerade_mark, nodeport_ips, probability},
};

/// One rule kube-proxy ensures with `iptables -N dst`, `iptables -C src
/// args` and `iptables -I src args` (jump rules into its chains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JumpRule {
    pub table: &'static str,
    pub src_chain: &'static str,
    pub dst_chain: &'static str,
    /// Everything after the chain name, ending with `-j dst_chain`.
    pub args: Vec<String>,
}

/// `iptablesJumpChains` followed by `iptablesKubeletJumpChains`, in the
/// order kube-proxy prepends them.
pub fn iptables_jump_rules() -> Vec<JumpRule> {
    const NEW: &[&str] = &["-m", "conntrack", "--ctstate", "NEW"];
    let table: [(&str, &str, &str, &str, &[&str]); 14] = [
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "INPUT",
            "kubernetes externally-visible service portals",
            NEW,
        ),
        (
            "filter",
            "KUBE-EXTERNAL-SERVICES",
            "FORWARD",
            "kubernetes externally-visible service portals",
            NEW,
        ),
        (
            "filter",
            "KUBE-NODEPORTS",
            "INPUT",
            "kubernetes health check service ports",
            &[],
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "FORWARD",
            "kubernetes service portals",
            NEW,
        ),
        (
            "filter",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            NEW,
        ),
        (
            "filter",
            "KUBE-FORWARD",
            "FORWARD",
            "kubernetes forwarding rules",
            &[],
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "INPUT",
            "kubernetes load balancer firewall",
            NEW,
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "OUTPUT",
            "kubernetes load balancer firewall",
            NEW,
        ),
        (
            "filter",
            "KUBE-PROXY-FIREWALL",
            "FORWARD",
            "kubernetes load balancer firewall",
            NEW,
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            &[],
        ),
        (
            "nat",
            "KUBE-SERVICES",
            "PREROUTING",
            "kubernetes service portals",
            &[],
        ),
        (
            "nat",
            "KUBE-POSTROUTING",
            "POSTROUTING",
            "kubernetes postrouting rules",
            &[],
        ),
        // kubelet's, which kube-proxy also ensures.
        ("filter", "KUBE-FIREWALL", "INPUT", "", &[]),
        ("filter", "KUBE-FIREWALL", "OUTPUT", "", &[]),
    ];
    table
        .iter()
        .map(|&(table, dst_chain, src_chain, comment, extra)| {
            let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            if !comment.is_empty() {
                args.extend(["-m", "comment", "--comment", comment].map(String::from));
            }
            args.extend(["-j", dst_chain].map(String::from));
            JumpRule {
                table,
                src_chain,
                dst_chain,
                args,
            }
        })
        .collect()
}

/// The chain kube-proxy's iptables Monitor creates in mangle, nat and filter.
pub const IPTABLES_CANARY_CHAIN: &str = "KUBE-PROXY-CANARY";

/// Above this many endpoints kube-proxy drops the per-endpoint comments.
const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// The input kube-proxy's iptables proxier gives `iptables-restore
/// --noflush --counters` on a full sync from an empty state.
pub fn render_iptables_restore(services: &[Service], node: &NodeSettings) -> String {
    render_iptables_restore_batches(services, node, usize::MAX).concat()
}

/// [`render_iptables_restore`] cut at Service boundaries into inputs of at
/// most `services_per_batch` Services each, to be restored one after the
/// other with `--noflush`: the first declares (flushes) the top-level
/// chains and holds the fixed rules, the last holds the rules that must end
/// KUBE-SERVICES and KUBE-FORWARD, so every chain ends up with exactly the
/// rules, in exactly the order, of the single input.
pub fn render_iptables_restore_batches(
    services: &[Service],
    node: &NodeSettings,
    services_per_batch: usize,
) -> Vec<String> {
    let mark = masquerade_mark(node.masquerade_bit);
    let nodeport_ips = nodeport_ips(node, ProxyMode::Iptables);
    let localhost_nodeports = localhost_nodeports(node);
    let endpoint_count: usize = services
        .iter()
        .map(|s| s.ports.len() * s.endpoints.len())
        .sum();
    let large = endpoint_count > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;

    // Written once, into the first batch.
    let mut top_filter_chains = String::new();
    let mut top_filter_rules = String::new();
    let mut top_nat_chains = String::new();
    let mut top_nat_rules = String::new();
    for c in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(top_filter_chains, ":{c} - [0:0]");
    }
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(top_nat_chains, ":{c} - [0:0]");
    }
    let _ = writeln!(
        top_nat_rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    let _ = writeln!(
        top_nat_rules,
        "-A KUBE-POSTROUTING -j MARK --xor-mark {mark}"
    );
    // HasRandomFully(): any iptables >= 1.6.2.
    let _ = writeln!(
        top_nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    let _ = writeln!(top_nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {mark}");
    if localhost_nodeports {
        let _ = writeln!(top_filter_chains, ":KUBE-FIREWALL - [0:0]");
        let _ = writeln!(
            top_filter_rules,
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        );
    }

    // Written once, into the last batch.
    let mut last_filter_rules = String::new();
    let mut last_nat_rules = String::new();
    const NODEPORTS_COMMENT: &str =
        "\"kubernetes service nodeports; NOTE: this must be the last rule in this chain\"";
    match nodeport_ips {
        None => {
            let localhost = if localhost_nodeports {
                ""
            } else {
                " ! -d 127.0.0.0/8"
            };
            let _ = writeln!(
                last_nat_rules,
                "-A KUBE-SERVICES -m comment --comment {NODEPORTS_COMMENT} -m addrtype --dst-type LOCAL{localhost} -j KUBE-NODEPORTS"
            );
        }
        Some(ips) => {
            for ip in ips {
                let _ = writeln!(
                    last_nat_rules,
                    "-A KUBE-SERVICES -m comment --comment {NODEPORTS_COMMENT} -d {ip} -j KUBE-NODEPORTS"
                );
            }
        }
    }
    if !node.conntrack_tcp_be_liberal {
        let _ = writeln!(
            last_filter_rules,
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
        );
    }
    let _ = writeln!(
        last_filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"
    );
    let _ = writeln!(
        last_filter_rules,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );

    let batches: Vec<&[Service]> = if services.is_empty() {
        vec![services]
    } else {
        services.chunks(services_per_batch.max(1)).collect()
    };
    let count = batches.len();
    batches
        .into_iter()
        .enumerate()
        .map(|(i, batch)| {
            let (first, last) = (i == 0, i + 1 == count);
            let mut filter_rules = String::new();
            let mut nat_chains = String::with_capacity(batch.len() * 128);
            let mut nat_rules = String::with_capacity(batch.len() * 1024);
            for svc in batch {
                for port in &svc.ports {
                    write_iptables_port(
                        &PortPlan::new(svc, port),
                        node,
                        large,
                        &mut filter_rules,
                        &mut nat_chains,
                        &mut nat_rules,
                    );
                }
            }
            let mut out = String::with_capacity(
                filter_rules.len() + nat_chains.len() + nat_rules.len() + 4096,
            );
            out.push_str("*filter\n");
            if first {
                out.push_str(&top_filter_chains);
                out.push_str(&top_filter_rules);
            }
            out.push_str(&filter_rules);
            if last {
                out.push_str(&last_filter_rules);
            }
            out.push_str("COMMIT\n*nat\n");
            if first {
                out.push_str(&top_nat_chains);
            }
            out.push_str(&nat_chains);
            if first {
                out.push_str(&top_nat_rules);
            }
            out.push_str(&nat_rules);
            if last {
                out.push_str(&last_nat_rules);
            }
            out.push_str("COMMIT\n");
            out
        })
        .collect()
}

fn write_iptables_port(
    plan: &PortPlan,
    node: &NodeSettings,
    large: bool,
    filter_rules: &mut String,
    nat_chains: &mut String,
    nat_rules: &mut String,
) {
    let (svc, port, name) = (plan.svc, plan.port, &plan.name);
    let p = port.protocol.as_str();
    let chains = iptables_chains(svc, port);
    let has_endpoints = plan.has_endpoints();
    let has_external = plan.has_external_endpoints();
    let cluster_ip = svc.cluster_ip;
    let svc_port = port.port;
    // Internal traffic policy is Cluster: the internal chain is KUBE-SVC.
    let internal_chain = &chains.svc;
    let external_policy_chain = if plan.external_local {
        &chains.svl
    } else {
        &chains.svc
    };
    let uses_external_chain = has_endpoints && plan.externally_accessible;
    let (external_target, external_comment) = if !has_endpoints {
        ("REJECT", format!("\"{name} has no endpoints\""))
    } else {
        ("DROP", format!("\"{name} has no local endpoints\""))
    };

    // Capture the clusterIP.
    if has_endpoints {
        let _ = writeln!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {cluster_ip} --dport {svc_port} -j {internal_chain}"
        );
    } else {
        let _ = writeln!(
            filter_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {p} -p {p} -d {cluster_ip} --dport {svc_port} -j REJECT"
        );
    }

    // Capture nodeports.
    if let Some(node_port) = port.node_port {
        if has_endpoints {
            let _ = writeln!(
                nat_rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {node_port} -j {}",
                chains.ext
            );
        }
        if !has_external {
            let _ = writeln!(
                filter_rules,
                "-A KUBE-EXTERNAL-SERVICES -m comment --comment {external_comment} -m addrtype --dst-type LOCAL -m {p} -p {p} --dport {node_port} -j {external_target}"
            );
        }
    }

    // Internal traffic handling.
    if has_endpoints {
        let args = format!(
            "-m comment --comment \"{name} cluster IP\" -m {p} -p {p} -d {cluster_ip} --dport {svc_port}"
        );
        if node.masquerade_all {
            let _ = writeln!(nat_rules, "-A {internal_chain} {args} -j KUBE-MARK-MASQ");
        } else if let Some(cidr) = node.cluster_cidr {
            let _ = writeln!(
                nat_rules,
                "-A {internal_chain} {args} ! -s {cidr} -j KUBE-MARK-MASQ"
            );
        }
    }

    // External traffic handling.
    if uses_external_chain {
        let ext = &chains.ext;
        let _ = writeln!(nat_chains, ":{ext} - [0:0]");
        if !plan.external_local {
            let _ = writeln!(
                nat_rules,
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            );
        } else {
            if let Some(cidr) = node.cluster_cidr {
                let _ = writeln!(
                    nat_rules,
                    "-A {ext} -m comment --comment \"pod traffic for {name} external destinations\" -s {cidr} -j {}",
                    chains.svc
                );
            }
            let _ = writeln!(
                nat_rules,
                "-A {ext} -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"
            );
            let _ = writeln!(
                nat_rules,
                "-A {ext} -m comment --comment \"route LOCAL traffic for {name} external destinations\" -m addrtype --src-type LOCAL -j {}",
                chains.svc
            );
        }
        if has_external {
            let _ = writeln!(nat_rules, "-A {ext} -j {external_policy_chain}");
        }
    }

    let sep = |ip: Ipv4Addr| iptables_endpoint_chain(svc, port, ip);
    let write_to_endpoints = |nat_rules: &mut String, chain: &str, endpoints: &[Ipv4Addr]| {
        let comment = |ip: Ipv4Addr| {
            if large {
                String::new()
            } else {
                format!(" -m comment --comment \"{name} -> {}\"", plan.endpoint(ip))
            }
        };
        if let Some(seconds) = svc.session_affinity_seconds {
            for &ip in endpoints {
                let sep = sep(ip);
                let _ = writeln!(
                    nat_rules,
                    "-A {chain}{} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}",
                    comment(ip)
                );
            }
        }
        let n = endpoints.len();
        for (i, &ip) in endpoints.iter().enumerate() {
            let statistic = if i < n - 1 {
                format!(
                    " -m statistic --mode random --probability {}",
                    probability(n - i)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                nat_rules,
                "-A {chain}{}{statistic} -j {}",
                comment(ip),
                sep(ip)
            );
        }
    };
    if !plan.cluster.is_empty() {
        let _ = writeln!(nat_chains, ":{} - [0:0]", chains.svc);
        write_to_endpoints(nat_rules, &chains.svc, &plan.cluster);
    }
    if !plan.local.is_empty() {
        let _ = writeln!(nat_chains, ":{} - [0:0]", chains.svl);
        write_to_endpoints(nat_rules, &chains.svl, &plan.local);
    }

    // The per-endpoint chains (the local endpoints are among the ready ones).
    for &ip in &plan.cluster {
        let chain = sep(ip);
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
        let comment = if large {
            String::new()
        } else {
            format!(" -m comment --comment {name}")
        };
        let _ = writeln!(nat_rules, "-A {chain}{comment} -s {ip} -j KUBE-MARK-MASQ");
        let affinity = if svc.session_affinity_seconds.is_some() {
            format!(" -m recent --name {chain} --set")
        } else {
            String::new()
        };
        let _ = writeln!(
            nat_rules,
            "-A {chain}{comment}{affinity} -m {p} -p {p} -j DNAT --to-destination {}",
            plan.endpoint(ip)
        );
    }
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
    fn iptables_one_service_is_kube_proxys_text() {
        let rules = render_iptables_restore(&[svc1()], &node());
        let want = "\
*filter
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-FIREWALL - [0:0]
-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x00004000/0x00004000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x00004000
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000
-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -j KUBE-SEP-SXIVWICOYRO3J4NJ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
";
        assert_eq!(rules, want);
    }

    #[test]
    fn iptables_probabilities_affinity_local_policy_and_no_endpoints() {
        let ep = |d: u8, local: bool| ServiceEndpoint {
            ip: Ipv4Addr::new(10, 180, 0, d),
            local,
            ready: true,
        };
        let mut svc = svc1();
        svc.endpoints = vec![ep(3, true), ep(1, false), ep(2, false)];
        svc.ports[0].node_port = Some(30080);
        svc.external_traffic_policy_local = true;
        svc.session_affinity_seconds = Some(10800);
        let mut empty = svc1();
        empty.name = "svc9".into();
        empty.endpoints = vec![ep(9, true)];
        empty.endpoints[0].ready = false;
        empty.ports[0].node_port = Some(30090);
        let rules = render_iptables_restore(&[svc.clone(), empty], &node());
        let c = iptables_chains(&svc, &svc.ports[0]);
        let sep = |d| iptables_endpoint_chain(&svc, &svc.ports[0], Ipv4Addr::new(10, 180, 0, d));
        let has = |line: String| assert!(rules.contains(&format!("{line}\n")), "{line}\n{rules}");
        // Sorted by "ip:port"; 1/3, then 1/2, then the rest.
        has(format!(
            "-A {} -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m statistic --mode random --probability 0.3333333333 -j {}",
            c.svc,
            sep(1)
        ));
        has(format!(
            "-A {} -m comment --comment \"ns1/svc1:p80 -> 10.180.0.2:80\" -m statistic --mode random --probability 0.5000000000 -j {}",
            c.svc,
            sep(2)
        ));
        has(format!(
            "-A {} -m comment --comment \"ns1/svc1:p80 -> 10.180.0.3:80\" -j {}",
            c.svc,
            sep(3)
        ));
        has(format!(
            "-A {} -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m recent --name {} --rcheck --seconds 10800 --reap -j {}",
            c.svc,
            sep(1),
            sep(1)
        ));
        has(format!(
            "-A {} -m comment --comment ns1/svc1:p80 -m recent --name {} --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80",
            sep(2),
            sep(2)
        ));
        // Local policy: only the local endpoint, and the EXT short-circuits.
        has(format!(
            "-A {} -m comment --comment \"ns1/svc1:p80 -> 10.180.0.3:80\" -j {}",
            c.svl,
            sep(3)
        ));
        has(format!(
            "-A KUBE-NODEPORTS -m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 30080 -j {}",
            c.ext
        ));
        has(format!(
            "-A {} -m comment --comment \"pod traffic for ns1/svc1:p80 external destinations\" -s 10.0.0.0/8 -j {}",
            c.ext, c.svc
        ));
        has(format!(
            "-A {} -m comment --comment \"masquerade LOCAL traffic for ns1/svc1:p80 external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
            c.ext
        ));
        has(format!(
            "-A {} -m comment --comment \"route LOCAL traffic for ns1/svc1:p80 external destinations\" -m addrtype --src-type LOCAL -j {}",
            c.ext, c.svc
        ));
        has(format!("-A {} -j {}", c.ext, c.svl));
        // No ready endpoints: REJECT in filter, no nat chains.
        has("-A KUBE-SERVICES -m comment --comment \"ns1/svc9:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT".into());
        has("-A KUBE-EXTERNAL-SERVICES -m comment --comment \"ns1/svc9:p80 has no endpoints\" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30090 -j REJECT".into());
        assert!(!rules.contains("svc9:p80 cluster IP"));
    }
}
