//! An in-memory Kubernetes API server, since no real one runs on these machines.
//!
//! It answers the REST paths kube-rs uses with the objects it holds, which are real Kubernetes
//! objects (Pods, Services, Secrets, Leases, IdentityPolicies, Gateways, ...) in their JSON form,
//! with the API server's semantics where Signet depends on them:
//! - list (`<Kind>List`, with the collection's resourceVersion) with label and field selectors;
//! - watch as a stream of ADDED/MODIFIED/DELETED events from the resourceVersion asked for (the
//!   events a list-then-watch would otherwise miss are replayed; one older than the history kept
//!   is `410 Expired`, and the client must list again);
//! - get; create (`409 AlreadyExists`; `status` is dropped, `generation` starts at 1); replace and
//!   patch (`409 Conflict` on a stale resourceVersion; merge patch and server-side apply; on the
//!   object they leave `status` alone and bump `generation` when `spec` changes, on the `status`
//!   subresource they change only `status`); delete (uid and resourceVersion preconditions; an
//!   object with finalizers stays, terminating, until an update removes the last one);
//! - TokenReview, answering for the tokens it was given; deleting a Namespace deletes what is
//!   in it; a Service created without a ClusterIP gets one when the test asked for that;
//! - `pods/{name}/exec` and `pods/{name}/portforward` over WebSocket (`streams`), run by a
//!   [`PodRuntime`](crate::streams::PodRuntime) the test gives it;
//! - refusals a test asks for, shaped as the API server sends them (RBAC's 403 Forbidden, a 500).
//!
//! It runs in process ([`FakeApi::client`]) or over HTTP/1.1 on a listener of the test's choosing
//! ([`FakeApi::serve`], [`FakeApi::serve_loopback`]), and records every request it answered.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

type Reply = Response<UnsyncBoxBody<Bytes, Infallible>>;

/// `(collection, namespace, name)`: the collection is `<api prefix>|<plural>`, the namespace
/// empty for cluster-scoped objects.
type Key = (String, String, String);

/// Events kept for watches that start from an older resourceVersion.
const HISTORY: usize = 10_000;

/// (Kind, plural, namespaced) of every kind the fake stores. A collection not listed here is
/// answered as the API server answers an unknown resource: 404.
const KINDS: &[(&str, &str, bool)] = &[
    ("Namespace", "namespaces", false),
    ("Node", "nodes", false),
    ("Pod", "pods", true),
    ("ServiceAccount", "serviceaccounts", true),
    ("Service", "services", true),
    ("Endpoints", "endpoints", true),
    ("EndpointSlice", "endpointslices", true),
    ("Secret", "secrets", true),
    ("ConfigMap", "configmaps", true),
    ("Lease", "leases", true),
    ("DaemonSet", "daemonsets", true),
    ("Deployment", "deployments", true),
    ("IdentityPolicy", "identitypolicies", true),
    ("TrafficPolicy", "trafficpolicies", true),
    ("SignetIdentity", "signetidentities", false),
    ("LoadBalancerIPPool", "loadbalancerippools", false),
    ("L2AnnouncementPolicy", "l2announcementpolicies", false),
    ("GatewayClass", "gatewayclasses", false),
    ("Gateway", "gateways", true),
    ("HTTPRoute", "httproutes", true),
    ("GRPCRoute", "grpcroutes", true),
    ("TLSRoute", "tlsroutes", true),
    ("TCPRoute", "tcproutes", true),
    ("ReferenceGrant", "referencegrants", true),
];

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// One request the fake answered.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// The request body as JSON (`null` when it had none or it was not JSON).
    pub body: Value,
    /// The RBAC verb the request needs: get, list, watch, create, update, patch, delete.
    pub verb: &'static str,
    /// The status code of the answer.
    pub code: u16,
}

/// An answer a test forces instead of the normal one.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub code: StatusCode,
    pub reason: String,
    pub message: String,
}

type Rule = Arc<dyn Fn(&Seen) -> Option<Refusal> + Send + Sync>;

