//! Network namespaces: validating CNI_NETNS and opening a netlink socket
//! inside one without moving the process.
use std::{fs::File, os::fd::AsFd, path::Path};

use nix::sched::{CloneFlags, setns};
use rtnetlink::Handle;

use crate::error::{CniError, Result, code};

/// Opens `path` and checks that it really is a network namespace.
pub fn open(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            code::UNKNOWN_CONTAINER
        } else {
            code::INVALID_ENV
        };
        CniError::new(code, format!("cannot open CNI_NETNS {}", path.display())).with_details(e)
    })?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!("cannot stat CNI_NETNS {}", path.display()),
        )
        .with_details(e)
    })?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} is not a network namespace", path.display()),
        ));
    }
    // nsfs also holds other namespace kinds: ask the kernel for the type.
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd.
    let ns_type = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), NS_GET_NSTYPE) };
    if ns_type != libc::CLONE_NEWNET {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_NETNS {} is a namespace, but not a network namespace",
                path.display()
            ),
        ));
    }
    Ok(file)
}

/// `_IO(0xb7, 0x3)` from linux/nsfs.h.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// A netlink handle whose socket lives in `netns`. The socket is created on a
/// short-lived thread that has entered the namespace; the process itself
/// never moves, so nothing can leak into the wrong namespace.
pub fn netlink_in(netns: &File) -> Result<Handle> {
    let runtime = tokio::runtime::Handle::current();
    let fd = netns.as_fd();
    let made = std::thread::scope(|s| {
        s.spawn(|| {
            setns(fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            let _enter = runtime.enter();
            rtnetlink::new_connection()
        })
        .join()
        .expect("netns thread panicked")
    });
    let (connection, handle, _) = made.map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            "cannot open a netlink socket in the pod netns",
        )
        .with_details(e)
    })?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A netlink handle in the current (host) namespace.
pub fn netlink_here() -> Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| {
        CniError::new(code::IO_FAILURE, "cannot open a netlink socket").with_details(e)
    })?;
    tokio::spawn(connection);
    Ok(handle)
}
