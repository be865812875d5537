//! The CRI client: the calls the kubelet makes, with kubelet-like configs.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    security_profile::ProfileType, *,
};
use serde_json::Value;
use tonic::{Status, transport::Channel};

use super::IMAGE;

/// Per-request deadline on the gRPC channel: keep `exec_sync` timeouts below.
const RPC_TIMEOUT: Duration = Duration::from_secs(120);

/// The runtime's conditions, as the kubelet reads them from `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeStatus {
    pub runtime_ready: bool,
    /// The `NetworkReady` condition: false until a CNI config loads.
    pub network_ready: bool,
    pub network_reason: String,
    pub network_message: String,
}

/// `PodSandboxStatus`, with what the verbose info adds.
#[derive(Clone, Debug)]
pub struct SandboxStatus {
    pub state: PodSandboxState,
    /// The pod IP CNI returned ("" when it has none, or once stopped).
    pub ip: String,
    pub additional_ips: Vec<String>,
    /// The pod's netns, /var/run/netns/cni-*. Mounted in containerd's mount
    /// namespace only: elsewhere it is an empty file (there while the pod
    /// runs, removed on stop), not something `setns` or `ip netns exec`
    /// can enter; use [`SandboxStatus::netns_proc_path`] (or run commands
    /// in a container with `exec_sync`).
    pub netns: Option<PathBuf>,
    /// The sandbox (pause) process, while it runs.
    pub pid: Option<u32>,
}

impl SandboxStatus {
    /// `/proc/<pid>/ns/net` of the sandbox: the pod's netns, reachable from
    /// any mount namespace.
    pub fn netns_proc_path(&self) -> Option<PathBuf> {
        self.pid.map(|p| PathBuf::from(format!("/proc/{p}/ns/net")))
    }
}

#[derive(Default)]
pub(super) struct Known {
    /// Configs of the sandboxes run through this client (CreateContainer
    /// needs the sandbox's config again, as the kubelet sends it).
    sandboxes: HashMap<String, PodSandboxConfig>,
    pub(super) netns: Vec<PathBuf>,
}

/// A CRI client speaking to one containerd, making the calls the kubelet
/// makes, with kubelet-like configs.
#[derive(Clone)]
pub struct Cri {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
    pub(super) known: Arc<Mutex<Known>>,
    log_root: PathBuf,
    cgroup_root: String,
}