#[derive(Clone, Debug)]
struct Event {
    version: u64,
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    version: u64,
    history: VecDeque<Event>,
    seen: Vec<Seen>,
    rules: Vec<Rule>,
    /// Token → TokenReview `status` for it.
    tokens: BTreeMap<String, Value>,
    /// The first three octets and a dot of the ClusterIPs given to Services created without one.
    cluster_ips: Option<String>,
    next_cluster_ip: u8,
}

struct Inner {
    store: Mutex<Store>,
    events: broadcast::Sender<Event>,
    /// While true, list requests wait: an API server that is slow or out of reach.
    held: tokio::sync::watch::Sender<bool>,
    /// Bumped to end every open watch, as an API server restart or a load balancer does.
    watch_epoch: tokio::sync::watch::Sender<u64>,
    stop: CancellationToken,
    /// Who runs pods' processes, for exec and port-forward; `None`: they are refused.
    runtime: Mutex<Option<Arc<dyn crate::streams::PodRuntime>>>,
}

/// Cancels `stop` when the last of the test's handles goes.
struct Owner(CancellationToken);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The fake; clones share it. Its in-process clients count as clones; a served listener answers
/// until the last clone or client is dropped, then open watches end and the listener closes.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi").finish_non_exhaustive()
    }
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl FakeApi {
    /// Holds `objects` (each stored as [`FakeApi::put`] stores it).
    pub fn new(objects: Vec<Value>) -> Self {
        let stop = CancellationToken::new();
        let api = Self {
            inner: Arc::new(Inner {
                // As a real API server's, the first resourceVersion is not 0 (which means "any"
                // to a watch), so an empty list still names where a watch resumes.
                store: Mutex::new(Store {
                    version: 1,
                    ..Store::default()
                }),
                events: broadcast::channel(1024).0,
                held: tokio::sync::watch::channel(false).0,
                watch_epoch: tokio::sync::watch::channel(0).0,
                stop: stop.clone(),
                runtime: Mutex::new(None),
            }),
            _owner: Arc::new(Owner(stop)),
        };
        for o in objects {
            api.put(o);
        }
        api
    }

    /// Holds the objects of the YAML documents in `manifests` (empty documents are skipped).
    pub fn from_yaml(manifests: &str) -> Self {
        let objects = serde_yaml::Deserializer::from_str(manifests)
            .map(|doc| {
                <Value as serde::Deserialize>::deserialize(doc)
                    .unwrap_or_else(|e| panic!("a manifest the fake API cannot read: {e}"))
            })
            .filter(|v| !v.is_null())
            .collect();
        Self::new(objects)
    }

    /// A client whose requests this fake answers in process. It keeps the fake up as a clone
    /// does: its watches stay open while the client lives.
    pub fn client(&self) -> kube::Client {
        let (inner, owner) = (self.inner.clone(), self._owner.clone());
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let _keeps_the_fake_up = &owner;
            let inner = inner.clone();
            async move { Ok::<_, Infallible>(inner.answer(req).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Serves HTTP/1.1 on `listener` (bound wherever the test wants it: on loopback, or inside
    /// a network namespace of its own) from a thread of its own, until the last clone is dropped.
    pub fn serve(&self, listener: std::net::TcpListener) {
        let inner = self.inner.clone();
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the fake API server");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let stream = tokio::select! {
                        () = inner.stop.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok((s, _)) => s,
                            Err(_) => continue,
                        },
                    };
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        let stop = inner.stop.clone();
                        let service = hyper::service::service_fn(move |req| {
                            let inner = inner.clone();
                            async move { Ok::<_, Infallible>(inner.answer(req).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .with_upgrades();
                        tokio::select! {
                            () = stop.cancelled() => {}
                            _ = conn => {}
                        }
                    });
                }
            });
        });
    }

    /// Serves on a free port of 127.0.0.1; returns the server's URL.
    pub fn serve_loopback(&self) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        self.serve(listener);
        url
    }

    /// TokenReview answers `status` for `token` (its `audiences` default to the ones asked for).
    pub fn token(&self, token: &str, status: Value) {
        self.inner.lock().tokens.insert(token.to_owned(), status);
    }

    /// `token` is a bound service-account token of the agent pod `signet-agent-<node>` (uid
    /// `uid-agent-<node>`) on `node`.
    pub fn agent_token(&self, token: &str, node: &str) {
        self.token(
            token,
            json!({"authenticated": true,
                "user": {"username": "system:serviceaccount:signet-system:signet-agent",
                    "extra": {"authentication.kubernetes.io/pod-name": [format!("signet-agent-{node}")],
                              "authentication.kubernetes.io/pod-uid": [format!("uid-agent-{node}")],
                              "authentication.kubernetes.io/node-name": [node]}}}),
        );
    }

    /// From now on, exec and port-forward on a pod run through `runtime` (the part of a kubelet
    /// and a container runtime the test plays). Over [`FakeApi::serve`] only: the in-process
    /// client has no connection to upgrade.
    pub fn pod_runtime(&self, runtime: Arc<dyn crate::streams::PodRuntime>) {
        *self.inner.runtime.lock().unwrap_or_else(|p| p.into_inner()) = Some(runtime);
    }

    /// From now on, a Service created without a `clusterIP` gets one, as the API server gives
    /// it: `prefix` (`10.96.7.`) and the next host number from 1.
    pub fn allocate_cluster_ips(&self, prefix: &str) {
        self.inner.lock().cluster_ips = Some(prefix.to_owned());
    }

    /// From now on, a request for which `rule` says so is refused with its answer instead.
    pub fn refuse_when(&self, rule: impl Fn(&Seen) -> Option<Refusal> + Send + Sync + 'static) {
        self.inner.lock().rules.push(Arc::new(rule));
    }

    /// From now on, `verb` on `plural` (`secrets`, `leases`, `pods/exec`, ...) is refused as RBAC refuses a
    /// service account without the permission: 403 Forbidden naming the verb and the resource.
    pub fn forbid(&self, verb: &'static str, plural: &'static str) {
        self.refuse_when(move |seen| {
            let target = parse_path(&seen.path)?;
            let (_, resource) = target.collection.split_once('|')?;
            let resource = match target.stream {
                Some(sub) => format!("{resource}/{sub}"),
                None => resource.to_owned(),
            };
            (seen.verb == verb && resource == plural).then(|| Refusal {
                code: StatusCode::FORBIDDEN,
                reason: "Forbidden".into(),
                message: format!(
                    "{plural} is forbidden: User \"system:serviceaccount:signet-system:signet-agent\" cannot {verb} resource \"{plural}\"{}",
                    target
                        .namespace
                        .map(|ns| format!(" in the namespace \"{ns}\""))
                        .unwrap_or_default()
                ),
            })
        });
    }

    /// Ends every open watch; clients must watch again to see later changes.
    pub fn end_watches(&self) {
        self.inner.watch_epoch.send_modify(|g| *g += 1);
    }

    /// Makes list requests wait (`true`) until released (`false`).
    pub fn hold_lists(&self, hold: bool) {
        self.inner.held.send_replace(hold);
    }

    /// Creates or replaces an object as a controller, the kubelet or `kubectl apply` would,
    /// `status` and all. A given uid is kept.
    pub fn put(&self, object: Value) -> Value {
        self.inner.store_object(object)
    }

    /// Deletes an object by kind, namespace and name, finalizers or not.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let key = key_of(&json!({"apiVersion": api_version, "kind": kind,
            "metadata": {"name": name, "namespace": namespace}}));
        self.inner.remove(&key);
    }

    /// The stored object of `kind` named `name` in `namespace` (empty for cluster-scoped ones).
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = self.inner.lock();
        store
            .objects
            .iter()
            .find(|((_, ns, n), o)| o["kind"] == kind && ns == namespace && n == name)
            .map(|(_, o)| o.clone())
    }

    /// Every stored object of `kind`.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let store = self.inner.lock();
        store
            .objects
            .values()
            .filter(|o| o["kind"] == kind)
            .cloned()
            .collect()
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.inner.lock().seen.clone()
    }

    /// How many watch requests have been served.
    pub fn watch_requests(&self) -> usize {
        self.inner
            .lock()
            .seen
            .iter()
            .filter(|s| s.verb == "watch")
            .count()
    }
}

