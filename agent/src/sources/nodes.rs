//! Kubernetes Nodes as the agent needs them: name, IPv4 podCIDRs, InternalIP.
//! From a watcher on all Nodes, or from a NodeList file exactly as `kubectl
//! get nodes -o yaml` (or `-o json`) prints it, through the same k8s-openapi
//! types.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use serde::Deserialize;
use tokio::{sync::watch, task::JoinHandle};

pub type Snapshot = Vec<NodeRoute>;

/// Nodes from the Kubernetes API (relists, reconnects, deletes).
pub fn from_kubernetes(client: Client) -> (watch::Receiver<Snapshot>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Vec::new());
    let events = watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff();
    let task = tokio::spawn(super::reflect(events, NodeRoute::from_node, tx));
    (rx, task)
}

/// Nodes from a NodeList file, reloaded when it changes.
pub fn from_file(path: PathBuf) -> Result<(watch::Receiver<Snapshot>, JoinHandle<()>)> {
    super::watch_file(path, read_node_list)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoute {
    pub name: String,
    pub pod_cidrs: Vec<Ipv4Net>,
    pub internal_ip: Option<Ipv4Addr>,
}

impl NodeRoute {
    pub fn from_node(node: &Node) -> Option<NodeRoute> {
        let name = node.metadata.name.clone()?;
        let spec = node.spec.as_ref();
        let mut cidrs: Vec<&String> = spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        if let Some(single) = spec.and_then(|s| s.pod_cidr.as_ref())
            && !cidrs.contains(&single)
        {
            cidrs.insert(0, single);
        }
        let pod_cidrs = cidrs
            .into_iter()
            .filter_map(|c| match c.parse::<IpNet>() {
                Ok(IpNet::V4(v4)) => Some(v4.trunc()),
                _ => None,
            })
            .collect();
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|addrs| {
                addrs
                    .iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            });
        Some(NodeRoute {
            name,
            pod_cidrs,
            internal_ip,
        })
    }
}

/// A NodeList reduced to routes while it is parsed: one Node at a time is
/// alive, not the whole list (5,000 full Nodes are tens of MB).
#[derive(Deserialize)]
struct NodeList {
    #[serde(default, deserialize_with = "routes_of_nodes")]
    items: Vec<NodeRoute>,
}

fn routes_of_nodes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<NodeRoute>, D::Error> {
    struct Nodes;
    impl<'de> serde::de::Visitor<'de> for Nodes {
        type Value = Vec<NodeRoute>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of Nodes")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut routes = Vec::new();
            while let Some(node) = seq.next_element::<Node>()? {
                routes.extend(NodeRoute::from_node(&node));
            }
            Ok(routes)
        }
    }
    d.deserialize_seq(Nodes)
}

/// Parses a NodeList in JSON or YAML (`kind: List` or `kind: NodeList`).
pub fn parse_node_list(text: &str) -> Result<Vec<NodeRoute>> {
    // JSON (what large generated lists are) streams straight from the text.
    if let Ok(list) = serde_json::from_str::<NodeList>(text) {
        return Ok(list.items);
    }
    // YAML goes through serde_json's Value, so the k8s-openapi deserializers
    // see the JSON data model they were written for.
    let value: serde_json::Value =
        serde_yaml_ng::from_str(text).context("the node list is neither JSON nor YAML")?;
    let list: NodeList =
        serde_json::from_value(value).context("the node list is not a Kubernetes NodeList")?;
    Ok(list.items)
}

pub fn read_node_list(path: &Path) -> Result<Vec<NodeRoute>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the nodes file {}", path.display()))?;
    parse_node_list(&text).with_context(|| format!("in {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KUBECTL_YAML: &str = r#"
apiVersion: v1
items:
- apiVersion: v1
  kind: Node
  metadata:
    name: node-a
    resourceVersion: "1234"
  spec:
    podCIDR: 10.244.0.0/24
    podCIDRs:
    - 10.244.0.0/24
    - fd00:10:244::/64
  status:
    addresses:
    - address: 192.168.50.2
      type: InternalIP
    - address: node-a
      type: Hostname
- apiVersion: v1
  kind: Node
  metadata:
    name: node-b
  spec: {}
  status:
    addresses:
    - address: 192.168.50.3
      type: InternalIP
kind: List
metadata:
  resourceVersion: ""
"#;

    #[test]
    fn parses_kubectl_yaml() {
        let nodes = parse_node_list(KUBECTL_YAML).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].name, "node-a");
        assert_eq!(nodes[0].pod_cidrs, vec!["10.244.0.0/24".parse().unwrap()]);
        assert_eq!(nodes[0].internal_ip, Some("192.168.50.2".parse().unwrap()));
        // A node without a podCIDR yet is listed, with none.
        assert!(nodes[1].pod_cidrs.is_empty());
    }

    #[test]
    fn parses_kubectl_json() {
        let json = r#"{"apiVersion":"v1","kind":"NodeList","items":[
            {"metadata":{"name":"n1"},"spec":{"podCIDR":"10.1.2.0/24"},
             "status":{"addresses":[{"type":"InternalIP","address":"10.0.0.1"}]}}]}"#;
        let nodes = parse_node_list(json).unwrap();
        assert_eq!(nodes[0].pod_cidrs, vec!["10.1.2.0/24".parse().unwrap()]);
    }

    #[test]
    fn rejects_garbage_with_context() {
        let err = parse_node_list("items: 3").unwrap_err();
        assert!(format!("{err:#}").contains("NodeList"), "{err:#}");
    }
}
