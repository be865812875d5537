//! A real runtime drives Beeline through libcni: podman (Debian's 4.3, CNI
//! network backend, runc) inside a node namespace with a Beeline agent, and
//! a busybox image built locally from busybox-static (no registry needed).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use beeline_tests::*;

struct Podman<'a> {
    node: &'a Node,
    root: PathBuf,
    conf: PathBuf,
}

impl Podman<'_> {
    fn cmd(&self) -> Command {
        let mut cmd = self.node.ns.cmd("podman");
        cmd.env("CONTAINERS_CONF", &self.conf)
            .arg("--root")
            .arg(self.root.join("storage"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--runtime",
                "runc",
            ])
            .args(["--events-backend", "none"]);
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        run(self.cmd().args(args))
    }

    fn ip_of(&self, container: &str) -> Ipv4Addr {
        let out = self.run(&[
            "inspect",
            "-f",
            "{{(index .NetworkSettings.Networks \"beeline-pods\").IPAddress}}",
            container,
        ]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("an IPv4 address")
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Containers first (podman runs CNI DEL), then its storage.
        let _ = self
            .cmd()
            .args(["rm", "--all", "--force", "--time", "0"])
            .output();
        let _ = self.cmd().args(["system", "reset", "--force"]).output();
    }
}

/// A rootfs with busybox and its applets, imported as an image.
fn busybox_image(podman: &Podman, dir: &Path) {
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static is installed");
    for applet in ["sh", "sleep", "ping", "ip", "nc", "cat", "hostname"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    podman.run(&["import", tar.to_str().unwrap(), "localhost/busybox:beeline"]);
}

#[test]
fn podman_runs_two_containers_on_the_beeline_network() {
    require_root();
    assert!(
        Command::new("podman").arg("--version").output().is_ok(),
        "podman is needed (apt-get install podman runc busybox-static)"
    );
    let mut node = Node::new("10.244.1.0/24", Ipv4Addr::new(192, 168, 90, 1));
    node.start_agent(&[]);
    let dir = tempfile::tempdir().unwrap();
    let net_d = dir.path().join("net.d");
    std::fs::create_dir_all(&net_d).unwrap();
    let mut plugin = node.cni_conf("1.0.0");
    plugin.as_object_mut().unwrap().remove("cniVersion");
    plugin.as_object_mut().unwrap().remove("name");
    let conflist = json!({ "cniVersion": "1.0.0", "name": "beeline-pods", "plugins": [plugin] });
    std::fs::write(
        net_d.join("10-beeline.conflist"),
        serde_json::to_vec_pretty(&conflist).unwrap(),
    )
    .unwrap();
    let plugin_dir = bin("beeline").parent().unwrap().to_path_buf();
    let conf = dir.path().join("containers.conf");
    std::fs::write(
        &conf,
        format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"/usr/lib/cni\"]\n\
             network_config_dir = \"{}\"\n\n[containers]\ndefault_ulimits = [\"nofile=1024:1024\"]\n\
             log_driver = \"k8s-file\"\n\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\n\
             events_logger = \"none\"\n",
            plugin_dir.display(),
            net_d.display()
        ),
    )
    .unwrap();
    let podman = Podman {
        node: &node,
        root: dir.path().join("podman"),
        conf,
    };
    busybox_image(&podman, dir.path());

    for name in ["bl-a", "bl-b"] {
        // Podman would set RLIMIT_NPROC/NOFILE to its defaults, which a host
        // without CAP_SYS_RESOURCE refuses: ask for lower ones.
        let (nproc, nofile) = (1024, 1024);
        podman.run(&[
            "run",
            "-d",
            "--ulimit",
            &format!("nproc={nproc}:{nproc}"),
            "--ulimit",
            &format!("nofile={nofile}:{nofile}"),
            "--name",
            name,
            "--network",
            "beeline-pods",
            "localhost/busybox:beeline",
            "sleep",
            "600",
        ]);
    }
    let (a, b) = (podman.ip_of("bl-a"), podman.ip_of("bl-b"));
    assert_ne!(a, b);
    assert!(a.to_string().starts_with("10.244.1.") && b.to_string().starts_with("10.244.1."));
    assert_eq!(
        node.map_endpoints().len(),
        2,
        "podman's containers were not registered"
    );
    podman.run(&["exec", "bl-a", "ping", "-c", "2", "-W", "2", &b.to_string()]);
    podman.run(&["exec", "bl-b", "ping", "-c", "2", "-W", "2", &a.to_string()]);
    podman.run(&[
        "exec",
        "bl-a",
        "ping",
        "-c",
        "2",
        "-W",
        "2",
        &node.ip.to_string(),
    ]);
    assert!(node.ns.ping(a, 2), "the node cannot reach the container");

    podman.run(&["rm", "--force", "--time", "0", "bl-a", "bl-b"]);
    assert!(
        node.pod_veths().is_empty(),
        "veths left: {:?}",
        node.pod_veths()
    );
    assert!(
        node.allocated_ips().is_empty(),
        "IPs left: {:?}",
        node.allocated_ips()
    );
    assert!(node.map_endpoints().is_empty(), "map entries left");
}
