//! Gateway listeners of protocol TCP and TLS (Passthrough): the connection goes to a backend of
//! the listener's TCPRoute, or of the TLSRoute the ClientHello's server name picks, over HBONE
//! with the Gateway's identity (so the backend's ingress policy decides on it, as for HTTP).
//! TLS is not terminated: the ClientHello is read with `MSG_PEEK` and every byte, that one
//! included, reaches the backend, which answers with its own certificate. What cannot be routed
//! (no server name, not TLS, no route for the name, no ready endpoint) is closed with a reset
//! and logged and counted with its reason.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use super::refusal::EdgeRefusal;
use crate::config::EdgeLimits;
use crate::proxy::ProxyContext;
use crate::proxy::hbone::{Route, pump};
use crate::routing::l4::{L4Route, host_matches};
use crate::routing::model::{Listener, Protocol};

/// The most a ClientHello may take to arrive whole (one TLS record).
const MAX_HELLO: usize = 16 * 1024 + 5;

/// What the start of a TLS connection says.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// A ClientHello naming this server (lowercase).
    Name(String),
    /// A ClientHello without a server name.
    NoName,
    /// Not all of it yet.
    Incomplete,
    /// Not a TLS ClientHello, and why.
    NotTls(&'static str),
}

/// Reads the server name out of a ClientHello at the start of `b` (a single record).
pub fn client_hello(b: &[u8]) -> Hello {
    fn u16_at(b: &[u8], i: usize) -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *b.get(i)?,
            *b.get(i + 1)?,
        ])))
    }
    if b.len() < 5 {
        return Hello::Incomplete;
    }
    if b[0] != 0x16 || b[1] != 3 {
        return Hello::NotTls("not a TLS handshake record");
    }
    let Some(len) = u16_at(b, 3) else {
        return Hello::Incomplete;
    };
    if len > 16 * 1024 {
        return Hello::NotTls("record longer than TLS allows");
    }
    let Some(record) = b.get(5..5 + len) else {
        return Hello::Incomplete;
    };
    if record.first() != Some(&1) || record.len() < 4 {
        return Hello::NotTls("not a ClientHello");
    }
    let hlen =
        (usize::from(record[1]) << 16) | (usize::from(record[2]) << 8) | usize::from(record[3]);
    let Some(body) = record.get(4..4 + hlen) else {
        return Hello::NotTls("a ClientHello spanning records");
    };
    // version (2), random (32), session id, cipher suites, compression methods, extensions.
    let mut i = 34;
    let Some(sid) = body.get(i).map(|l| usize::from(*l)) else {
        return Hello::NotTls("truncated ClientHello");
    };
    i += 1 + sid;
    let Some(suites) = u16_at(body, i) else {
        return Hello::NotTls("truncated ClientHello");
    };
    i += 2 + suites;
    let Some(comp) = body.get(i).map(|l| usize::from(*l)) else {
        return Hello::NotTls("truncated ClientHello");
    };
    i += 1 + comp;
    let Some(ext_len) = u16_at(body, i) else {
        return Hello::NoName; // no extensions at all
    };
    let Some(mut exts) = body.get(i + 2..i + 2 + ext_len) else {
        return Hello::NotTls("truncated extensions");
    };
    while exts.len() >= 4 {
        let (kind, len) = (u16_at(exts, 0).unwrap_or(0), u16_at(exts, 2).unwrap_or(0));
        let Some(data) = exts.get(4..4 + len) else {
            return Hello::NotTls("truncated extension");
        };
        if kind == 0 {
            // server_name_list: (type 0, length, name)
            let (Some(t), Some(n)) = (data.get(2), u16_at(data, 3)) else {
                return Hello::NotTls("malformed server_name");
            };
            let Some(name) = data.get(5..5 + n).filter(|_| *t == 0) else {
                return Hello::NotTls("malformed server_name");
            };
            let ok = !name.is_empty()
                && name
                    .iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.');
            if !ok {
                return Hello::NotTls("server name is not a DNS name");
            }
            return Hello::Name(String::from_utf8_lossy(name).to_ascii_lowercase());
        }
        exts = &exts[4 + len..];
    }
    Hello::NoName
}

/// Peeks until the ClientHello is whole (or proves not to be one).
async fn peek_hello(tcp: &TcpStream) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; MAX_HELLO];
    let mut last = 0;
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Ok(Hello::NotTls("closed before a ClientHello"));
        }
        match client_hello(&buf[..n]) {
            Hello::Incomplete if n < MAX_HELLO => {
                if n == last {
                    // Nothing new is queued yet: wait a little for the rest.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                last = n;
            }
            Hello::Incomplete => return Ok(Hello::NotTls("ClientHello too long")),
            h => return Ok(h),
        }
    }
}

/// The listener and route a connection goes to: TCP, the oldest route of the (only) listener;
/// TLS, the listener and then the route whose names match `sni`, exact names first.
fn pick<'a>(listeners: &'a [Listener], sni: Option<&str>) -> Option<(&'a Listener, &'a L4Route)> {
    let Some(sni) = sni else {
        let l = listeners.first()?;
        return Some((l, l.l4.first()?));
    };
    let exact = |p: &str| p == sni;
    let wild = |p: &str| host_matches(p, sni);
    for test in [&exact as &dyn Fn(&str) -> bool, &wild] {
        for l in listeners {
            if l.hostname.as_deref().is_some_and(|h| !test(h) && !wild(h)) {
                continue;
            }
            if let Some(r) = l.l4.iter().find(|r| r.hostnames.iter().any(|h| test(h))) {
                return Some((l, r));
            }
        }
    }
    None
}

