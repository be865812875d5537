//! The built-in IP allocator: one file per allocated address under the
//! network's data dir, like host-local, so the store is human-readable and a
//! crash at any point leaves it consistent:
//! - every change happens under an exclusive `flock` (released by the kernel
//!   if the process dies),
//! - a record is written to a temp file, then `link`ed into place, which is
//!   atomic and fails if the address is taken,
//! - leftover temp files from a killed process are removed under the lock.
//!
//! Each record names its attachment and where its pod lives (the boot, the
//! netns path and inode), so an address is never held by a pod that is gone:
//! records of an earlier boot are dropped the first time the store is used
//! after a reboot, and a full range reclaims the records whose pod is gone
//! (the agent also releases them, within a resync period).
//!
//! Nothing is fsynced (host-local does not either): a killed process cannot
//! lose page-cache writes, and a power loss kills every pod of the node,
//! whose records the next boot drops. This keeps four disk flushes out of
//! every ADD. Nothing is renamed over an existing file either: ext4
//! (`auto_da_alloc`) starts writeback of a file renamed over another, which
//! costs 0.5 ms per ADD and several ms at the tail.
use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip";
/// The boot the records were written in (`/proc/sys/kernel/random/boot_id`).
const BOOT_FILE: &str = "boot_id";
const TEMP_PREFIX: &str = "tmp-";
/// The longest IPv4 address, `255.255.255.255`.
const LAST_RESERVED_WIDTH: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("podCIDR {range} has no usable addresses")]
    NoHosts { range: Ipv4Net },
    #[error("podCIDR {range} is exhausted: all {hosts} addresses are allocated")]
    Exhausted { range: Ipv4Net, hosts: usize },
    #[error("IP store: cannot {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}

/// This boot's id; empty if the kernel does not say (then boots are not told apart).
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Who holds an address: the attachment (container id + interface).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner {
    pub container_id: String,
    pub ifname: String,
}

/// Where the holder's pod lives, to tell whether it still does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    pub boot_id: String,
    /// CNI_NETNS as the runtime gave it.
    pub netns: String,
    /// The netns file's inode when the address was allocated.
    pub netns_inode: u64,
}

impl Pod {
    /// The pod of `netns` (an open netns file at `path`), in this boot.
    pub fn of(path: &Path, netns: &File) -> Pod {
        use std::os::unix::fs::MetadataExt;
        Pod {
            boot_id: boot_id(),
            netns: path.display().to_string(),
            netns_inode: netns.metadata().map(|m| m.ino()).unwrap_or(0),
        }
    }

    /// Whether the netns is gone: its path missing, or now another netns.
    /// A path the caller cannot look at counts as present.
    pub fn netns_gone(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match fs::metadata(&self.netns) {
            Ok(m) => self.netns_inode != 0 && m.ino() != self.netns_inode,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }
}

/// One allocation as recorded: `container id\nifname\n` then `key=value`
/// lines (records of the previous release have only the first two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub owner: Owner,
    pub pod: Option<Pod>,
}

impl Record {
    fn to_text(&self) -> String {
        let mut text = format!("{}\n{}\n", self.owner.container_id, self.owner.ifname);
        if let Some(pod) = &self.pod {
            text.push_str(&format!(
                "boot={}\nnetns={}\nnetns_inode={}\n",
                pod.boot_id, pod.netns, pod.netns_inode
            ));
        }
        text
    }

