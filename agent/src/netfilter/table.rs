//! The nftables table Beeline owns, `table ip beeline`: egress masquerade
//! for pod traffic leaving the cluster, and the mark on packets of
//! connections the host stack destination-NATed (see the eBPF `stack_nat`
//! module: their replies must go back through the stack).
//!
//! ```text
//! table ip beeline {
//!   chain postrouting {
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip daddr <each cluster / non-masquerade CIDR> return
//!     ip saddr <this node's podCIDR> masquerade
//!   }
//!   chain stack-nat {
//!     type filter hook postrouting priority srcnat + 10; policy accept;
//!     ct direction original ct status dnat meta mark set mark | STACK_NAT_MARK
//!   }
//! }
//! ```
//! Every apply replaces the whole table in one netfilter transaction.
use std::{ffi::CStr, io, ptr::NonNull};

use beeline_common::STACK_NAT_MARK;
use ipnet::Ipv4Net;
use nftnl::{
    Batch, Chain, ChainType, Hook, MsgType, Policy, ProtoFamily, Rule, Table,
    expr::{ConntrackStatus, Expression},
    nft_expr, nftnl_sys as sys,
};

use super::send;

const TABLE: &CStr = c"beeline";
const MASQUERADE_CHAIN: &CStr = c"postrouting";
const STACK_NAT_CHAIN: &CStr = c"stack-nat";
/// NF_IP_PRI_NAT_SRC: where `masquerade` normally runs.
const SRCNAT_PRIORITY: i32 = 100;

/// The masquerade rules: this node's podCIDR, and the destinations that
/// keep the pod's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masquerade {
    pub pod_cidr: Ipv4Net,
    pub exceptions: Vec<Ipv4Net>,
}

/// Installs (or atomically replaces) the table: the stack-NAT mark always,
/// the masquerade rules when given.
pub fn apply(masquerade: Option<&Masquerade>) -> io::Result<()> {
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let mut batch = Batch::new();
    // add + delete + add: replaces an existing table, creates a missing one,
    // all inside one transaction.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);

    let mut stack_nat = Chain::new(STACK_NAT_CHAIN, &table);
    stack_nat.set_type(ChainType::Filter);
    // After NAT has bound the connection: its status says DNAT.
    stack_nat.set_hook(Hook::PostRouting, SRCNAT_PRIORITY + 10);
    stack_nat.set_policy(Policy::Accept);
    batch.add(&stack_nat, MsgType::Add);
    let mut rule = Rule::new(&stack_nat);
    rule.add_expr(&CtDirection);
    rule.add_expr(&nft_expr!(cmp == 0u8)); // IP_CT_DIR_ORIGINAL
    rule.add_expr(&nft_expr!(ct status));
    rule.add_expr(&nft_expr!(bitwise mask ConntrackStatus::DST_NAT.bits(), xor 0u32));
    rule.add_expr(&nft_expr!(cmp != 0u32));
    rule.add_expr(&nft_expr!(meta mark));
    rule.add_expr(&nft_expr!(bitwise mask !STACK_NAT_MARK, xor STACK_NAT_MARK));
    rule.add_expr(&nft_expr!(meta mark set));
    batch.add(&rule, MsgType::Add);

    let mut postrouting = Chain::new(MASQUERADE_CHAIN, &table);
    let mut rules = Vec::new();
    if let Some(masquerade) = masquerade {
        postrouting.set_type(ChainType::Nat);
        postrouting.set_hook(Hook::PostRouting, SRCNAT_PRIORITY);
        postrouting.set_policy(Policy::Accept);
        for net in &masquerade.exceptions {
            let mut rule = Rule::new(&postrouting);
            rule.add_expr(&nft_expr!(payload ipv4 daddr));
            rule.add_expr(&nft_expr!(bitwise mask net.netmask(), xor 0u32));
            rule.add_expr(&nft_expr!(cmp == net.network()));
            rule.add_expr(&nft_expr!(verdict return));
            rules.push(rule);
        }
        let pod_cidr = masquerade.pod_cidr;
        let mut rule = Rule::new(&postrouting);
        rule.add_expr(&nft_expr!(payload ipv4 saddr));
        rule.add_expr(&nft_expr!(bitwise mask pod_cidr.netmask(), xor 0u32));
        rule.add_expr(&nft_expr!(cmp == pod_cidr.network()));
        rule.add_expr(&nft_expr!(counter));
        rule.add_expr(&nft_expr!(masquerade));
        rules.push(rule);
        batch.add(&postrouting, MsgType::Add);
        for rule in &rules {
            batch.add(rule, MsgType::Add);
        }
    }
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

/// `ct direction`: the packet's direction in its connection (0 original,
/// 1 reply) into register 1; nftnl has no expression for it.
struct CtDirection;

impl Expression for CtDirection {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: a fresh expression, filled with plain integer attributes;
        // the rule frees it.
        unsafe {
            let expr = NonNull::new(sys::nftnl_expr_alloc(c"ct".as_ptr()))
                .expect("out of memory allocating an nftables expression");
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_CT_DREG as u16,
                libc::NFT_REG_1 as u32,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_CT_KEY as u16,
                libc::NFT_CT_DIRECTION as u32,
            );
            expr
        }
    }
}