fn plural_of(kind: &str) -> Option<(&'static str, bool)> {
    KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, plural, namespaced)| (*plural, *namespaced))
}

fn kind_of(plural: &str) -> Option<(&'static str, bool)> {
    KINDS
        .iter()
        .find(|(_, p, _)| *p == plural)
        .map(|(kind, _, namespaced)| (*kind, *namespaced))
}

fn key_of(object: &Value) -> Key {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let (plural, namespaced) =
        plural_of(kind).unwrap_or_else(|| panic!("the fake API does not know kind {kind}"));
    let prefix = if api_version == "v1" {
        "/api/v1".to_owned()
    } else {
        format!("/apis/{api_version}")
    };
    let namespace = if namespaced {
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    } else {
        String::new()
    };
    let name = object["metadata"]["name"]
        .as_str()
        .expect("metadata.name")
        .to_owned();
    (format!("{prefix}|{plural}"), namespace, name)
}

/// A request path split into collection, namespace, name and subresource.
#[derive(Clone, Debug)]
struct Target {
    collection: String,
    api_version: String,
    kind: &'static str,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
    /// A streaming subresource (`exec`, `portforward`), answered by [`streams`].
    stream: Option<&'static str>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("/api/v1".to_owned(), "v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (
            format!("/apis/{group}/{version}"),
            format!("{group}/{version}"),
            rest,
        ),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, sub] => (*plural, Some((*name).to_owned()), Some(*sub)),
        _ => return None,
    };
    let (kind, _) = kind_of(plural)?;
    Some(Target {
        collection: format!("{prefix}|{plural}"),
        api_version,
        kind,
        namespace,
        name,
        status: sub == Some("status"),
        stream: match (kind, sub) {
            ("Pod", Some("exec")) => Some("exec"),
            ("Pod", Some("portforward")) => Some("portforward"),
            _ => None,
        },
    })
}