    fn parse(text: &str) -> Option<Record> {
        let mut lines = text.lines();
        let owner = Owner {
            container_id: lines.next()?.to_string(),
            ifname: lines.next()?.to_string(),
        };
        let mut pod = Pod::default();
        let mut any = false;
        for line in lines {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            any = true;
            match key {
                "boot" => pod.boot_id = value.to_string(),
                "netns" => pod.netns = value.to_string(),
                "netns_inode" => pod.netns_inode = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        Some(Record {
            owner,
            pod: any.then_some(pod),
        })
    }

    /// Whether the record was written in another boot than `boot`.
    fn written_in_another_boot(&self, boot: &str) -> bool {
        !boot.is_empty() && self.pod.as_ref().is_some_and(|p| p.boot_id != boot)
    }
}

pub struct IpStore {
    dir: PathBuf,
}

impl IpStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<IpStore> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        Ok(IpStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The store's lock; the first holder after a reboot drops every record
    /// of the previous boots (their pods died with them).
    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| Error::Io {
            what: "lock",
            path: path.clone(),
            source: e.into(),
        })?;
        self.forget_other_boots()?;
        Ok(lock)
    }

    fn forget_other_boots(&self) -> Result<()> {
        let boot = boot_id();
        let path = self.dir.join(BOOT_FILE);
        let recorded = fs::read_to_string(&path).ok();
        if boot.is_empty() || recorded.as_deref().map(str::trim) == Some(boot.as_str()) {
            return Ok(());
        }
        // A marker from another boot: every record older than this boot
        // (the previous release's, which name no boot, too) is a dead pod's.
        // No marker yet (a new store, or one of the previous release with
        // live pods): nothing can be told, nothing is dropped.
        if recorded.is_some() {
            for (ip, record) in self.records()? {
                let stale = match &record {
                    Some(r) => r.pod.as_ref().is_none_or(|p| p.boot_id != boot),
                    None => true,
                };
                if stale {
                    self.remove(ip)?;
                }
            }
        }
        fs::write(&path, format!("{boot}\n")).map_err(io("write", &path))
    }

