//! The command line's way into a cluster (Kubernetes mode): an API client with a runtime of its
//! own, for commands that are otherwise synchronous, and admin ports reached through the API
//! server as `kubectl port-forward` reaches them.
//!
//! An agent's `/flows` and `/debug/state` answer only on its node's loopback, and a laptop
//! usually cannot reach pod or node addresses at all. A port-forward (`pods/{name}/portforward`)
//! needs `create` on `pods/portforward` in Signet's namespace, is authenticated and authorized
//! by the API server like any request, and arrives at the agent from the pod's own loopback
//! (the agent runs on the host network, so that is the node's). [`Kube::forward`] gives a local
//! address on 127.0.0.1 whose every connection becomes one port-forward, so the commands that
//! speak HTTP to admin ports work unchanged. Like `kubectl port-forward`'s, the local port is
//! open to every process of this machine while the command runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use super::status::Topology;
use crate::drain::Drain;

/// An API client and the forwards made through it; both end when it is dropped.
pub struct Kube {
    rt: tokio::runtime::Runtime,
    pub client: kube::Client,
    drain: Drain,
    /// (namespace, pod, port) → the local address forwarding to it.
    forwards: Mutex<BTreeMap<(String, String, u16), SocketAddr>>,
}

impl std::fmt::Debug for Kube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kube").finish_non_exhaustive()
    }
}

impl Kube {
    /// A client from `kubeconfig`, else `$KUBECONFIG`, `~/.kube/config` or the pod's service
    /// account.
    pub fn connect(kubeconfig: Option<&Path>) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("signet-kube")
            .enable_all()
            .build()
            .map_err(|e| format!("a runtime for the API client: {e}"))?;
        let client = rt
            .block_on(signet_ca::kubernetes::client(kubeconfig))
            .map_err(|e| e.to_string())?;
        Ok(Self {
            rt,
            client,
            drain: Drain::new(),
            forwards: Mutex::default(),
        })
    }

    /// Runs `fut` on this client's runtime, in the background, until it ends or this goes.
    pub fn spawn<F>(&self, name: &'static str, fut: F)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let _entered = self.rt.enter();
        drop(self.drain.spawn(name, fut));
    }

    /// Runs `f` to completion on this client's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// A local address (on 127.0.0.1) whose connections are forwarded to `port` of `pod` in
    /// `namespace` through the API server; the same address for the same target each time.
    /// A forward the API server refuses answers the connection with an HTTP 502 that says
    /// why (these are admin ports, spoken to in HTTP).
    pub fn forward(&self, namespace: &str, pod: &str, port: u16) -> Result<SocketAddr, String> {
        let key = (namespace.to_owned(), pod.to_owned(), port);
        let mut forwards = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(addr) = forwards.get(&key) {
            return Ok(*addr);
        }
        let _entered = self.rt.enter();
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|e| format!("a local port for the port-forward: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let (pod, stop, drain) = (pod.to_owned(), self.drain.stop_token(), self.drain.clone());
        self.drain.spawn("port-forward listener", async move {
            loop {
                let Some((sock, _)) =
                    crate::net::accept_next(&listener, &stop, "port-forward").await
                else {
                    return;
                };
                let (pods, pod) = (pods.clone(), pod.clone());
                drain.spawn("port-forward", async move {
                    forward_one(sock, &pods, &pod, port).await;
                });
            }
        });
        forwards.insert(key, addr);
        Ok(addr)
    }

    /// Signet's agents and CA in `namespace`, found as `signet status --kubernetes` finds them,
    /// each admin port replaced by a local forward to it.
    pub fn forwarded_topology(&self, namespace: &str) -> Result<Topology, String> {
        let mut topology = self.block_on(super::status::discover(&self.client, namespace))?;
        for node in &mut topology.nodes {
            if let Some(pod) = node.pod.clone() {
                let port = node.agent_admin.port();
                node.agent_admin = self.forward(namespace, &pod, port)?;
                node.via = Some(via(namespace, &pod, port));
            }
        }
        if let Some(ca) = &mut topology.ca
            && let Some(pod) = ca.pod.clone()
        {
            let port = ca.admin.port();
            ca.admin = self.forward(namespace, &pod, port)?;
            ca.via = Some(via(namespace, &pod, port));
        }
        Ok(topology)
    }
}

/// Why the API server did not open a port-forward, in words. An upgrade it refused comes back
/// with only a status code (the client does not read the body), so the usual reasons are named.
fn refusal(e: &kube::Error) -> String {
    use kube::client::UpgradeConnectionError::ProtocolSwitch;
    match e {
        kube::Error::UpgradeConnection(ProtocolSwitch(code)) => {
            let hint = match code.as_u16() {
                401 => " (the kubeconfig's credentials were not accepted)",
                403 => " (forbidden: it needs `create` on `pods/portforward` in that namespace)",
                404 => " (no such pod)",
                _ => "",
            };
            format!("the API server answered {code} to the port-forward{hint}")
        }
        other => other.to_string(),
    }
}

fn via(namespace: &str, pod: &str, port: u16) -> String {
    format!("through a port-forward to pod {namespace}/{pod} port {port}")
}

impl Drop for Kube {
    fn drop(&mut self) {
        self.drain.stop_token().cancel();
    }
}

/// One connection carried over one port-forward. A forward that fails before the pod says
/// anything is answered with an HTTP 502 naming the reason (the API server's refusal, or the
/// error the kubelet sent on the port's error channel).
async fn forward_one(sock: tokio::net::TcpStream, pods: &Api<Pod>, pod: &str, port: u16) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let refused = |why: &str| {
        let why = why.replace(['\r', '\n'], " ");
        format!(
            "HTTP/1.1 502 port-forward to pod {pod} port {port}: {why}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
    };
    let (mut sock_r, mut sock_w) = sock.into_split();
    let mut forwarder = match pods.portforward(pod, &[port]).await {
        Ok(f) => f,
        Err(e) => {
            let _ = sock_w.write_all(refused(&refusal(&e)).as_bytes()).await;
            return;
        }
    };
    let errors = forwarder.take_error(port);
    let Some(upstream) = forwarder.take_stream(port) else {
        let _ = sock_w
            .write_all(refused("no stream for the port").as_bytes())
            .await;
        return;
    };
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let to_pod = async move {
        let _ = tokio::io::copy(&mut sock_r, &mut up_w).await;
        let _ = up_w.shutdown().await;
        std::future::pending::<()>().await;
    };
    let from_pod = async move {
        let mut buf = vec![0u8; 32 * 1024];
        let mut any = false;
        loop {
            match up_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    any = true;
                    if sock_w.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        // The error comes before the stream's end, so it is there to read by now.
        if !any
            && let Some(errors) = errors
            && let Ok(Some(why)) =
                tokio::time::timeout(std::time::Duration::from_secs(1), errors).await
        {
            let _ = sock_w.write_all(refused(&why).as_bytes()).await;
        }
        let _ = sock_w.shutdown().await;
    };
    tokio::select! {
        () = to_pod => {}
        () = from_pod => {}
    }
    drop(forwarder);
}