fn verb_of(method: &Method, path: &str, query: &str) -> &'static str {
    let target = parse_path(path);
    let named = target.as_ref().is_some_and(|t| t.name.is_some());
    // As RBAC authorizes them since Kubernetes 1.31, also over a WebSocket's GET.
    if target.is_some_and(|t| t.stream.is_some()) {
        return "create";
    }
    match *method {
        Method::GET if named => "get",
        Method::GET if query_param(query, "watch").is_some_and(|w| w != "false" && w != "0") => {
            "watch"
        }
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

fn reply(code: StatusCode, v: &Value) -> Reply {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed_unsync())
        .expect("response")
}

fn failure(code: StatusCode, reason: &str, message: String) -> Reply {
    reply(
        code,
        &json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "reason": reason, "code": code.as_u16(), "message": message}),
    )
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality-based selector terms (`a=b`, `a==b`, `a!=b`, `a`, `!a`) over `value_of(key)`.
fn matches_terms(selector: Option<&str>, value_of: impl Fn(&str) -> Option<String>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let decoded = percent_decoded(selector);
    decoded
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                value_of(k).as_deref() != Some(v)
            } else if let Some((k, v)) = term.split_once('=') {
                value_of(k).as_deref() == Some(v.trim_start_matches('='))
            } else if let Some(k) = term.strip_prefix('!') {
                value_of(k).is_none()
            } else {
                value_of(term).is_some()
            }
        })
}

fn matches_labels(object: &Value, selector: Option<&str>) -> bool {
    matches_terms(selector, |k| {
        object["metadata"]["labels"][k].as_str().map(str::to_owned)
    })
}

/// Field selectors over dotted paths (`metadata.name`, `spec.nodeName`, `type`).
fn matches_fields(object: &Value, selector: Option<&str>) -> bool {
    matches_terms(selector, |path| {
        let v = path.split('.').fold(object, |v, k| &v[k]);
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        }
    })
}

/// RFC 7386 merge patch, which is also how this fake applies a server-side apply body.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// What a watch asks for.
struct Watch {
    target: Target,
    labels: Option<String>,
    fields: Option<String>,
}

