//! What a cluster's controllers, kubelets and container runtime do for the fake API server, on
//! the two-node topology: each Deployment of the namespaces it is told to run becomes one Pod on
//! the node its `kubernetes.io/hostname` selector names (a network namespace with a veth to the
//! node and an address of the node's pod /24, a cgroup under the node's cgroup root, the
//! placement annotations `localTopology` agents read, the container's command run inside them,
//! `Running` and `Ready` once it has started), a host-network Deployment's pod a process in the
//! node's own namespace; Deployment status and Services' EndpointSlices follow; a Deployment
//! gone takes its pod, process, namespace and cgroup along. Exec and port-forward reach inside
//! the pods (for the agents' pods, the node). `signet` in a command is the binary under test.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use signet_test_support::api::FakeApi;
use signet_test_support::streams::PodRuntime;

use super::topology::Topology;

#[derive(Debug)]
struct Running {
    pod: String,
    namespace: String,
    node: char,
    /// The pod's own namespace, veth and cgroup (none on the host network).
    netns: Option<String>,
    cgroup: Option<PathBuf>,
    host_if: Option<String>,
    /// The container's process, once started.
    process: Option<Child>,
}

#[derive(Debug, Clone)]
struct NodeAt {
    letter: char,
    netns: String,
    cgroup_root: PathBuf,
    /// Its pods' first three octets.
    pod_net: String,
    address: String,
}

#[derive(Debug, Clone)]
struct Nodes {
    /// By node name.
    nodes: BTreeMap<String, NodeAt>,
    exe: PathBuf,
    n: u32,
}

/// Runs the Deployments of `namespaces` until dropped; then removes everything it made.
pub struct Kubelet {
    nodes: Nodes,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pods: Arc<Mutex<BTreeMap<String, Running>>>,
}

struct Runtime {
    nodes: Nodes,
    pods: Arc<Mutex<BTreeMap<String, Running>>>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `command` with `signet` as the binary under test, started in `netns` and `cgroup` (when
/// given): the cgroup is joined first, then the namespace, then it runs.
fn start_in(
    exe: &std::path::Path,
    command: &[String],
    netns: &str,
    cgroup: Option<&PathBuf>,
    stdin: bool,
) -> std::io::Result<Child> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| std::io::Error::other("an empty command"))?;
    let program = if program == "signet" {
        exe.to_owned()
    } else {
        PathBuf::from(program)
    };
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))?;
    let procs = cgroup
        .map(|c| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
        })
        .transpose()?;
    let (ns_fd, procs_fd) = (ns.as_raw_fd(), procs.as_ref().map(|p| p.as_raw_fd()));
    let mut c = Command::new(program);
    c.args(args)
        .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec this only makes raw system calls (write, setns) on file
    // descriptors opened before the fork, which stay open until the spawn returns.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            if let Some(fd) = procs_fd {
                let n = libc_write(fd, b"0");
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc_setns(ns_fd) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = c.spawn();
    drop((ns, procs));
    child
}

fn libc_write(fd: i32, bytes: &[u8]) -> isize {
    // SAFETY: `bytes` is valid for its length; `fd` is open.
    unsafe { nix::libc::write(fd, bytes.as_ptr().cast(), bytes.len()) }
}

fn libc_setns(fd: i32) -> i32 {
    // SAFETY: `fd` is an open network namespace file.
    unsafe { nix::libc::setns(fd, nix::libc::CLONE_NEWNET) }
}

impl Nodes {
    fn of(&self, pod: &Value) -> Option<&NodeAt> {
        self.nodes.get(pod["spec"]["nodeName"].as_str()?)
    }
}

impl PodRuntime for Runtime {
    fn port_forward(&self, pod: &Value, port: u16) -> std::io::Result<std::net::TcpStream> {
        let key = key(pod);
        let netns = match self.pods.lock().expect("pods").get(&key) {
            Some(r) => r.netns.clone(),
            None => None,
        };
        let netns = match netns {
            Some(n) => n,
            None => self
                .nodes
                .of(pod)
                .map(|n| n.netns.clone())
                .ok_or_else(|| std::io::Error::other("pod on no node"))?,
        };
        signet_test_support::netns::in_netns(&netns, || {
            std::net::TcpStream::connect(("127.0.0.1", port))
        })
    }

    fn exec(&self, pod: &Value, _: Option<&str>, command: &[String]) -> std::io::Result<Child> {
        let key = key(pod);
        let (netns, cgroup) = match self.pods.lock().expect("pods").get(&key) {
            Some(r) => (r.netns.clone(), r.cgroup.clone()),
            None => (None, None),
        };
        let node_ns = self
            .nodes
            .of(pod)
            .map(|n| n.netns.clone())
            .ok_or_else(|| std::io::Error::other("pod on no node"))?;
        start_in(
            &self.nodes.exe,
            command,
            netns.as_deref().unwrap_or(&node_ns),
            cgroup.as_ref(),
            true,
        )
    }
}

