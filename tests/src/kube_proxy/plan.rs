//! What both proxiers derive from the model before writing rules: endpoint
//! categories, node-port addresses, and numbers printed as Go prints them.
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::{
    model::{NodeSettings, ProxyMode, Service, ServiceEndpoint, ServicePort},
    names::service_port_name,
};

/// `fmt.Sprintf("%#08x", 1<<bit)`: Go zero-pads the digits to 8, giving
/// "0x00004000" for bit 14.
pub fn masquerade_mark(bit: u8) -> String {
    format!("0x{:08x}", 1u64 << bit)
}

/// kube-proxy's `computeProbability`: `fmt.Sprintf("%0.10f", 1.0/float64(n))`.
pub fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// One service port with `proxy.CategorizeEndpoints` applied (internal
/// traffic policy Cluster, no topology, ready endpoints only).
pub(super) struct PortPlan<'a> {
    pub(super) svc: &'a Service,
    pub(super) port: &'a ServicePort,
    pub(super) name: String,
    /// Ready endpoints sorted by "ip:port" (kube-proxy's `byEndpoint`).
    pub(super) cluster: Vec<Ipv4Addr>,
    pub(super) local: Vec<Ipv4Addr>,
    pub(super) externally_accessible: bool,
    pub(super) external_local: bool,
}

impl<'a> PortPlan<'a> {
    pub(super) fn new(svc: &'a Service, port: &'a ServicePort) -> PortPlan<'a> {
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

    pub(super) fn has_endpoints(&self) -> bool {
        !self.cluster.is_empty()
    }

    pub(super) fn has_external_endpoints(&self) -> bool {
        self.has_endpoints() && (!self.external_local || !self.local.is_empty())
    }

    pub(super) fn endpoint(&self, ip: Ipv4Addr) -> String {
        format!("{ip}:{}", self.port.target_port)
    }
}

/// The node-port addresses kube-proxy would use: `None` = match all.
pub(super) fn nodeport_ips(node: &NodeSettings, mode: ProxyMode) -> Option<Vec<Ipv4Addr>> {
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
pub(super) fn localhost_nodeports(node: &NodeSettings) -> bool {
    node.localhost_nodeports
        && node.nodeport_addresses.as_ref().is_none_or(|cidrs| {
            cidrs.is_empty() || cidrs.iter().any(|c| c.contains(&Ipv4Addr::LOCALHOST))
        })
}

#[cfg(test)]
mod tests {
    use super::{super::tests::svc1, *};

    #[test]
    fn probabilities_are_formatted_like_go() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(6), "0.1666666667");
        assert_eq!(probability(7), "0.1428571429");
        assert_eq!(masquerade_mark(14), "0x00004000");
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
}
