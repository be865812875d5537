//! The built-in IP allocator: one file per allocated address under the
//! network's data dir, like host-local, so the store is human-readable and a
//! crash at any point leaves it consistent:
//! - every change happens under an exclusive `flock` (released by the kernel
//!   if the process dies),
//! - a record is written to a temp file, then `link`ed into place, which is
//!   atomic and fails if the address is taken,
//! - leftover temp files from a killed process are removed under the lock.
//!
//! Nothing is fsynced (host-local does not either): a killed process cannot
//! lose page-cache writes, and a power loss kills every pod of the node,
//! after which the runtime's GC releases what they held. This keeps four
//! disk flushes out of every ADD. Nothing is renamed over an existing file
//! either: ext4 (`auto_da_alloc`) starts writeback of a file renamed over
//! another, which costs 0.5 ms per ADD and several ms at the tail.
use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

use crate::error::{CniError, Result, code};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip";
const TEMP_PREFIX: &str = "tmp-";
/// The longest IPv4 address, `255.255.255.255`.
const LAST_RESERVED_WIDTH: usize = 15;

/// Who holds an address: the attachment (container id + interface).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

impl Owner {
    fn record(&self) -> String {
        format!("{}\n{}\n", self.container_id, self.ifname)
    }

    fn parse(record: &str) -> Option<Owner> {
        let mut lines = record.lines();
        let container_id = lines.next()?.to_string();
        let ifname = lines.next()?.to_string();
        Some(Owner {
            container_id,
            ifname,
        })
    }
}

pub struct IpStore {
    dir: PathBuf,
}

fn store_error(what: &str, path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::new(
        code::IPAM_STORE,
        format!("IP store: cannot {what} {}", path.display()),
    )
    .with_details(e)
}

