//! The command line, in the library so tests (and the deployment manifest
//! checks) parse arguments with the very same definition.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;

use crate::remote::Mode;

#[derive(Parser)]
#[command(name = "beeline-agent", version, about = "Beeline node agent")]
pub struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How the from-pod program sits on a pod's host veth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum PodAttach {
    /// A cls_bpf filter on a clsact qdisc: attaches in ~0.1 ms. Takes the
    /// veth's ingress qdisc slot, so a chained plugin that adds an `ingress`
    /// qdisc there (the bandwidth plugin's egressRate) fails.
    #[default]
    Tc,
    /// A pinned TCX link: coexists with any qdisc, but each attach waits out
    /// an RCU grace period under the RTNL lock (~9 ms on a 2-CPU VM).
    Tcx,
}

/// Who builds and strips the VXLAN headers (`--vxlan-encap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum VxlanEncapArg {
    /// The tc programs, on the uplink: no VXLAN device in the path (it stays
    /// for the packets the programs leave to the kernel).
    #[default]
    Program,
    /// The kernel's VXLAN device, for every packet.
    Device,
}

impl From<VxlanEncapArg> for beeline_common::VxlanEncap {
    fn from(arg: VxlanEncapArg) -> Self {
        match arg {
            VxlanEncapArg::Program => beeline_common::VxlanEncap::Program,
            VxlanEncapArg::Device => beeline_common::VxlanEncap::Device,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the node daemon.
    Run(Box<RunArgs>),
    /// List the endpoints in the pinned endpoint map, with their pods.
    Endpoints(EndpointsArgs),
    /// List the remote podCIDRs and the node each one is forwarded to.
    Nodes(InspectArgs),
    /// Show the per-program packet counters.
    Stats(InspectArgs),
    /// List the Service frontends and backends in the pinned maps
    /// (`--kube-proxy-replacement`).
    Services(EndpointsArgs),
    /// Remove Beeline from this node: CNI config and binary, pins, links,
    /// masquerade rules, the VXLAN device.
    Uninstall(UninstallArgs),
}

#[derive(Args)]
pub struct RunArgs {
    /// This node's name (its Node object).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The API socket for the CNI binary.
    #[arg(long, default_value = beeline_proto::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    #[arg(long, default_value = "/sys/fs/bpf/beeline")]
    pub bpffs_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/beeline")]
    pub state_dir: PathBuf,
    /// Static node source: a NodeList (JSON or YAML, as `kubectl get nodes
    /// -o yaml` prints it), reloaded when it changes. Without it, Nodes are
    /// watched through the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub nodes_file: Option<PathBuf>,
    /// Kubeconfig for the API (default: in-cluster config, then ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// How to reach other nodes.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// VXLAN UDP port.
    #[arg(long, default_value_t = 4789)]
    pub vxlan_port: u16,
    /// Who builds and strips the VXLAN headers.
    #[arg(long, value_enum, default_value_t = VxlanEncapArg::Program)]
    pub vxlan_encap: VxlanEncapArg,
    /// Pod interface MTU (default: uplink MTU, minus 50 when VXLAN may be used).
    #[arg(long)]
    pub pod_mtu: Option<u32>,
    /// Destinations pods reach with their own IP (every node's podCIDR is
    /// always included). Repeatable.
    #[arg(long = "no-masquerade-cidr", value_name = "CIDR")]
    pub no_masquerade_cidrs: Vec<Ipv4Net>,
    /// Do not install the egress masquerade rules.
    #[arg(long)]
    pub no_masquerade: bool,
    /// Install the CNI binary into this directory once the datapath is ready.
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// The CNI binary to install (default: `beeline` next to this program).
    #[arg(long)]
    pub cni_binary: Option<PathBuf>,
    /// Write the CNI network config into this directory once the node can
    /// network pods (so the node stays NotReady until then).
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// The installed network config's `dataDir`: where the CNI binary keeps
    /// its IP store (default: /var/lib/cni/beeline).
    #[arg(long)]
    pub ipam_data_dir: Option<PathBuf>,
    /// CNI plugins to chain after Beeline in the network config, when their
    /// binary is in `--cni-bin-dir`: portmap (hostPort), bandwidth (the
    /// bandwidth annotations). A missing one is reported, never silent.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "portmap,bandwidth",
        value_parser = clap::builder::PossibleValuesParser::new(["portmap", "bandwidth"])
    )]
    pub chain_plugins: Vec<String>,
    /// How the from-pod program is attached to each pod's host veth.
    #[arg(long, value_enum, default_value_t = PodAttach::Tc)]
    pub pod_attach: PodAttach,
    /// Turn on the eBPF programs' debug logs (failure paths only).
    #[arg(long)]
    pub ebpf_debug_logs: bool,
    /// Serve /healthz, /readyz and /metrics here.
    #[arg(long, default_value = "127.0.0.1:9962")]
    pub health_addr: std::net::SocketAddr,
    /// Translate Services in eBPF (kube-proxy replacement): ClusterIPs at
    /// the socket for pods and the node, NodePorts, externalIPs and
    /// load-balancer IPs per packet for clients outside the cluster.
    /// `--kube-proxy-replacement` or `--kube-proxy-replacement=true|false`.
    #[arg(
        long,
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub kube_proxy_replacement: bool,
    /// Static Service source: a List of Services and EndpointSlices (as
    /// `kubectl get svc,endpointslices -A -o yaml` prints it), reloaded when
    /// it changes. Without it, both are watched through the Kubernetes API.
    #[arg(long, requires = "kube_proxy_replacement")]
    pub services_file: Option<PathBuf>,
    /// The cgroup2 directory whose sockets get Services translated (default:
    /// the host's cgroup2 mount, so every process on the node).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// How often every owner compares the kernel with what it should be and
    /// repairs the difference (`500ms`, `10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub resync_period: std::time::Duration,
}

/// `<number><ms|s|m>`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 10s or 1m"))?;
    let duration = match unit {
        "ms" => std::time::Duration::from_millis(n),
        "s" => std::time::Duration::from_secs(n),
        "m" => std::time::Duration::from_secs(n * 60),
        _ => return Err(format!("{s:?}: the unit must be ms, s or m")),
    };
    if duration.is_zero() {
        return Err("the period must be longer than zero".into());
    }
    Ok(duration)
}

#[derive(Args)]
pub struct UninstallArgs {
    #[arg(long, default_value = "/sys/fs/bpf/beeline")]
    pub bpffs_dir: PathBuf,
    #[arg(long, default_value = "/var/lib/beeline")]
    pub state_dir: PathBuf,
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct EndpointsArgs {
    #[command(flatten)]
    pub inspect: InspectArgs,
    /// The agent's state dir, for the pods' names.
    #[arg(long, default_value = "/var/lib/beeline")]
    pub state_dir: PathBuf,
}

#[derive(Args)]
pub struct InspectArgs {
    #[arg(long, default_value = "/sys/fs/bpf/beeline")]
    pub bpffs_dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}
