//! Issue: the whole CNI spec, hardened. Concurrency and crashes: many
//! operations at once, and a CNI killed anywhere in ADD, through the exec
//! protocol against real namespaces.
use std::{collections::HashMap, net::Ipv4Addr, process::Stdio, sync::Mutex, time::Duration};

use beeline_tests::{
    cni_spec::{beeline_plugin, node_with, runtime},
    *,
};

#[test]
fn two_hundred_concurrent_operations_never_duplicate_or_leak() {
    let node = node_with("10.244.3.0/24");
    let live: Mutex<HashMap<Ipv4Addr, String>> = Mutex::new(HashMap::new());
    let conf = node.cni_conf("1.1.0");
    // 50 containers × (ADD, DEL, ADD, DEL) = 200 operations on 10 threads.
    let namespaces: Vec<NetNs> = (0..50).map(|_| NetNs::new("blp")).collect();
    std::thread::scope(|s| {
        for chunk in namespaces.chunks(5) {
            let (node, live, conf) = (&node, &live, &conf);
            s.spawn(move || {
                for round in 0..2 {
                    for ns in chunk {
                        let id = format!("ctr-{}", ns.name);
                        let out = node
                            .cni("ADD", conf, &id, Some(&ns.path()), "eth0")
                            .expect_ok("ADD");
                        let ip: Ipv4Addr = out.json()["ips"][0]["address"]
                            .as_str()
                            .unwrap()
                            .trim_end_matches("/32")
                            .parse()
                            .unwrap();
                        if let Some(other) = live.lock().unwrap().insert(ip, id.clone()) {
                            panic!("{ip} handed to {id} while {other} holds it (round {round})");
                        }
                    }
                    for ns in chunk {
                        let id = format!("ctr-{}", ns.name);
                        live.lock().unwrap().retain(|_, holder| *holder != id);
                        node.cni("DEL", conf, &id, Some(&ns.path()), "eth0")
                            .expect_ok("DEL");
                    }
                }
            });
        }
    });
    node.assert_nothing_left();
    for ns in &namespaces {
        assert_eq!(ns.settled_links(), vec!["lo".to_string()]);
    }
}

#[test]
fn a_cni_killed_anywhere_in_add_converges_after_del_or_gc() {
    let node = node_with("10.244.4.0/24");
    let conf = node.cni_conf("1.1.0");
    let rt = runtime(&node, vec![beeline_plugin(&node)]);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut next = || {
        // xorshift: reproducible enough, no dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut killed_mid_way = 0;
    for i in 0..20 {
        let ns = NetNs::new("blp");
        let id = format!("ctr-kill-{i}");
        let delay = Duration::from_micros(next() % 15_000);
        let mut child = node
            .ns
            .cmd(bin("beeline"))
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &id)
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let _ = child
                .stdin
                .take()
                .unwrap()
                .write_all(&serde_json::to_vec(&conf).unwrap());
        }
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if !status.success() {
            killed_mid_way += 1;
        }
        // Half the time the runtime DELs, half the time a GC cleans up.
        if i % 2 == 0 {
            node.cni("DEL", &conf, &id, Some(&ns.path()), "eth0")
                .expect_ok("DEL after a kill");
        } else {
            rt.gc(&[]).expect("GC after a kill");
        }
        node.assert_nothing_left();
        assert_eq!(
            ns.settled_links(),
            vec!["lo".to_string()],
            "kill {i} after {delay:?} left an interface"
        );
        // The store holds only complete records: no temp files survive
        // the lock taken by DEL/GC.
        if let Ok(entries) = std::fs::read_dir(node.ipam_dir().join("beeline-test")) {
            for entry in entries {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    !name.starts_with("tmp-"),
                    "half-written record {name} left after kill {i}"
                );
            }
        }
    }
    assert!(
        killed_mid_way > 0,
        "no ADD was interrupted: the test proved nothing"
    );
    // The store still works after all that.
    let pod = Pod::add(&node, "1.1.0");
    pod.del(&node);
    node.assert_nothing_left();
}
