//! The ADD result in each supported version's format.
use std::net::Ipv4Addr;

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for interfaces inside the container.
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    /// Address (as a /32) and the index of its interface in `interfaces`.
    pub ip: Ipv4Addr,
    pub ip_interface: usize,
    pub gateway: Ipv4Addr,
    /// The pod's default route goes through this interface.
    pub default_route: bool,
}

impl AddResult {
    /// The result when chained after other plugins: theirs (`prevResult`),
    /// with our interfaces, address and route appended.
    pub fn to_json_after(&self, cni_version: &str, prev: Option<&Value>) -> Value {
        let mut ours = self.to_json(cni_version);
        let Some(prev) = prev.filter(|p| p.is_object()) else {
            return ours;
        };
        let mut merged = prev.clone();
        merged["cniVersion"] = json!(cni_version);
        let offset = prev["interfaces"].as_array().map_or(0, Vec::len);
        for ip in ours["ips"].as_array_mut().into_iter().flatten() {
            ip["interface"] = json!(ip["interface"].as_u64().unwrap_or(0) as usize + offset);
        }
        for key in ["interfaces", "ips", "routes"] {
            let mut list = prev[key].as_array().cloned().unwrap_or_default();
            list.extend(ours[key].as_array().cloned().unwrap_or_default());
            merged[key] = json!(list);
        }
        if merged.get("dns").is_none() {
            merged["dns"] = ours["dns"].take();
        }
        merged
    }

    /// Serializes for `cni_version`: 0.3.x and 0.4.0 carry `"version": "4"`
    /// on every IP, 1.x dropped it.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = json!({ "name": i.name, "mac": i.mac });
                if let Some(sandbox) = &i.sandbox {
                    v["sandbox"] = json!(sandbox);
                }
                v
            })
            .collect();
        let mut ip = json!({
            "address": format!("{}/32", self.ip),
            "gateway": self.gateway.to_string(),
            "interface": self.ip_interface,
        });
        if cni_version.starts_with("0.") {
            ip["version"] = json!("4");
        }
        json!({
            "cniVersion": cni_version,
            "interfaces": interfaces,
            "ips": [ip],
            "routes": if self.default_route {
                json!([{ "dst": "0.0.0.0/0", "gw": self.gateway.to_string() }])
            } else {
                json!([])
            },
            "dns": {},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "bl0123456789abc".into(),
                    mac: "02:00:00:00:00:01".into(),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ip: Ipv4Addr::new(10, 244, 0, 5),
            ip_interface: 1,
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            default_route: true,
        }
    }

    #[test]
    fn a_chained_result_keeps_the_previous_one() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "dummy0", "mac": "02:00:00:00:00:09"}],
            "ips": [{"address": "192.0.2.5/24", "interface": 0}],
            "routes": [{"dst": "198.51.100.0/24"}],
            "dns": {"nameservers": ["192.0.2.53"]},
        });
        let json = sample().to_json_after("1.0.0", Some(&prev));
        assert_eq!(json["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(json["interfaces"][0]["name"], "dummy0");
        assert_eq!(json["ips"][0]["address"], "192.0.2.5/24");
        assert_eq!(json["ips"][1]["address"], "10.244.0.5/32");
        assert_eq!(
            json["ips"][1]["interface"], 2,
            "index shifted past the previous interfaces"
        );
        assert_eq!(json["routes"].as_array().unwrap().len(), 2);
        assert_eq!(json["dns"]["nameservers"][0], "192.0.2.53");
        assert_eq!(
            sample().to_json_after("1.0.0", None),
            sample().to_json("1.0.0")
        );
    }

    #[test]
    fn result_format_follows_the_version() {
        for v in crate::config::SUPPORTED_VERSIONS {
            let json = sample().to_json(v);
            assert_eq!(json["cniVersion"], v);
            assert_eq!(json["ips"][0]["address"], "10.244.0.5/32");
            assert_eq!(json["ips"][0]["interface"], 1);
            assert_eq!(json["interfaces"][1]["sandbox"], "/run/netns/p");
            assert!(json["interfaces"][0].get("sandbox").is_none());
            assert_eq!(json["routes"][0]["gw"], "169.254.1.1");
            let has_version = json["ips"][0].get("version").is_some();
            assert_eq!(has_version, v.starts_with("0."), "version {v}");
        }
    }
}
