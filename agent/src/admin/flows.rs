//! `GET /flows`: the node's recent flows as newline-delimited JSON, one
//! [`FlowEntry`](crate::flow::FlowEntry) per line, what `signet observe` merges across nodes.
//!
//! - `after=SEQ`: only records after that sequence number (a follower resumes with it);
//! - `since_ms=T`: only records at or after Unix milliseconds `T`;
//! - `follow=1`: stay open and send records as they come, until the agent stops.
//!
//! A follower that reads slower than records arrive loses the ones the ring overwrote: it gets
//! a line `{"lost": N}` in their place, and `signet_flow_records_lost_total` counts them. Like
//! `/debug/state`, it answers only on this node's loopback: flows name pods and addresses.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt as _, combinators::BoxBody};
use tokio_util::sync::CancellationToken;

use crate::flow::FlowLog;

/// What a `/flows` request asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Query {
    pub after: u64,
    pub since_ms: u64,
    pub follow: bool,
}

impl Query {
    /// Reads `after`, `since_ms` and `follow` from a query string; anything else is an error
    /// that names it.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut q = Query::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("`{k}={v}`: expected a number"))
            };
            match k {
                "after" => q.after = number(v)?,
                "since_ms" => q.since_ms = number(v)?,
                "follow" => q.follow = matches!(v, "" | "1" | "true"),
                other => {
                    return Err(format!(
                        "unknown parameter `{other}` (after, since_ms, follow)"
                    ));
                }
            }
        }
        Ok(q)
    }
}

/// How long a follower's stream waits, once a record has come, for others to send with it: at
/// thousands of records a second, one chunk (one write, one wake-up of the reader) per record
/// costs the node far more than the records themselves; a person following sees no delay.
const FOLLOW_BATCH: std::time::Duration = std::time::Duration::from_millis(20);

/// One chunk of lines: what lies after `after` (a `lost` line first when records were
/// overwritten before this reader saw them), and the last sequence number sent.
fn chunk(log: &FlowLog, after: u64, since_ms: u64) -> (Bytes, u64) {
    let (records, lost) = log.after(after);
    let mut out = Vec::new();
    if lost > 0 {
        log.count_lost(lost);
        out.extend_from_slice(format!("{{\"lost\":{lost}}}\n").as_bytes());
    }
    let mut last = after;
    for r in records {
        last = r.seq;
        if r.time_ms < since_ms {
            continue;
        }
        if serde_json::to_writer(&mut out, &*r).is_ok() {
            out.push(b'\n');
        }
    }
    (Bytes::from(out), last)
}

/// The response to `/flows?query`: everything kept now, or (following) a stream that ends when
/// `stop` fires.
pub fn respond(
    log: Arc<FlowLog>,
    query: Query,
    stop: CancellationToken,
) -> Response<BoxBody<Bytes, std::convert::Infallible>> {
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/x-ndjson");
    if !query.follow {
        let (body, _) = chunk(&log, query.after, query.since_ms);
        return builder
            .body(http_body_util::Full::new(body).boxed())
            .expect("static headers are valid");
    }
    let stream = futures::stream::unfold((log, query.after, true), move |(log, after, first)| {
        let stop = stop.clone();
        async move {
            if !first {
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = async {
                        log.wait_beyond(after).await;
                        tokio::time::sleep(FOLLOW_BATCH).await;
                    } => {}
                }
            }
            let (body, last) = chunk(&log, after, query.since_ms);
            let frame = Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(body));
            Some((frame, (log, last, false)))
        }
    });
    builder
        .body(http_body_util::StreamBody::new(stream).boxed())
        .expect("static headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_read_strictly() {
        assert_eq!(Query::parse(None), Ok(Query::default()));
        assert_eq!(
            Query::parse(Some("after=7&follow=1&since_ms=5")),
            Ok(Query {
                after: 7,
                since_ms: 5,
                follow: true
            })
        );
        assert!(Query::parse(Some("after=x")).is_err_and(|e| e.contains("after=x")));
        assert!(Query::parse(Some("verdict=dropped")).is_err_and(|e| e.contains("verdict")));
    }

    #[test]
    fn a_chunk_says_what_was_lost_then_the_records() {
        let log = FlowLog::new(2);
        for _ in 0..4 {
            log.push(crate::flow::FlowEntry::default());
        }
        let (body, last) = chunk(&log, 1, 0);
        let text = String::from_utf8(body.to_vec()).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "{\"lost\":1}", "{text}");
        assert_eq!(lines.len(), 3);
        assert_eq!(last, 4);
        assert_eq!(log.lost(), 1);
    }
}