/// Serves one connection accepted on an L4 port.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    bound: Option<IpAddr>,
    port: u16,
    ctx: ProxyContext,
    limits: EdgeLimits,
) {
    let reset = |tcp: &TcpStream| {
        let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
    };
    let refuse = |tcp: &TcpStream, r: EdgeRefusal| {
        r.report(&ctx.metrics);
        reset(tcp);
    };
    let protocol = ctx.snapshot().gateway.port(bound, port).map(|p| p.protocol);
    let sni = match protocol {
        Some(Protocol::TlsPassthrough) => {
            match tokio::time::timeout(limits.handshake, peek_hello(&tcp)).await {
                Ok(Ok(Hello::Name(n))) => Some(n),
                Ok(Ok(Hello::NoName)) => {
                    return refuse(
                        &tcp,
                        EdgeRefusal::NotRoutable {
                            why: "the ClientHello names no server (SNI)".into(),
                        },
                    );
                }
                Ok(Ok(Hello::NotTls(why))) => {
                    return refuse(&tcp, EdgeRefusal::NotRoutable { why: why.into() });
                }
                Ok(Ok(Hello::Incomplete)) | Ok(Err(_)) => return reset(&tcp),
                Err(_) => {
                    return refuse(
                        &tcp,
                        EdgeRefusal::NotRoutable {
                            why: "no ClientHello within the handshake timeout".into(),
                        },
                    );
                }
            }
        }
        Some(Protocol::Tcp) => None,
        _ => return refuse(&tcp, EdgeRefusal::ListenerRemoved),
    };
    let snap = ctx.snapshot();
    let Some(cfg) = snap.gateway.port(bound, port) else {
        return refuse(&tcp, EdgeRefusal::ListenerRemoved);
    };
    let Some((listener, route)) = pick(&cfg.listeners, sni.as_deref()) else {
        return refuse(
            &tcp,
            EdgeRefusal::NoListener {
                host: sni.unwrap_or_default(),
            },
        );
    };
    let route_name = format!("{}/{}", route.namespace, route.name);
    let total: u32 = route.backends.iter().map(|b| b.weight).sum();
    if total == 0 {
        return refuse(
            &tcp,
            EdgeRefusal::NoValidBackend {
                route: route_name,
                why: "no backendRef resolves".into(),
            },
        );
    }
    let mut draw = (crate::proxy::forward::draw() * f64::from(total)) as u32;
    let backend = route
        .backends
        .iter()
        .find(|b| {
            let hit = draw < b.weight;
            draw = draw.saturating_sub(b.weight);
            hit
        })
        .unwrap_or(&route.backends[0]);
    let service = format!("{}/{}", backend.namespace, backend.name);
    let Some(endpoint) = snap
        .services
        .pick_named(&backend.namespace, &backend.name, backend.port)
    else {
        return refuse(&tcp, EdgeRefusal::NoReadyEndpoint { service });
    };
    let Some(pod) = snap.pod_by_ip(endpoint.ip()) else {
        return refuse(&tcp, EdgeRefusal::UnknownEndpoint { target: endpoint });
    };
    let Some(node) = pod.node.as_ref().and_then(|n| snap.nodes.get(n)) else {
        return refuse(&tcp, EdgeRefusal::EndpointNodeUnknown { target: endpoint });
    };
    let hbone = Route {
        source: listener.identity.clone(),
        destination: pod.identity.clone(),
        node: SocketAddr::new(*node, ctx.inbound_port),
    };
    let source = listener.identity.to_string();
    drop(snap);
    let opened = tokio::time::timeout(limits.handshake, ctx.hbone.open(&hbone, endpoint)).await;
    let tunnel = match opened {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let why = e.to_string();
            return refuse(
                &tcp,
                EdgeRefusal::Backend {
                    route: route_name,
                    target: endpoint,
                    source,
                    why,
                },
            );
        }
        Err(_) => {
            let why = "the HBONE tunnel did not open within the handshake timeout".into();
            return refuse(
                &tcp,
                EdgeRefusal::Backend {
                    route: route_name,
                    target: endpoint,
                    source,
                    why,
                },
            );
        }
    };
    tracing::debug!(%peer, route = route_name, %endpoint, "gateway L4 connection forwarded");
    let meter = crate::proxy::hbone::Meter::default();
    let mut tcp = tcp;
    if let Err(e) = pump(&mut tcp, tunnel.send, tunnel.recv, limits.idle, &meter).await {
        tracing::debug!(%peer, route = route_name, error = %e, "gateway L4 connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, for `name`.
    fn hello(name: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let mut c = rustls::ClientConnection::new(
            std::sync::Arc::new(config),
            rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name"),
        )
        .expect("client");
        let mut out = Vec::new();
        c.write_tls(&mut out).expect("hello");
        out
    }

    #[test]
    fn the_server_name_is_read_from_a_real_client_hello_and_junk_is_refused() {
        let h = hello("DB.Example.Test");
        assert_eq!(client_hello(&h), Hello::Name("db.example.test".into()));
        for cut in [3, 40, h.len() - 1] {
            assert_eq!(client_hello(&h[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert!(matches!(
            client_hello(b"GET / HTTP/1.1\r\n\r\n"),
            Hello::NotTls(_)
        ));
        // An IP address as the name: rustls sends no SNI.
        assert_eq!(client_hello(&hello("10.0.0.1")), Hello::NoName);
        // A length that runs past the record.
        let mut bad = h.clone();
        bad[6..9].copy_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(client_hello(&bad), Hello::NotTls(_)));
    }
}
