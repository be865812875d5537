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
//! the chain-name vectors of the unit tests below come from.
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
use std::{
    collections::HashSet,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;

/// kube-proxy's two Linux modes modelled here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// `iptables` mode (iptables-nft here, as on current distributions).
    Iptables,
    /// `nftables` mode: table `ip kube-proxy`.
    Nftables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `strings.ToLower(string(v1.Protocol))`, as kube-proxy hashes and prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name ("" for a Service's single unnamed port).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// The endpoints' port (numeric targetPort).
    pub target_port: u16,
    /// Set for Services of type NodePort.
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEndpoint {
    pub ip: Ipv4Addr,
    /// The endpoint's nodeName is this node.
    pub local: bool,
    /// `conditions.ready`; endpoints that are not ready are left out.
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Every endpoint serves every port (at the port's `target_port`).
    pub endpoints: Vec<ServiceEndpoint>,
    /// `externalTrafficPolicy: Local` (only matters for NodePort ports).
    pub external_traffic_policy_local: bool,
    /// `sessionAffinity: ClientIP` with this timeout (kube-proxy's default is 10800).
    pub session_affinity_seconds: Option<u32>,
}

/// What kube-proxy knows about the node it runs on, and its flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    /// The node's IPs (the first is kube-proxy's `nodeIP`).
    pub node_ips: Vec<Ipv4Addr>,
    /// `--cluster-cidr` (detect-local-mode ClusterCIDR); `None` leaves out
    /// the `! -s <cidr> -j KUBE-MARK-MASQ` and "pod traffic" rules, as
    /// kube-proxy does without it.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The ServiceCIDRs (nftables: "Drop traffic to unallocated ClusterIPs").
    pub service_cidrs: Vec<Ipv4Net>,
    /// `--nodeport-addresses`. `None` is kube-proxy's default for the mode:
    /// every local address in iptables mode, `primary` (the node IPs) in
    /// nftables mode. The addresses used are the `node_ips` inside the CIDRs.
    pub nodeport_addresses: Option<Vec<Ipv4Net>>,
    /// `--masquerade-all`.
    pub masquerade_all: bool,
    /// `--iptables-masquerade-bit` (kube-proxy's default 14: mark 0x4000).
    pub masquerade_bit: u8,
    /// `--iptables-localhost-nodeports` (default true).
    pub localhost_nodeports: bool,
    /// The node has `net.netfilter.nf_conntrack_tcp_be_liberal` set.
    pub conntrack_tcp_be_liberal: bool,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            node_ips: Vec::new(),
            cluster_cidr: None,
            service_cidrs: Vec::new(),
            nodeport_addresses: None,
            masquerade_all: false,
            masquerade_bit: 14,
            localhost_nodeports: true,
            conntrack_tcp_be_liberal: false,
        }
    }
}

/// `fmt.Sprintf("%#08x", 1<<bit)`: Go zero-pads the digits to 8, giving
/// "0x00004000" for bit 14.
pub fn masquerade_mark(bit: u8) -> String {
    format!("0x{:08x}", 1u64 << bit)
}

/// `proxy.ServicePortName.String()`: "ns/name:port", or "ns/name" when the
/// port has no name.
pub fn service_port_name(svc: &Service, port: &ServicePort) -> String {
    if port.name.is_empty() {
        format!("{}/{}", svc.namespace, svc.name)
    } else {
        format!("{}/{}:{}", svc.namespace, svc.name, port.name)
    }
}

fn b32_prefix(data: &[u8], chars: usize) -> String {
    let mut s = base32(&sha256(data));
    s.truncate(chars);
    s
}

/// iptables `portProtoHash`: base32(sha256(name + protocol))[:16].
pub fn port_proto_hash(service_port_name: &str, protocol: Protocol) -> String {
    b32_prefix(
        format!("{service_port_name}{}", protocol.as_str()).as_bytes(),
        16,
    )
}

/// The iptables chains of one service port (each exists only when used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesChains {
    /// KUBE-SVC-: Cluster traffic policy.
    pub svc: String,
    /// KUBE-SVL-: Local traffic policy.
    pub svl: String,
    /// KUBE-EXT-: external destinations (NodePort).
    pub ext: String,
    /// KUBE-FW-: loadBalancerSourceRanges (never written here).
    pub fw: String,
}

