//! The conformance suite (src/conformance.rs) against Beeline, and against
//! Debian's `bridge` + `host-local` as the reference. Where the reference
//! differs, the difference is listed in tests/CONFORMANCE.md and here; the
//! test fails if the reference's behaviour changes, so the list stays true.
use std::{net::Ipv4Addr, path::PathBuf};

use beeline_tests::{conformance, *};

fn failures(outcomes: &[conformance::Outcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.name.clone())
        .collect()
}

#[test]
fn beeline_passes_every_check() {
    require_root();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    let mut plugin = node.cni_conf("1.1.0");
    plugin.as_object_mut().unwrap().remove("cniVersion");
    plugin.as_object_mut().unwrap().remove("name");
    let runtime = conformance::Runtime {
        host: &node.ns,
        conflist: json!({ "name": "beeline-test", "plugins": [plugin] }),
        cni_path: vec![bin("beeline").parent().unwrap().to_path_buf()],
    };
    let outcomes = conformance::run(&runtime);
    println!("{}", conformance::report("beeline", &outcomes));
    assert!(outcomes.len() > 40, "only {} checks ran", outcomes.len());
    assert_eq!(failures(&outcomes), Vec::<String>::new());
    assert!(node.pod_veths().is_empty(), "the suite left veths");
    assert!(
        node.allocated_ips().is_empty(),
        "the suite left IPs: {:?}",
        node.allocated_ips()
    );
}

/// Where Debian's bridge + host-local 1.1.1 differs from the spec's MUSTs
/// as this suite checks them (see tests/CONFORMANCE.md).
const REFERENCE_DIFFERENCES: &[&str] = &[
    // skel prints its "about" text and exits 0 when CNI_COMMAND is unset.
    "errors: a missing CNI_COMMAND is error code 4",
];

#[test]
fn the_reference_bridge_plugin_differs_only_where_documented() {
    require_root();
    let cni_dir = PathBuf::from("/usr/lib/cni");
    assert!(
        cni_dir.join("bridge").exists(),
        "Debian's containernetworking-plugins are needed (apt-get install containernetworking-plugins)"
    );
    let host = NetNs::new("blr");
    let data = tempfile::tempdir().unwrap();
    let runtime = conformance::Runtime {
        host: &host,
        conflist: json!({
            "name": "reference",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni-ref0",
                "isGateway": true,
                "ipam": { "type": "host-local", "subnet": "10.88.0.0/24", "dataDir": data.path() },
            }],
        }),
        cni_path: vec![cni_dir],
    };
    let outcomes = conformance::run(&runtime);
    println!("{}", conformance::report("bridge + host-local", &outcomes));
    assert!(outcomes.len() > 20, "only {} checks ran", outcomes.len());
    assert_eq!(failures(&outcomes), REFERENCE_DIFFERENCES);
}
