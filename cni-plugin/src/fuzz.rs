//! Property tests ("fuzzing") of everything that reads untrusted input:
//! the network config and the prevResult a runtime or earlier plugin hands
//! us. Inputs: arbitrary bytes, arbitrary JSON, and mutations of the seed
//! corpus in `fuzz-corpus/`. The invariant: no panic, and every refusal is
//! a spec error with a documented code.
use std::path::Path;

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::{
    check,
    config::{Env, NetConf},
    result::AddResult,
};

const CONFIG_ERROR_CODES: [u32; 3] = [1, 6, 7];

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Feeds one input through every reader; panics are the bugs we look for.
fn exercise(bytes: &[u8]) {
    match NetConf::parse(bytes) {
        Ok(conf) => {
            let env = Env {
                container_id: "fuzz".into(),
                netns: Some("/run/netns/fuzz".into()),
                ifname: "eth0".into(),
                cni_path: None,
                cni_args: None,
            };
            if let Some(prev) = &conf.prev_result {
                let _ = check::expected(prev, &env);
                let ours = AddResult {
                    interfaces: vec![],
                    ip: [10, 0, 0, 1].into(),
                    ip_interface: 0,
                    gateway: [169, 254, 1, 1].into(),
                    default_route: true,
                };
                let merged = ours.to_json_after(&conf.cni_version, Some(prev));
                assert_eq!(merged["cniVersion"], conf.cni_version.as_str());
            }
            let _ = conf.ipam_type();
        }
        Err(e) => {
            assert!(
                CONFIG_ERROR_CODES.contains(&e.code),
                "undocumented code {} for {:?}",
                e.code,
                String::from_utf8_lossy(bytes)
            );
            assert!(!e.msg.is_empty());
            let _: Value =
                serde_json::from_str(&e.to_json("1.1.0")).expect("error objects are JSON");
        }
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "[a-z0-9./:-]{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "1.1.0",
            "1.0.0",
            "0.4.0",
            "0.3.1",
            "0.3.0",
            "eth0",
            "10.1.2.3/24",
            "beeline"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "cniVersion",
                    "name",
                    "type",
                    "mtu",
                    "ipam",
                    "prevResult",
                    "interfaces",
                    "ips",
                    "address",
                    "interface",
                    "sandbox",
                    "mac",
                    "routes",
                    "dns",
                    "agentSocket",
                    "dataDir",
                    "logLevel",
                    "cni.dev/valid-attachments",
                    "containerID",
                    "ifname",
                ])
                .prop_map(String::from),
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn the_seed_corpus_parses_without_panicking() {
    let seeds = corpus();
    assert!(seeds.len() >= 5, "the corpus went missing");
    for seed in seeds {
        exercise(&seed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&bytes);
    }

    #[test]
    fn arbitrary_json(value in arb_json()) {
        exercise(value.to_string().as_bytes());
    }

    /// A valid config with an arbitrary prevResult and extra fields.
    #[test]
    fn arbitrary_prev_result(prev in arb_json(), extra in arb_json(), version in prop::sample::select(crate::config::SUPPORTED_VERSIONS.to_vec())) {
        let mut conf = json!({"cniVersion": version, "name": "fuzz", "type": "beeline", "prevResult": prev});
        if let Value::Object(m) = extra {
            for (k, v) in m {
                conf[k] = v;
            }
        }
        exercise(conf.to_string().as_bytes());
    }

    /// Seeds with a byte flipped, truncated or duplicated.
    #[test]
    fn mutated_seeds(index in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), byte in any::<u8>(), op in 0u8..3) {
        let seeds = corpus();
        let mut input = seeds[index.index(seeds.len())].clone();
        let pos = at.index(input.len().max(1));
        match op {
            0 if !input.is_empty() => {
                let last = input.len() - 1;
                input[pos.min(last)] = byte;
            }
            1 => input.truncate(pos),
            _ => { let tail = input[pos.min(input.len())..].to_vec(); input.extend(tail); }
        }
        exercise(&input);
    }
}
