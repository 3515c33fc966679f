//! The fake API server's streaming subresources, `pods/{name}/exec` and
//! `pods/{name}/portforward`, spoken as the API server and the kubelet speak them: a WebSocket
//! upgrade with the `v5.channel.k8s.io` (or `v4`) subprotocol, then binary messages whose first
//! byte names the channel.
//!
//! - exec: channel 0 is the process's stdin, 1 its stdout, 2 its stderr; 3 carries a `Status`
//!   when it exits (`Success`, or `NonZeroExitCode` with the code as the `ExitCode` cause); under
//!   v5 a message `[255, 0]` closes stdin.
//! - port-forward: one port per request; channel 0 carries the bytes, 1 an error. Each channel's
//!   first message is the port, two bytes little-endian.
//!
//! What runs and where is the test's: a [`PodRuntime`] starts the process inside the pod (its
//! network namespace and cgroup) or dials the port on the pod's loopback, as a container runtime
//! would.

use std::io::{Read as _, Write as _};
use std::sync::Arc;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

/// What the kubelet and the container runtime do for a pod, in the test's own terms.
pub trait PodRuntime: Send + Sync + 'static {
    /// Connects to `port` on the pod's loopback (its network namespace's), as port-forward does.
    fn port_forward(&self, pod: &Value, port: u16) -> std::io::Result<std::net::TcpStream>;
    /// Starts `command` in the pod's container (its namespaces and cgroup) with stdin, stdout
    /// and stderr piped, as exec does.
    fn exec(
        &self,
        pod: &Value,
        container: Option<&str>,
        command: &[String],
    ) -> std::io::Result<std::process::Child>;
}

pub(crate) const EXEC_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

/// The subprotocol to answer with, of the ones the client offered; `None` when none is ours.
pub(crate) fn protocol(offered: Option<&http::HeaderValue>) -> Option<&'static str> {
    let offered = offered?.to_str().ok()?;
    EXEC_PROTOCOLS
        .into_iter()
        .find(|p| offered.split(',').any(|o| o.trim() == *p))
}

type Ws = tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

pub(crate) async fn websocket(upgrade: hyper::upgrade::OnUpgrade) -> Option<Ws> {
    let upgraded = upgrade.await.ok()?;
    Some(
        tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await,
    )
}

fn framed(channel: u8, bytes: &[u8]) -> Message {
    let mut v = Vec::with_capacity(bytes.len() + 1);
    v.push(channel);
    v.extend_from_slice(bytes);
    Message::binary(v)
}

/// The `Status` exec sends on channel 3 when the process ended.
fn exit_status(code: Option<i32>) -> Value {
    match code {
        Some(0) => json!({"metadata": {}, "status": "Success"}),
        Some(n) => json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command [...], exit code {n}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": n.to_string()}]}}),
        None => json!({"metadata": {}, "status": "Failure",
            "message": "command terminated by a signal", "reason": "InternalError"}),
    }
}

/// Runs an exec session: the process's output to the client as it comes, the client's input to
/// the process, the exit status last.
pub(crate) async fn exec(
    ws: Ws,
    runtime: Arc<dyn PodRuntime>,
    pod: Value,
    container: Option<String>,
    command: Vec<String>,
    v5: bool,
) {
    let (mut tx, mut rx) = ws.split();
    let mut child = match runtime.exec(&pod, container.as_deref(), &command) {
        Ok(c) => c,
        Err(e) => {
            let status = json!({"metadata": {}, "status": "Failure", "reason": "InternalError",
                "message": format!("failed to exec in container: starting {command:?}: {e}")});
            let _ = tx.send(framed(3, status.to_string().as_bytes())).await;
            let _ = tx.close().await;
            return;
        }
    };
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<(u8, Vec<u8>)>(64);
    let mut readers = vec![];
    for (channel, pipe) in [
        (
            1u8,
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ),
        (
            2u8,
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ),
    ] {
        let Some(mut pipe) = pipe else { continue };
        let out_tx = out_tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if out_tx.blocking_send((channel, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    drop(out_tx);
    let mut stdin = child.stdin.take();
    loop {
        tokio::select! {
            out = out_rx.recv() => match out {
                Some((channel, bytes)) => {
                    if tx.send(framed(channel, &bytes)).await.is_err() {
                        break;
                    }
                }
                // Both pipes closed: the process is done with its output.
                None => break,
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => match (b[0], b.get(1)) {
                    (0, _) => {
                        if let Some(s) = stdin.as_mut() && s.write_all(&b[1..]).and_then(|()| s.flush()).is_err() {
                            stdin = None;
                        }
                    }
                    (255, Some(0)) if v5 => stdin = None,
                    _ => {}
                },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    // The client went: so does the process, as the kubelet ends an exec whose
                    // stream is gone.
                    let _ = child.kill();
                    break;
                }
                Some(Ok(_)) => {}
            },
        }
    }
    drop(stdin);
    let code = tokio::task::spawn_blocking(move || {
        let status = child.wait().ok();
        for r in readers {
            let _ = r.join();
        }
        status.and_then(|s| s.code())
    })
    .await
    .ok()
    .flatten();
    let _ = tx
        .send(framed(3, exit_status(code).to_string().as_bytes()))
        .await;
    let _ = tx.close().await;
}

/// Runs a port-forward session for one port: the pod's socket on channel 0, a dial failure on
/// channel 1.
pub(crate) async fn port_forward(ws: Ws, runtime: Arc<dyn PodRuntime>, pod: Value, port: u16) {
    let (mut tx, mut rx) = ws.split();
    let le = port.to_le_bytes();
    if tx.send(framed(0, &le)).await.is_err() || tx.send(framed(1, &le)).await.is_err() {
        return;
    }
    let dialled = {
        let pod = pod.clone();
        tokio::task::spawn_blocking(move || runtime.port_forward(&pod, port)).await
    };
    let sock = match dialled {
        Ok(Ok(s)) => s
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(s)),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    };
    let sock = match sock {
        Ok(s) => s,
        Err(e) => {
            let name = pod["metadata"]["name"].as_str().unwrap_or("?");
            let text = format!(
                "error forwarding port {port} to pod {name}: failed to connect to localhost:{port} inside namespace: {e}"
            );
            let _ = tx.send(framed(1, text.as_bytes())).await;
            let _ = tx.close().await;
            return;
        }
    };
    let (mut from_pod, mut to_pod) = sock.into_split();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            n = from_pod.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(framed(0, &buf[..n])).await.is_err() {
                        break;
                    }
                }
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) if b.len() > 1 && b[0] == 0 => {
                    if to_pod.write_all(&b[1..]).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = to_pod.shutdown().await;
    let _ = tx.close().await;
}
