//! An in-memory Kubernetes API server for the end-to-end suites, since no real one runs on these
//! machines. It serves HTTP/1.1 on an address inside a namespace the test created, and answers
//! the REST paths kube-rs uses with the objects it holds, which are real Kubernetes objects
//! (Pods, Services, IdentityPolicies, Leases, ...) in their JSON form:
//! - list with label selectors, and watch as a stream of ADDED/MODIFIED/DELETED events;
//! - get, create (409 when the name exists), replace (409 on a stale resourceVersion), patch
//!   (server-side apply and merge patch, on the object or its `status`), delete (an object with
//!   finalizers stays, terminating, until an update removes the last one);
//! - TokenReview, answering for the agents' tokens with the bound pod's node.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::in_netns;

type Reply = Response<UnsyncBoxBody<Bytes, Infallible>>;

/// `(collection, namespace, name)`: the collection is `<api prefix>|<plural>`, the namespace
/// empty for cluster-scoped objects.
type Key = (String, String, String);

/// (Kind, plural, namespaced) of every kind the suites store.
const KINDS: &[(&str, &str, bool)] = &[
    ("Namespace", "namespaces", false),
    ("Node", "nodes", false),
    ("Pod", "pods", true),
    ("Service", "services", true),
    ("Endpoints", "endpoints", true),
    ("EndpointSlice", "endpointslices", true),
    ("Secret", "secrets", true),
    ("ConfigMap", "configmaps", true),
    ("Lease", "leases", true),
    ("IdentityPolicy", "identitypolicies", true),
    ("SignetIdentity", "signetidentities", false),
    ("GatewayClass", "gatewayclasses", false),
    ("Gateway", "gateways", true),
    ("HTTPRoute", "httproutes", true),
    ("ReferenceGrant", "referencegrants", true),
];

#[derive(Clone)]
struct Event {
    collection: String,
    namespace: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct Store {
    objects: BTreeMap<Key, Value>,
    version: u64,
    /// Watch requests served so far.
    watches: u64,
}

/// The fake; clones share it.
#[derive(Clone)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Event>,
    /// Agent tokens and the node each one's bound pod runs on.
    tokens: Arc<BTreeMap<String, String>>,
    /// While true, list requests wait: an API server that is slow or out of reach.
    held: Arc<tokio::sync::watch::Sender<bool>>,
    /// Bumped to end every open watch, as an API server restart or a load balancer does.
    watches: Arc<tokio::sync::watch::Sender<u64>>,
    stop: CancellationToken,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // The last clone stops the server.
        if Arc::strong_count(&self.store) == 1 {
            self.stop.cancel();
        }
    }
}

