//! kube-proxy's chain, set and comment names, with its hashes:
//! base32(sha256(...)) prefixes, as Go's `base32.StdEncoding` writes them.
use std::net::Ipv4Addr;

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use super::model::{Protocol, Service, ServicePort};

/// `proxy.ServicePortName.String()`: "ns/name:port", or "ns/name" when the
/// port has no name.
pub fn service_port_name(svc: &Service, port: &ServicePort) -> String {
    if port.name.is_empty() {
        format!("{}/{}", svc.namespace, svc.name)
    } else {
        format!("{}/{}:{}", svc.namespace, svc.name, port.name)
    }
}

fn b32_prefix(data: &[u8], chars: usize) -> String {
    let mut s = base32(&sha256(data));
    s.truncate(chars);
    s
}

/// iptables `portProtoHash`: base32(sha256(name + protocol))[:16].
pub fn port_proto_hash(service_port_name: &str, protocol: Protocol) -> String {
    b32_prefix(
        format!("{service_port_name}{}", protocol.as_str()).as_bytes(),
        16,
    )
}

/// The iptables chains of one service port (each exists only when used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesChains {
    /// KUBE-SVC-: Cluster traffic policy.
    pub svc: String,
    /// KUBE-SVL-: Local traffic policy.
    pub svl: String,
    /// KUBE-EXT-: external destinations (NodePort).
    pub ext: String,
    /// KUBE-FW-: loadBalancerSourceRanges (never written here).
    pub fw: String,
}

pub fn iptables_chains(svc: &Service, port: &ServicePort) -> IptablesChains {
    let hash = port_proto_hash(&service_port_name(svc, port), port.protocol);
    IptablesChains {
        svc: format!("KUBE-SVC-{hash}"),
        svl: format!("KUBE-SVL-{hash}"),
        ext: format!("KUBE-EXT-{hash}"),
        fw: format!("KUBE-FW-{hash}"),
    }
}

/// KUBE-SEP-: base32(sha256(name + protocol + "ip:port"))[:16].
pub fn iptables_endpoint_chain(svc: &Service, port: &ServicePort, ip: Ipv4Addr) -> String {
    let input = format!(
        "{}{}{ip}:{}",
        service_port_name(svc, port),
        port.protocol.as_str(),
        port.target_port
    );
    format!("KUBE-SEP-{}", b32_prefix(input.as_bytes(), 16))
}

/// nftables `hashAndTruncate`: base32(sha256(name))[:8] + "-" + name
/// (names here are far below the 240-character truncation).
fn nft_hash_and_truncate(name: &str) -> String {
    format!("{}-{name}", b32_prefix(name.as_bytes(), 8))
}

/// The nftables chains of one service port (each exists only when used).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftChains {
    pub service: String,
    pub local: String,
    pub external: String,
    pub firewall: String,
}

pub fn nft_chains(svc: &Service, port: &ServicePort) -> NftChains {
    let base = nft_hash_and_truncate(&format!(
        "{}/{}/{}/{}",
        svc.namespace,
        svc.name,
        port.protocol.as_str(),
        port.name
    ));
    NftChains {
        service: format!("service-{base}"),
        local: format!("local-{base}"),
        external: format!("external-{base}"),
        firewall: format!("firewall-{base}"),
    }
}

/// `endpoint-HASH-ns/name/proto/port__ip/port`; the affinity set is the same
/// with `affinity-`.
pub fn nft_endpoint_chain_base(svc: &Service, port: &ServicePort, ip: Ipv4Addr) -> String {
    nft_hash_and_truncate(&format!(
        "{}/{}/{}/{}__{ip}/{}",
        svc.namespace,
        svc.name,
        port.protocol.as_str(),
        port.name,
        port.target_port
    ))
}

/// SHA-256, for kube-proxy's chain-name hashes.
fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// RFC 4648 base32 with padding (Go's `base32.StdEncoding`).
fn base32(data: &[u8]) -> String {
    BASE32.encode(data)
}

#[cfg(test)]
mod tests {
    use super::{super::tests::svc1, *};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_and_base32_match_the_standards() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // RFC 4648 test vectors.
        for (input, want) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(base32(input.as_bytes()), want, "{input:?}");
        }
    }
    #[test]
    fn chain_names_match_kube_proxys_test_vectors() {
        // From pkg/proxy/iptables/proxier_test.go and nftables/proxier_test.go.
        let svc = svc1();
        let port = &svc.ports[0];
        assert_eq!(iptables_chains(&svc, port).svc, "KUBE-SVC-XPGD46QRK7WJZT7O");
        assert_eq!(
            iptables_endpoint_chain(&svc, port, Ipv4Addr::new(10, 180, 0, 1)),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            nft_chains(&svc, port).service,
            "service-ULMVA6XW-ns1/svc1/tcp/p80"
        );
        assert_eq!(
            nft_endpoint_chain_base(&svc, port, Ipv4Addr::new(10, 180, 0, 1)),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
        let mut svc2 = svc.clone();
        svc2.namespace = "ns2".into();
        svc2.name = "svc2".into();
        assert_eq!(
            nft_chains(&svc2, &svc2.ports[0]).service,
            "service-42NFTM6N-ns2/svc2/tcp/p80"
        );
    }
}