    /// Every allocation on disk (unreadable records still count as taken).
    /// Called under the lock, when no other writer exists: temp files met on
    /// the way are leftovers of a killed process and are removed.
    fn records(&self) -> Result<Vec<(Ipv4Addr, Option<Record>)>> {
        let entries = fs::read_dir(&self.dir).map_err(io("read", &self.dir))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("read", &self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                continue;
            };
            let record = fs::read_to_string(entry.path())
                .ok()
                .and_then(|r| Record::parse(&r));
            out.push((ip, record));
        }
        Ok(out)
    }

    /// Allocations with their records, for GC and the agent.
    pub fn allocations(&self) -> Result<Vec<(Ipv4Addr, Record)>> {
        let _lock = self.lock()?;
        Ok(self
            .records()?
            .into_iter()
            .filter_map(|(ip, record)| Some((ip, record?)))
            .collect())
    }

    /// The address held by `owner`, if any.
    pub fn find(&self, owner: &Owner) -> Result<Option<Ipv4Addr>> {
        let _lock = self.lock()?;
        Ok(self
            .records()?
            .into_iter()
            .find(|(_, r)| r.as_ref().is_some_and(|r| r.owner == *owner))
            .map(|(ip, _)| ip))
    }

    /// Reserves a free address of `range` for `record`'s owner, round-robin
    /// after the last one handed out (so a just-released address is not
    /// reused at once). When the range is full, the records `dead` says are
    /// of pods that are gone are released first (a runtime that crashed
    /// before its DEL, and never calls GC).
    pub fn allocate(
        &self,
        range: Ipv4Net,
        record: &Record,
        dead: impl Fn(&Record) -> bool,
    ) -> Result<Ipv4Addr> {
        let _lock = self.lock()?;
        let records = self.records()?;
        if let Some((ip, _)) = records
            .iter()
            .find(|(_, r)| r.as_ref().is_some_and(|r| r.owner == record.owner))
        {
            return Ok(*ip);
        }
        let hosts: Vec<Ipv4Addr> = range.hosts().collect();
        if hosts.is_empty() {
            return Err(Error::NoHosts { range });
        }
        let mut taken: HashSet<Ipv4Addr> = records.iter().map(|(ip, _)| *ip).collect();
        if let Some(ip) = self.reserve(&hosts, &taken, record)? {
            return Ok(ip);
        }
        let boot = boot_id();
        for (ip, held) in &records {
            if let Some(held) = held
                && (held.written_in_another_boot(&boot) || dead(held))
            {
                self.remove(*ip)?;
                taken.remove(ip);
            }
        }
        self.reserve(&hosts, &taken, record)?
            .ok_or(Error::Exhausted {
                range,
                hosts: hosts.len(),
            })
    }

    fn reserve(
        &self,
        hosts: &[Ipv4Addr],
        taken: &HashSet<Ipv4Addr>,
        record: &Record,
    ) -> Result<Option<Ipv4Addr>> {
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
            if self.write_record(*ip, record)? {
                self.write_last_reserved(*ip)?;
                return Ok(Some(*ip));
            }
        }
        Ok(None)
    }

    /// Releases every address held by `owner`; returns what was released.
    pub fn release(&self, owner: &Owner) -> Result<Vec<Ipv4Addr>> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for (ip, record) in self.records()? {
            if record.is_some_and(|r| r.owner == *owner) && self.remove(ip)? {
                released.push(ip);
            }
        }
        Ok(released)
    }

    /// Removes the record of `ip`; false if it was gone already.
    fn remove(&self, ip: Ipv4Addr) -> Result<bool> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("remove", &path)(e)),
        }
    }

    /// Creates the record for `ip` atomically; false if it already exists.
    fn write_record(&self, ip: Ipv4Addr, record: &Record) -> Result<bool> {
        let tmp = self.write_temp(record.to_text().as_bytes())?;
        let path = self.dir.join(ip.to_string());
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io("write", &path)(e)),
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
            .map_err(io("write", &path))
    }

    fn write_temp(&self, data: &[u8]) -> Result<PathBuf> {
        let path = self
            .dir
            .join(format!("{TEMP_PREFIX}{}", std::process::id()));
        let mut f = File::create(&path).map_err(io("write", &path))?;
        f.write_all(data).map_err(io("write", &path))?;
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

    /// A record of a pod of this boot whose netns is `netns`.
    fn held(id: &str, netns: &str) -> Record {
        Record {
            owner: owner(id),
            pod: Some(Pod {
                boot_id: boot_id(),
                netns: netns.into(),
                netns_inode: 0,
            }),
        }
    }

    fn record(id: &str) -> Record {
        held(id, "/proc/self/ns/net")
    }

    const ALIVE: fn(&Record) -> bool = |_| false;

    /// An empty store in a fresh directory, and a range of 6 hosts.
    fn small_store() -> (tempfile::TempDir, IpStore, Ipv4Net) {
        let dir = tempfile::tempdir().unwrap();
        let store = IpStore::open(dir.path()).unwrap();
        (dir, store, "10.1.0.0/29".parse().unwrap())
    }

    #[test]
    fn allocates_distinct_addresses_and_reuses_for_the_same_owner() {
        let (_dir, store, range) = small_store();
        let a = store.allocate(range, &record("a"), ALIVE).unwrap();
        let b = store.allocate(range, &record("b"), ALIVE).unwrap();
        assert_ne!(a, b);
        assert_eq!(store.allocate(range, &record("a"), ALIVE).unwrap(), a);
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
            assert!(
                seen.insert(
                    store
                        .allocate(range, &record(&format!("c{i}")), ALIVE)
                        .unwrap()
                )
            );
        }
        let err = store.allocate(range, &record("c6"), ALIVE).unwrap_err();
        assert!(matches!(err, Error::Exhausted { hosts: 6, .. }), "{err}");
        // Freed addresses come back.
        let freed = store.release(&owner("c3")).unwrap()[0];
        assert_eq!(store.allocate(range, &record("c7"), ALIVE).unwrap(), freed);
    }

    #[test]
    fn leftovers_of_a_killed_writer_do_not_break_the_store() {
        let (dir, store, range) = small_store();
        fs::write(dir.path().join("tmp-999999"), "half a rec").unwrap();
        fs::write(dir.path().join("10.1.0.1"), "").unwrap(); // truncated record
        let ip = store.allocate(range, &record("a"), ALIVE).unwrap();
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
                            .allocate(range, &record(&format!("t{i}")), ALIVE)
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
        let a = store.allocate(range, &record("a"), ALIVE).unwrap();
        let hint = dir.path().join(LAST_RESERVED_FILE);
        let inode = fs::metadata(&hint).unwrap().ino();
        store.release(&owner("a")).unwrap();
        // A just-released address is not handed out again at once.
        let b = store.allocate(range, &record("b"), ALIVE).unwrap();
        assert_ne!(a, b);
        assert_eq!(fs::read_to_string(&hint).unwrap().trim(), b.to_string());
        // Same file: no rename over it (ext4 would flush on every ADD).
        assert_eq!(fs::metadata(&hint).unwrap().ino(), inode);
        // A hint cut short by a crash only resets the round robin.
        fs::write(&hint, "10.1.").unwrap();
        let c = store.allocate(range, &record("c"), ALIVE).unwrap();
        assert_eq!(c, a, "allocation restarts at the first free address");
    }

    #[test]
    fn a_reboot_frees_every_address_of_the_previous_boot() {
        let (dir, store, range) = small_store();
        for i in 0..6 {
            store
                .allocate(range, &record(&format!("c{i}")), ALIVE)
                .unwrap();
        }
        // A record the previous release wrote (no pod lines) is kept as long
        // as nothing tells that its pod is gone...
        fs::remove_file(dir.path().join("10.1.0.1")).unwrap();
        fs::write(dir.path().join("10.1.0.1"), "old\neth0\n").unwrap();
        assert!(store.allocations().unwrap().len() == 6);
        // ...but after a reboot, every record of before is a dead pod's. (A
        // reboot, as far as the store can tell: its files name another boot.)
        for entry in fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let text = fs::read_to_string(&path).unwrap();
            fs::write(&path, text.replace(&boot_id(), "an-earlier-boot")).unwrap();
        }
        assert_eq!(store.allocations().unwrap(), vec![]);
        for i in 0..6 {
            store
                .allocate(range, &record(&format!("n{i}")), ALIVE)
                .unwrap();
        }
    }

    #[test]
    fn a_full_range_reclaims_only_what_dead_pods_held() {
        let (_dir, store, range) = small_store();
        for i in 0..6 {
            store
                .allocate(
                    range,
                    &held(&format!("c{i}"), &format!("/nonexistent/c{i}")),
                    ALIVE,
                )
                .unwrap();
        }
        let c2 = store.find(&owner("c2")).unwrap().unwrap();
        // Only c2's pod is gone (its netns and veth, say the caller's checks).
        let dead = |r: &Record| r.owner.container_id == "c2";
        assert_eq!(store.allocate(range, &record("new"), dead).unwrap(), c2);
        assert!(matches!(
            store.allocate(range, &record("more"), dead),
            Err(Error::Exhausted { .. })
        ));
        for i in [0, 1, 3, 4, 5] {
            assert!(store.find(&owner(&format!("c{i}"))).unwrap().is_some());
        }
    }

    #[test]
    fn records_round_trip_and_the_previous_format_parses() {
        let r = held("abc", "/run/netns/x");
        assert_eq!(Record::parse(&r.to_text()), Some(r));
        let old = Record::parse("abc\neth0\n").unwrap();
        assert_eq!((old.owner, old.pod), (owner("abc"), None));
        assert!(
            Pod {
                boot_id: String::new(),
                netns: "/nonexistent/ns".into(),
                netns_inode: 7
            }
            .netns_gone()
        );
        assert!(
            !Pod {
                boot_id: String::new(),
                netns: "/proc/self/ns/net".into(),
                netns_inode: 0
            }
            .netns_gone()
        );
    }
}
