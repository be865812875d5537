//! Every map of the datapath, pinned by name under the agent's bpffs dir.
//! Keys and values live in `beeline-common`, shared with user space.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use beeline_common::{
    Affinity, AffinityKey, Backend, Counter, DEFAULT_STACK_NAT_ENTRIES, Endpoint, EndpointKey,
    FlowKey, LbNat, MAX_AFFINITY, MAX_BACKENDS, MAX_ENDPOINTS, MAX_LB_NAT, MAX_REMOTE_CIDRS,
    MAX_SERVICE_ENTRIES, MAX_SOCK_REV_NAT, NodeConfig, RemoteNode, STATS_SLOTS, ServiceEntry,
    ServiceKey, SockRevKey, SockRevNat,
};

/// Local pods by IPv4 address: where to deliver their packets.
#[btf_map]
pub static BEELINE_ENDPOINTS: HashMap<EndpointKey, Endpoint, { MAX_ENDPOINTS as usize }> =
    HashMap::new();

/// Other nodes' podCIDRs: which node owns each, and how to reach it.
#[btf_map]
pub static BEELINE_REMOTE_CIDRS: LpmTrie<[u8; 4], RemoteNode, { MAX_REMOTE_CIDRS as usize }> =
    LpmTrie::new();

/// This node: uplink, VXLAN device and settings.
#[btf_map]
pub static BEELINE_NODE_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Replies of connections the host stack NATed, by their tuple: left to the
/// stack (see `stack_nat`). The agent sizes it to the node's conntrack.
#[btf_map]
pub static BEELINE_STACK_NAT: HashMap<FlowKey, u32, { DEFAULT_STACK_NAT_ENTRIES as usize }> =
    HashMap::new();

/// Non-zero once `BEELINE_STACK_NAT` may hold anything: until then the
/// ingress programs skip its lookup, so a node where the stack NATs nothing
/// (no kube-proxy, no hostPort) never pays for it. Never cleared.
#[btf_map]
pub static BEELINE_STACK_NAT_ON: Array<u32, 1> = Array::new();

/// Packet counters by (program, verdict), see `beeline_common::stats_slot`.
#[btf_map]
pub static BEELINE_STATS: PerCpuArray<Counter, { STATS_SLOTS as usize }> = PerCpuArray::new();

/// Service frontends and their backend slots (`ServiceKey::slot`).
#[btf_map]
pub static BEELINE_SERVICES: HashMap<ServiceKey, ServiceEntry, { MAX_SERVICE_ENTRIES as usize }> =
    HashMap::new();

/// Backends by id.
#[btf_map]
pub static BEELINE_BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }> = HashMap::new();

/// Sockets whose destination was translated: the Service address to show
/// in `recvmsg` and `getpeername`. LRU: a closed socket's entry ages out.
#[btf_map]
pub static BEELINE_SOCK_REV_NAT: LruHashMap<SockRevKey, SockRevNat, { MAX_SOCK_REV_NAT as usize }> =
    LruHashMap::new();

/// `sessionAffinity: ClientIP`: the backend a client last used.
#[btf_map]
pub static BEELINE_AFFINITY: LruHashMap<AffinityKey, Affinity, { MAX_AFFINITY as usize }> =
    LruHashMap::new();

/// Connections from outside translated per packet, both directions.
#[btf_map]
pub static BEELINE_LB_NAT: LruHashMap<FlowKey, LbNat, { MAX_LB_NAT as usize }> = LruHashMap::new();
