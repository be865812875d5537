//! The Kubernetes deployment in `deploy/` (what `kubectl apply -k deploy/`
//! creates), checked against the agent itself, without a cluster:
//!
//! - every resource the kustomization lists parses as its Kubernetes type, with
//!   no field the type does not know (a misspelled or misplaced field fails);
//! - the DaemonSet's args, with `$(VAR)` expanded the way the kubelet does,
//!   parse with the agent's own command line;
//! - every path the agent uses is on a writable hostPath mount, at the host
//!   path the node (CNI binary, container runtime, bpftool) expects;
//! - the probes reach the health server the args configure;
//! - RBAC grants the agent's service account watches on Nodes, Services and
//!   EndpointSlices and nothing more;
//! - the DaemonSet runs on every node, in the host network namespace;
//! - the image (`deploy/Containerfile`) ships what the DaemonSet runs.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use beeline_agent::cli::{Cli, Command, RunArgs};
use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, ServiceAccount, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// What `fieldRef: spec.nodeName` stands for in the expanded args.
const NODE_NAME: &str = "node-x";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[derive(Default)]
struct Manifests {
    /// The kustomization's `namespace:`.
    namespace: Option<String>,
    /// The kustomization's `images[].name`.
    image_names: Vec<String>,
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

/// Reads every resource file of deploy/kustomization.yaml into its type.
fn load() -> Manifests {
    let kustomization: Value =
        serde_yaml_ng::from_str(&read(&deploy_dir().join("kustomization.yaml")))
            .expect("deploy/kustomization.yaml is YAML");
    let mut m = Manifests {
        namespace: kustomization["namespace"].as_str().map(str::to_owned),
        image_names: kustomization["images"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i["name"].as_str().expect("images[].name").to_owned())
            .collect(),
        ..Manifests::default()
    };
    let resources = kustomization["resources"]
        .as_array()
        .expect("deploy/kustomization.yaml lists resources");
    assert!(
        !resources.is_empty(),
        "the kustomization lists no resources"
    );
    for resource in resources {
        let name = resource.as_str().expect("resources[] are paths");
        let path = deploy_dir().join(name);
        assert!(
            path.is_file(),
            "deploy/kustomization.yaml lists {name}, which is not a file in deploy/"
        );
        let text = read(&path);
        for (index, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let doc = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{name}: document {index} is not YAML: {e}"));
            if doc.is_null() {
                continue; // an empty document (a stray `---`)
            }
            let at = format!("{name} (document {index})");
            let kind = doc["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{at} has no kind"));
            let namespace = doc["metadata"]["namespace"].as_str();
            match kind {
                "Namespace" | "ClusterRole" | "ClusterRoleBinding" => {
                    assert_eq!(namespace, None, "{at}: a {kind} is not namespaced");
                }
                _ => assert_eq!(
                    namespace,
                    m.namespace.as_deref(),
                    "{at}: the {kind} must be in the kustomization's namespace"
                ),
            }
            match kind {
                "Namespace" => m.namespaces.push(typed(&at, doc)),
                "ServiceAccount" => m.service_accounts.push(typed(&at, doc)),
                "ClusterRole" => m.cluster_roles.push(typed(&at, doc)),
                "ClusterRoleBinding" => m.cluster_role_bindings.push(typed(&at, doc)),
                "ConfigMap" => m.config_maps.push(typed(&at, doc)),
                "DaemonSet" => m.daemon_sets.push(typed(&at, doc)),
                other => panic!("{at}: unexpected kind {other}: teach this test about it"),
            }
        }
    }
    m
}

/// Deserializes `doc` as `T` (which checks apiVersion and kind) and makes sure
/// serializing it back gives `doc` again: k8s-openapi skips unknown fields, so
/// this is what catches a misspelled or misplaced one.
fn typed<T: DeserializeOwned + Serialize>(at: &str, doc: Value) -> T {
    let object: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{at}: not a valid {}: {e}", std::any::type_name::<T>()));
    let back = serde_json::to_value(&object).unwrap();
    if let Some(difference) = first_difference(&doc, &back, "") {
        panic!("{at}: {difference}");
    }
    object
}