fn key_of(object: &Value) -> Key {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let (_, plural, namespaced) = KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .unwrap_or_else(|| panic!("the fake API does not know kind {kind}"));
    let prefix = if api_version == "v1" {
        "/api/v1".to_owned()
    } else {
        format!("/apis/{api_version}")
    };
    let namespace = if *namespaced {
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
struct Target {
    collection: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("/api/v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("/apis/{group}/{version}"), rest),
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
    Some(Target {
        collection: format!("{prefix}|{plural}"),
        namespace,
        name,
        status: sub == Some("status"),
    })
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

/// Equality selectors (`a=b,c`) as kube-rs sends them, percent-decoded.
fn matches_labels(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let decoded = selector
        .replace("%3D", "=")
        .replace("%2F", "/")
        .replace("%2C", ",");
    decoded.split(',').filter(|s| !s.is_empty()).all(|term| {
        let labels = &object["metadata"]["labels"];
        match term.split_once('=') {
            Some((k, v)) => labels[k].as_str() == Some(v),
            None => !labels[term].is_null(),
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

impl FakeApi {
    /// Holds `objects`; `tokens` maps agent tokens to their nodes for TokenReview.
    pub fn new(objects: Vec<Value>, tokens: &[(&str, &str)]) -> Self {
        let (events, _) = broadcast::channel(1024);
        let api = Self {
            store: Arc::default(),
            events,
            tokens: Arc::new(
                tokens
                    .iter()
                    .map(|(t, n)| ((*t).to_owned(), (*n).to_owned()))
                    .collect(),
            ),
            held: Arc::new(tokio::sync::watch::channel(false).0),
            watches: Arc::new(tokio::sync::watch::channel(0).0),
            stop: CancellationToken::new(),
        };
        for o in objects {
            api.put(o);
        }
        api
    }

    /// Serves on `addr` inside network namespace `ns`, until the last clone is dropped.
    pub fn serve(&self, ns: &str, addr: std::net::SocketAddr) {
        let (api, ns) = (self.clone_weak(), ns.to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            in_netns(&ns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("rt");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
                    tx.send(()).expect("ready");
                    loop {
                        let stream = tokio::select! {
                            () = api.stop.cancelled() => return,
                            accepted = listener.accept() => match accepted {
                                Ok((s, _)) => s,
                                Err(_) => continue,
                            },
                        };
                        let api = api.clone();
                        tokio::spawn(async move {
                            let stop = api.stop.clone();
                            let service = hyper::service::service_fn(move |req| {
                                let api = api.clone();
                                async move { Ok::<_, Infallible>(api.answer(req).await) }
                            });
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                            tokio::select! {
                                () = stop.cancelled() => {}
                                _ = conn => {}
                            }
                        });
                    }
                });
            })
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the fake API server listens");
    }

    /// A handle that does not count towards keeping the server up.
    fn clone_weak(&self) -> Handle {
        Handle {
            store: Arc::downgrade(&self.store),
            events: self.events.clone(),
            tokens: self.tokens.clone(),
            held: self.held.clone(),
            watches: self.watches.clone(),
            stop: self.stop.clone(),
        }
    }

    /// Ends every open watch; clients must watch again to see later changes.
    pub fn end_watches(&self) {
        self.watches.send_modify(|g| *g += 1);
    }

    /// Makes list requests wait (`true`) until released (`false`).
    pub fn hold_lists(&self, hold: bool) {
        self.held.send_replace(hold);
    }

    /// Creates or replaces an object, as a controller or `kubectl apply` would.
    pub fn put(&self, object: Value) {
        self.clone_weak().store_object(object);
    }

    /// Deletes an object by kind, namespace and name.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let key = key_of(&json!({"apiVersion": api_version, "kind": kind,
            "metadata": {"name": name, "namespace": namespace}}));
        self.clone_weak().remove(&key);
    }

    /// How many watch requests have been served.
    pub fn watch_requests(&self) -> u64 {
        self.store.lock().expect("store").watches
    }

    /// Every stored object of `kind`.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let store = self.store.lock().expect("store");
        store
            .objects
            .values()
            .filter(|o| o["kind"] == kind)
            .cloned()
            .collect()
    }
}

/// What request handlers hold: the store weakly, so dropping the `FakeApi` ends the server.
#[derive(Clone)]
struct Handle {
    store: std::sync::Weak<Mutex<Store>>,
    events: broadcast::Sender<Event>,
    tokens: Arc<BTreeMap<String, String>>,
    held: Arc<tokio::sync::watch::Sender<bool>>,
    watches: Arc<tokio::sync::watch::Sender<u64>>,
    stop: CancellationToken,
}

impl Handle {
    fn with_store<T>(&self, f: impl FnOnce(&mut Store) -> T) -> Option<T> {
        let store = self.store.upgrade()?;
        let mut guard = store.lock().expect("store");
        Some(f(&mut guard))
    }

    fn store_object(&self, mut object: Value) -> Value {
        let key = key_of(&object);
        let stored = self.with_store(|s| {
            s.version += 1;
            let existed = s.objects.get(&key).cloned();
            let meta = &mut object["metadata"];
            meta["resourceVersion"] = json!(s.version.to_string());
            let uid = existed
                .as_ref()
                .and_then(|e| e["metadata"]["uid"].as_str().map(str::to_owned))
                .unwrap_or_else(|| format!("uid-{}", s.version));
            meta["uid"] = json!(uid);
            if meta["creationTimestamp"].is_null() {
                meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            s.objects.insert(key.clone(), object.clone());
            existed.is_some()
        });
        if let Some(existed) = stored {
            let _ = self.events.send(Event {
                collection: key.0,
                namespace: key.1,
                kind: if existed { "MODIFIED" } else { "ADDED" },
                object: object.clone(),
            });
        }
        object
    }

    fn remove(&self, key: &Key) -> Option<Value> {
        let removed = self.with_store(|s| s.objects.remove(key)).flatten()?;
        let _ = self.events.send(Event {
            collection: key.0.clone(),
            namespace: key.1.clone(),
            kind: "DELETED",
            object: removed.clone(),
        });
        Some(removed)
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

    fn get(&self, key: &Key) -> Option<Value> {
        self.with_store(|s| s.objects.get(key).cloned()).flatten()
    }

    async fn answer(&self, req: Request<Incoming>) -> Reply {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" {
            return self.review(&body);
        }
        let Some(t) = parse_path(&path) else {
            return failure(StatusCode::NOT_FOUND, "NotFound", path);
        };
        let selector = query_param(&query, "labelSelector").map(str::to_owned);
        let Some(name) = t.name.clone() else {
            return match parts.method {
                Method::GET if query_param(&query, "watch").is_some_and(|w| w != "false") => {
                    self.watch(t, selector)
                }
                Method::GET => {
                    let mut held = self.held.subscribe();
                    let _ = held.wait_for(|h| !*h).await;
                    self.list(&t, selector.as_deref())
                }
                Method::POST => {
                    let mut object: Value = serde_json::from_slice(&body).expect("a JSON object");
                    // As the API server does: the path names the namespace.
                    if let Some(ns) = &t.namespace {
                        object["metadata"]["namespace"] = json!(ns);
                    }
                    let key = key_of(&object);
                    if self.get(&key).is_some() {
                        return failure(StatusCode::CONFLICT, "AlreadyExists", key.2);
                    }
                    reply(StatusCode::CREATED, &self.store_object(object))
                }
                _ => failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", path),
            };
        };
        let key = (
            t.collection.clone(),
            t.namespace.clone().unwrap_or_default(),
            name.clone(),
        );
        match parts.method {
            Method::GET => match self.get(&key) {
                Some(o) => reply(StatusCode::OK, &o),
                None => failure(StatusCode::NOT_FOUND, "NotFound", name),
            },
            Method::PUT => {
                let mut object: Value = serde_json::from_slice(&body).expect("a JSON object");
                if let Some(ns) = &t.namespace {
                    object["metadata"]["namespace"] = json!(ns);
                }
                let Some(current) = self.get(&key) else {
                    return failure(StatusCode::NOT_FOUND, "NotFound", name);
                };
                let sent = object["metadata"]["resourceVersion"].as_str();
                if sent.is_some() && sent != current["metadata"]["resourceVersion"].as_str() {
                    return failure(StatusCode::CONFLICT, "Conflict", name);
                }
                if t.status {
                    let mut whole = current;
                    whole["status"] = object["status"].take();
                    object = whole;
                }
                self.finish(&key, object)
            }
            Method::PATCH => {
                let patch: Value = serde_json::from_slice(&body).expect("a JSON patch");
                let apply = parts
                    .headers
                    .get("content-type")
                    .is_some_and(|c| c.as_bytes().starts_with(b"application/apply-patch"));
                let mut object = match self.get(&key) {
                    Some(o) => o,
                    None if apply && !t.status => {
                        let mut o = patch.clone();
                        o["metadata"]["name"] = json!(name);
                        if let Some(ns) = &t.namespace {
                            o["metadata"]["namespace"] = json!(ns);
                        }
                        o
                    }
                    None => return failure(StatusCode::NOT_FOUND, "NotFound", name),
                };
                if t.status {
                    merge(&mut object["status"], &patch["status"]);
                } else {
                    let mut patch = patch;
                    if let Some(meta) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                        meta.remove("resourceVersion");
                    }
                    merge(&mut object, &patch);
                }
                self.finish(&key, object)
            }
            Method::DELETE => match self.get(&key) {
                // With finalizers the object stays, terminating, until they are removed.
                Some(mut o)
                    if o["metadata"]["finalizers"]
                        .as_array()
                        .is_some_and(|f| !f.is_empty()) =>
                {
                    if o["metadata"]["deletionTimestamp"].is_null() {
                        o["metadata"]["deletionTimestamp"] =
                            json!(jiff::Timestamp::now().to_string());
                    }
                    reply(StatusCode::OK, &self.store_object(o))
                }
                Some(_) => {
                    self.remove(&key);
                    reply(
                        StatusCode::OK,
                        &json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success"}),
                    )
                }
                None => failure(StatusCode::NOT_FOUND, "NotFound", name),
            },
            _ => failure(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", path),
        }
    }

    fn list(&self, t: &Target, selector: Option<&str>) -> Reply {
        let (items, version) = self
            .with_store(|s| {
                let items: Vec<Value> = s
                    .objects
                    .iter()
                    .filter(|((c, ns, _), o)| {
                        *c == t.collection
                            && t.namespace.as_ref().is_none_or(|want| want == ns)
                            && matches_labels(o, selector)
                    })
                    .map(|(_, o)| o.clone())
                    .collect();
                (items, s.version)
            })
            .unwrap_or_default();
        reply(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List",
                "metadata": {"resourceVersion": version.to_string()}, "items": items}),
        )
    }

    /// Events on the collection from now on, one JSON object per line, until the server stops.
    fn watch(&self, t: Target, selector: Option<String>) -> Reply {
        self.with_store(|s| s.watches += 1);
        let rx = self.events.subscribe();
        let stop = self.stop.clone();
        let mut ended = self.watches.subscribe();
        ended.mark_unchanged();
        let stream =
            futures::stream::unfold((rx, stop, ended), move |(mut rx, stop, mut ended)| {
                let (collection, namespace, selector) =
                    (t.collection.clone(), t.namespace.clone(), selector.clone());
                async move {
                    loop {
                        let event = tokio::select! {
                            () = stop.cancelled() => return None,
                            _ = ended.changed() => return None,
                            e = rx.recv() => e,
                        };
                        match event {
                            Ok(e)
                                if e.collection == collection
                                    && namespace.as_ref().is_none_or(|n| *n == e.namespace)
                                    && matches_labels(&e.object, selector.as_deref()) =>
                            {
                                let line =
                                    format!("{}\n", json!({"type": e.kind, "object": e.object}));
                                let frame = Ok::<_, Infallible>(Frame::data(Bytes::from(line)));
                                return Some((frame, (rx, stop, ended)));
                            }
                            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                            Err(broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                }
            });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed_unsync())
            .expect("response")
    }

    fn review(&self, body: &[u8]) -> Reply {
        let asked: Value = serde_json::from_slice(body).expect("a TokenReview");
        let token = asked["spec"]["token"].as_str().unwrap_or("");
        let status = match self.tokens.get(token) {
            Some(node) => json!({"authenticated": true,
                "audiences": asked["spec"]["audiences"],
                "user": {"username": "system:serviceaccount:signet-system:signet-agent",
                    "extra": {"authentication.kubernetes.io/pod-name": [format!("signet-agent-{node}")],
                              "authentication.kubernetes.io/pod-uid": [format!("uid-agent-{node}")],
                              "authentication.kubernetes.io/node-name": [node]}}}),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        let mut answer = asked;
        answer["status"] = status;
        reply(StatusCode::CREATED, &answer)
    }
}