impl IpStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<IpStore> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| store_error("create", &dir, e))?;
        Ok(IpStore { dir })
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| store_error("open", &path, e))?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| store_error("lock", &path, e))
    }

    /// Every allocation on disk (unreadable records still count as taken).
    /// Called under the lock, when no other writer exists: temp files met on
    /// the way are leftovers of a killed process and are removed.
    fn records(&self) -> Result<Vec<(Ipv4Addr, Option<Owner>)>> {
        let entries = fs::read_dir(&self.dir).map_err(|e| store_error("read", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| store_error("read", &self.dir, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            let owner = fs::read_to_string(entry.path())
                .ok()
                .and_then(|r| Owner::parse(&r));
            out.push((ip, owner));
        }
        Ok(out)
    }

    /// Allocations with their owners, for GC.
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, Owner)>> {
        let _lock = self.lock()?;
        Ok(self
            .records()?
            .into_iter()
            .filter_map(|(ip, owner)| Some((ip, owner?)))
            .collect())
    }

    /// The address held by `owner`, if any.
    pub fn find(&self, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        let _lock = self.lock()?;
        Ok(self
            .records()?
            .into_iter()
            .find(|(_, o)| o.as_ref() == Some(owner))
            .map(|(ip, _)| ip))
    }

    /// Reserves a free address of `range` for `owner`, round-robin after the
    /// last one handed out (so a just-released address is not reused at once).
    pub fn allocate(&self, range: Ipv4Net, owner: &Owner) -> Result<Ipv4Addr> {
        let _lock = self.lock()?;
        let records = self.records()?;
        if let Some((ip, _)) = records.iter().find(|(_, o)| o.as_ref() == Some(owner)) {
            return Ok(*ip);
        }
        let taken: HashSet<Ipv4Addr> = records.into_iter().map(|(ip, _)| ip).collect();
        let hosts: Vec<Ipv4Addr> = range.hosts().collect();
        if hosts.is_empty() {
            return Err(CniError::new(
                code::IP_EXHAUSTED,
                format!("podCIDR {range} has no usable addresses"),
            ));
        }
        let last = fs::read_to_string(self.dir.join(LAST_RESERVED_FILE))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok());
        let start = last
            .and_then(|last| hosts.iter().position(|h| *h == last))
            .map_or(0, |i| i + 1);
        for ip in hosts.iter().cycle().skip(start).take(hosts.len()) {
            if taken.contains(ip) {
                continue;
            }
            if self.write_record(*ip, owner)? {
                self.write_last_reserved(*ip)?;
                return Ok(*ip);
            }
        }
        Err(CniError::new(
            code::IP_EXHAUSTED,
            format!(
                "podCIDR {range} is exhausted: all {} addresses are allocated",
                hosts.len()
            ),
        ))
    }

    /// Releases every address held by `owner`; returns what was released.
    pub fn release(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for (ip, o) in self.records()? {
            if o.as_ref() == Some(owner) {
                let path = self.dir.join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => released.push(ip),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(store_error("remove", &path, e)),
                }
            }
        }
        Ok(released)
    }

    /// Creates the record for `ip` atomically; false if it already exists.
    fn write_record(&self, ip: Ipv4Addr, owner: &Owner) -> Result<bool> {
        let tmp = self.write_temp(owner.record().as_bytes())?;
        let path = self.dir.join(ip.to_string());
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(store_error("write", &path, e)),
        }
    }

    /// Overwrites the round-robin hint in place: padded to a fixed width, so
    /// no truncation (which ext4 also flushes on close) and no rename. A
    /// write cut short by a crash leaves an unparsable hint, and allocation
    /// then starts at the beginning of the range: nothing is lost.
    fn write_last_reserved(&self, ip: Ipv4Addr) -> Result<()> {
        let path = self.dir.join(LAST_RESERVED_FILE);
        let line = format!("{:<LAST_RESERVED_WIDTH$}\n", ip.to_string());
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| store_error("write", &path, e))
    }

    fn write_temp(&self, data: &[u8]) -> Result<PathBuf> {
        let path = self
            .dir
            .join(format!("{TEMP_PREFIX}{}", std::process::id()));
        let mut f = File::create(&path).map_err(|e| store_error("write", &path, e))?;
        f.write_all(data)
            .map_err(|e| store_error("write", &path, e))?;
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    /// An empty store in a fresh directory, and a range of 6 hosts.
    fn small_store() -> (tempfile::TempDir, IpStore, Ipv4Net) {
        let dir = tempfile::tempdir().unwrap();
        let store = IpStore::open(dir.path()).unwrap();
        (dir, store, "10.1.0.0/29".parse().unwrap())
    }

    #[test]
    fn allocates_distinct_addresses_and_reuses_for_the_same_owner() {
        let (_dir, store, range) = small_store();
        let a = store.allocate(range, &owner("a")).unwrap();
        let b = store.allocate(range, &owner("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(store.allocate(range, &owner("a")).unwrap(), a);
        assert_eq!(store.find(&owner("b")).unwrap(), Some(b));
        assert_eq!(store.release(&owner("a")).unwrap(), vec![a]);
        assert!(store.release(&owner("a")).unwrap().is_empty());
        assert_eq!(store.find(&owner("a")).unwrap(), None);
    }

    #[test]
    fn exhaustion_is_an_error_never_a_duplicate() {
        let (_dir, store, range) = small_store();
        let mut seen = HashSet::new();
        for i in 0..6 {
            assert!(seen.insert(store.allocate(range, &owner(&format!("c{i}"))).unwrap()));
        }
        let err = store.allocate(range, &owner("c6")).unwrap_err();
        assert_eq!(err.code, code::IP_EXHAUSTED);
        // Freed addresses come back.
        let freed = store.release(&owner("c3")).unwrap()[0];
        assert_eq!(store.allocate(range, &owner("c7")).unwrap(), freed);
    }

    #[test]
    fn leftovers_of_a_killed_writer_do_not_break_the_store() {
        let (dir, store, range) = small_store();
        fs::write(dir.path().join("tmp-999999"), "half a rec").unwrap();
        fs::write(dir.path().join("10.1.0.1"), "").unwrap(); // truncated record
        let ip = store.allocate(range, &owner("a")).unwrap();
        assert_ne!(
            ip,
            "10.1.0.1".parse::<Ipv4Addr>().unwrap(),
            "a taken address was reused"
        );
        assert!(!dir.path().join("tmp-999999").exists());
    }

    #[test]
    fn concurrent_allocations_from_many_threads_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let range: Ipv4Net = "10.1.0.0/24".parse().unwrap();
        let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..32)
                .map(|i| {
                    let path = dir.path().to_path_buf();
                    s.spawn(move || {
                        IpStore::open(path)
                            .unwrap()
                            .allocate(range, &owner(&format!("t{i}")))
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let unique: HashSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), ips.len(), "duplicate IPs: {ips:?}");
    }

    #[test]
    fn the_round_robin_hint_is_rewritten_in_place_and_survives_garbling() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store, range) = small_store();
        let a = store.allocate(range, &owner("a")).unwrap();
        let hint = dir.path().join(LAST_RESERVED_FILE);
        let inode = fs::metadata(&hint).unwrap().ino();
        store.release(&owner("a")).unwrap();
        // A just-released address is not handed out again at once.
        let b = store.allocate(range, &owner("b")).unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read_to_string(&hint).unwrap().trim(), b.to_string());
        // Same file: no rename over it (ext4 would flush on every ADD).
        assert_eq!(fs::metadata(&hint).unwrap().ino(), inode);
        // A hint cut short by a crash only resets the round robin.
        fs::write(&hint, "10.1.").unwrap();
        let c = store.allocate(range, &owner("c")).unwrap();
        assert_eq!(c, a, "allocation restarts at the first free address");
    }
}