fn first_difference(written: &Value, typed: &Value, path: &str) -> Option<String> {
    match (written, typed) {
        (Value::Object(w), Value::Object(t)) => {
            for (key, value) in w {
                let here = format!("{path}.{key}");
                match t.get(key) {
                    None => {
                        return Some(format!(
                            "{here} is not a field of this Kubernetes type (misspelled or misplaced?)"
                        ));
                    }
                    Some(typed) => {
                        if let Some(d) = first_difference(value, typed, &here) {
                            return Some(d);
                        }
                    }
                }
            }
            t.keys()
                .find(|k| !w.contains_key(*k))
                .map(|k| format!("{path}.{k} appeared when re-serializing"))
        }
        (Value::Array(w), Value::Array(t)) if w.len() == t.len() => w
            .iter()
            .zip(t)
            .enumerate()
            .find_map(|(i, (w, t))| first_difference(w, t, &format!("{path}[{i}]"))),
        (w, t) if w == t => None,
        (w, t) => Some(format!("{path} is {w} but reads back as {t} (wrong type?)")),
    }
}

fn the<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what}");
    &items[0]
}

impl Manifests {
    fn daemon_set(&self) -> &DaemonSet {
        the(&self.daemon_sets, "DaemonSet")
    }

    fn pod(&self) -> &PodSpec {
        self.daemon_set()
            .spec
            .template
            .spec
            .as_ref()
            .expect("the DaemonSet has a pod template spec")
    }

    /// The agent container (the one running `beeline-agent`).
    fn agent(&self) -> &Container {
        let agents: Vec<&Container> = self
            .pod()
            .containers
            .iter()
            .filter(|c| {
                c.command
                    .as_ref()
                    .and_then(|c| c.first())
                    .is_some_and(|c| c.ends_with("/beeline-agent"))
            })
            .collect();
        assert_eq!(
            agents.len(),
            1,
            "expected one container whose command is beeline-agent"
        );
        agents[0]
    }

    fn config_map(&self, name: &str) -> &ConfigMap {
        self.config_maps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("the env refers to ConfigMap {name}, which is not deployed"))
    }

    /// The agent container's env as the kubelet would set it.
    fn env(&self) -> BTreeMap<String, String> {
        let container = self.agent();
        assert!(
            container.env_from.is_none(),
            "envFrom is not supported by this test"
        );
        let mut env = BTreeMap::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(value), None) => expand(value, &env),
                (None, None) => String::new(),
                (None, Some(source)) => {
                    if let Some(field) = &source.field_ref {
                        match field.field_path.as_str() {
                            "spec.nodeName" => NODE_NAME.to_owned(),
                            "metadata.name" => "beeline-agent-xxxxx".to_owned(),
                            "metadata.namespace" => self.namespace.clone().unwrap_or_default(),
                            "status.hostIP" | "status.podIP" => "192.0.2.1".to_owned(),
                            other => panic!("env {}: unexpected fieldRef {other}", var.name),
                        }
                    } else if let Some(key_ref) = &source.config_map_key_ref {
                        self.config_map(&key_ref.name)
                            .data
                            .as_ref()
                            .and_then(|d| d.get(&key_ref.key))
                            .unwrap_or_else(|| {
                                panic!(
                                    "env {}: ConfigMap {} has no key {}",
                                    var.name, key_ref.name, key_ref.key
                                )
                            })
                            .clone()
                    } else {
                        panic!("env {}: unsupported valueFrom", var.name)
                    }
                }
                (Some(_), Some(_)) => panic!("env {}: both value and valueFrom", var.name),
            };
            env.insert(var.name.clone(), value);
        }
        env
    }

    /// The agent container's args, expanded and parsed by the agent's CLI.
    fn run_args(&self) -> RunArgs {
        let env = self.env();
        let args: Vec<String> = self
            .agent()
            .args
            .iter()
            .flatten()
            .map(|a| expand(a, &env))
            .collect();
        let cli = Cli::try_parse_from(std::iter::once("beeline-agent".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("the DaemonSet's args do not parse:\n{e}"));
        match cli.command {
            Command::Run(run) => *run,
            _ => panic!("the DaemonSet must run `beeline-agent run`"),
        }
    }

    /// The volume mount `path` is on (the deepest one) and the host path it
    /// is at. Fails unless that mount is a writable hostPath.
    fn host_path(&self, path: &Path) -> (&VolumeMount, PathBuf) {
        let mount = self
            .agent()
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| Path::new(&m.mount_path).components().count())
            .unwrap_or_else(|| panic!("{} is on no volume mount", path.display()));
        assert!(
            mount.sub_path.is_none() && mount.sub_path_expr.is_none(),
            "subPath mounts are not supported by this test"
        );
        assert_ne!(
            mount.read_only,
            Some(true),
            "{}: the agent writes there, mount {} must not be read-only",
            path.display(),
            mount.name
        );
        let volume = self
            .pod()
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("volume mount {} has no volume", mount.name));
        let host = volume.host_path.as_ref().unwrap_or_else(|| {
            panic!(
                "{} is on volume {}, which is not a hostPath: it would not outlive the pod \
                 or be seen by the node",
                path.display(),
                volume.name
            )
        });
        let rest = path.strip_prefix(&mount.mount_path).unwrap();
        (mount, Path::new(&host.path).join(rest))
    }
}