pub fn iptables_chains(svc: &Service, port: &ServicePort) -> IptablesChains {
    let hash = port_proto_hash(&service_port_name(svc, port), port.protocol);
    IptablesChains {
        svc: format!("KUBE-SVC-{hash}"),
        svl: format!("KUBE-SVL-{hash}"),
        ext: format!("KUBE-EXT-{hash}"),
        fw: format!("KUBE-FW-{hash}"),
    }
}

/// KUBE-SEP-: base32(sha256(name + protocol + "ip:port"))[:16].
pub fn iptables_endpoint_chain(svc: &Service, port: &ServicePort, ip: Ipv4Addr) -> String {
    let input = format!(
        "{}{}{ip}:{}",
        service_port_name(svc, port),
        port.protocol.as_str(),
        port.target_port
    );
    format!("KUBE-SEP-{}", b32_prefix(input.as_bytes(), 16))
}

/// nftables `hashAndTruncate`: base32(sha256(name))[:8] + "-" + name
/// (names here are far below the 240-character truncation).
fn nft_hash_and_truncate(name: &str) -> String {
    format!("{}-{name}", b32_prefix(name.as_bytes(), 8))
}

/// The nftables chains of one service port (each exists only when used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftChains {
    pub service: String,
    pub local: String,
    pub external: String,
    pub firewall: String,
}

pub fn nft_chains(svc: &Service, port: &ServicePort) -> NftChains {
    let base = nft_hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        port.protocol.as_str(),
        port.name
    ));
    NftChains {
        service: format!("service-{base}"),
        local: format!("local-{base}"),
        external: format!("external-{base}"),
        firewall: format!("firewall-{base}"),
    }
}

/// `endpoint-HASH-ns/name/proto/port__ip/port`; the affinity set is the same
/// with `affinity-`.
pub fn nft_endpoint_chain_base(svc: &Service, port: &ServicePort, ip: Ipv4Addr) -> String {
    nft_hash_and_truncate(&format!(
        "{}/{}/{}/{}__{ip}/{}",
        svc.namespace,
        svc.name,
        port.protocol.as_str(),
        port.name,
        port.target_port
    ))
}

/// kube-proxy's `computeProbability`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// One service port with `proxy.CategorizeEndpoints` applied (internal
/// traffic policy Cluster, no topology, ready endpoints only).
struct PortPlan<'a> {
    svc: &'a Service,
    port: &'a ServicePort,
    name: String,
    /// Ready endpoints sorted by "ip:port" (kube-proxy's `byEndpoint`).
    cluster: Vec<Ipv4Addr>,
    local: Vec<Ipv4Addr>,
    externally_accessible: bool,
    external_local: bool,
}

impl<'a> PortPlan<'a> {
    fn new(svc: &'a Service, port: &'a ServicePort) -> PortPlan<'a> {
        let mut ready: Vec<&ServiceEndpoint> = svc.endpoints.iter().filter(|e| e.ready).collect();
        // byEndpoint sorts on "ip:port" strings: 10.0.0.10:80 comes before
        // 10.0.0.1:80.
        ready.sort_by_cached_key(|e| format!("{}:{}", e.ip, port.target_port));
        ready.dedup_by_key(|e| e.ip);
        let externally_accessible = port.node_port.is_some();
        let external_local = svc.external_traffic_policy_local && externally_accessible;
        let cluster = ready.iter().map(|e| e.ip).collect();
        let local = if external_local {
            ready.iter().filter(|e| e.local).map(|e| e.ip).collect()
        } else {
            Vec::new()
        };
        PortPlan {
            svc,
            port,
            name: service_port_name(svc, port),
            cluster,
            local,
            externally_accessible,
            external_local,
        }
    }

    fn has_endpoints(&self) -> bool {
        !self.cluster.is_empty()
    }

    fn has_external_endpoints(&self) -> bool {
        self.has_endpoints() && (!self.external_local || !self.local.is_empty())
    }

    fn endpoint(&self, ip: Ipv4Addr) -> String {
        format!("{ip}:{}", self.port.target_port)
    }
}

/// The node-port addresses kube-proxy would use: `None` = match all.
fn nodeport_ips(node: &NodeSettings, mode: ProxyMode) -> Option<Vec<Ipv4Addr>> {
    let cidrs: Vec<Ipv4Net> = match (&node.nodeport_addresses, mode) {
        (Some(cidrs), _) => cidrs.clone(),
        (None, ProxyMode::Iptables) => return None,
        // nftables mode defaults to "primary": the node IPs as /32s.
        (None, ProxyMode::Nftables) if node.node_ips.is_empty() => return None,
        (None, ProxyMode::Nftables) => node
            .node_ips
            .iter()
            .map(|ip| Ipv4Net::new(*ip, 32).unwrap())
            .collect(),
    };
    if cidrs.is_empty() {
        return None;
    }
    // NodePortAddresses.MatchAll(): a 0.0.0.0/0 entry.
    if cidrs.iter().any(|c| c.prefix_len() == 0) {
        return None;
    }
    Some(
        node.node_ips
            .iter()
            .copied()
            .filter(|ip| cidrs.iter().any(|c| c.contains(ip)))
            .collect(),
    )
}

