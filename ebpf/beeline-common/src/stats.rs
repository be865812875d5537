//! Packet counters: `BEELINE_STATS` holds one per-CPU counter per
//! (program, verdict), at index `program * MAX_VERDICTS + verdict`. A new
//! verdict or program is one line below; the agent's `stats` command and
//! `/metrics` list whatever is declared here. Numbers are never reused or
//! moved, and the map keeps its size, so counters already pinned keep counting.

/// Slots reserved per program: verdicts are numbered below this.
pub const MAX_VERDICTS: u32 = 64;
/// Programs are numbered below this.
pub const MAX_PROGRAMS: u32 = 16;
/// Entries of `BEELINE_STATS`.
pub const STATS_SLOTS: u32 = MAX_PROGRAMS * MAX_VERDICTS;

/// The value of one `BEELINE_STATS` slot, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    /// Bytes as the program saw them (the frame, Ethernet header included).
    pub bytes: u64,
}

/// Where a packet counter lives in `BEELINE_STATS`.
#[inline(always)]
pub const fn stats_slot(program: Program, verdict: Verdict) -> u32 {
    program as u32 * MAX_VERDICTS + verdict as u32
}

/// What the tc action of a verdict is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictKind {
    /// Handed to another device or netns by a redirect helper.
    Redirect,
    /// Left to the next tc program and the host stack.
    Pass,
    /// Dropped.
    Drop,
}

