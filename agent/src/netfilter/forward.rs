//! Accept rules for pod traffic in iptables' FORWARD chain (its nft backend,
//! table `ip filter`, which Debian, Ubuntu and RHEL use). Docker and many
//! kubeadm nodes set that chain's policy to DROP, which kills pod egress and
//! all traffic the host forwards to and from pods; an accept in a table of
//! Beeline's own would not help (a drop in any base chain is final). So, as
//! flannel does: a chain of Beeline's own, `BEELINE-FORWARD`, with
//! `-s <podCIDRs> -j ACCEPT` and `-d <podCIDRs> -j ACCEPT`, and one jump to
//! it from FORWARD. Both carry a comment and are built from the expressions
//! `iptables-nft` writes, so `iptables -S` (and kube-proxy) read them.
use std::{ffi::CStr, io};

use ipnet::Ipv4Net;
use nftnl::{Batch, Chain, MsgType, ProtoFamily, Rule, Table, nft_expr};

use super::{rules, send};

const TABLE: &CStr = c"filter";
const FORWARD: &CStr = c"FORWARD";
pub const CHAIN: &CStr = c"BEELINE-FORWARD";
const COMMENT: &CStr = c"beeline: pod traffic the host forwards";

/// What [`apply`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// No iptables FORWARD chain on this node: nothing there to accept in.
    NoForwardChain,
    /// The jump from FORWARD was missing (a first install, or flushed).
    JumpAdded,
    /// Already jumped to; the chain's rules were rewritten.
    Updated,
}

/// Installs or updates the accept rules for `pod_cidrs` (every node's).
pub fn apply(pod_cidrs: &[Ipv4Net]) -> io::Result<Applied> {
    let Some(forward_rules) = rules(TABLE, FORWARD)? else {
        return Ok(Applied::NoForwardChain);
    };
    let ours: Vec<u64> = forward_rules
        .iter()
        .filter(|r| r.comment.as_deref() == COMMENT.to_str().ok())
        .map(|r| r.handle)
        .collect();
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let forward = Chain::new(FORWARD, &table);
    let chain = Chain::new(CHAIN, &table);
    let mut batch = Batch::new();
    batch.add(&chain, MsgType::Add);
    // A rule without a handle, deleted: every rule of the chain goes.
    batch.add(&Rule::new(&chain), MsgType::Del);
    for net in pod_cidrs {
        for field in [Field::Source, Field::Destination] {
            let mut rule = Rule::new(&chain);
            match field {
                Field::Source => rule.add_expr(&nft_expr!(payload ipv4 saddr)),
                Field::Destination => rule.add_expr(&nft_expr!(payload ipv4 daddr)),
            }
            rule.add_expr(&nft_expr!(bitwise mask net.netmask(), xor 0u32));
            rule.add_expr(&nft_expr!(cmp == net.network()));
            rule.add_expr(&nft_expr!(counter));
            rule.add_expr(&nft_expr!(verdict accept));
            set_comment(&mut rule);
            batch.add(&rule, MsgType::Add);
        }
    }
    // Exactly one jump: duplicates (two agents racing, say) go.
    let mut stale = Vec::new();
    for handle in ours.iter().skip(1) {
        let mut rule = Rule::new(&forward);
        rule.set_handle(*handle);
        stale.push(rule);
    }
    for rule in &stale {
        batch.add(rule, MsgType::Del);
    }
    let mut jump = Rule::new(&forward);
    if ours.is_empty() {
        jump.add_expr(&nft_expr!(counter));
        jump.add_expr(&nft_expr!(verdict jump CHAIN.to_owned()));
        set_comment(&mut jump);
        batch.add(&jump, MsgType::Add);
    }
    send(&batch.finalize())?;
    Ok(if ours.is_empty() {
        Applied::JumpAdded
    } else {
        Applied::Updated
    })
}

/// Whether the jump and the chain are in place; `None` when there is no
/// iptables FORWARD chain.
pub fn installed() -> io::Result<Option<bool>> {
    let Some(forward_rules) = rules(TABLE, FORWARD)? else {
        return Ok(None);
    };
    let jumped = forward_rules
        .iter()
        .any(|r| r.comment.as_deref() == COMMENT.to_str().ok());
    Ok(Some(jumped && rules(TABLE, CHAIN)?.is_some()))
}

/// Removes the jump and the chain; false if there was nothing to remove.
pub fn remove() -> io::Result<bool> {
    let Some(forward_rules) = rules(TABLE, FORWARD)? else {
        return Ok(false);
    };
    let table = Table::new(TABLE, ProtoFamily::Ipv4);
    let forward = Chain::new(FORWARD, &table);
    let chain = Chain::new(CHAIN, &table);
    let jumps: Vec<Rule> = forward_rules
        .iter()
        .filter(|r| r.comment.as_deref() == COMMENT.to_str().ok())
        .map(|r| {
            let mut rule = Rule::new(&forward);
            rule.set_handle(r.handle);
            rule
        })
        .collect();
    let has_chain = rules(TABLE, CHAIN)?.is_some();
    if jumps.is_empty() && !has_chain {
        return Ok(false);
    }
    let mut batch = Batch::new();
    for rule in &jumps {
        batch.add(rule, MsgType::Del);
    }
    if has_chain {
        batch.add(&Rule::new(&chain), MsgType::Del);
        batch.add(&chain, MsgType::Del);
    }
    send(&batch.finalize())?;
    Ok(true)
}

enum Field {
    Source,
    Destination,
}

fn set_comment(rule: &mut Rule) {
    rule.set_comment(COMMENT)
        .expect("the comment fits the kernel's limit");
}
