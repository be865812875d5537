//! Services and EndpointSlices as the Service load balancer needs them,
//! selected the way kube-proxy selects them: not Services another proxy
//! serves (`service.kubernetes.io/service-proxy-name`), not headless ones,
//! not ExternalName. From watchers on both kinds, or from a `List` file
//! exactly as `kubectl get svc,endpointslices -A -o json` (or `-o yaml`)
//! prints it, through the same k8s-openapi types and projections.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;
use tokio::{sync::watch, task::JoinHandle};

/// kube-proxy's label selector for both kinds.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One object of either kind, projected.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(ServiceInfo),
    Slice(SliceInfo),
}

pub type Snapshot = Vec<Object>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`.
    pub external_ips: Vec<Ipv4Addr>,
    pub ports: Vec<PortInfo>,
    /// `externalTrafficPolicy: Local` (NodePort and LoadBalancer Services).
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: String,
    /// The Service it belongs to (`kubernetes.io/service-name`).
    pub service: String,
    /// (name, protocol, port): a Service port's target, resolved.
    pub ports: Vec<(String, u8, u16)>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub addr: Ipv4Addr,
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

fn protocol(name: Option<&str>) -> Option<u8> {
    match name.unwrap_or("TCP") {
        "TCP" => Some(IPPROTO_TCP),
        "UDP" => Some(IPPROTO_UDP),
        // SCTP: not translated.
        _ => None,
    }
}

fn has_label(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, l: &str) -> bool {
    meta.labels.as_ref().is_some_and(|m| m.contains_key(l))
}

impl ServiceInfo {
    pub fn from_service(svc: &Service) -> Option<ServiceInfo> {
        let meta = &svc.metadata;
        if has_label(meta, PROXY_NAME_LABEL) || has_label(meta, HEADLESS_LABEL) {
            return None;
        }
        let spec = svc.spec.as_ref()?;
        let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
        if type_ == "ExternalName" {
            return None;
        }
        let mut ips: Vec<&String> = spec.cluster_ips.iter().flatten().collect();
        if let Some(ip) = &spec.cluster_ip
            && !ips.contains(&ip)
        {
            ips.insert(0, ip);
        }
        // Headless ("None") and IPv6 addresses parse to nothing.
        let cluster_ips: Vec<Ipv4Addr> = ips.into_iter().filter_map(|i| i.parse().ok()).collect();
        if cluster_ips.is_empty() {
            return None;
        }
        let mut external_ips: Vec<Ipv4Addr> = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|i| i.parse().ok())
            .collect();
        if type_ == "LoadBalancer" {
            let ingress = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref());
            external_ips.extend(
                ingress
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok()),
            );
        }
        external_ips.sort();
        external_ips.dedup();
        let exposed = matches!(type_, "NodePort" | "LoadBalancer");
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(PortInfo {
                    name: p.name.clone().unwrap_or_default(),
                    protocol: protocol(p.protocol.as_deref())?,
                    port: u16::try_from(p.port).ok()?,
                    node_port: p
                        .node_port
                        .filter(|_| exposed)
                        .and_then(|n| u16::try_from(n).ok()),
                })
            })
            .collect();
        let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .and_then(|t| u32::try_from(t).ok())
                // The API's default: 3 hours.
                .unwrap_or(10800)
        });
        Some(ServiceInfo {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone()?,
            cluster_ips,
            external_ips,
            ports,
            external_local: (exposed || !spec.external_ips.as_ref().is_none_or(Vec::is_empty))
                && spec.external_traffic_policy.as_deref() == Some("Local"),
            internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            affinity_timeout,
        })
    }
}

impl SliceInfo {
    pub fn from_slice(slice: &EndpointSlice) -> Option<SliceInfo> {
        let meta = &slice.metadata;
        if has_label(meta, PROXY_NAME_LABEL)
            || has_label(meta, HEADLESS_LABEL)
            || slice.address_type != "IPv4"
        {
            return None;
        }
        let service = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?.clone();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    protocol(p.protocol.as_deref())?,
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|e| {
                let c = e.conditions.as_ref();
                // Unset `ready` and `serving` mean true, unset `terminating`
                // false (the API's documented defaults).
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                Some(EndpointInfo {
                    addr: e.addresses.first()?.parse().ok()?,
                    node_name: e.node_name.clone(),
                    ready,
                    serving: c.and_then(|c| c.serving).unwrap_or(ready),
                    terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                })
            })
            .collect();
        Some(SliceInfo {
            namespace: meta.namespace.clone().unwrap_or_default(),
            service,
            ports,
            endpoints,
        })
    }
}

/// Both kinds from the Kubernetes API, with kube-proxy's selector; one
/// snapshot of both after every change.
pub fn from_kubernetes(client: Client) -> (watch::Receiver<Snapshot>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Vec::new());
    let config = watcher::Config::default().labels(LABEL_SELECTOR);
    let (svc_tx, mut svc_rx) = watch::channel(Vec::new());
    let (slice_tx, mut slice_rx) = watch::channel(Vec::new());
    let services = super::reflect(
        watcher(Api::<Service>::all(client.clone()), config.clone()).default_backoff(),
        ServiceInfo::from_service,
        svc_tx,
    );
    let slices = super::reflect(
        watcher(Api::<EndpointSlice>::all(client), config).default_backoff(),
        SliceInfo::from_slice,
        slice_tx,
    );
    let task = tokio::spawn(async move {
        let reflectors = async { tokio::join!(services, slices) };
        let combine = async {
            loop {
                tokio::select! {
                    r = svc_rx.changed() => if r.is_err() { return },
                    r = slice_rx.changed() => if r.is_err() { return },
                }
                let snapshot: Snapshot = svc_rx
                    .borrow_and_update()
                    .iter()
                    .cloned()
                    .map(Object::Service)
                    .chain(
                        slice_rx
                            .borrow_and_update()
                            .iter()
                            .cloned()
                            .map(Object::Slice),
                    )
                    .collect();
                if tx.send(snapshot).is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = reflectors => {}
            () = combine => {}
        }
    });
    (rx, task)
}

/// Both kinds from a `List` file, reloaded when it changes.
pub fn from_file(path: PathBuf) -> Result<(watch::Receiver<Snapshot>, JoinHandle<()>)> {
    super::watch_file(path, read_list)
}

pub fn read_list(path: &Path) -> Result<Snapshot> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the services file {}", path.display()))?;
    parse_list(&text).with_context(|| format!("in {}", path.display()))
}

/// A `List` (or `ServiceList`, `EndpointSliceList`) in JSON or YAML.
pub fn parse_list(text: &str) -> Result<Snapshot> {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => serde_yaml_ng::from_str(text).context("neither JSON nor YAML")?,
    };
    let Some(items) = value.get("items").and_then(Value::as_array) else {
        bail!("not a Kubernetes List: no items");
    };
    let mut objects = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let kind = item.get("kind").and_then(Value::as_str).unwrap_or_default();
        let at = || format!("item {i} ({kind})");
        match kind {
            "Service" => {
                let svc: Service = serde_json::from_value(item.clone()).with_context(at)?;
                objects.extend(ServiceInfo::from_service(&svc).map(Object::Service));
            }
            "EndpointSlice" => {
                let slice: EndpointSlice = serde_json::from_value(item.clone()).with_context(at)?;
                objects.extend(SliceInfo::from_slice(&slice).map(Object::Slice));
            }
            other => bail!("item {i}: kind {other:?} is neither Service nor EndpointSlice"),
        }
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL_YAML: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: default}
  spec:
    type: NodePort
    clusterIP: 10.96.0.10
    clusterIPs: [10.96.0.10]
    externalIPs: [203.0.113.7]
    externalTrafficPolicy: Local
    sessionAffinity: ClientIP
    ports:
    - {name: http, port: 80, protocol: TCP, targetPort: web, nodePort: 30080}
    - {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}
    - {name: sctp, port: 9, protocol: SCTP, targetPort: 9}
- apiVersion: v1
  kind: Service
  metadata: {name: headless, namespace: default}
  spec: {clusterIP: None, ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata:
    name: other-proxy
    namespace: default
    labels: {service.kubernetes.io/service-proxy-name: foo}
  spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: ext, namespace: default}
  spec: {type: ExternalName, externalName: example.com}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: web-abc
    namespace: default
    labels: {kubernetes.io/service-name: web}
  addressType: IPv4
  ports: [{name: http, port: 8080, protocol: TCP}]
  endpoints:
  - addresses: [10.244.1.5]
    nodeName: node-a
    conditions: {ready: true}
  - addresses: [10.244.2.5]
    nodeName: node-b
    conditions: {ready: false, serving: true, terminating: true}
  - addresses: [10.244.2.6]
"#;

    #[test]
    fn kubectl_lists_parse_with_kube_proxys_selection() {
        let objects = parse_list(KUBECTL_YAML).unwrap();
        let services: Vec<&ServiceInfo> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Service(s) => Some(s),
                _ => None,
            })
            .collect();
        assert_eq!(services.len(), 1, "{services:?}");
        let web = services[0];
        assert_eq!(web.cluster_ips, vec![Ipv4Addr::new(10, 96, 0, 10)]);
        assert_eq!(web.external_ips, vec![Ipv4Addr::new(203, 0, 113, 7)]);
        assert!(web.external_local && !web.internal_local);
        assert_eq!(web.affinity_timeout, Some(10800));
        assert_eq!(web.ports.len(), 2, "SCTP is left out");
        assert_eq!(web.ports[1].protocol, IPPROTO_UDP);
        assert_eq!(web.ports[0].node_port, Some(30080));
        let Object::Slice(slice) = objects.last().unwrap() else {
            panic!("no slice")
        };
        assert_eq!(slice.service, "web");
        assert_eq!(slice.ports, vec![("http".to_string(), IPPROTO_TCP, 8080)]);
        assert!(slice.endpoints[0].ready);
        let draining = &slice.endpoints[1];
        assert!(!draining.ready && draining.serving && draining.terminating);
        // No conditions: ready.
        assert!(slice.endpoints[2].ready && slice.endpoints[2].node_name.is_none());
    }

    #[test]
    fn other_kinds_are_refused_by_name() {
        let err = parse_list(r#"{"items":[{"kind":"Pod"}]}"#).unwrap_err();
        assert!(format!("{err:#}").contains("Pod"), "{err:#}");
    }
}