impl Watch {
    fn wants(&self, e: &Event) -> bool {
        e.collection == self.target.collection
            && self
                .target
                .namespace
                .as_ref()
                .is_none_or(|n| *n == e.namespace)
            && matches_labels(&e.object, self.labels.as_deref())
            && matches_fields(&e.object, self.fields.as_deref())
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event under the store's lock, so a watch that starts from the history and
    /// then follows the channel neither misses nor repeats one.
    fn emit(&self, s: &mut Store, key: &Key, kind: &'static str, object: Value) {
        let event = Event {
            version: s.version,
            collection: key.0.clone(),
            namespace: key.1.clone(),
            kind,
            object,
        };
        if s.history.len() == HISTORY {
            s.history.pop_front();
        }
        s.history.push_back(event.clone());
        let _ = self.events.send(event);
    }

    fn store_object(&self, mut object: Value) -> Value {
        let key = key_of(&object);
        let mut s = self.lock();
        s.version += 1;
        let existed = s.objects.get(&key).cloned();
        let version = s.version;
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(version.to_string());
        let uid = existed
            .as_ref()
            .and_then(|e| e["metadata"]["uid"].as_str().map(str::to_owned))
            .or_else(|| meta["uid"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("uid-{version}"));
        meta["uid"] = json!(uid);
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = existed
                .as_ref()
                .map(|e| e["metadata"]["creationTimestamp"].clone())
                .filter(|t| !t.is_null())
                .unwrap_or_else(|| json!(jiff::Timestamp::now().to_string()));
        }
        s.objects.insert(key.clone(), object.clone());
        let kind = if existed.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.emit(&mut s, &key, kind, object.clone());
        object
    }

    fn remove(&self, key: &Key) -> Option<Value> {
        let mut s = self.lock();
        let mut removed = s.objects.remove(key)?;
        s.version += 1;
        removed["metadata"]["resourceVersion"] = json!(s.version.to_string());
        self.emit(&mut s, key, "DELETED", removed.clone());
        Some(removed)
    }

    fn get(&self, key: &Key) -> Option<Value> {
        self.lock().objects.get(key).cloned()
    }

    /// Stores an updated object, or, when it is terminating and its last finalizer went,
    /// removes it as the API server does.
    fn finish(&self, key: &Key, object: Value) -> Reply {
        let terminating = !object["metadata"]["deletionTimestamp"].is_null();
        let finalized = object["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        if terminating && finalized {
            self.remove(key);
            return reply(StatusCode::OK, &object);
        }
        reply(StatusCode::OK, &self.store_object(object))
    }

    async fn answer<B>(&self, mut req: Request<B>) -> Reply
    where
        B: hyper::body::Body,
    {
        let upgrade = parse_path(req.uri().path())
            .is_some_and(|t| t.stream.is_some())
            .then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let mut seen = Seen {
            verb: verb_of(&parts.method, &path, &query),
            method: parts.method.clone(),
            path: path.clone(),
            query: query.clone(),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            code: 0,
        };
        let rules = self.lock().rules.clone();
        let answer = match rules.iter().find_map(|rule| rule(&seen)) {
            Some(r) => failure(r.code, &r.reason, r.message),
            None if upgrade.is_some() => self.stream(&parts, upgrade, &path, &query),
            None => {
                self.answer_normally(&parts, &seen.body, seen.verb, &path, &query)
                    .await
            }
        };
        seen.code = answer.status().as_u16();
        self.lock().seen.push(seen);
        answer
    }

    async fn answer_normally(
        &self,
        parts: &http::request::Parts,
        body: &Value,
        verb: &'static str,
        path: &str,
        query: &str,
    ) -> Reply {
        if path == TOKEN_REVIEWS && parts.method == Method::POST {
            return self.review(body);
        }
        let Some(t) = parse_path(path) else {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            );
        };
        let labels = query_param(query, "labelSelector").map(str::to_owned);
        let fields = query_param(query, "fieldSelector").map(str::to_owned);
        let Some(name) = t.name.clone() else {
            return match verb {
                "watch" => self.watch(
                    Watch {
                        target: t,
                        labels,
                        fields,
                    },
                    query_param(query, "resourceVersion").and_then(|v| v.parse().ok()),
                ),
                "list" => {
                    let mut held = self.held.subscribe();
                    let _ = held.wait_for(|h| !*h).await;
                    self.list(&t, labels.as_deref(), fields.as_deref())
                }
                "create" => self.create(&t, body.clone()),
                _ => failure(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    path.to_owned(),
                ),
            };
        };
        let key = (
            t.collection.clone(),
            t.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        let not_found = || {
            failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", t.kind),
            )
        };
        match parts.method {
            Method::GET => match self.get(&key) {
                Some(o) => reply(StatusCode::OK, &o),
                None => not_found(),
            },
            Method::PUT => {
                let mut object = body.clone();
                if let Some(ns) = &t.namespace {
                    object["metadata"]["namespace"] = json!(ns);
                }
                let Some(current) = self.get(&key) else {
                    return not_found();
                };
                let sent = object["metadata"]["resourceVersion"].as_str();
                if sent.is_some() && sent != current["metadata"]["resourceVersion"].as_str() {
                    return conflict(&t, &name);
                }
                self.finish(&key, updated(&t, current, object))
            }
            Method::PATCH => {
                let apply = parts
                    .headers
                    .get("content-type")
                    .is_some_and(|c| c.as_bytes().starts_with(b"application/apply-patch"));
                let current = self.get(&key);
                let mut object = match &current {
                    Some(o) => o.clone(),
                    None if apply && !t.status => {
                        let mut o = body.clone();
                        o["metadata"]["name"] = json!(name);
                        if let Some(ns) = &t.namespace {
                            o["metadata"]["namespace"] = json!(ns);
                        }
                        return self.create(&t, o);
                    }
                    None => return not_found(),
                };
                let sent = body["metadata"]["resourceVersion"].as_str();
                if sent.is_some() && sent != object["metadata"]["resourceVersion"].as_str() {
                    return conflict(&t, &name);
                }
                let mut patch = body.clone();
                if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.remove("resourceVersion");
                }
                merge(&mut object, &patch);
                let current = current.expect("present");
                self.finish(&key, updated(&t, current, object))
            }
            Method::DELETE => self.delete(&key, &t, &name, body),
            _ => failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                path.to_owned(),
            ),
        }
    }

    /// `pods/{name}/exec` and `pods/{name}/portforward`: switches to a WebSocket and runs the
    /// session on the pod through the test's runtime.
    fn stream(
        &self,
        parts: &http::request::Parts,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
        path: &str,
        query: &str,
    ) -> Reply {
        let Some(t) = parse_path(path) else {
            return failure(StatusCode::NOT_FOUND, "NotFound", path.to_owned());
        };
        let name = t.name.clone().unwrap_or_default();
        let key = (
            t.collection.clone(),
            t.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        let Some(pod) = self.get(&key) else {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("pods \"{name}\" not found"),
            );
        };
        let header = |h: http::header::HeaderName| parts.headers.get(h);
        let is_websocket = header(http::header::UPGRADE)
            .and_then(|u| u.to_str().ok())
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
        let (Some(key), true, Some(upgrade)) = (
            header(http::header::SEC_WEBSOCKET_KEY),
            is_websocket,
            upgrade,
        ) else {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "Upgrade request required".into(),
            );
        };
        let Some(protocol) = crate::streams::protocol(header(http::header::SEC_WEBSOCKET_PROTOCOL))
        else {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "no supported subprotocol (v5.channel.k8s.io, v4.channel.k8s.io) requested".into(),
            );
        };
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let Some(runtime) = runtime else {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                format!("no container runtime runs pod {name} in this fake"),
            );
        };
        if pod["status"]["phase"] != "Running" {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!(
                    "pod {name} is not running (phase {})",
                    pod["status"]["phase"].as_str().unwrap_or("unknown")
                ),
            );
        }
        let params: Vec<(String, String)> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), percent_decoded(v)))
            .collect();
        let session: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> = match t
            .stream
        {
            Some("exec") => {
                let command: Vec<String> = params
                    .iter()
                    .filter(|(k, _)| k == "command")
                    .map(|(_, v)| v.clone())
                    .collect();
                if command.is_empty() {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "you must specify at least 1 command".into(),
                    );
                }
                let container = params
                    .iter()
                    .find(|(k, _)| k == "container")
                    .map(|(_, v)| v.clone());
                let v5 = protocol.starts_with("v5");
                Box::pin(async move {
                    if let Some(ws) = crate::streams::websocket(upgrade).await {
                        crate::streams::exec(ws, runtime, pod, container, command, v5).await;
                    }
                })
            }
            _ => {
                let ports: Vec<u16> = params
                    .iter()
                    .filter(|(k, _)| k == "ports")
                    .flat_map(|(_, v)| v.split(',').map(str::to_owned).collect::<Vec<_>>())
                    .filter_map(|p| p.trim().parse().ok())
                    .collect();
                let [port] = ports[..] else {
                    return failure(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("this fake forwards exactly one port per request, not {ports:?}"),
                    );
                };
                Box::pin(async move {
                    if let Some(ws) = crate::streams::websocket(upgrade).await {
                        crate::streams::port_forward(ws, runtime, pod, port).await;
                    }
                })
            }
        };
        let stop = self.stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = session => {}
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(http::header::CONNECTION, "Upgrade")
            .header(http::header::UPGRADE, "websocket")
            .header(http::header::SEC_WEBSOCKET_ACCEPT, accept)
            .header(http::header::SEC_WEBSOCKET_PROTOCOL, protocol)
            .body(Full::new(Bytes::new()).boxed_unsync())
            .expect("response")
    }

    fn create(&self, t: &Target, mut object: Value) -> Reply {
        // As the API server does: the path names the namespace, and a create sets no status.
        if let Some(ns) = &t.namespace {
            object["metadata"]["namespace"] = json!(ns);
        }
        if let Some(o) = object.as_object_mut() {
            o.remove("status");
        }
        if object["apiVersion"].is_null() {
            object["apiVersion"] = json!(t.api_version);
        }
        if object["kind"].is_null() {
            object["kind"] = json!(t.kind);
        }
        if object["metadata"]["generation"].is_null() {
            object["metadata"]["generation"] = json!(1);
        }
        if object["metadata"]["name"].is_null() {
            return failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!("{} is invalid: metadata.name: Required value", t.kind),
            );
        }
        if t.kind == "Service" && object["spec"]["clusterIP"].is_null() {
            let mut s = self.lock();
            if let Some(prefix) = s.cluster_ips.clone() {
                s.next_cluster_ip += 1;
                let ip = format!("{prefix}{}", s.next_cluster_ip);
                object["spec"]["clusterIP"] = json!(ip);
                object["spec"]["clusterIPs"] = json!([ip]);
            }
        }
        let key = key_of(&object);
        if self.get(&key).is_some() {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{}\" already exists", t.kind, key.2),
            );
        }
        reply(StatusCode::CREATED, &self.store_object(object))
    }

    fn delete(&self, key: &Key, t: &Target, name: &str, options: &Value) -> Reply {
        let Some(mut o) = self.get(key) else {
            return failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", t.kind),
            );
        };
        let pre = &options["preconditions"];
        let uid_differs = pre["uid"]
            .as_str()
            .is_some_and(|u| Some(u) != o["metadata"]["uid"].as_str());
        let version_differs = pre["resourceVersion"]
            .as_str()
            .is_some_and(|v| Some(v) != o["metadata"]["resourceVersion"].as_str());
        if uid_differs || version_differs {
            return failure(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: {} in precondition does not match",
                    t.kind,
                    if uid_differs {
                        "UID"
                    } else {
                        "ResourceVersion"
                    }
                ),
            );
        }
        // With finalizers the object stays, terminating, until they are removed.
        if o["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            if o["metadata"]["deletionTimestamp"].is_null() {
                o["metadata"]["deletionTimestamp"] = json!(jiff::Timestamp::now().to_string());
            }
            return reply(StatusCode::OK, &self.store_object(o));
        }
        if t.kind == "Namespace" {
            // The namespace controller's work, done at once: everything in it goes first.
            let inside: Vec<Key> = self
                .lock()
                .objects
                .keys()
                .filter(|(_, ns, _)| ns == name)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&k);
            }
        }
        match self.remove(key) {
            Some(gone) => reply(StatusCode::OK, &gone),
            None => failure(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", t.kind),
            ),
        }
    }

    fn list(&self, t: &Target, labels: Option<&str>, fields: Option<&str>) -> Reply {
        let s = self.lock();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|((c, ns, _), o)| {
                *c == t.collection
                    && t.namespace.as_ref().is_none_or(|want| want == ns)
                    && matches_labels(o, labels)
                    && matches_fields(o, fields)
            })
            .map(|(_, o)| o.clone())
            .collect();
        reply(
            StatusCode::OK,
            &json!({"apiVersion": t.api_version, "kind": format!("{}List", t.kind),
                "metadata": {"resourceVersion": s.version.to_string()}, "items": items}),
        )
    }

    /// Events on the collection after `from` (or from now on), one JSON object per line, until
    /// the watch is ended or the fake goes.
    fn watch(&self, w: Watch, from: Option<u64>) -> Reply {
        let (backlog, rx) = {
            let s = self.lock();
            if let Some(from) = from
                && from > 0
                && s.history.front().is_some_and(|e| e.version > from + 1)
            {
                return failure(
                    StatusCode::GONE,
                    "Expired",
                    format!("too old resource version: {from}"),
                );
            }
            let backlog: VecDeque<Event> = match from {
                Some(from) if from > 0 => s
                    .history
                    .iter()
                    .filter(|e| e.version > from && w.wants(e))
                    .cloned()
                    .collect(),
                _ => VecDeque::new(),
            };
            (backlog, self.events.subscribe())
        };
        let stop = self.stop.clone();
        let mut ended = self.watch_epoch.subscribe();
        ended.mark_unchanged();
        let line = |e: &Event| {
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                "{}\n",
                json!({"type": e.kind, "object": e.object})
            ))))
        };
        let stream = futures::stream::unfold(
            (backlog, rx, stop, ended, w),
            move |(mut backlog, mut rx, stop, mut ended, w)| async move {
                if let Some(e) = backlog.pop_front() {
                    return Some((line(&e), (backlog, rx, stop, ended, w)));
                }
                loop {
                    let event = tokio::select! {
                        () = stop.cancelled() => return None,
                        _ = ended.changed() => return None,
                        e = rx.recv() => e,
                    };
                    match event {
                        Ok(e) if w.wants(&e) => {
                            return Some((line(&e), (backlog, rx, stop, ended, w)));
                        }
                        Ok(_) => {}
                        // A watcher that fell behind is ended, as the API server ends a slow
                        // one; it lists again.
                        Err(_) => return None,
                    }
                }
            },
        );
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed_unsync())
            .expect("response")
    }

    fn review(&self, asked: &Value) -> Reply {
        let token = asked["spec"]["token"].as_str().unwrap_or("");
        let known = self.lock().tokens.get(token).cloned();
        let status = match known {
            Some(mut status) => {
                if status.get("audiences").is_none() && status["authenticated"] == true {
                    status["audiences"] = asked["spec"]["audiences"].clone();
                }
                status
            }
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        let mut answer = asked.clone();
        answer["status"] = status;
        reply(StatusCode::CREATED, &answer)
    }
}

fn conflict(t: &Target, name: &str) -> Reply {
    failure(
        StatusCode::CONFLICT,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            t.kind
        ),
    )
}

/// What an update leaves: on the `status` subresource only the status changes; on the object
/// everything but the status, with `generation` bumped when the spec changed.
fn updated(t: &Target, current: Value, mut object: Value) -> Value {
    if t.status {
        let mut whole = current;
        whole["status"] = object["status"].take();
        return whole;
    }
    let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
    let changed = object["spec"] != current["spec"];
    match current.get("status") {
        Some(status) => object["status"] = status.clone(),
        None => {
            if let Some(o) = object.as_object_mut() {
                o.remove("status");
            }
        }
    }
    object["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
    object
}
