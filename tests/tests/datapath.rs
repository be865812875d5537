//! The eBPF object itself, driven through the agent's `Datapath` with no
//! daemon and no CNI binary: load, pin, attach to a veth in a test netns,
//! send packets, read the counters and the receiver's socket.
use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use beeline_agent::{
    cli::PodAttach,
    datapath::{self, Datapath},
    inspect,
    maps::StatsMap,
};
use beeline_common::{Endpoint, Program, Verdict};
use beeline_tests::*;

/// A pod-like netns wired to `node` with a veth, set up as the CNI does.
struct FakePod {
    ns: NetNs,
    host_if: String,
    ip: Ipv4Addr,
}

impl FakePod {
    fn new(node: &NetNs, ip: Ipv4Addr) -> FakePod {
        let host_if = unique("bld");
        let ns = hand_wired_pod(node, &host_if, ip, None);
        FakePod { ns, host_if, ip }
    }
}

/// `beeline_from_pod`'s packets with `verdict`, read from the pinned map.
fn from_pod(bpffs: &BpffsDir, verdict: Verdict) -> u64 {
    let counters = StatsMap::open(&bpffs.path).unwrap().read().unwrap();
    counters.get(Program::FromPod, verdict)
}

fn ifindex(ns: &NetNs, dev: &str) -> u32 {
    let v: serde_json::Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", dev])).unwrap();
    v[0]["ifindex"].as_u64().unwrap() as u32
}

#[test]
fn the_object_loads_attaches_counts_and_redirects_into_the_peer_netns() {
    require_root();
    let node = NetNs::new("bld");
    let bpffs = BpffsDir::new();
    let sender = FakePod::new(&node, Ipv4Addr::new(10, 99, 1, 1));
    let receiver = FakePod::new(&node, Ipv4Addr::new(10, 99, 1, 2));

    let mut datapath = node.enter(|| {
        let dp = Datapath::load(&bpffs.path, false, PodAttach::Tc).expect("load the eBPF object");
        dp.programs
            .attach_pod(&sender.host_if)
            .expect("attach to the host veth");
        dp
    });
    // Maps are pinned by name under the bpffs dir.
    for map in beeline_common::map_names::ALL {
        assert!(bpffs.path.join(map).exists(), "{map} is not pinned");
    }

    // 1. Unknown destination: left to the host stack and counted as passed.
    let before = from_pod(&bpffs, Verdict::PassedToHost);
    sender.ns.enter(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..10 {
            sock.send_to(b"nobody", "10.99.1.77:9").unwrap();
        }
    });
    let after = from_pod(&bpffs, Verdict::PassedToHost);
    assert!(
        after >= before + 10,
        "passed_to_host went {before} -> {after}"
    );
    assert_eq!(from_pod(&bpffs, Verdict::RedirectedLocal), 0);

    // 2. A registered endpoint: delivered into the receiver's netns.
    datapath
        .endpoints
        .upsert(
            receiver.ip,
            Endpoint {
                host_ifindex: ifindex(&node, &receiver.host_if),
                pod_mac: receiver.ns.mac("eth0").0,
                host_mac: node.mac(&receiver.host_if).0,
                flags: 0,
            },
        )
        .unwrap();
    let listener = receiver
        .ns
        .enter(|| UdpSocket::bind((receiver.ip, 7777)))
        .unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    sender.ns.enter(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.send_to(b"hello beeline", (receiver.ip, 7777)).unwrap();
    });
    let mut buf = [0u8; 64];
    let (n, from) = listener
        .recv_from(&mut buf)
        .expect("the datagram was redirected");
    assert_eq!(&buf[..n], b"hello beeline");
    assert_eq!(from.ip(), sender.ip);
    assert!(from_pod(&bpffs, Verdict::RedirectedLocal) >= 1);
    assert_eq!(from_pod(&bpffs, Verdict::DroppedHelperError), 0);

    // The endpoint is visible through the pinned map, as operators see it.
    let rows = inspect::endpoints(&bpffs.path, &bpffs.path.join("no-state")).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].ip, receiver.ip);

    // 3. Detaching removes the filter and the program stops counting.
    node.enter(|| datapath::detach_from_pod_veth(&sender.host_if))
        .unwrap();
    let tc = run(node
        .cmd("tc")
        .args(["filter", "show", "dev", &sender.host_if, "ingress"]));
    assert!(
        tc.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&tc.stdout)
    );
    let before = inspect::stats(&bpffs.path).unwrap();
    sender.ns.enter(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.send_to(b"x", (receiver.ip, 7777)).unwrap();
    });
    std::thread::sleep(Duration::from_millis(100));
    let after = inspect::stats(&bpffs.path).unwrap();
    assert_eq!(before, after, "a detached program still ran");
}
