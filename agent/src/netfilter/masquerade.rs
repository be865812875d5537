//! Egress masquerade for pod traffic leaving the cluster, as an nftables
//! table owned by Beeline (`table ip beeline`), written over netfilter
//! netlink with nftnl (no `iptables`/`nft` processes).
//!
//! ```text
//! table ip beeline {
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip daddr <each cluster / non-masquerade CIDR> return
//!     ip saddr <this node's podCIDR> masquerade
//!   }
//! }
//! ```
//! Every apply replaces the whole table in one netfilter transaction.
use std::{ffi::CStr, io};

use ipnet::Ipv4Net;
use nftnl::{Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table, nft_expr};

use super::send;

const TABLE: &CStr = c"beeline";
const CHAIN: &CStr = c"postrouting";
/// NF_IP_PRI_NAT_SRC: where `masquerade` normally runs.
const SRCNAT_PRIORITY: i32 = 100;

/// Installs (or atomically replaces) the masquerade table.
pub fn apply(pod_cidr: Ipv4Net, no_masquerade: &[Ipv4Net]) -> io::Result<()> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    // add + delete + add: replaces an existing table, creates a missing one,
    // all inside one transaction.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let mut chain = Chain::new(CHAIN, &table);
    chain.set_type(ChainType::Nat);
    chain.set_hook(Hook::PostRouting, SRCNAT_PRIORITY);
    chain.set_policy(Policy::Accept);
    batch.add(&chain, MsgType::Add);
    for net in no_masquerade {
        let mut rule = Rule::new(&chain);
        rule.add_expr(&nft_expr!(payload ipv4 daddr));
        rule.add_expr(&nft_expr!(bitwise mask net.netmask(), xor 0u32));
        rule.add_expr(&nft_expr!(cmp == net.network()));
        rule.add_expr(&nft_expr!(verdict return));
        batch.add(&rule, MsgType::Add);
    }
    let mut rule = Rule::new(&chain);
    rule.add_expr(&nft_expr!(payload ipv4 saddr));
    rule.add_expr(&nft_expr!(bitwise mask pod_cidr.netmask(), xor 0u32));
    rule.add_expr(&nft_expr!(cmp == pod_cidr.network()));
    rule.add_expr(&nft_expr!(counter));
    rule.add_expr(&nft_expr!(masquerade));
    batch.add(&rule, MsgType::Add);
    send(&batch.finalize())
}

/// Removes the table; succeeds if it is already gone.
pub fn remove() -> io::Result<()> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    send(&batch.finalize())
}

/// Whether the table is installed (a `nft flush ruleset` or a firewall
/// reload removes it).
pub fn installed() -> io::Result<bool> {
    Ok(super::tables()?.iter().any(|t| t.as_c_str() == TABLE))
}
