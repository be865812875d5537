//! Services (`--kube-proxy-replacement`): keeps the Service maps equal to
//! what the Services and EndpointSlices call for on this node, and the
//! socket programs attached to the cgroup root. `desired_frontends` is the
//! whole policy (which addresses, which endpoints for which traffic); the
//! rest is ids, ordering and repair.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use beeline_common::{Backend, SERVICE_SNAT, ServiceEntry, ServiceKey, scope};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info};

use super::{Pace, Pass, repaired};
use crate::{
    datapath::Programs,
    maps::services::{ServicesMaps, Tables},
    metrics::Metrics,
    sources::services::{EndpointInfo, IPPROTO_TCP, Object, ServiceInfo, Snapshot},
    status::{Conditions, NodeState},
};

const OWNER: &str = "services";
/// The file in the state dir naming each frontend, for `beeline-agent services`.
pub const NAMES_FILE: &str = "services.json";
/// How long a translated connection from outside may stay idle.
const TCP_IDLE: Duration = Duration::from_secs(6 * 3600);
const UDP_IDLE: Duration = Duration::from_secs(300);

/// A backend as the maps hold it: address, port, protocol.
pub type BackendAddr = (Ipv4Addr, u16, u8);

/// One frontend this node must translate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    /// Slot 0 of `BEELINE_SERVICES`.
    pub key: ServiceKey,
    /// What it belongs to: `namespace/name:port`.
    pub name: String,
    pub flags: u16,
    pub affinity_timeout: u32,
    pub backends: Vec<BackendAddr>,
}

/// What `beeline-agent services` shows next to the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    /// Frontend id → `namespace/name:port`.
    pub frontends: BTreeMap<u32, String>,
}

fn key(addr: Ipv4Addr, port: u16, protocol: u8, scope: u8) -> ServiceKey {
    ServiceKey {
        addr: addr.octets(),
        port: port.to_be_bytes(),
        protocol,
        scope,
        slot: 0,
        pad: [0; 2],
    }
}

/// Endpoints for one kind of traffic, as kube-proxy picks them (KEP-1669):
/// the ready ones, or if none is, the serving and terminating ones; with
/// `local_only`, only this node's.
fn choose(endpoints: &[(EndpointInfo, u16)], local_only: bool, node: &str) -> Vec<BackendAddr> {
    let eligible: Vec<&(EndpointInfo, u16)> = endpoints
        .iter()
        .filter(|(e, _)| !local_only || e.node_name.as_deref() == Some(node))
        .collect();
    let ready: Vec<&&(EndpointInfo, u16)> = eligible.iter().filter(|(e, _)| e.ready).collect();
    let chosen: Vec<&&(EndpointInfo, u16)> = if ready.is_empty() {
        eligible
            .iter()
            .filter(|(e, _)| e.serving && e.terminating)
            .collect()
    } else {
        ready
    };
    let mut backends: Vec<BackendAddr> = chosen.iter().map(|(e, p)| (e.addr, *p, 0)).collect();
    backends.sort();
    backends.dedup();
    backends
}

