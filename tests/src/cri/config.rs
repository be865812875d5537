//! containerd's config and its CNI bin dir.
use std::path::Path;

use super::IMAGE;

/// Makes `dir` a CNI bin dir holding `binaries` (symlinked) plus the
/// reference `loopback` plugin from /usr/lib/cni, which containerd 1.6 runs
/// for every sandbox and looks for in its one `bin_dir`.
pub fn cni_bin_dir(dir: &Path, binaries: &[&Path]) {
    std::fs::create_dir_all(dir).unwrap();
    let loopback = Path::new("/usr/lib/cni/loopback");
    for bin in binaries.iter().copied().chain([loopback]) {
        let link = dir.join(bin.file_name().unwrap());
        if !link.exists() {
            std::os::unix::fs::symlink(bin, &link)
                .unwrap_or_else(|e| panic!("link {}: {e}", link.display()));
        }
    }
}

pub(super) fn config_toml(dir: &Path, cni_conf_dir: &Path, cni_bin_dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
# Snapshotters that probe for filesystems or devices this machine lacks.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  # Defaults to /opt/containerd.
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  # Without CAP_SYS_RESOURCE the sandbox's oom_score_adj of -998 cannot be
  # set and runc fails with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  # Would load a profile with apparmor_parser where AppArmor is enabled.
  disable_apparmor = true
  # Its streaming server (exec/attach/port-forward URLs, unused by
  # ExecSync) listens on the node netns' loopback, on a random port.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/sbin/runc"
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{conf}"
    bin_dir = "{bin}"
    max_conf_num = 1
"#,
        conf = cni_conf_dir.display(),
        bin = cni_bin_dir.display(),
    )
}
