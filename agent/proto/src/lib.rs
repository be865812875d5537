//! The agent's API on its Unix socket: one JSON request line, one JSON
//! response line, per connection. The CNI binary is the main client; the
//! types are also what the agent persists for each endpoint.
use std::{
    fmt,
    io::{BufRead, BufReader, Read, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::DeserializeOwned};

pub const DEFAULT_SOCKET: &str = "/run/beeline/agent.sock";
/// Upper bound for one request or response line.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// What a new pod on this node gets. Fails while the agent is not ready.
    NodeInfo,
    /// Adds a pod endpoint to the datapath (map entry + tc program on its host veth).
    Register { endpoint: Endpoint },
    /// Removes a pod endpoint; answers the removed endpoint, if there was one.
    Unregister {
        container_id: String,
        ifname: String,
    },
    /// Checks the endpoint's datapath state (map entry, attached program);
    /// answers `None` for an unknown endpoint, else the problems found.
    CheckEndpoint {
        container_id: String,
        ifname: String,
    },
    /// Every endpoint the agent knows.
    ListEndpoints,
    /// Deletes a retired pod veth (already down and renamed to
    /// [`RETIRED_PREFIX`]...) in the background: the kernel takes tens of
    /// milliseconds to tear a veth pair down, which DEL need not wait for.
    RetireLink { ifname: String },
}

impl Request {
    /// The request's name, for metrics and logs.
    pub fn verb(&self) -> &'static str {
        match self {
            Request::NodeInfo => "node_info",
            Request::Register { .. } => "register",
            Request::Unregister { .. } => "unregister",
            Request::CheckEndpoint { .. } => "check_endpoint",
            Request::ListEndpoints => "list_endpoints",
            Request::RetireLink { .. } => "retire_link",
        }
    }
}

/// The pods' default gateway: link-local and never on the wire (each pod has
/// a permanent neighbour entry for it, its host veth's MAC).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Name prefix of a pod veth that DEL took out of service.
pub const RETIRED_PREFIX: &str = "bx";
/// The alias a retired veth carries (the agent deletes leftovers at start).
pub const RETIRED_ALIAS: &str = "beeline retired";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_name: String,
    /// The node's podCIDR, e.g. `10.244.1.0/24`.
    pub pod_cidr: String,
    /// MTU for pod interfaces (uplink MTU minus encapsulation overhead).
    pub mtu: u32,
    /// The pods' default gateway (link-local, answered by a static neighbour entry).
    pub gateway: Ipv4Addr,
}

/// A pod interface as the CNI binary created it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Endpoint {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: MacAddr,
    pub pod_mac: MacAddr,
    /// The Kubernetes pod, when the runtime said (`K8S_POD_*` in CNI_ARGS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
    /// The inode of `netns` and the boot it was made in: with the host veth
    /// gone too, the pod is gone (see `beeline_ipam::Pod`).
    #[serde(default)]
    pub netns_inode: u64,
    #[serde(default)]
    pub boot_id: String,
    /// The built-in allocator's store holding the address (none when an
    /// IPAM plugin gave it): the agent releases a gone pod's address there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam_dir: Option<PathBuf>,
    /// The bandwidth plugin shapes this pod on its host veth: its traffic
    /// takes the host stack both ways (no program on its veth, no redirect
    /// into it), so the qdiscs see every packet.
    #[serde(default)]
    pub shaped: bool,
}

/// A Kubernetes pod, as the kubelet names it in CNI_ARGS.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uid: String,
}

/// Why the agent refused a request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub message: String,
    /// True when the agent cannot serve yet (no podCIDR, datapath loading):
    /// the runtime should try again later.
    #[serde(default)]
    pub not_ready: bool,
}

impl ApiError {
    pub fn new(message: impl Into<String>) -> Self {
        ApiError {
            message: message.into(),
            not_ready: false,
        }
    }
    pub fn not_ready(message: impl Into<String>) -> Self {
        ApiError {
            message: message.into(),
            not_ready: true,
        }
    }
}

