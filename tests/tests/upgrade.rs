//! Issue: upgrades. An agent of this version starts on the state dir and
//! pins of the previous release without losing an endpoint or a packet, and
//! replaces any pinned map whose layout differs from its own.
use std::{net::Ipv4Addr, process::Command, time::Duration};

use beeline_agent::{
    cli::PodAttach,
    datapath::{Datapath, declared_layouts, layout},
};
use beeline_tests::*;

/// The state file's format version.
fn state_version(node: &Node) -> u64 {
    let text = std::fs::read_to_string(node.state_dir().join("endpoints.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["version"]
        .as_u64()
        .unwrap()
}

#[test]
fn the_previous_release_is_replaced_without_losing_an_endpoint_or_a_packet() {
    let previous = previous_bin_dir();
    let mut cluster = Cluster::new(2);
    for node in &mut cluster.nodes {
        node.binaries = Some(previous.clone());
    }
    let args = ["--mode", "direct"];
    cluster.start(&args);
    let (a, b) = (
        Pod::add(&cluster.nodes[0], "1.0.0"),
        Pod::add(&cluster.nodes[0], "1.0.0"),
    );
    let c = Pod::add(&cluster.nodes[1], "1.0.0");
    assert_eq!(
        state_version(&cluster.nodes[0]),
        1,
        "not the previous release's state"
    );
    let filter_before = cluster.nodes[0]
        .ns
        .ingress_filter_program_id(&a.host_ifname);

    // Same node and across nodes, both ways, every 2 ms, while both nodes
    // switch to this release (a SIGKILL, as a DaemonSet rollout may do).
    let interval = Duration::from_millis(2);
    let probes = [
        UdpProbe::start(&b.ns, b.ip, &a.ns, interval),
        UdpProbe::start(&a.ns, a.ip, &c.ns, interval),
        UdpProbe::start(&c.ns, c.ip, &b.ns, interval),
    ];
    std::thread::sleep(Duration::from_millis(500));
    for node in &mut cluster.nodes {
        node.kill_agent();
        node.binaries = None;
        node.start_agent(&args);
        std::thread::sleep(Duration::from_millis(500));
    }
    for (i, probe) in probes.into_iter().enumerate() {
        let (sent, received) = probe.finish();
        assert!(sent > 500, "probe {i} sent only {sent}");
        assert_eq!(received, sent, "probe {i} lost {} packets", sent - received);
    }

    // Every endpoint is still there, with this release's program.
    let node = &cluster.nodes[0];
    let ips: Vec<String> = node
        .map_endpoints()
        .iter()
        .map(|e| e["ip"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 2, "{ips:?}");
    for pod in [&a, &b] {
        assert!(
            ips.contains(&pod.ip.to_string()),
            "{} lost: {ips:?}",
            pod.ip
        );
    }
    assert_ne!(
        node.ns.ingress_filter_program_id(&a.host_ifname),
        filter_before,
        "the old program still runs on the pod's veth"
    );
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(
        log.contains("BEELINE_STATS"),
        "the stats map was not replaced: {log}"
    );
    // The old pods pass this release's CHECK, and its DEL rewrites the state
    // in this release's format.
    let mut check_conf = node.cni_conf("1.0.0");
    check_conf["prevResult"] = a.result.clone();
    node.cni(
        "CHECK",
        &check_conf,
        &a.container_id,
        Some(&a.ns.path()),
        "eth0",
    )
    .expect_ok("CHECK of a pod the previous release added");
    a.del(node);
    assert_eq!(state_version(node), 2);
    b.del(node);
    c.del(&cluster.nodes[1]);
    node.assert_nothing_left();
}

/// A map of a different kind, key, value or capacity than this build's
/// programs declare must not be reused: aya would, and the verifier or the
/// programs would misread it. Each property, for every pinned map.
#[test]
fn a_pinned_map_of_another_layout_is_replaced_at_start() {
    require_root();
    let declared = declared_layouts().unwrap();
    // Another map type bpftool can create with the same key and value.
    let other_type = |t: u32| match t {
        1 => "lru_hash",     // BPF_MAP_TYPE_HASH
        2 => "percpu_array", // BPF_MAP_TYPE_ARRAY
        6 => "array",        // BPF_MAP_TYPE_PERCPU_ARRAY
        9 => "hash",         // BPF_MAP_TYPE_LRU_HASH
        11 => "hash",        // BPF_MAP_TYPE_LPM_TRIE
        t => panic!("no alternative for map type {t}"),
    };
    let same_type = |t: u32| match t {
        1 => "hash",
        2 => "array",
        6 => "percpu_array",
        9 => "lru_hash",
        11 => "lpm_trie",
        t => panic!("unknown map type {t}"),
    };
    let ns = NetNs::new("bll");
    for (name, wanted) in &declared {
        for property in ["type", "key", "value", "entries"] {
            let bpffs = BpffsDir::new();
            std::fs::create_dir_all(&bpffs.path).unwrap();
            let pin = bpffs.path.join(name);
            let mut key = wanted.key_size;
            let mut value = wanted.value_size;
            let mut entries = wanted.max_entries;
            let mut kind = same_type(wanted.map_type);
            match property {
                "type" => kind = other_type(wanted.map_type),
                // Arrays take 4-byte keys only: their variant is the value.
                "key" if matches!(wanted.map_type, 2 | 6) => value += 8,
                "key" => key += 4,
                "value" => value += 8,
                _ => entries = if entries > 1 { entries / 2 } else { 2 },
            }
            let mut create = Command::new("bpftool");
            create
                .args(["map", "create"])
                .arg(&pin)
                .args(["type", kind])
                .args(["key", &key.to_string(), "value", &value.to_string()])
                .args(["entries", &entries.to_string(), "name", "old"]);
            if kind == "lpm_trie" {
                create.args(["flags", "1"]); // BPF_F_NO_PREALLOC, which tries need
            }
            run(&mut create);
            let loaded = ns.enter(|| Datapath::load(&bpffs.path, false, PodAttach::Tc));
            let loaded = loaded.unwrap_or_else(|e| panic!("{name} with another {property}: {e:#}"));
            assert_eq!(
                loaded.replaced_maps,
                vec![*name],
                "{name}: another {property}"
            );
            assert_eq!(
                layout::pinned(&pin).unwrap().as_ref(),
                Some(wanted),
                "{name}: the pin with another {property} was kept"
            );
            drop(loaded);
        }
    }
    // And the pins a load made are reused by the next one, untouched.
    let bpffs = BpffsDir::new();
    drop(
        ns.enter(|| Datapath::load(&bpffs.path, false, PodAttach::Tc))
            .unwrap(),
    );
    let again = ns
        .enter(|| Datapath::load(&bpffs.path, false, PodAttach::Tc))
        .unwrap();
    assert!(again.replaced_maps.is_empty(), "{:?}", again.replaced_maps);
}

/// An older agent's node config map (16-byte values, before the VXLAN port
/// and encapsulation fields) is still pinned: aya would reuse it and the
/// verifier would reject the programs. The agent replaces it.
#[test]
fn a_pinned_map_with_an_older_layout_is_replaced_at_start() {
    require_root();
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(192, 168, 91, 1));
    std::fs::create_dir_all(&node.bpffs.path).unwrap();
    let pin = node.bpffs.path.join("BEELINE_NODE_CONFIG");
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type",
            "array",
            "key",
            "4",
            "value",
            "16",
            "entries",
            "1",
            "name",
            "BEELINE_NODE_C",
        ]));
    node.start_agent(&["--mode", "vxlan"]);
    let show = run(Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(&pin));
    let map: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(
        map["bytes_value"],
        std::mem::size_of::<beeline_common::NodeConfig>(),
        "{map}"
    );
    let dump = || {
        let out = run(Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&pin));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        eventually(Duration::from_secs(5), || dump()
            .contains("\"vxlan_port\": 4789")),
        "node config not written: {}",
        dump()
    );
    let pod = Pod::add(&node, "1.1.0");
    pod.del(&node);
}