impl Cri {
    /// A lazily connecting client over the Unix socket (call within a
    /// tokio runtime: the channel's worker is spawned on it).
    pub(super) fn connect(socket: &Path, log_root: PathBuf, cgroup_root: String) -> Cri {
        let socket = socket.to_path_buf();
        let connector = tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        // The URI is required but unused: the connector dials the socket.
        let channel = tonic::transport::Endpoint::from_static("http://[::1]:50051")
            .connect_timeout(Duration::from_secs(5))
            .timeout(RPC_TIMEOUT)
            .connect_with_connector_lazy(connector);
        Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            known: Arc::default(),
            log_root,
            cgroup_root,
        }
    }

    /// `Status`: whether the runtime and its network (CNI) are ready.
    pub async fn status(&self) -> Result<RuntimeStatus, Status> {
        let resp = self
            .runtime
            .clone()
            .status(StatusRequest { verbose: false })
            .await?
            .into_inner();
        let conditions = resp.status.map(|s| s.conditions).unwrap_or_default();
        let find = |t: &str| conditions.iter().find(|c| c.r#type == t);
        let network = find("NetworkReady");
        Ok(RuntimeStatus {
            runtime_ready: find("RuntimeReady").is_some_and(|c| c.status),
            network_ready: network.is_some_and(|c| c.status),
            network_reason: network.map(|c| c.reason.clone()).unwrap_or_default(),
            network_message: network.map(|c| c.message.clone()).unwrap_or_default(),
        })
    }

    /// Whether the image service has `image` (`ImageStatus`).
    pub async fn image_present(&self, image: &str) -> Result<bool, Status> {
        let resp = self
            .images
            .clone()
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(resp.image.is_some())
    }

    /// The sandbox config the kubelet would send for a pod with no special
    /// settings (BestEffort, default security context, pod networking).
    pub fn pod_sandbox_config(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        port_mappings: &[(u16, u16, Protocol)],
    ) -> PodSandboxConfig {
        let labels = HashMap::from([
            ("io.kubernetes.pod.name".to_string(), name.to_string()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                namespace.to_string(),
            ),
            ("io.kubernetes.pod.uid".to_string(), uid.to_string()),
        ]);
        let annotations = HashMap::from([
            ("kubernetes.io/config.source".to_string(), "api".to_string()),
            (
                "kubernetes.io/config.seen".to_string(),
                "2024-01-01T00:00:00Z".to_string(),
            ),
        ]);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: uid.to_string(),
                namespace: namespace.to_string(),
                attempt: 0,
            }),
            // The kubelet uses the pod name (cut to 63 characters).
            hostname: name.chars().take(63).collect(),
            // /var/log/pods/<namespace>_<name>_<uid> on a real node.
            log_directory: self
                .log_root
                .join(format!("{namespace}_{name}_{uid}"))
                .to_string_lossy()
                .into_owned(),
            dns_config: None,
            port_mappings: port_mappings
                .iter()
                .map(|&(container_port, host_port, protocol)| PortMapping {
                    protocol: protocol as i32,
                    container_port: container_port.into(),
                    host_port: host_port.into(),
                    host_ip: String::new(),
                })
                .collect(),
            labels,
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                // cgroupfs driver: /kubepods/besteffort/pod<uid> on a node.
                cgroup_parent: format!("{}/pod{uid}", self.cgroup_root),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    // The kubelet's default without a seccomp profile.
                    seccomp: Some(unconfined()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            windows: None,
        }
    }

    /// `RunPodSandbox` with [`Cri::pod_sandbox_config`]'s config: the pod's
    /// netns is made and CNI ADD run. `port_mappings` are
    /// (container port, host port, protocol), i.e. hostPorts.
    pub async fn run_pod_sandbox(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        port_mappings: &[(u16, u16, Protocol)],
    ) -> Result<String, Status> {
        self.run_pod_sandbox_with(self.pod_sandbox_config(name, namespace, uid, port_mappings))
            .await
    }

    /// `RunPodSandbox` with a config of the caller's.
    pub async fn run_pod_sandbox_with(&self, config: PodSandboxConfig) -> Result<String, Status> {
        // The kubelet makes the pod's log directory before RunPodSandbox.
        std::fs::create_dir_all(&config.log_directory)
            .map_err(|e| Status::internal(format!("log dir: {e}")))?;
        let id = self
            .runtime
            .clone()
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        self.known
            .lock()
            .unwrap()
            .sandboxes
            .insert(id.clone(), config);
        // Remember its netns, to make sure it is gone at the end.
        if let Ok(status) = self.pod_sandbox_status(&id).await
            && let Some(ns) = status.netns
        {
            let mut known = self.known.lock().unwrap();
            if !known.netns.contains(&ns) {
                known.netns.push(ns);
            }
        }
        Ok(id)
    }

    /// `PodSandboxStatus` (verbose, for the netns and pid).
    pub async fn pod_sandbox_status(&self, id: &str) -> Result<SandboxStatus, Status> {
        let resp = self
            .runtime
            .clone()
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            })
            .await?
            .into_inner();
        let status = resp
            .status
            .ok_or_else(|| Status::internal("no status in PodSandboxStatus"))?;
        let network = status.network.unwrap_or_default();
        // containerd's verbose info: {"pid": …, "runtimeSpec": {"linux":
        // {"namespaces": [{"type": "network", "path": …}]}}, …}
        let info: Value = resp
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or(Value::Null);
        let pid = info["pid"].as_u64().filter(|&p| p > 0).map(|p| p as u32);
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|nss| {
                nss.iter()
                    .find(|n| n["type"] == "network")
                    .and_then(|n| n["path"].as_str())
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
            });
        Ok(SandboxStatus {
            state: PodSandboxState::try_from(status.state)
                .unwrap_or(PodSandboxState::SandboxNotready),
            ip: network.ip,
            additional_ips: network.additional_ips.into_iter().map(|i| i.ip).collect(),
            netns,
            pid,
        })
    }

    /// `ListPodSandbox` (all of them, any state).
    pub async fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>, Status> {
        Ok(self
            .runtime
            .clone()
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items)
    }

    /// `StopPodSandbox`: kills its containers (no grace period), runs CNI
    /// DEL and removes the netns. Idempotent, and the kubelet does call it
    /// again. containerd 1.6 runs CNI DEL every time: the first with
    /// CNI_NETNS, a second stop (and the remove) with an empty CNI_NETNS.
    pub async fn stop_pod_sandbox(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// `RemovePodSandbox` (containerd 1.6 runs CNI DEL once more, with no
    /// CNI_NETNS; the kubelet's GC removes sandboxes this way, and nothing
    /// ever runs CNI GC).
    pub async fn remove_pod_sandbox(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_string(),
            })
            .await?;
        self.known.lock().unwrap().sandboxes.remove(id);
        Ok(())
    }

    /// `CreateContainer` in a sandbox run through this client, with the
    /// kubelet's config for a BestEffort container running `cmd` from
    /// [`IMAGE`] (as `command`, no `args`).
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        name: &str,
        cmd: &[&str],
    ) -> Result<String, Status> {
        let sandbox = self
            .known
            .lock()
            .unwrap()
            .sandboxes
            .get(sandbox_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("sandbox {sandbox_id} not run here")))?;
        let pod = sandbox.metadata.clone().unwrap_or_default();
        // The kubelet makes <log dir>/<container>/ and logs to
        // <container>/<restart count>.log in it.
        std::fs::create_dir_all(Path::new(&sandbox.log_directory).join(name))
            .map_err(|e| Status::internal(format!("log dir: {e}")))?;
        let labels = HashMap::from([
            ("io.kubernetes.container.name".to_string(), name.to_string()),
            ("io.kubernetes.pod.name".to_string(), pod.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                pod.namespace.clone(),
            ),
            ("io.kubernetes.pod.uid".to_string(), pod.uid.clone()),
        ]);
        let annotations = HashMap::from([
            (
                "io.kubernetes.container.restartCount".to_string(),
                "0".to_string(),
            ),
            (
                "io.kubernetes.container.terminationMessagePath".to_string(),
                "/dev/termination-log".to_string(),
            ),
            (
                "io.kubernetes.container.terminationMessagePolicy".to_string(),
                "File".to_string(),
            ),
            (
                "io.kubernetes.pod.terminationGracePeriod".to_string(),
                "30".to_string(),
            ),
        ]);
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.to_string(),
                user_specified_image: IMAGE.to_string(),
                ..Default::default()
            }),
            command: cmd.iter().map(|s| s.to_string()).collect(),
            labels,
            annotations,
            log_path: format!("{name}/0.log"),
            linux: Some(LinuxContainerConfig {
                // BestEffort: minimal shares, first to be OOM-killed.
                resources: Some(LinuxContainerResources {
                    cpu_period: 100_000,
                    cpu_shares: 2,
                    oom_score_adj: 1000,
                    ..Default::default()
                }),
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    seccomp: Some(unconfined()),
                    masked_paths: [
                        "/proc/asound",
                        "/proc/acpi",
                        "/proc/kcore",
                        "/proc/keys",
                        "/proc/latency_stats",
                        "/proc/timer_list",
                        "/proc/timer_stats",
                        "/proc/sched_debug",
                        "/proc/scsi",
                        "/sys/firmware",
                    ]
                    .map(String::from)
                    .to_vec(),
                    readonly_paths: [
                        "/proc/bus",
                        "/proc/fs",
                        "/proc/irq",
                        "/proc/sys",
                        "/proc/sysrq-trigger",
                    ]
                    .map(String::from)
                    .to_vec(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        Ok(self
            .runtime
            .clone()
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox),
            })
            .await?
            .into_inner()
            .container_id)
    }

    /// `StartContainer`.
    pub async fn start_container(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .start_container(StartContainerRequest {
                container_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// `StopContainer`: SIGTERM, SIGKILL after `timeout`.
    pub async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), Status> {
        self.runtime
            .clone()
            .stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout: timeout.as_secs() as i64,
            })
            .await?;
        Ok(())
    }

    /// `RemoveContainer`.
    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        self.runtime
            .clone()
            .remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// `ExecSync`: runs `cmd` in the container, killed after `timeout`
    /// (whole seconds, at least 1; keep it under two minutes). Returns
    /// (exit code, stdout, stderr). Debian's busybox `wget` crashes on
    /// `-T`: let this timeout bound it instead.
    pub async fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String, String), Status> {
        let resp = self
            .runtime
            .clone()
            .exec_sync(ExecSyncRequest {
                container_id: container_id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout.as_secs().max(1) as i64,
            })
            .await?
            .into_inner();
        Ok((
            resp.exit_code,
            String::from_utf8_lossy(&resp.stdout).into_owned(),
            String::from_utf8_lossy(&resp.stderr).into_owned(),
        ))
    }
}

/// Network and IPC shared by the pod, PID per container: the kubelet's
/// defaults (no hostNetwork, no shareProcessNamespace).
fn pod_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn unconfined() -> SecurityProfile {
    SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    }
}
