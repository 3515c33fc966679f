//! The CA's gRPC server: TLS listener, authentication, node authorisation, issuance, background
//! upkeep (cluster-state reloads, root rotation, serving-certificate renewal) and drain.
//!
//! The only part of `signet-ca` that opens sockets.

pub mod admin;
pub mod auth;
pub mod authz;
pub mod ca_secret;
pub mod config;
pub mod gate;
pub mod grpc;
pub mod kube;
pub use crate::placement;
pub mod tls;
pub mod tls_copies;
pub mod tokenreview;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::issuer::CertificateAuthority;
use crate::proto::istio::istio_certificate_service_server::IstioCertificateServiceServer;
use crate::proto::signet::trust_bundle_service_server::TrustBundleServiceServer;
use crate::store::StoreError;
use auth::{Authenticator, StaticTokens};
use authz::{NodeAuthorizer, StateError};
use ca_secret::KeySecret;
use config::ServerConfig;
use grpc::CaService;
use tls::{ServingCert, ServingCertError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("CA material: {0}")]
    Store(#[from] StoreError),
    #[error("cluster state: {0}")]
    State(#[from] StateError),
    #[error("serving certificate: {0}")]
    ServingCert(#[from] ServingCertError),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {source} (is another signet-ca running?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Why a replica could not start in a cluster.
#[derive(Debug, thiserror::Error)]
pub enum InClusterError {
    #[error("CA keys: {0}")]
    Keys(#[from] ca_secret::CaSecretError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// A bound, ready-to-run CA server.
#[derive(Debug)]
pub struct CaServer {
    config: ServerConfig,
    listener: TcpListener,
    /// The admin port's, when one is configured.
    admin: Option<TcpListener>,
    ca: Arc<CertificateAuthority>,
    authz: Arc<NodeAuthorizer>,
    auth: Arc<dyn Authenticator>,
    serving: Arc<ServingCert>,
}

impl CaServer {
    /// Opens the CA material, loads the cluster state and binds the listener, with the
    /// per-node tokens from the configuration.
    pub async fn bind(config: ServerConfig) -> Result<Self, ServerError> {
        let auth: Arc<dyn Authenticator> = Arc::new(StaticTokens::new(&config.nodes));
        Self::bind_with(config, auth).await
    }

    /// As [`bind`](Self::bind), with another authenticator (TokenReview in Kubernetes).
    pub async fn bind_with(
        config: ServerConfig,
        auth: Arc<dyn Authenticator>,
    ) -> Result<Self, ServerError> {
        let ca = Arc::new(CertificateAuthority::open(config.ca.clone())?);
        let authz = Arc::new(match &config.cluster {
            config::CaCluster::Dir(dir) => NodeAuthorizer::new(
                config.ca.trust_domain.clone(),
                config.agent_identity.clone(),
                dir,
            )?,
            config::CaCluster::Kubernetes => NodeAuthorizer::from_api(
                config.ca.trust_domain.clone(),
                config.agent_identity.clone(),
            ),
        });
        let serving = ServingCert::new(
            ca.clone(),
            config.server_identity.clone(),
            config.serving_names.clone(),
        )?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let admin = match config.admin {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            ),
            None => None,
        };
        Ok(Self {
            config,
            listener,
            admin,
            ca,
            authz,
            auth,
            serving,
        })
    }

    /// Starts a replica in a cluster: keys from the Secret (`caSecret`) or `cacerts`, agents
    /// checked by TokenReview, rotation followed (and driven while this replica, named `holder`
    /// in the Lease, holds it). Returns once the view of who runs where is loaded, ready to run.
    pub async fn start_in_cluster(
        config: ServerConfig,
        client: ::kube::Client,
        holder: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, InClusterError> {
        let namespace = config.agent_namespace.clone();
        let copies = config.gateway_tls_namespace.clone();
        let keys = match (&config.ca_secret, &config.ca.source) {
            (Some(secret), crate::CaSource::SharedStateDir(dir)) => {
                let (keys, created) =
                    KeySecret::ensure(&client, &namespace, secret, &config.ca, dir).await?;
                tracing::info!(secret = %secret, created, "CA keys from the Kubernetes Secret");
                Some(keys)
            }
            _ => None,
        };
        let auth = Arc::new(tokenreview::TokenReviewAuthenticator::new(
            client.clone(),
            &namespace,
            "signet-agent",
        ));
        let server = Self::bind_with(config, auth).await?;
        if let Some(keys) = keys {
            keys.publish_bundle(&server.authority().bundle()).await?;
            let elector = crate::lease::Elector::new(
                client.clone(),
                &namespace,
                ca_secret::ROTATION_LEASE,
                holder,
                30,
            );
            tokio::spawn(ca_secret::follow(
                keys,
                server.authority(),
                elector,
                Duration::from_secs(10),
                shutdown.clone(),
            ));
        }
        // Serve only once the view of who runs where is loaded.
        kube::watch_cluster(client, server.authorizer(), copies, shutdown).await;
        Ok(server)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Who may obtain what; the Kubernetes watcher (`kube::watch_cluster`) feeds it.
    pub fn authorizer(&self) -> Arc<NodeAuthorizer> {
        self.authz.clone()
    }

    pub fn authority(&self) -> Arc<CertificateAuthority> {
        self.ca.clone()
    }

    /// Where the admin port listens, when one is configured (the OS's choice for port 0).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets in-flight requests
    /// finish. Callers bound the drain with their own grace timeout.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ServerError> {
        let limits = self.config.limits;
        let admin = self.admin.map(|listener| {
            let source = match self.config.cluster {
                config::CaCluster::Dir(_) => "standalone",
                config::CaCluster::Kubernetes => "kubernetes",
            };
            let serving = self.listener.local_addr().unwrap_or(self.config.listen);
            let status = admin::status_of(self.ca.clone(), serving, source);
            tokio::spawn(admin::serve(listener, status, shutdown.clone()))
        });
        let tls = TlsAcceptor::from(Arc::new(tls::server_config(self.serving.clone())?));
        let (tx, rx) = mpsc::channel(64);
        let accept = tokio::spawn(accept_loop(
            self.listener,
            tls,
            tx,
            Duration::from_secs(limits.handshake_timeout_seconds),
            crate::peers::PerSource::new(limits.max_connections_per_peer),
            shutdown.clone(),
        ));
        let upkeep = tokio::spawn(upkeep(
            self.ca.clone(),
            self.authz.clone(),
            self.serving.clone(),
            shutdown.clone(),
        ));
        let gate = gate::AuthGate::new(
            self.auth,
            gate::GateLimits {
                cache: Duration::from_secs(limits.token_cache_seconds),
                checks_per_peer: limits.max_auth_checks_per_peer,
                failures_per_peer: limits.max_auth_failures_per_peer,
                window: Duration::from_secs(60),
            },
        );
        let service = CaService {
            ca: self.ca,
            gate: Arc::new(gate),
            authz: self.authz,
            slots: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            queue_timeout: Duration::from_secs(limits.queue_timeout_seconds),
        };
        let istio = IstioCertificateServiceServer::new(service.clone())
            .max_decoding_message_size(limits.max_request_bytes);
        let bundle = TrustBundleServiceServer::new(service)
            .max_decoding_message_size(limits.max_request_bytes);
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_streams_per_connection)
            .timeout(Duration::from_secs(limits.request_timeout_seconds))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(istio)
            .add_service(bundle)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                shutdown.clone().cancelled_owned(),
            )
            .await;
        shutdown.cancel();
        accept.abort();
        upkeep.abort();
        if let Some(a) = admin {
            a.abort();
        }
        result.map_err(ServerError::from)
    }
}

type TlsConn = tokio_rustls::server::TlsStream<TcpStream>;

/// A TLS connection counted against its peer address's connection cap while it is open.
struct PeerConn {
    inner: TlsConn,
    _slot: crate::peers::SourceSlot,
}

impl tokio::io::AsyncRead for PeerConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = <TlsConn as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: TlsAcceptor,
    tx: mpsc::Sender<Result<PeerConn, std::io::Error>>,
    handshake_timeout: Duration,
    per_peer: Arc<crate::peers::PerSource>,
    shutdown: CancellationToken,
) {
    // Handshakes run concurrently, but not without bound: a flood of half-open connections
    // must not exhaust memory. And one address (a pod) may hold only so many connections,
    // handshaking or open, so it cannot take the budget every agent shares.
    let handshakes = Arc::new(Semaphore::new(256));
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_peer.try_take(peer.ip()) else {
            tracing::warn!(%peer, cap = per_peer.cap(), "connection refused: this address holds its share of the CA's connections");
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many TLS handshakes in progress; dropping connection");
            continue;
        };
        let (tls, tx) = (tls.clone(), tx.clone());
        let _ = stream.set_nodelay(true);
        let span = tracing::info_span!("ca_conn", %peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, tls.accept(stream)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx
                            .send(Ok(PeerConn {
                                inner: conn,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::info!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!("TLS handshake timed out"),
                }
            }
            .instrument(span),
        );
    }
}

async fn upkeep(
    ca: Arc<CertificateAuthority>,
    authz: Arc<NodeAuthorizer>,
    serving: Arc<ServingCert>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match authz.refresh() {
            Ok(true) => tracing::info!("cluster state reloaded"),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "cluster state change refused; previous state stays in force")
            }
        }
        let now = time::OffsetDateTime::now_utc();
        // Cheap unless due; due at once when another root has started signing.
        match serving.renew_if_due(now) {
            Ok(true) => tracing::info!("serving certificate renewed"),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "serving certificate renewal failed; will retry"),
        }
        n += 1;
        // A shared directory is rotated by the Lease holder (`ca_secret::follow`).
        if n.is_multiple_of(30) && ca.rotates_itself() {
            match ca.maintain(now) {
                Ok(m) if m.changed() => {
                    tracing::info!(promoted = ?m.promoted, retired = ?m.retired, started = ?m.started_rotation, "root rotation advanced")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "root rotation step failed; will retry"),
            }
        }
    }
}