/// NewProxier: localhostNodePorts holds only if `--nodeport-addresses`
/// covers 127.0.0.1 (as the default, all addresses, does).
fn localhost_nodeports(node: &NodeSettings) -> bool {
    node.localhost_nodeports
        && node.nodeport_addresses.as_ref().is_none_or(|cidrs| {
            cidrs.is_empty() || cidrs.iter().any(|c| c.contains(&Ipv4Addr::LOCALHOST))
        })
}

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

/// `/run/netns/<name>` for a bare name, or the path itself.
pub fn netns_path(name_or_path: &str) -> PathBuf {
    if name_or_path.contains('/') {
        PathBuf::from(name_or_path)
    } else {
        Path::new("/run/netns").join(name_or_path)
    }
}

fn in_netns(netns: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).arg(program);
    cmd
}

fn run_checked(cmd: &mut Command, stdin: Option<&[u8]>) -> Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // Write from a thread so a tool that fails early cannot deadlock us.
        let input = input.to_vec();
        let writer = std::thread::spawn(move || pipe.write_all(&input));
        let out = child.wait_with_output()?;
        let _ = writer.join();
        check(cmd, out)
    } else {
        check(cmd, child.wait_with_output()?)
    }
}

fn check(cmd: &Command, out: Output) -> Result<Output> {
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Keep the error readable when the input was huge.
        let stderr: String = stderr.chars().take(4000).collect();
        bail!("{cmd:?} failed ({}): {stderr}", out.status);
    }
    Ok(out)
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

/// How `install_with` loads the rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallOptions {
    /// Services per `iptables-restore` call. kube-proxy loads a full sync
    /// in one call (`usize::MAX` here), but iptables-nft 1.8.9's `--noflush`
    /// restore looks chains up by name in a list, so one call is quadratic
    /// in its chains: 45 s for 10,000 Services, about 3 s in calls of 500.
    /// Cut at Service boundaries, the calls leave exactly the same rules.
    pub iptables_services_per_call: usize,
    /// Services per `nft -f` transaction. One transaction (`usize::MAX`,
    /// as kube-proxy does) is quadratic in the kernel, which walks the
    /// whole transaction for every anonymous verdict map it binds
    /// (`__nft_set_trans_bind`): 25 s for 10,000 Services, about 11 s in
    /// transactions of 1,000 (the rest is the kernel scanning every set of
    /// the table for each new anonymous set, whatever the split).
    pub nftables_services_per_call: usize,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            iptables_services_per_call: 500,
            nftables_services_per_call: 1000,
        }
    }
}

/// What `install` wrote and how long the kernel took to take it.
#[derive(Clone, Debug)]
pub struct InstallReport {
    pub mode: ProxyMode,
    /// Bytes of rule text handed to `iptables-restore` / `nft -f -`.
    pub rule_bytes: usize,
    /// Number of `iptables-restore` / `nft -f -` calls.
    pub calls: usize,
    pub render_time: Duration,
    /// Time of the `iptables-restore` / `nft -f` calls alone.
    pub load_time: Duration,
    pub total_time: Duration,
}

/// Writes kube-proxy's rules for `services` into the network namespace
/// (a name under /run/netns or a path), as kube-proxy does at start-up,
/// after removing any kube-proxy rules already there (see [`remove`]):
///
/// - iptables: `route_localnet=1` (if localhost NodePorts), the canary
///   chains, `iptables -N`/`-C`/`-I` for each jump rule (one shell), then
///   `iptables-restore -w --noflush --counters`;
/// - nftables: `nft -f -` with the first-sync transaction.
///
/// The restore input / transaction is loaded in slices of Services (see
/// [`InstallOptions`]); the rules left behind are the same.
pub fn install(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
) -> Result<InstallReport> {
    install_with(netns, mode, services, node, &InstallOptions::default())
}

