//! One attachment (container id + interface), one owner at a time: ADD,
//! DEL and CHECK of the same attachment hold an exclusive `flock` on a file
//! named for it, so a runtime that retries an ADD while the first still
//! runs, or DELs it meanwhile, waits instead of undoing the other's work.
//! The kernel drops the lock if the process dies. DEL removes the file
//! while holding it; a waiter that then gets the lock on the removed file
//! takes a new one.
use std::{
    fs::{self, File, OpenOptions},
    os::unix::fs::MetadataExt,
    path::PathBuf,
};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    config::{Env, NetConf},
    error::{CniError, Result, code},
    link,
};

const DIR: &str = "attachments";

pub struct AttachmentLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl AttachmentLock {
    /// Waits for, then takes, the attachment's lock.
    pub fn take(conf: &NetConf, env: &Env) -> Result<AttachmentLock> {
        let dir = conf.ipam_dir().join(DIR);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            CniError::new(
                code::IO_FAILURE,
                format!("cannot {what} the attachment lock in {}", dir.display()),
            )
            .with_details(e)
        };
        fs::create_dir_all(&dir).map_err(|e| fail("create", &e))?;
        let path = dir.join(link::host_ifname(&env.container_id, &env.ifname));
        loop {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| fail("open", &e))?;
            let lock =
                Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| fail("take", &e))?;
            let held = lock.metadata().map_err(|e| fail("stat", &e))?.ino();
            // Still the file at that name: the lock is ours. Otherwise the
            // holder before us removed it; take the new one.
            if fs::metadata(&path).is_ok_and(|m| m.ino() == held) {
                return Ok(AttachmentLock { _lock: lock, path });
            }
        }
    }

    /// Releases the lock and removes its file (the attachment is gone).
    pub fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}