/// Expands `$(VAR)` references like the kubelet (`$$` is a literal `$`), but
/// fails on a reference the env does not define, which the kubelet would pass
/// on verbatim.
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
        } else if let Some(after) = after.strip_prefix('(') {
            let end = after
                .find(')')
                .unwrap_or_else(|| panic!("unterminated $( in {s:?}"));
            let name = &after[..end];
            let value = env.get(name).unwrap_or_else(|| {
                panic!("{s:?} refers to $({name}), which the container's env does not define")
            });
            out.push_str(value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn every_resource_parses_as_its_kubernetes_type() {
    let m = load();
    let namespace = m
        .namespace
        .as_deref()
        .expect("the kustomization sets a namespace");
    assert!(
        m.namespaces
            .iter()
            .any(|n| n.metadata.name.as_deref() == Some(namespace)),
        "namespace {namespace} is not created by the kustomization"
    );
    the(&m.service_accounts, "ServiceAccount");
    the(&m.cluster_roles, "ClusterRole");
    the(&m.cluster_role_bindings, "ClusterRoleBinding");
    the(&m.config_maps, "ConfigMap");
    m.daemon_set();
}

#[test]
fn daemonset_args_parse_with_the_agents_command_line() {
    let m = load();
    let args = m.run_args();
    assert_eq!(
        args.node_name, NODE_NAME,
        "--node-name must come from the pod's spec.nodeName"
    );
    assert!(
        args.nodes_file.is_none() && args.kubeconfig.is_none(),
        "in a cluster the agent watches Nodes with its service account (in-cluster config)"
    );
    let image = m.agent().image.as_deref().expect("the agent has an image");
    let image_name = image.split('@').next().unwrap();
    let image_name = match image_name.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => name,
        _ => image_name,
    };
    assert!(
        m.image_names.iter().any(|n| n == image_name),
        "image {image_name} has no `images:` entry in the kustomization to override it"
    );
}

#[test]
fn every_path_the_agent_uses_is_on_a_host_path_mount() {
    let m = load();
    let args = m.run_args();

    // bpffs: pins must land on the node's bpffs, where they outlive the agent
    // and `bpftool ... pinned /sys/fs/bpf/...` finds them.
    let (bpffs, host) = m.host_path(Path::new("/sys/fs/bpf"));
    assert_eq!(
        bpffs.mount_path, "/sys/fs/bpf",
        "/sys/fs/bpf is not mounted"
    );
    assert_eq!(
        host,
        Path::new("/sys/fs/bpf"),
        "the bpffs volume is the node's /sys/fs/bpf"
    );
    let (_, host) = m.host_path(&args.bpffs_dir);
    assert!(
        host.starts_with("/sys/fs/bpf"),
        "--bpffs-dir is at {} on the node, not on its bpffs",
        host.display()
    );
    m.host_path(&args.state_dir);

    // The CNI binary on the node dials the socket path written in the
    // conflist, so it must be the same path inside and outside the pod.
    let socket_dir = args.socket.parent().expect("--socket has a directory");
    let (_, host) = m.host_path(socket_dir);
    assert_eq!(
        host, socket_dir,
        "the socket must be at the same path on the node as in the pod"
    );

    // The container runtime's defaults (containerd and CRI-O).
    let bin = args.cni_bin_dir.as_ref().expect("--cni-bin-dir is set");
    assert_eq!(
        m.host_path(bin).1,
        Path::new("/opt/cni/bin"),
        "--cni-bin-dir on the node"
    );
    let conf = args.cni_conf_dir.as_ref().expect("--cni-conf-dir is set");
    assert_eq!(
        m.host_path(conf).1,
        Path::new("/etc/cni/net.d"),
        "--cni-conf-dir on the node"
    );

    // The CNI binary's IP store (its default dataDir) and the runtimes' pod
    // netns: the agent releases addresses of pods that are gone, at the
    // paths the CNI binary recorded on the node.
    let ipam = args
        .ipam_data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/lib/cni/beeline"));
    assert_eq!(m.host_path(&ipam).1, ipam, "the IP store on the node");
    let (netns, host) = m.host_path(Path::new("/run/netns"));
    assert_eq!(host, Path::new("/run/netns"), "pod netns on the node");
    assert_eq!(
        netns.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "netns created after the agent started must be visible to it"
    );

    // The Service socket programs attach to the node's cgroup2 root.
    let cgroup = args.cgroup_root.as_ref().expect("--cgroup-root is set");
    assert_eq!(
        m.host_path(cgroup).1,
        Path::new("/sys/fs/cgroup"),
        "--cgroup-root on the node"
    );

    // The kubelet refuses Bidirectional propagation to unprivileged containers.
    let privileged = m
        .agent()
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false);
    for mount in m.agent().volume_mounts.iter().flatten() {
        if mount.mount_propagation.as_deref() == Some("Bidirectional") {
            assert!(
                privileged,
                "mount {} is Bidirectional: the container must be privileged",
                mount.name
            );
        }
    }
}

