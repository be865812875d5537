//! The test image, built from busybox-static without a registry.
use std::{path::Path, process::Command};

use super::IMAGE;
use crate::run;

/// A docker-archive of a one-layer image: /bin/busybox, a symlink for every
/// applet, /tmp and a root passwd entry. Its default command sleeps forever,
/// so it also serves as the sandbox image.
pub(super) fn build_image(dir: &Path) {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    let list = run(Command::new("/bin/busybox").arg("--list"));
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    for d in ["tmp", "root", "www"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    // The config's diff_ids must be the uncompressed layer's digest, or the
    // unpack fails ("wrong diff id calculated on extraction").
    let sum = run(Command::new("sha256sum").arg(&layer));
    let digest = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin"],
            // busybox sleep takes no "infinity" everywhere: 68 years will do.
            "Cmd": ["/bin/sleep", "2147483647"],
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{digest}")] },
        "history": [{ "created_by": "beeline-tests cri::build_image" }],
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [IMAGE],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(dir.join("image.tar"))
        .args(["manifest.json", "config.json", "layer.tar"]));
    let _ = std::fs::remove_dir_all(&rootfs);
    let _ = std::fs::remove_file(&layer);
}