pub fn install_with(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
    options: &InstallOptions,
) -> Result<InstallReport> {
    let path = netns_path(netns);
    let start = Instant::now();
    remove(netns, mode)?;
    let (program, args): (&str, &[&str]) = match mode {
        ProxyMode::Iptables => {
            let mut script = String::from("set -e\n");
            if localhost_nodeports(node) {
                script.push_str("echo 1 > /proc/sys/net/ipv4/conf/all/route_localnet\n");
            }
            for table in ["mangle", "nat", "filter"] {
                let _ = writeln!(
                    script,
                    "iptables -w -t {table} -N {IPTABLES_CANARY_CHAIN} 2>/dev/null || true"
                );
            }
            for jump in iptables_jump_rules() {
                let args: Vec<String> = jump.args.iter().map(|a| shell_quote(a)).collect();
                let args = args.join(" ");
                let (t, src, dst) = (jump.table, jump.src_chain, jump.dst_chain);
                let _ = writeln!(
                    script,
                    "iptables -w -t {t} -N {dst} 2>/dev/null || true\n\
                     iptables -w -t {t} -C {src} {args} 2>/dev/null || iptables -w -t {t} -I {src} {args}"
                );
            }
            run_checked(in_netns(&path, "sh").arg("-c").arg(&script), None)
                .context("ensuring kube-proxy's jump rules")?;
            ("iptables-restore", &["-w", "--noflush", "--counters"])
        }
        ProxyMode::Nftables => ("nft", &["-f", "-"]),
    };
    let rendering = Instant::now();
    let batches = match mode {
        ProxyMode::Iptables => {
            render_iptables_restore_batches(services, node, options.iptables_services_per_call)
        }
        ProxyMode::Nftables => {
            render_nftables_batches(services, node, options.nftables_services_per_call)
        }
    };
    let render_time = rendering.elapsed();
    let load = Instant::now();
    for (i, batch) in batches.iter().enumerate() {
        run_checked(in_netns(&path, program).args(args), Some(batch.as_bytes()))
            .with_context(|| format!("{program} (call {} of {})", i + 1, batches.len()))?;
    }
    Ok(InstallReport {
        mode,
        rule_bytes: batches.iter().map(String::len).sum(),
        calls: batches.len(),
        render_time,
        load_time: load.elapsed(),
        total_time: start.elapsed(),
    })
}

fn remove_nftables(path: &Path) -> Result<()> {
    let listed = run_checked(in_netns(path, "nft").args(["list", "tables"]), None)?;
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l.trim() == "table ip kube-proxy")
    {
        run_checked(
            in_netns(path, "nft").args(["delete", "table", "ip", "kube-proxy"]),
            None,
        )?;
    }
    Ok(())
}

/// Removes what `install` wrote: nftables deletes table `ip kube-proxy`
/// (kube-proxy's own cleanup); iptables deletes every rule of a built-in
/// chain that jumps to a `KUBE-` chain and every `KUBE-` chain of the
/// filter, nat and mangle tables (kubelet's KUBE-FIREWALL included).
pub fn remove(netns: &str, mode: ProxyMode) -> Result<()> {
    let path = netns_path(netns);
    match mode {
        ProxyMode::Nftables => remove_nftables(&path),
        ProxyMode::Iptables => {
            // First unhook and flush every KUBE- chain, then delete them,
            // in slices: iptables-nft's --noflush restore is quadratic in
            // the chains of one call.
            let mut flush = String::new();
            let mut delete: Vec<String> = Vec::new();
            for table in ["filter", "nat", "mangle"] {
                let saved =
                    run_checked(in_netns(&path, "iptables-save").args(["-t", table]), None)?;
                let saved = String::from_utf8_lossy(&saved.stdout);
                let ours: Vec<&str> = saved
                    .lines()
                    .filter_map(|l| l.strip_prefix(':'))
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|c| c.starts_with("KUBE-"))
                    .collect();
                if ours.is_empty() {
                    continue;
                }
                let _ = writeln!(flush, "*{table}");
                for line in saved.lines() {
                    let Some(rule) = line.strip_prefix("-A ") else {
                        continue;
                    };
                    let chain = rule.split_whitespace().next().unwrap_or("");
                    let jumps_to_ours = rule
                        .rsplit_once(" -j ")
                        .is_some_and(|(_, target)| target.starts_with("KUBE-"));
                    if !chain.starts_with("KUBE-") && jumps_to_ours {
                        let _ = writeln!(flush, "-D {rule}");
                    }
                }
                for chain in &ours {
                    let _ = writeln!(flush, ":{chain} - [0:0]");
                }
                let _ = writeln!(flush, "COMMIT");
                for slice in ours.chunks(2000) {
                    let mut restore = format!("*{table}\n");
                    for chain in slice {
                        let _ = writeln!(restore, "-X {chain}");
                    }
                    restore.push_str("COMMIT\n");
                    delete.push(restore);
                }
            }
            for restore in std::iter::once(&flush).chain(&delete) {
                if restore.is_empty() {
                    continue;
                }
                run_checked(
                    in_netns(&path, "iptables-restore").args(["-w", "--noflush"]),
                    Some(restore.as_bytes()),
                )
                .context("removing kube-proxy's iptables rules")?;
            }
            Ok(())
        }
    }
}