#[test]
fn the_agent_has_the_privileges_it_needs() {
    let m = load();
    let security = m
        .agent()
        .security_context
        .as_ref()
        .expect("the agent has a securityContext");
    if security.privileged == Some(true) {
        return;
    }
    let added: Vec<&str> = security
        .capabilities
        .as_ref()
        .and_then(|c| c.add.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    for needed in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"] {
        assert!(
            added.contains(&needed),
            "not privileged, so it needs capability {needed}"
        );
    }
}

#[test]
fn probes_reach_the_health_server() {
    let m = load();
    let args = m.run_args();
    let agent = m.agent();
    let check = |what: &str, probe: Option<&Probe>, path: &str| {
        let probe = probe.unwrap_or_else(|| panic!("the agent has no {what}"));
        let get = probe
            .http_get
            .as_ref()
            .unwrap_or_else(|| panic!("the {what} is not an httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{what} path");
        let port = match &get.port {
            IntOrString::Int(port) => *port,
            IntOrString::String(name) => {
                agent
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name))
                    .unwrap_or_else(|| panic!("{what}: no container port named {name}"))
                    .container_port
            }
        };
        assert_eq!(
            port,
            i32::from(args.health_addr.port()),
            "{what} port vs --health-addr"
        );
        // Without `host` the kubelet dials the pod IP (the node's IP with
        // hostNetwork), which a loopback listener does not answer.
        if !args.health_addr.ip().is_unspecified() {
            assert_eq!(
                get.host.as_deref().map(|h| h.parse().ok()),
                Some(Some(args.health_addr.ip())),
                "{what} host vs --health-addr"
            );
        }
    };
    check("livenessProbe", agent.liveness_probe.as_ref(), "/healthz");
    check("readinessProbe", agent.readiness_probe.as_ref(), "/readyz");
    if agent.startup_probe.is_some() {
        check("startupProbe", agent.startup_probe.as_ref(), "/healthz");
    }
}

