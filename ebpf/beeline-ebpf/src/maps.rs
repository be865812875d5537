//! Every map of the datapath, pinned by name under the agent's bpffs dir.
//! Keys and values live in `beeline-common`, shared with user space.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use beeline_common::{
    Counter, DEFAULT_STACK_NAT_ENTRIES, Endpoint, EndpointKey, FlowKey, MAX_ENDPOINTS,
    MAX_REMOTE_CIDRS, NodeConfig, RemoteNode, STATS_SLOTS,
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

/// Packet counters by (program, verdict), see `beeline_common::stats_slot`.
#[btf_map]
pub static BEELINE_STATS: PerCpuArray<Counter, { STATS_SLOTS as usize }> = PerCpuArray::new();
