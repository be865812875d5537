//! Network namespaces: [`NetNs`] and pods wired into them by hand.
use std::{
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use beeline_proto::RETIRED_PREFIX;
use serde_json::Value;

use crate::util::{run, unique};

/// A network namespace (under /run/netns), deleted on drop if we made it.
pub struct NetNs {
    pub name: String,
    owned: bool,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let ns = NetNs {
            name: unique(prefix),
            owned: true,
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A namespace someone else made (`ip netns add NAME`): never deleted.
    pub fn existing(name: &str) -> NetNs {
        let ns = NetNs {
            name: name.to_string(),
            owned: false,
        };
        assert!(
            ns.path().exists(),
            "no network namespace {name} under /run/netns"
        );
        ns
    }

    /// A second handle on this namespace that does not delete it.
    pub fn borrowed(&self) -> NetNs {
        NetNs {
            name: self.name.clone(),
            owned: false,
        }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command run inside the namespace (`nsenter --net`, which keeps
    /// /sys and bpffs visible, unlike `ip netns exec`).
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg(program);
        cmd
    }

    /// `ip -n <ns> args...`, asserting success.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = run(Command::new("ip").arg("-n").arg(&self.name).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has entered this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// `ping -q -n -c count -i interval -W wait ip` inside the namespace.
    fn ping_cmd(&self, ip: Ipv4Addr, count: u32, interval: &str, wait: &str) -> Command {
        let mut cmd = self.cmd("ping");
        cmd.args([
            "-q",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            interval,
            "-W",
            wait,
        ])
        .arg(ip.to_string())
        .stderr(Stdio::null());
        cmd
    }

    fn ping_ok(mut cmd: Command) -> bool {
        cmd.stdout(Stdio::null())
            .status()
            .expect("ping runs (install iputils-ping)")
            .success()
    }

    pub fn ping(&self, ip: Ipv4Addr, count: u32) -> bool {
        Self::ping_ok(self.ping_cmd(ip, count, "0.01", "2"))
    }

    /// Average round-trip time in milliseconds over `count` echo requests,
    /// or `None` if any was lost.
    pub fn ping_rtt(&self, ip: Ipv4Addr, count: u32) -> Option<f64> {
        let out = self.ping_cmd(ip, count, "0.05", "2").output().ok()?;
        if !out.status.success() {
            return None;
        }
        // "rtt min/avg/max/mdev = 0.041/0.052/0.066/0.010 ms"
        let text = String::from_utf8_lossy(&out.stdout);
        let stats = text.lines().find(|l| l.contains("min/avg/max"))?;
        stats
            .split('=')
            .nth(1)?
            .trim()
            .split('/')
            .nth(1)?
            .parse()
            .ok()
    }

    /// One echo request, waiting at most `timeout` for the reply.
    pub fn ping_once(&self, ip: Ipv4Addr, timeout: Duration) -> bool {
        let wait = format!("{:.1}", timeout.as_secs_f32());
        Self::ping_ok(self.ping_cmd(ip, 1, "0.01", &wait))
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        let out = self.ip(&["-j", "link", "show"]);
        let links: Value = serde_json::from_str(&out).unwrap();
        links
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// The links once every veth DEL retired is deleted (the agent does that
    /// in the background, within tens of milliseconds).
    pub fn settled_links(&self) -> Vec<String> {
        let retired = |l: &Vec<String>| l.iter().any(|n| n.starts_with(RETIRED_PREFIX));
        let mut links = self.links();
        let deadline = Instant::now() + Duration::from_secs(5);
        while retired(&links) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            links = self.links();
        }
        links
    }

    /// The MAC address of `dev`.
    pub fn mac(&self, dev: &str) -> beeline_proto::MacAddr {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", dev])).unwrap();
        v[0]["address"].as_str().unwrap().parse().unwrap()
    }

    /// The id of the bpf program filtering `dev`'s tc ingress, as `tc` shows it.
    pub fn ingress_filter_program_id(&self, dev: &str) -> Option<u32> {
        let out = self
            .cmd("tc")
            .args(["filter", "show", "dev", dev, "ingress"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)?
            .parse()
            .ok()
    }

    /// (rx, tx) packet counters of `dev`.
    pub fn link_packets(&self, dev: &str) -> (u64, u64) {
        let out = self.ip(&["-j", "-s", "link", "show", "dev", dev]);
        let v: Value = serde_json::from_str(&out).unwrap();
        let s = &v[0]["stats64"];
        (
            s["rx"]["packets"].as_u64().unwrap(),
            s["tx"]["packets"].as_u64().unwrap(),
        )
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A pod netns wired to `node` by hand the way the CNI wires one, with no
/// Beeline involved: veth `host_if` (up) to `eth0`, `ip/32`, a permanent
/// neighbour for the link-local gateway and `default via 169.254.1.1
/// onlink`. Routes towards the pod are the caller's.
pub fn hand_wired_pod(node: &NetNs, host_if: &str, ip: Ipv4Addr, mtu: Option<u32>) -> NetNs {
    let pod = NetNs::new("blp");
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&["link", "set", host_if, "up"]);
    pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
    if let Some(mtu) = mtu {
        pod.ip(&["link", "set", "eth0", "mtu", &mtu.to_string()]);
    }
    pod.ip(&["link", "set", "eth0", "up"]);
    let gateway_mac = node.mac(host_if).to_string();
    pod.ip(&[
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        &gateway_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ]);
    pod
}