/// Rules installed by `install_guarded`, removed on drop.
pub struct InstalledRules {
    pub netns: String,
    pub mode: ProxyMode,
    pub report: InstallReport,
}

impl Drop for InstalledRules {
    fn drop(&mut self) {
        if netns_path(&self.netns).exists() {
            let _ = remove(&self.netns, self.mode);
        }
    }
}

/// `install`, with a guard that removes the rules when dropped.
pub fn install_guarded(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
) -> Result<InstalledRules> {
    install_guarded_with(netns, mode, services, node, &InstallOptions::default())
}

/// `install_with`, with a guard that removes the rules when dropped.
pub fn install_guarded_with(
    netns: &str,
    mode: ProxyMode,
    services: &[Service],
    node: &NodeSettings,
    options: &InstallOptions,
) -> Result<InstalledRules> {
    let report = install_with(netns, mode, services, node, options)?;
    Ok(InstalledRules {
        netns: netns.to_string(),
        mode,
        report,
    })
}

/// `iptables-save` (all tables) or `nft list ruleset` inside the namespace.
pub fn dump(netns: &str, mode: ProxyMode) -> Result<String> {
    let path = netns_path(netns);
    let out = match mode {
        ProxyMode::Iptables => run_checked(&mut in_netns(&path, "iptables-save"), None)?,
        ProxyMode::Nftables => run_checked(in_netns(&path, "nft").args(["list", "ruleset"]), None)?,
    };
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

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

/// SHA-256 (FIPS 180-4), for kube-proxy's chain-name hashes.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = u64::from_be_bytes([0, 0, 0, buf[0], buf[1], buf[2], buf[3], buf[4]]);
        let chars = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < chars {
                out.push(ALPHABET[((bits >> (35 - 5 * i)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_and_base32_match_the_standards() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // RFC 4648 test vectors.
        for (input, want) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(base32(input.as_bytes()), want, "{input:?}");
        }
    }

    fn svc1() -> Service {
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

    #[test]
    fn chain_names_match_kube_proxys_test_vectors() {
        // From pkg/proxy/iptables/proxier_test.go and nftables/proxier_test.go.
        let svc = svc1();
        let port = &svc.ports[0];
        assert_eq!(iptables_chains(&svc, port).svc, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            iptables_endpoint_chain(&svc, port, Ipv4Addr::new(10, 180, 0, 1)),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            nft_chains(&svc, port).service,
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_endpoint_chain_base(&svc, port, Ipv4Addr::new(10, 180, 0, 1)),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let mut svc2 = svc.clone();
        svc2.namespace = "ns2".into();
        svc2.name = "svc2".into();
        assert_eq!(
            nft_chains(&svc2, &svc2.ports[0]).service,
            "service-42NFTM6N-ns2/svc2/tcp/p80"
        );
    }

    #[test]
    fn probabilities_are_formatted_like_go() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(6), "0.1666666667");
        assert_eq!(probability(7), "0.1428571429");
        assert_eq!(masquerade_mark(14), "0x00004000");
    }

    fn node() -> NodeSettings {
        NodeSettings {
            node_ips: vec![Ipv4Addr::new(192, 168, 0, 2)],
            cluster_cidr: Some("10.0.0.0/8".parse().unwrap()),
            service_cidrs: vec!["172.30.0.0/16".parse().unwrap()],
            ..NodeSettings::default()
        }
    }

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

    #[test]
    fn endpoints_are_in_kube_proxys_string_order() {
        let mut svc = svc1();
        svc.endpoints = [1u8, 10, 2]
            .map(|d| ServiceEndpoint {
                ip: Ipv4Addr::new(10, 0, 0, d),
                local: false,
                ready: true,
            })
            .to_vec();
        let plan = PortPlan::new(&svc, &svc.ports[0]);
        let want = [10u8, 1, 2].map(|d| Ipv4Addr::new(10, 0, 0, d));
        assert_eq!(plan.cluster, want);
    }

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