/// Every frontend this node translates, from the Services and their
/// EndpointSlices:
/// - ClusterIPs, for sockets (pods and the node), from endpoints of the
///   whole cluster or, with `internalTrafficPolicy: Local`, this node's;
/// - externalIPs, load-balancer IPs and this node's NodePorts, for sockets
///   with every endpoint (kube-proxy's short-circuit for traffic from
///   inside), and for packets from outside with this node's endpoints only
///   under `externalTrafficPolicy: Local`, else every endpoint and the
///   client translated to this node's address.
pub fn desired_frontends(
    objects: &[Object],
    node: &str,
    node_addr: Option<Ipv4Addr>,
) -> Vec<FrontendSpec> {
    let mut slices: HashMap<(&str, &str), Vec<&crate::sources::services::SliceInfo>> =
        HashMap::new();
    for o in objects {
        if let Object::Slice(s) = o {
            slices
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(s);
        }
    }
    let mut out: BTreeMap<ServiceKey, FrontendSpec> = BTreeMap::new();
    let services = objects.iter().filter_map(|o| match o {
        Object::Service(s) => Some(s),
        _ => None,
    });
    for svc in services {
        let own = slices
            .get(&(svc.namespace.as_str(), svc.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for port in &svc.ports {
            // The port's endpoints: its target port is resolved in the
            // slices, under the Service port's name.
            let endpoints: Vec<(EndpointInfo, u16)> = own
                .iter()
                .flat_map(|s| {
                    s.ports
                        .iter()
                        .filter(|(n, proto, _)| *n == port.name && *proto == port.protocol)
                        .flat_map(|(_, _, target)| {
                            s.endpoints.iter().map(move |e| (e.clone(), *target))
                        })
                })
                .collect();
            let mut add = |addr: Ipv4Addr, number: u16, scope: u8, local: bool, flags: u16| {
                let k = key(addr, number, port.protocol, scope);
                let backends = choose(&endpoints, local, node)
                    .into_iter()
                    .map(|(a, p, _)| (a, p, port.protocol))
                    .collect();
                out.entry(k).or_insert_with(|| FrontendSpec {
                    key: k,
                    name: service_port_name(svc, &port.name),
                    flags,
                    affinity_timeout: svc.affinity_timeout.unwrap_or(0),
                    backends,
                });
            };
            for ip in &svc.cluster_ips {
                add(*ip, port.port, scope::SOCKET, svc.internal_local, 0);
            }
            let mut outside: Vec<(Ipv4Addr, u16)> =
                svc.external_ips.iter().map(|ip| (*ip, port.port)).collect();
            if let (Some(addr), Some(node_port)) = (node_addr, port.node_port) {
                outside.push((addr, node_port));
            }
            let snat = if svc.external_local { 0 } else { SERVICE_SNAT };
            for (ip, number) in outside {
                add(ip, number, scope::SOCKET, false, 0);
                add(ip, number, scope::EXTERNAL, svc.external_local, snat);
            }
        }
    }
    out.into_values().collect()
}

fn service_port_name(svc: &ServiceInfo, port: &str) -> String {
    if port.is_empty() {
        format!("{}/{}", svc.namespace, svc.name)
    } else {
        format!("{}/{}:{port}", svc.namespace, svc.name)
    }
}

/// Frontend and backend ids, stable while they exist (the programs'
/// affinity and connection entries name them), learned back from the maps
/// after a restart.
#[derive(Default)]
struct Ids {
    backends: HashMap<BackendAddr, u32>,
    frontends: HashMap<ServiceKey, u32>,
    next: u32,
}

impl Ids {
    fn learn(&mut self, current: &Tables) {
        for (id, b) in &current.backends {
            let addr = (
                Ipv4Addr::from(b.addr),
                u16::from_be_bytes(b.port),
                b.protocol,
            );
            self.backends.insert(addr, *id);
            self.next = self.next.max(*id);
        }
        for (k, e) in current.frontends() {
            self.frontends.insert(*k, e.id);
            self.next = self.next.max(e.id);
        }
    }

    fn fresh(&mut self) -> u32 {
        self.next = self.next.wrapping_add(1).max(1);
        self.next
    }

    /// The map contents for `frontends`; ids of what is gone are dropped.
    fn tables(&mut self, frontends: &[FrontendSpec]) -> Tables {
        let mut tables = Tables::default();
        let mut backends = HashMap::new();
        let mut fronts = HashMap::new();
        for f in frontends {
            let id = match self.frontends.get(&f.key) {
                Some(id) => *id,
                None => self.fresh(),
            };
            fronts.insert(f.key, id);
            tables.services.insert(
                f.key,
                ServiceEntry {
                    id,
                    count: f.backends.len() as u16,
                    flags: f.flags,
                    affinity_timeout: f.affinity_timeout,
                },
            );
            for (slot, b) in f.backends.iter().enumerate() {
                let bid = match backends.get(b).or(self.backends.get(b)) {
                    Some(id) => *id,
                    None => self.fresh(),
                };
                backends.insert(*b, bid);
                tables.backends.insert(
                    bid,
                    Backend {
                        addr: b.0.octets(),
                        port: b.1.to_be_bytes(),
                        protocol: b.2,
                        pad: 0,
                    },
                );
                tables.services.insert(
                    ServiceKey {
                        slot: slot as u16 + 1,
                        ..f.key
                    },
                    ServiceEntry {
                        id: bid,
                        ..Default::default()
                    },
                );
            }
        }
        self.backends = backends;
        self.frontends = fronts;
        tables
    }
}

pub struct Services {
    node_name: String,
    maps: ServicesMaps,
    programs: Programs,
    /// The cgroup2 directory the socket programs are attached to.
    cgroup: PathBuf,
    state_dir: PathBuf,
    metrics: Arc<Metrics>,
    conditions: Conditions,
    ids: Ids,
    /// What the last pass wrote (`None` before the first).
    applied: Option<(Tables, Names)>,
    found: BTreeMap<String, String>,
}

impl Services {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_name: String,
        maps: ServicesMaps,
        programs: Programs,
        cgroup: PathBuf,
        state_dir: PathBuf,
        metrics: Arc<Metrics>,
        conditions: Conditions,
    ) -> Services {
        Services {
            node_name,
            maps,
            programs,
            cgroup,
            state_dir,
            metrics,
            conditions,
            ids: Ids::default(),
            applied: None,
            found: BTreeMap::new(),
        }
    }

    pub async fn run(
        mut self,
        mut input: watch::Receiver<Snapshot>,
        mut node: watch::Receiver<NodeState>,
        period: Duration,
    ) {
        let mut pace = Pace::new(OWNER, period);
        loop {
            let objects = input.borrow_and_update().clone();
            let node_addr = node
                .borrow_and_update()
                .uplink
                .as_ref()
                .map(|u| u.net.addr());
            let result = self.reconcile(&objects, node_addr);
            pace.after(&result, &self.metrics);
            tokio::select! {
                changed = input.changed() => if changed.is_err() { return },
                changed = node.changed() => if changed.is_err() { return },
                _ = pace.due() => {}
            }
        }
    }

    /// One pass; what it found damaged is published as conditions.
    pub fn reconcile(&mut self, objects: &[Object], node_addr: Option<Ipv4Addr>) -> Result<Pass> {
        self.found.clear();
        let pass = self.apply(objects, node_addr);
        self.conditions.publish(OWNER, &self.found);
        match pass? {
            Pass::Done if !self.found.is_empty() => Ok(Pass::Repaired),
            pass => Ok(pass),
        }
    }

    fn apply(&mut self, objects: &[Object], node_addr: Option<Ipv4Addr>) -> Result<Pass> {
        let current = self.maps.read()?;
        let first = self.applied.is_none();
        if first {
            self.ids.learn(&current);
        }
        let frontends = desired_frontends(objects, &self.node_name, node_addr);
        let desired = self.ids.tables(&frontends);
        let changes = self.maps.apply(&current, &desired)?;
        self.move_udp_sockets_on(&current, &desired);
        if let Some((before, _)) = &self.applied
            && *before != current
        {
            repaired(
                &self.metrics,
                &mut self.found,
                "service_map_entry",
                &format!("{} entries rewritten", changes.written + changes.removed),
            );
        }
        if changes != Default::default() {
            info!(
                frontends = frontends.len(),
                written = changes.written,
                removed = changes.removed,
                flushed = changes.flushed,
                "Service maps updated"
            );
        }
        let names = Names {
            frontends: frontends
                .iter()
                .map(|f| (desired.services[&f.key].id, f.name.clone()))
                .collect(),
        };
        if self.applied.as_ref().is_none_or(|(_, n)| *n != names) {
            write_names(&self.state_dir, &names)?;
        }
        // The programs go on after the maps they read are filled; a
        // restarted agent swaps its own in.
        let missing = !self.programs.cgroup_attached();
        if first || missing {
            self.programs
                .attach_cgroup(&self.cgroup)
                .with_context(|| format!("attaching to the cgroup {}", self.cgroup.display()))?;
            if missing && !first {
                let cgroup = self.cgroup.display().to_string();
                repaired(&self.metrics, &mut self.found, "socket_program", &cgroup);
            }
        }
        let expired = self.maps.expire_nat(monotonic_ns(), |protocol| {
            if protocol == IPPROTO_TCP {
                TCP_IDLE.as_nanos() as u64
            } else {
                UDP_IDLE.as_nanos() as u64
            }
        });
        self.metrics
            .count_action("expired_service_connection", expired);
        self.metrics.set_services(
            objects
                .iter()
                .filter(|o| matches!(o, Object::Service(_)))
                .count(),
            frontends.len(),
            desired.backends.len(),
            self.maps.nat_entries(),
        );
        self.applied = Some((desired, names));
        Ok(Pass::Done)
    }
}

impl Services {
    /// Connected UDP sockets to a backend that left: destroyed, so their
    /// applications open new ones (a TCP connection fails by itself).
    fn move_udp_sockets_on(&self, current: &Tables, desired: &Tables) {
        // (frontend, backend) pairs that no longer exist.
        let desired_pairs = desired.udp_socket_backends();
        let gone: HashSet<_> = current
            .udp_socket_backends()
            .into_iter()
            .filter(|pair| !desired_pairs.contains(pair))
            .collect();
        if gone.is_empty() {
            return;
        }
        let doomed = |s: &crate::sockets::UdpSocket| {
            let backend = (s.dst, s.dport);
            self.maps
                .translated_from(s.cookie, s.dst, s.dport)
                .is_some_and(|frontend| gone.contains(&(frontend, backend)))
        };
        let mut destroyed = 0;
        for netns in crate::sockets::netns_to_search(&self.state_dir) {
            match crate::sockets::destroy_udp_in(netns.as_deref(), &doomed) {
                Ok(n) => destroyed += n,
                // A pod that went away meanwhile, say: its sockets went too.
                Err(e) => debug!(?netns, "looking for UDP sockets to move on: {e}"),
            }
        }
        if destroyed > 0 {
            info!(
                destroyed,
                "closed connected UDP sockets of removed backends"
            );
        }
        self.metrics.count_action("destroyed_udp_socket", destroyed);
    }
}

fn write_names(state_dir: &std::path::Path, names: &Names) -> Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let path = state_dir.join(NAMES_FILE);
    let tmp = state_dir.join(format!("{NAMES_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(names)?)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
}

pub fn read_names(state_dir: &std::path::Path) -> Names {
    std::fs::read(state_dir.join(NAMES_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// `bpf_ktime_get_ns`'s clock.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::services::{IPPROTO_UDP, PortInfo, SliceInfo};

    fn ep(addr: [u8; 4], node: &str, ready: bool, terminating: bool) -> EndpointInfo {
        EndpointInfo {
            addr: addr.into(),
            node_name: Some(node.into()),
            ready,
            serving: ready || terminating,
            terminating,
        }
    }

    fn web(external_local: bool, internal_local: bool) -> Vec<Object> {
        vec![
            Object::Service(ServiceInfo {
                namespace: "default".into(),
                name: "web".into(),
                cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 10)],
                external_ips: vec![Ipv4Addr::new(203, 0, 113, 7)],
                ports: vec![
                    PortInfo {
                        name: "http".into(),
                        protocol: IPPROTO_TCP,
                        port: 80,
                        node_port: Some(30080),
                    },
                    PortInfo {
                        name: "dns".into(),
                        protocol: IPPROTO_UDP,
                        port: 53,
                        node_port: None,
                    },
                ],
                external_local,
                internal_local,
                affinity_timeout: None,
            }),
            Object::Slice(SliceInfo {
                namespace: "default".into(),
                service: "web".into(),
                // The named target port "http" resolved to 8080.
                ports: vec![
                    ("http".into(), IPPROTO_TCP, 8080),
                    ("dns".into(), IPPROTO_UDP, 5353),
                ],
                endpoints: vec![
                    ep([10, 244, 1, 5], "me", true, false),
                    ep([10, 244, 2, 5], "other", true, false),
                    ep([10, 244, 1, 6], "me", false, true),
                ],
            }),
        ]
    }

    fn find(f: &[FrontendSpec], addr: [u8; 4], port: u16, scope: u8) -> &FrontendSpec {
        f.iter()
            .find(|f| {
                f.key.addr == addr && f.key.port == port.to_be_bytes() && f.key.scope == scope
            })
            .unwrap_or_else(|| panic!("no frontend {addr:?}:{port} scope {scope}"))
    }

    #[test]
    fn cluster_ips_node_ports_and_external_ips_get_their_frontends() {
        let node = Ipv4Addr::new(192, 168, 1, 1);
        let f = desired_frontends(&web(false, false), "me", Some(node));
        // ClusterIP (TCP, UDP): sockets only. NodePort and external IP:
        // sockets and packets from outside.
        assert_eq!(f.len(), 2 + 2 + 2 + 1 + 1, "{f:#?}");
        let cluster = find(&f, [10, 96, 0, 10], 80, scope::SOCKET);
        assert_eq!(cluster.name, "default/web:http");
        let ready: Vec<BackendAddr> = vec![
            (Ipv4Addr::new(10, 244, 1, 5), 8080, IPPROTO_TCP),
            (Ipv4Addr::new(10, 244, 2, 5), 8080, IPPROTO_TCP),
        ];
        assert_eq!(cluster.backends, ready, "ready endpoints only");
        let dns = find(&f, [10, 96, 0, 10], 53, scope::SOCKET);
        assert_eq!(dns.backends[0].1, 5353);
        let node_port = find(&f, node.octets(), 30080, scope::EXTERNAL);
        assert_eq!(node_port.flags, SERVICE_SNAT);
        assert_eq!(node_port.backends, ready);
    }

    #[test]
    fn local_policies_keep_this_nodes_endpoints_and_fall_back_to_terminating_ones() {
        let node = Ipv4Addr::new(192, 168, 1, 1);
        let f = desired_frontends(&web(true, true), "me", Some(node));
        let cluster = find(&f, [10, 96, 0, 10], 80, scope::SOCKET);
        assert_eq!(
            cluster.backends,
            vec![(Ipv4Addr::new(10, 244, 1, 5), 8080, IPPROTO_TCP)]
        );
        let outside = find(&f, node.octets(), 30080, scope::EXTERNAL);
        assert_eq!(outside.flags, 0, "Local keeps the client's address");
        assert_eq!(outside.backends.len(), 1);
        // From inside, NodePorts use every endpoint (short-circuit).
        assert_eq!(
            find(&f, node.octets(), 30080, scope::SOCKET).backends.len(),
            2
        );

        // No ready endpoint on "other": its terminating-and-serving ones
        // are used; none at all on a node without endpoints.
        let mut objects = web(true, true);
        if let Object::Slice(s) = &mut objects[1] {
            s.endpoints = vec![ep([10, 244, 2, 9], "other", false, true)];
        }
        let f = desired_frontends(&objects, "other", Some(node));
        assert_eq!(
            find(&f, [10, 96, 0, 10], 80, scope::SOCKET).backends.len(),
            1
        );
        let f = desired_frontends(&objects, "me", Some(node));
        assert!(
            find(&f, [10, 96, 0, 10], 80, scope::SOCKET)
                .backends
                .is_empty()
        );
    }

    #[test]
    fn ids_stay_put_while_their_backends_live() {
        let node = Ipv4Addr::new(192, 168, 1, 1);
        let mut ids = Ids::default();
        let first = ids.tables(&desired_frontends(&web(false, false), "me", Some(node)));
        let again = ids.tables(&desired_frontends(&web(false, false), "me", Some(node)));
        assert_eq!(first, again);
        // A restarted agent learns them back from the maps.
        let mut fresh = Ids::default();
        fresh.learn(&first);
        assert_eq!(
            fresh.tables(&desired_frontends(&web(false, false), "me", Some(node))),
            first
        );
    }
}