pub type Response<T> = Result<T, ApiError>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the Beeline agent is not running or not reachable at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Beeline agent at {path} did not answer in time: {source}")]
    Timeout {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the Beeline agent at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Beeline agent sent an unreadable answer: {0}")]
    Protocol(#[from] serde_json::Error),
    #[error("the Beeline agent refused: {0}")]
    Agent(#[from] ApiError),
}

/// A blocking client: the CNI binary is short-lived and makes a few calls.
#[derive(Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Client {
            path: path.into(),
            timeout: Duration::from_secs(10),
        }
    }

    pub fn node_info(&self) -> Result<NodeInfo, ClientError> {
        self.call(&Request::NodeInfo)
    }

    pub fn register(&self, endpoint: &Endpoint) -> Result<(), ClientError> {
        self.call(&Request::Register {
            endpoint: endpoint.clone(),
        })
    }

    pub fn unregister(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Endpoint>, ClientError> {
        self.call(&Request::Unregister {
            container_id: container_id.into(),
            ifname: ifname.into(),
        })
    }

    pub fn retire_link(&self, ifname: &str) -> Result<(), ClientError> {
        self.call(&Request::RetireLink {
            ifname: ifname.into(),
        })
    }

    pub fn check_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Vec<String>>, ClientError> {
        self.call(&Request::CheckEndpoint {
            container_id: container_id.into(),
            ifname: ifname.into(),
        })
    }

    pub fn list_endpoints(&self) -> Result<Vec<Endpoint>, ClientError> {
        self.call(&Request::ListEndpoints)
    }

    fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, ClientError> {
        // A busy agent (out of descriptors, flooded) is a reason to try
        // again, not a failure.
        let io = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout {
                path: self.path.clone(),
                source,
            },
            _ => ClientError::Io {
                path: self.path.clone(),
                source,
            },
        };
        let mut stream = self.connect()?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        // An agent at its connection bound answers "busy" and closes before
        // reading: the answer is still there to read after a failed write.
        let written = stream.write_all(&line);
        let mut reader = BufReader::new(stream).take(MAX_MESSAGE_BYTES as u64);
        let mut answer = String::new();
        let read = reader.read_line(&mut answer);
        if answer.is_empty() {
            written.map_err(io)?;
            read.map_err(io)?;
        }
        let response: Response<T> = serde_json::from_str(&answer)?;
        Ok(response?)
    }
}

impl Client {
    /// Connects without ever blocking past the timeout: a Unix socket's
    /// connect waits while the listener's backlog is full (an agent out of
    /// file descriptors, a flood of clients), and a CNI call must end.
    fn connect(&self) -> Result<UnixStream, ClientError> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
        let unreachable = |source: std::io::Error| ClientError::Unreachable {
            path: self.path.clone(),
            source,
        };
        let addr = UnixAddr::new(&self.path).map_err(|e| unreachable(e.into()))?;
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let fd = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| unreachable(e.into()))?;
            match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
                Ok(()) => {
                    let stream = UnixStream::from(fd);
                    stream
                        .set_nonblocking(false)
                        .map_err(|source| ClientError::Io {
                            path: self.path.clone(),
                            source,
                        })?;
                    return Ok(stream);
                }
                Err(nix::errno::Errno::EAGAIN) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(ClientError::Timeout {
                        path: self.path.clone(),
                        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                    });
                }
                Err(e) => return Err(unreachable(e.into())),
            }
        }
    }
}

/// An Ethernet address, written `02:42:ac:11:00:02` in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts
                .next()
                .ok_or_else(|| format!("bad MAC address {s:?}"))?;
            if part.len() != 2 {
                return Err(format!("bad MAC address {s:?}"));
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
        }
        if parts.next().is_some() {
            return Err(format!("bad MAC address {s:?}"));
        }
        Ok(MacAddr(mac))
    }
}

impl TryFrom<&[u8]> for MacAddr {
    type Error = String;
    fn try_from(bytes: &[u8]) -> Result<Self, Self::Error> {
        <[u8; 6]>::try_from(bytes)
            .map(MacAddr)
            .map_err(|_| format!("not a 6-byte MAC address: {bytes:?}"))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips_and_rejects_garbage() {
        let mac: MacAddr = "02:42:ac:11:00:0a".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x42, 0xac, 0x11, 0x00, 0x0a]);
        assert_eq!(mac.to_string(), "02:42:ac:11:00:0a");
        for bad in [
            "",
            "02:42",
            "02:42:ac:11:00:0a:01",
            "zz:42:ac:11:00:0a",
            "2:42:ac:11:00:0a",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn requests_are_tagged_json() {
        let req = Request::Unregister {
            container_id: "c1".into(),
            ifname: "eth0".into(),
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"op":"unregister","container_id":"c1","ifname":"eth0"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
    }

    #[test]
    fn unreachable_agent_is_reported_as_such() {
        let client = Client::new("/nonexistent/beeline/agent.sock");
        match client.node_info() {
            Err(ClientError::Unreachable { .. }) => {}
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}