#[test]
fn rbac_grants_the_agent_watches_on_nodes_services_and_endpointslices_and_nothing_more() {
    let m = load();
    let role = the(&m.cluster_roles, "ClusterRole");
    assert!(role.aggregation_rule.is_none(), "no aggregated ClusterRole");
    let rules = role.rules.as_deref().unwrap_or_default();
    let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
    for rule in rules {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert!(
            verbs
                .iter()
                .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
            "a watch only reads: {verbs:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                granted.push((group.clone(), resource.clone(), verbs.clone()));
            }
        }
    }
    granted.sort();
    let want = |g: &str, r: &str, v: &[&str]| {
        (
            g.to_owned(),
            r.to_owned(),
            v.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        granted,
        vec![
            want("", "nodes", &["get", "list", "watch"]),
            want("", "services", &["list", "watch"]),
            want("discovery.k8s.io", "endpointslices", &["list", "watch"]),
        ],
        "Nodes (routes), Services and EndpointSlices (the Service load balancer), nothing else"
    );

    let binding = the(&m.cluster_role_bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());

    let account_name = m
        .pod()
        .service_account_name
        .as_deref()
        .expect("the DaemonSet names its service account");
    let account = the(&m.service_accounts, "ServiceAccount");
    assert_eq!(account.metadata.name.as_deref(), Some(account_name));
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "bound to the agent's service account only"
    );
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, account_name);
    assert_eq!(
        subjects[0].namespace.as_deref(),
        m.daemon_set().metadata.namespace.as_deref(),
        "the binding's subject is in the DaemonSet's namespace"
    );
}

#[test]
fn the_agent_runs_on_every_node_in_the_host_network() {
    let m = load();
    let pod = m.pod();
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "the DaemonSet must tolerate every taint (`- operator: Exists`): nodes are NotReady \
         until the agent runs"
    );
    assert_eq!(
        pod.host_network,
        Some(true),
        "the datapath is the node's netns"
    );
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let spec = &m.daemon_set().spec;
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.as_ref());
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.and_then(|l| l.get(key)),
            Some(value),
            "the selector's {key} is not on the pod template"
        );
    }
}

#[test]
fn the_image_ships_what_the_daemonset_runs() {
    let m = load();
    let args = m.run_args();
    let containerfile = read(&deploy_dir().join("Containerfile"));
    let ignore = read(&repo_root().join(".containerignore"));
    let mut destinations = Vec::new();
    for line in containerfile.lines().map(str::trim) {
        let Some(copy) = line.strip_prefix("COPY ") else {
            continue;
        };
        let words: Vec<&str> = copy
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (destination, sources) = words.split_last().expect("COPY has operands");
        for source in sources {
            assert!(
                ignore.lines().any(|l| l.trim() == format!("!{source}")),
                ".containerignore keeps {source} out of the build context"
            );
        }
        destinations.push(PathBuf::from(destination));
    }
    let program = PathBuf::from(&m.agent().command.as_ref().unwrap()[0]);
    assert!(
        destinations.contains(&program),
        "the image has no {}",
        program.display()
    );
    // `run --cni-bin-dir` installs --cni-binary, by default `beeline` next
    // to the agent.
    if args.cni_bin_dir.is_some() {
        let cni = args
            .cni_binary
            .clone()
            .unwrap_or_else(|| program.with_file_name("beeline"));
        assert!(
            destinations.contains(&cni),
            "the image has no CNI binary at {}",
            cni.display()
        );
    }
}