fn key(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["metadata"]["namespace"].as_str().unwrap_or_default(),
        pod["metadata"]["name"].as_str().unwrap_or_default()
    )
}

impl Kubelet {
    /// Runs the Deployments in namespaces labelled `signet.dev/connectivity` on `t`'s nodes.
    pub fn start(t: &Topology, api: &FakeApi, exe: PathBuf) -> Self {
        let mut nodes = BTreeMap::new();
        for (letter, net) in [('a', 78), ('b', 79)] {
            nodes.insert(
                format!("node-{letter}"),
                NodeAt {
                    letter,
                    netns: t.ns(&format!("node-{letter}")),
                    cgroup_root: t.cgroup_root(letter),
                    pod_net: format!("10.{net}.{}", t.n),
                    address: t.node_ip(letter),
                },
            );
        }
        let nodes = Nodes { nodes, exe, n: t.n };
        let pods: Arc<Mutex<BTreeMap<String, Running>>> = Arc::default();
        api.pod_runtime(Arc::new(Runtime {
            nodes: nodes.clone(),
            pods: pods.clone(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, pods, api, nodes) = (stop.clone(), pods.clone(), api.clone(), nodes.clone());
            std::thread::spawn(move || {
                let mut next = 10u8;
                while !stop.load(Ordering::SeqCst) {
                    reconcile(&api, &nodes, &pods, &mut next);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        Self {
            nodes,
            stop,
            thread: Some(thread),
            pods,
        }
    }

    /// How many pods it runs now.
    pub fn running(&self) -> usize {
        self.pods.lock().expect("pods").len()
    }
}

fn connectivity_namespaces(api: &FakeApi) -> Vec<String> {
    api.objects("Namespace")
        .into_iter()
        .filter(|n| !n["metadata"]["labels"]["signet.dev/connectivity"].is_null())
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

fn reconcile(api: &FakeApi, nodes: &Nodes, pods: &Mutex<BTreeMap<String, Running>>, next: &mut u8) {
    let namespaces = connectivity_namespaces(api);
    let deployments: Vec<Value> = api
        .objects("Deployment")
        .into_iter()
        .filter(|d| {
            d["metadata"]["namespace"]
                .as_str()
                .is_some_and(|ns| namespaces.iter().any(|n| n == ns))
        })
        .collect();
    // Gone: their pods go.
    let wanted: Vec<String> = deployments
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["metadata"]["namespace"].as_str().unwrap_or_default(),
                d["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let gone: Vec<String> = pods
        .lock()
        .expect("pods")
        .keys()
        .filter(|k| {
            let (ns, pod) = k.split_once('/').unwrap_or_default();
            let deployment = pod.rsplit_once('-').map_or(pod, |(d, _)| d);
            !wanted.contains(&format!("{ns}/{deployment}"))
        })
        .cloned()
        .collect();
    for k in gone {
        if let Some(r) = pods.lock().expect("pods").remove(&k) {
            api.delete("v1", "Pod", &r.namespace, &r.pod);
            remove(r, nodes);
        }
    }
    for d in &deployments {
        let (ns, name) = (
            d["metadata"]["namespace"].as_str().unwrap_or_default(),
            d["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let pod_name = format!("{name}-0");
        let k = format!("{ns}/{pod_name}");
        if pods.lock().expect("pods").contains_key(&k) {
            continue;
        }
        match run_pod(api, nodes, d, ns, &pod_name, next) {
            Ok(r) => {
                pods.lock().expect("pods").insert(k, r);
                let mut d = d.clone();
                d["status"] = json!({"observedGeneration": d["metadata"]["generation"], "replicas": 1,
                    "readyReplicas": 1, "availableReplicas": 1, "updatedReplicas": 1});
                api.put(d);
            }
            Err(e) => eprintln!("kubelet: {ns}/{pod_name}: {e}"),
        }
    }
    // EndpointSlices of the Services in those namespaces.
    for svc in api.objects("Service") {
        let ns = svc["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if !namespaces.contains(&ns) {
            continue;
        }
        let selector = svc["spec"]["selector"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let ready: Vec<Value> = api
            .objects("Pod")
            .into_iter()
            .filter(|p| p["metadata"]["namespace"] == ns.as_str())
            .filter(|p| selector.iter().all(|(k, v)| p["metadata"]["labels"][k] == *v))
            .filter_map(|p| {
                Some(json!({"addresses": [p["status"]["podIP"].as_str()?], "conditions": {"ready": true},
                    "nodeName": p["spec"]["nodeName"]}))
            })
            .collect();
        let ports: Vec<Value> = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| json!({"name": p["name"], "port": p["targetPort"], "protocol": "TCP"}))
            .collect();
        let svc_name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{svc_name}-kubelet"), "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc_name}},
            "addressType": "IPv4", "ports": ports, "endpoints": ready});
        let current = api.get("EndpointSlice", &ns, &format!("{svc_name}-kubelet"));
        if current
            .as_ref()
            .is_none_or(|c| c["endpoints"] != slice["endpoints"])
        {
            api.put(slice);
        }
    }
}

fn run_pod(
    api: &FakeApi,
    nodes: &Nodes,
    d: &Value,
    ns: &str,
    pod_name: &str,
    next: &mut u8,
) -> Result<Running, String> {
    let template = &d["spec"]["template"];
    let spec = &template["spec"];
    let node_name = spec["nodeSelector"]["kubernetes.io/hostname"]
        .as_str()
        .ok_or("no kubernetes.io/hostname selector")?;
    let at = nodes
        .nodes
        .get(node_name)
        .ok_or_else(|| format!("no node {node_name}"))?;
    let command: Vec<String> = spec["containers"][0]["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_owned))
        .collect();
    let host = spec["hostNetwork"] == true;
    let mut r = Running {
        pod: pod_name.into(),
        namespace: ns.into(),
        node: at.letter,
        netns: None,
        cgroup: None,
        host_if: None,
        process: None,
    };
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": ns, "labels": template["metadata"]["labels"]},
        "spec": {"nodeName": node_name, "hostNetwork": host,
                 "serviceAccountName": spec["serviceAccountName"].as_str().unwrap_or("default"),
                 "containers": spec["containers"]}});
    // Whatever was made before a failure is removed with it.
    let pod_ip = match set_up(&mut r, &mut pod, nodes, at, &command, host, next) {
        Ok(ip) => ip,
        Err(e) => {
            remove(r, nodes);
            return Err(e);
        }
    };
    // Ready once the server says so.
    let mut line = String::new();
    if let Some(out) = r.process.as_mut().and_then(|p| p.stdout.take()) {
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
    }
    if line.trim() != "ready" {
        let e = format!("the container did not start: {line:?}");
        remove(r, nodes);
        return Err(e);
    }
    pod["status"] = json!({"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        "conditions": [{"type": "Ready", "status": "True"}]});
    api.put(pod);
    Ok(r)
}

/// The pod's network, cgroup and process: in its own namespace with a veth to the node, or on
/// the node's; its address.
fn set_up(
    r: &mut Running,
    pod: &mut Value,
    nodes: &Nodes,
    at: &NodeAt,
    command: &[String],
    host: bool,
    next: &mut u8,
) -> Result<String, String> {
    if host {
        r.process =
            Some(start_in(&nodes.exe, command, &at.netns, None, false).map_err(|e| e.to_string())?);
        Ok(at.address.clone())
    } else {
        *next += 1;
        let host_number = *next;
        let pod_ip = format!("{}.{host_number}", at.pod_net);
        let netns = format!("sgk{}-{host_number}", nodes.n);
        let host_if = format!("sgk{}v{host_number}", nodes.n);
        ip(&["netns", "add", &netns])?;
        r.netns = Some(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &at.netns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        r.host_if = Some(host_if.clone());
        ip(&["-n", &at.netns, "link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &at.netns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &host_if,
        ])?;
        let out = Command::new("ip")
            .args(["netns", "exec", &at.netns, "sysctl", "-qw"])
            .arg(format!("net.ipv4.conf.{host_if}.proxy_arp=1"))
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        let gateway = format!("{}.1", at.pod_net);
        ip(&["-n", &netns, "route", "add", &gateway, "dev", "eth0"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", &gateway])?;
        let cg_name = format!("sgk-{host_number}");
        let cgroup = at.cgroup_root.join(&cg_name);
        std::fs::create_dir(&cgroup).map_err(|e| format!("{}: {e}", cgroup.display()))?;
        r.cgroup = Some(cgroup.clone());
        pod["metadata"]["annotations"] = json!({"signet.dev/cgroup": cg_name,
            "signet.dev/netns": netns, "signet.dev/host-interface": host_if});
        r.process = Some(
            start_in(&nodes.exe, command, &netns, Some(&cgroup), false)
                .map_err(|e| e.to_string())?,
        );
        Ok(pod_ip)
    }
}

fn remove(mut r: Running, nodes: &Nodes) {
    if let Some(p) = r.process.as_mut() {
        let _ = p.kill();
        let _ = p.wait();
    }
    if let (Some(host_if), Some(at)) = (&r.host_if, nodes.nodes.get(&format!("node-{}", r.node))) {
        let _ = ip(&["-n", &at.netns, "link", "del", host_if]);
    }
    if let Some(ns) = &r.netns {
        let _ = ip(&["netns", "del", ns]);
    }
    if let Some(cg) = &r.cgroup {
        for _ in 0..50 {
            if std::fs::remove_dir(cg).is_ok() || !cg.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let left: Vec<Running> = std::mem::take(&mut *self.pods.lock().expect("pods"))
            .into_values()
            .collect();
        for r in left {
            remove(r, &self.nodes);
        }
    }
}
