//! Fixtures shared by the CNI spec tests (`tests/tests/cni_spec*.rs`): a
//! node with a running agent, and Beeline in a conflist run by a
//! [`conformance::Runtime`] with Debian's plugins on the CNI path.
use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::{Node, bin, conformance, require_root};

/// The podCIDR of the spec tests' node.
pub const POD_CIDR: &str = "10.244.1.0/24";
/// Where Debian's containernetworking-plugins are.
pub const DEBIAN_CNI: &str = "/usr/lib/cni";

/// A node with podCIDR `cidr` and a running agent (default flags).
pub fn node_with(cidr: &str) -> Node {
    require_root();
    let mut node = Node::new(cidr, Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    node
}

/// A runtime executing `plugins` as one conflist from `node`, with
/// Beeline's and Debian's plugins on its CNI path.
pub fn runtime<'a>(node: &'a Node, plugins: Vec<Value>) -> conformance::Runtime<'a> {
    conformance::Runtime {
        host: &node.ns,
        conflist: json!({ "name": "beeline-test", "plugins": plugins }),
        cni_path: vec![
            bin("beeline").parent().unwrap().to_path_buf(),
            DEBIAN_CNI.into(),
        ],
    }
}

/// Beeline's entry in a conflist (the conflist has the name and version).
pub fn beeline_plugin(node: &Node) -> Value {
    let mut plugin = node.cni_conf("1.1.0");
    plugin.as_object_mut().unwrap().remove("cniVersion");
    plugin.as_object_mut().unwrap().remove("name");
    plugin
}