/// Stack-NAT entries recorded by programs that did not know the switch
/// (an older agent's) are looked up as soon as this agent's programs run:
/// it switches the lookup on at load when the map holds any.
#[test]
fn stack_nat_entries_left_by_an_older_agent_switch_the_lookup_on() {
    require_root();
    use aya::maps::{Array, HashMap, Map, MapData};
    use beeline_agent::maps::StackNatMap;
    use beeline_common::{FlowKey, map_names};
    let ns = NetNs::new("bll");
    let bpffs = BpffsDir::new();
    drop(
        ns.enter(|| Datapath::load(&bpffs.path, false, PodAttach::Tc))
            .unwrap(),
    );
    let off = || {
        let data = MapData::from_pin(bpffs.path.join(map_names::STACK_NAT_ON)).unwrap();
        let mut on: Array<_, u32> = Array::try_from(Map::Array(data)).unwrap();
        on.set(0, 0, 0).unwrap();
    };
    off();
    // An empty map leaves it off.
    drop(
        ns.enter(|| Datapath::load(&bpffs.path, false, PodAttach::Tc))
            .unwrap(),
    );
    assert!(!StackNatMap::open(&bpffs.path).unwrap().is_on().unwrap());
    // One entry written behind the switch's back.
    let data = MapData::from_pin(bpffs.path.join(map_names::STACK_NAT)).unwrap();
    let mut map: HashMap<_, FlowKey, u32> = HashMap::try_from(Map::HashMap(data)).unwrap();
    let key = FlowKey {
        saddr: [10, 244, 1, 5],
        daddr: [10, 244, 1, 6],
        sport: 8080u16.to_be_bytes(),
        dport: 40000u16.to_be_bytes(),
        protocol: 6,
        pad: [0; 3],
    };
    map.insert(key, 0, 0).unwrap();
    off();
    let loaded = ns
        .enter(|| Datapath::load(&bpffs.path, false, PodAttach::Tc))
        .unwrap();
    assert!(loaded.stack_nat.is_on().unwrap(), "entries left unread");
}