macro_rules! numbered {
    (
        $(#[$meta:meta])*
        pub enum $enum:ident { $( $(#[$doc:meta])* $variant:ident = $n:literal, $name:literal, $extra:expr; )* }
        extra: $extra_fn:ident -> $extra_ty:ty;
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $enum { $( $(#[$doc])* $variant = $n, )* }

        impl $enum {
            /// Every value, in numbering order.
            pub const ALL: &'static [$enum] = &[$($enum::$variant),*];

            /// The name operators see (CLI, metrics labels).
            pub const fn name(self) -> &'static str {
                match self { $($enum::$variant => $name,)* }
            }

            pub const fn $extra_fn(self) -> $extra_ty {
                match self { $($enum::$variant => $extra,)* }
            }
        }
    };
}

numbered! {
    /// Every program, named for where it runs (Cilium's `bpf_lxc` /
    /// `bpf_host` / `bpf_overlay` split). `name()` is the counters' label,
    /// `function()` the program's name in the object.
    pub enum Program {
        /// tc ingress of a pod's host-side veth: packets leaving the pod.
        FromPod = 0, "from_pod", "beeline_from_pod";
        /// tc ingress of the node's uplink: packets arriving from other nodes.
        FromUplink = 1, "from_uplink", "beeline_from_uplink";
        /// tc ingress of the VXLAN device: decapsulated packets from other nodes.
        FromOverlay = 2, "from_overlay", "beeline_from_overlay";
        /// tc egress of a pod's host veth: what the host stack sends the pod.
        ToPod = 3, "to_pod", "beeline_to_pod";
        /// tc egress of the uplink: what the host stack sends other hosts.
        ToUplink = 4, "to_uplink", "beeline_to_uplink";
        /// tc egress of the VXLAN device: what the host stack sends other
        /// nodes' pods (routes to their podCIDRs lead there).
        ToOverlay = 5, "to_overlay", "beeline_to_overlay";
        /// cgroup `connect4`: a socket connecting to a Service.
        SockConnect = 6, "sock_connect", "beeline_sock_connect4";
        /// cgroup `sendmsg4`: an unconnected UDP socket sending to a Service.
        SockSendmsg = 7, "sock_sendmsg", "beeline_sock_sendmsg4";
        /// cgroup `recvmsg4`: a UDP answer shown as from the Service.
        SockRecvmsg = 8, "sock_recvmsg", "beeline_sock_recvmsg4";
        /// cgroup `getpeername4`: the Service as the connected peer.
        SockGetpeername = 9, "sock_getpeername", "beeline_sock_getpeername4";
        /// Not a program: the Service translation of packets from outside
        /// (NodePort, externalIPs, load-balancer IPs), counted besides the
        /// verdict of the program that carried the packet.
        ServiceLb = 10, "service_lb", "";
    }
    extra: function -> &'static str;
}

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcIngress,
    TcEgress,
    /// A cgroup sock_addr hook (its attach type is in the program's name).
    SockAddr,
    /// Counters only.
    None,
}

impl Program {
    pub const fn hook(self) -> Hook {
        match self {
            Program::FromPod | Program::FromUplink | Program::FromOverlay => Hook::TcIngress,
            Program::ToPod | Program::ToUplink | Program::ToOverlay => Hook::TcEgress,
            Program::SockConnect
            | Program::SockSendmsg
            | Program::SockRecvmsg
            | Program::SockGetpeername => Hook::SockAddr,
            Program::ServiceLb => Hook::None,
        }
    }

    /// Whether the program runs at tc egress (else ingress).
    pub const fn egress(self) -> bool {
        matches!(self.hook(), Hook::TcEgress)
    }
}

numbered! {
    /// What a program did with a packet. Each program counts one verdict
    /// per packet.
    pub enum Verdict {
        /// Delivered into a local pod's netns (`bpf_redirect_peer`).
        RedirectedLocal = 0, "redirected_local", VerdictKind::Redirect;
        /// Sent to a remote node over the underlay (`bpf_redirect_neigh`).
        ForwardedDirect = 1, "forwarded_direct", VerdictKind::Redirect;
        /// Sent to a remote node VXLAN-encapsulated.
        ForwardedTunnel = 2, "forwarded_tunnel", VerdictKind::Redirect;
        /// Not ours (unknown destination, not IPv4, TTL expiring, VXLAN the
        /// programs leave to the kernel): left to the host stack.
        PassedToHost = 3, "passed_to_host", VerdictKind::Pass;
        /// Too short or inconsistent to hold the headers we parse.
        DroppedMalformed = 4, "dropped_malformed", VerdictKind::Drop;
        /// A helper failed (redirect, tunnel key, header rewrite).
        DroppedHelperError = 5, "dropped_helper_error", VerdictKind::Drop;
        /// For a pod whose traffic the host stack shapes (bandwidth plugin).
        PassedThroughStack = 6, "passed_through_stack", VerdictKind::Pass;
        /// A reply of a connection the host stack NATed (kube-proxy, portmap):
        /// left to the stack, which reverses the translation.
        PassedStackNat = 7, "passed_stack_nat", VerdictKind::Pass;
        /// Egress: the stack NATed this connection; its replies are recorded
        /// so the programs leave them to the stack.
        RecordedStackNat = 8, "recorded_stack_nat", VerdictKind::Pass;
        /// Egress: a NATed connection that could not be recorded (the map is
        /// full): its replies may skip the stack.
        StackNatMapFull = 9, "stack_nat_map_full", VerdictKind::Pass;
        /// Egress: nothing to do, on to the device.
        Continued = 10, "continued", VerdictKind::Pass;
        /// The VXLAN device's egress: the remote node set as the tunnel's
        /// destination, the device encapsulates.
        TunnelKeySet = 11, "tunnel_key_set", VerdictKind::Pass;
        /// The VXLAN device's egress: no node owns the destination.
        DroppedNoRemoteNode = 12, "dropped_no_remote_node", VerdictKind::Drop;
        /// A Service address translated to a backend's (a new connection,
        /// or a datagram).
        Translated = 13, "translated", VerdictKind::Pass;
        /// A packet of a connection already translated, either direction.
        Tracked = 14, "tracked", VerdictKind::Pass;
        /// A backend's address shown as the Service's again (`recvmsg`,
        /// `getpeername`).
        ReverseTranslated = 15, "reverse_translated", VerdictKind::Pass;
        /// A Service without endpoints (for this traffic): refused at once.
        RefusedNoEndpoints = 16, "refused_no_endpoints", VerdictKind::Drop;
        /// A connection from outside that could not be tracked (map full).
        DroppedLbNatFull = 17, "dropped_lb_nat_full", VerdictKind::Drop;
        /// No free source port to translate the client to this node's address.
        DroppedNoSnatPort = 18, "dropped_no_snat_port", VerdictKind::Drop;
    }
    extra: kind -> VerdictKind;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_fit_their_slots_and_names_are_unique() {
        for (i, p) in Program::ALL.iter().enumerate() {
            assert!((*p as u32) < MAX_PROGRAMS);
            assert!(Program::ALL[i + 1..].iter().all(|q| q.name() != p.name()));
        }
        for (i, v) in Verdict::ALL.iter().enumerate() {
            assert!((*v as u32) < MAX_VERDICTS);
            assert!(Verdict::ALL[i + 1..].iter().all(|w| w.name() != v.name()));
        }
        assert!(Program::ToPod.egress() && !Program::FromPod.egress());
        assert_eq!(
            stats_slot(Program::FromOverlay, Verdict::DroppedHelperError),
            2 * MAX_VERDICTS + 5
        );
    }
}
