//! Issue: the whole CNI spec, hardened. IPAM delegation (host-local,
//! static, dhcp) and chaining with Debian's plugins, through the exec
//! protocol against real namespaces.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    time::Duration,
};

use beeline_tests::{
    cni_spec::{DEBIAN_CNI, POD_CIDR, beeline_plugin, node_with, runtime},
    conformance, *,
};
use serde_json::Value;

#[test]
fn ipam_is_delegated_to_host_local_and_static_through_cni_path() {
    let node = node_with(POD_CIDR);
    let data = tempfile::tempdir().unwrap();
    let mut plugin = beeline_plugin(&node);
    plugin["ipam"] = json!({
        "type": "host-local",
        "ranges": [[{ "subnet": POD_CIDR, "rangeStart": "10.244.1.100", "rangeEnd": "10.244.1.110" }]],
        "dataDir": data.path(),
    });
    let rt = runtime(&node, vec![plugin.clone()]);
    let pod = NetNs::new("blp");
    let at = conformance::Attachment {
        container_id: "ctr-hostlocal",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let result = rt.add("1.0.0", at).unwrap();
    let ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    assert!(
        (100..=110).contains(&ip.octets()[3]),
        "{ip} is not from host-local's range"
    );
    assert!(node.ns.ping(ip, 2));
    rt.check("1.0.0", at, &result)
        .expect("CHECK with a delegated IPAM");
    let held = data.path().join("beeline-test").join(ip.to_string());
    assert!(held.exists(), "host-local did not record {ip}");
    rt.del("1.0.0", at, Some(&result)).unwrap();
    assert!(!held.exists(), "DEL did not reach host-local");
    assert!(
        node.allocated_ips().is_empty(),
        "the built-in allocator was used"
    );

    // A failure after the delegate allocated (its address is outside the
    // node's podCIDR): the delegate gets DEL.
    let mut outside = plugin.clone();
    outside["ipam"]["ranges"] = json!([[{ "subnet": "10.99.0.0/24" }]]);
    let err = runtime(&node, vec![outside]).add("1.0.0", at).unwrap_err();
    assert_eq!(err.error_code(), Some(106), "{}", err.stdout);
    assert!(
        err.stdout.contains("outside this node's podCIDR"),
        "{}",
        err.stdout
    );
    let leftovers: Vec<_> = std::fs::read_dir(data.path().join("beeline-test"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().parse::<Ipv4Addr>().is_ok())
        .collect();
    assert!(
        leftovers.is_empty(),
        "the delegate kept an address after a failed ADD"
    );
    assert_eq!(pod.settled_links(), vec!["lo".to_string()]);

    let mut static_plugin = beeline_plugin(&node);
    static_plugin["ipam"] =
        json!({ "type": "static", "addresses": [{ "address": "10.244.1.77/24" }] });
    let rt = runtime(&node, vec![static_plugin]);
    let result = rt.add("1.0.0", at).unwrap();
    assert_eq!(result["ips"][0]["address"], "10.244.1.77/32");
    assert!(node.ns.ping(Ipv4Addr::new(10, 244, 1, 77), 2));
    rt.del("1.0.0", at, Some(&result)).unwrap();
    node.assert_nothing_left();
}

/// A node-local DHCP server (dnsmasq) on the pods' host veths, reached
/// through Debian's `dhcp` IPAM plugin and its daemon.
struct DhcpService {
    dir: tempfile::TempDir,
    _dnsmasq: Background,
    daemon: Background,
}

impl DhcpService {
    fn start(node: &Node, first: u8, last: u8) -> DhcpService {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("dnsmasq.log")).unwrap();
        let dnsmasq = Background::spawn(
            node.ns
                .cmd("dnsmasq")
                .args(["--keep-in-foreground", "--conf-file=/dev/null", "--port=0"])
                .args(["--user=root", "--group=root", "--no-ping", "--log-dhcp"])
                // Beeline's host veths; they come and go.
                .args(["--interface=bl*", "--bind-dynamic"])
                // They carry only the pods' gateway 169.254.1.1/32.
                .arg("--shared-network=169.254.1.1,10.244.1.0")
                .arg(format!(
                    "--dhcp-range=10.244.1.{first},10.244.1.{last},255.255.255.0,1h"
                ))
                .arg("--dhcp-option=option:router,169.254.1.1")
                .arg(format!(
                    "--dhcp-leasefile={}",
                    dir.path().join("leases").display()
                ))
                .arg(format!(
                    "--pid-file={}",
                    dir.path().join("dnsmasq.pid").display()
                ))
                .arg("--log-facility=-")
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        );
        let socket = dir.path().join("dhcp.sock");
        let daemon = Background::spawn(
            node.ns
                .cmd(format!("{DEBIAN_CNI}/dhcp"))
                .args(["daemon", "-socketpath"])
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        assert!(
            eventually(Duration::from_secs(10), || socket.exists()),
            "the dhcp daemon did not create its socket"
        );
        DhcpService {
            dir,
            _dnsmasq: dnsmasq,
            daemon,
        }
    }

    fn ipam(&self) -> Value {
        json!({ "type": "dhcp", "daemonSocketPath": self.dir.path().join("dhcp.sock") })
    }

    /// Addresses dnsmasq has leased right now.
    fn leases(&self) -> Vec<Ipv4Addr> {
        std::fs::read_to_string(self.dir.path().join("leases"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2)?.parse().ok())
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }
}

fn address_of(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap()
}

#[test]
fn ipam_is_delegated_to_dhcp_with_a_node_local_server() {
    let node = node_with(POD_CIDR);
    let dhcp = DhcpService::start(&node, 150, 160);
    let mut plugin = beeline_plugin(&node);
    plugin["ipam"] = dhcp.ipam();
    let rt = runtime(&node, vec![plugin.clone()]);
    let pods: Vec<NetNs> = (0..3).map(|_| NetNs::new("bld")).collect();
    let ids = ["ctr-dhcp-a", "ctr-dhcp-b", "ctr-dhcp-c"];
    let paths: Vec<_> = pods.iter().map(|p| p.path()).collect();
    let at = |i: usize| conformance::Attachment {
        container_id: ids[i],
        netns: Some(&paths[i]),
        ifname: "eth0",
    };
    let results: Vec<Value> = (0..3)
        .map(|i| {
            rt.add("1.0.0", at(i))
                .unwrap_or_else(|e| panic!("ADD {i}: {}\n{}", e.stdout, dhcp.log()))
        })
        .collect();
    let ips: Vec<Ipv4Addr> = results.iter().map(address_of).collect();
    for ip in &ips {
        assert!(
            (150..=160).contains(&ip.octets()[3]),
            "{ip} is not from the DHCP range"
        );
    }
    let mut leased = dhcp.leases();
    leased.sort();
    let mut expected = ips.clone();
    expected.sort();
    assert_eq!(
        leased, expected,
        "dnsmasq's leases are not the pods' addresses"
    );
    assert!(
        node.allocated_ips().is_empty(),
        "the built-in allocator was used"
    );

    // The pods are wired like any other: to each other and to the node.
    assert!(pods[0].ping(ips[1], 2), "pod a cannot reach pod b");
    assert!(node.ns.ping(ips[2], 2), "the node cannot reach pod c");
    rt.check("1.0.0", at(0), &results[0]).expect("CHECK");

    // GC releases the lease of an attachment no longer valid, DEL the rest.
    rt.gc(&[at(0), at(1)]).expect("GC");
    assert!(
        eventually(Duration::from_secs(5), || !dhcp.leases().contains(&ips[2])),
        "GC did not release {}:\n{}",
        ips[2],
        dhcp.log()
    );
    assert_eq!(pods[2].settled_links(), vec!["lo".to_string()]);
    for (i, result) in results.iter().enumerate().take(2) {
        rt.del("1.0.0", at(i), Some(result)).unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || dhcp.leases().is_empty()),
        "DEL did not release the leases: {:?}",
        dhcp.leases()
    );
    node.assert_nothing_left();

    // No DHCP service: ADD fails with the plugin's error and leaves nothing.
    let mut broken = beeline_plugin(&node);
    broken["ipam"] =
        json!({ "type": "dhcp", "daemonSocketPath": dhcp.dir.path().join("nobody.sock") });
    let err = runtime(&node, vec![broken])
        .add("1.0.0", at(0))
        .unwrap_err();
    assert!(err.stdout.contains("dhcp"), "{}", err.stdout);
    node.assert_nothing_left();
    assert_eq!(pods[0].settled_links(), vec!["lo".to_string()]);

    // An ADD killed while dhcp works on the new veth: only the veth (and its
    // alias) records the attachment, and GC finds it.
    let signal = |sig: &str| {
        run(std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(dhcp.daemon.0.id().to_string()));
    };
    signal("STOP");
    let mut add = node
        .ns
        .cmd(bin("beeline"))
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", ids[0])
        .env("CNI_NETNS", &paths[0])
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_PATH",
            format!(
                "{}:{DEBIAN_CNI}",
                bin("beeline").parent().unwrap().display()
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut conf = plugin.clone();
    conf["cniVersion"] = json!("1.0.0");
    conf["name"] = json!("beeline-test");
    std::io::Write::write_all(
        &mut add.stdin.take().unwrap(),
        &serde_json::to_vec(&conf).unwrap(),
    )
    .unwrap();
    // Up with its alias: IPAM (stalled in the stopped daemon) comes next.
    let waiting = eventually(Duration::from_secs(10), || {
        node.ns
            .ip(&["-o", "link", "show", "up"])
            .contains("alias beeline beeline-test eth0 ctr-dhcp-a")
    });
    std::thread::sleep(Duration::from_millis(300));
    let _ = add.kill();
    let _ = add.wait();
    signal("CONT");
    assert!(waiting, "ADD never created the veth");
    // The stalled request completes once the daemon runs again.
    assert!(eventually(Duration::from_secs(10), || dhcp.leases().len() == 1));
    rt.gc(&[]).expect("GC after a killed ADD");
    assert!(
        eventually(Duration::from_secs(5), || dhcp.leases().is_empty()),
        "GC did not release the killed ADD's lease"
    );
    node.assert_nothing_left();
    assert_eq!(pods[0].settled_links(), vec!["lo".to_string()]);
}

#[test]
fn chained_with_portmap_and_bandwidth() {
    let mut cluster = Cluster::new(1);
    let external = NetNs::new("ble");
    cluster.plug(&external, "eth0");
    external.ip(&["addr", "add", "192.168.100.200/24", "dev", "eth0"]);
    external.ip(&["link", "set", "eth0", "up"]);
    // bandwidth's egressRate needs the veth's ingress qdisc slot.
    cluster.start(&["--mode", "direct", "--pod-attach", "tcx"]);
    let node = &cluster.nodes[0];
    let rate_bits = 8_000_000u64; // 8 Mbit/s
    let rt = runtime(
        node,
        vec![
            beeline_plugin(node),
            json!({
                "type": "portmap",
                "capabilities": { "portMappings": true },
                "runtimeConfig": { "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] },
            }),
            json!({
                "type": "bandwidth",
                "ingressRate": rate_bits, "ingressBurst": rate_bits / 8,
                "egressRate": rate_bits, "egressBurst": rate_bits / 8,
            }),
        ],
    );
    let pod = NetNs::new("blp");
    let at = conformance::Attachment {
        container_id: "ctr-chain",
        netns: Some(&pod.path()),
        ifname: "eth0",
    };
    let result = rt.add("1.0.0", at).expect("ADD through the chain");
    let pod_ip: Ipv4Addr = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|ip| ip["address"].as_str()?.strip_suffix("/32")?.parse().ok())
        .expect("the chain's result keeps beeline's address");
    // Beeline's CHECK finds its interface in the chain's merged result.
    // (Debian's portmap 1.1.1 fails its own CHECK on IPv4-only pods: it
    // looks for an IPv6 DNAT chain it never made.)
    runtime(node, vec![beeline_plugin(node)])
        .check("1.0.0", at, &result)
        .expect("beeline CHECK with the chain's result");

    // hostPort: the external host reaches the pod's port 80 at node:8080.
    let listener = pod
        .enter(|| TcpListener::bind(SocketAddr::from((pod_ip, 80))))
        .unwrap();
    let seen = std::thread::scope(|s| {
        let server = s.spawn(move || listener.accept().map(|(_, peer)| peer));
        let connected = external.enter(|| {
            TcpStream::connect_timeout(
                &SocketAddr::from((Cluster::node_ip(0), 8080)),
                Duration::from_secs(5),
            )
        });
        if connected.is_err() {
            let _ = pod.enter(|| TcpStream::connect((pod_ip, 80)));
        }
        (connected.map(|_| ()), server.join().unwrap())
    });
    seen.0.expect("hostPort 8080 on the node is not reachable");

    // bandwidth: the host veth carries the plugin's token bucket, and
    // traffic the host delivers into the pod is held to the rate.
    let host_veth = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["sandbox"].is_null() && i["name"].as_str().is_some_and(|n| n.starts_with("bl")))
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let qdisc = node
        .ns
        .cmd("tc")
        .args(["qdisc", "show", "dev", &host_veth])
        .output()
        .unwrap();
    let qdisc = String::from_utf8_lossy(&qdisc.stdout).into_owned();
    assert!(
        qdisc.contains("tbf"),
        "no token bucket on {host_veth}: {qdisc}"
    );
    let gbits = tcp_throughput(&pod, pod_ip, &node.ns, Duration::from_secs(2)).unwrap();
    assert!(
        gbits * 1e9 < rate_bits as f64 * 2.5,
        "host->pod ran at {gbits} Gbit/s despite an {rate_bits} bit/s limit"
    );

    rt.del("1.0.0", at, Some(&result))
        .expect("DEL through the chain");
    assert!(node.pod_veths().is_empty());
    let nat = node
        .ns
        .cmd("iptables")
        .args(["-t", "nat", "-S"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&nat.stdout).contains("8080"),
        "portmap rules left"
    );
}
