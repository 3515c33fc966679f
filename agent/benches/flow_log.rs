//! How many flows per second one agent can record and stream to a `signet observe` follower with
//! no loss: the agent's own admin server (`/flows?follow=1`) over loopback, its flow log of the
//! default size, and a follower reading NDJSON over HTTP as `signet observe -f` does. A producer
//! writes records at a set rate for a few seconds; the follower counts what it received and what
//! it was told it lost. The rate doubles until records are lost, and the highest loss-free rate
//! is printed. Not a test: `cargo bench -p signet-agent --bench flow_log`.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use signet_agent::admin::metrics::Metrics;
use signet_agent::admin::{AdminState, serve};
use signet_agent::drain::Drain;
use signet_agent::flow::{FlowEntry, HttpInfo, Peer};

/// A record as big as a real one: both sides named, an HTTP decision, a rule and a reason.
fn record(i: u64) -> FlowEntry {
    FlowEntry {
        reporter: "inbound".into(),
        source: Peer {
            identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
            number: Some(260),
            address: Some(([10, 99, 11, 2], 30_000 + (i % 30_000) as u16).into()),
            pod: Some("shop/web-0".into()),
        },
        destination: Peer {
            identity: "spiffe://cluster.local/ns/payments/sa/api".into(),
            number: Some(258),
            address: Some(([10, 99, 21, 2], 8080).into()),
            pod: Some("payments/api-0".into()),
        },
        protocol: "tcp".into(),
        verdict: "l7-denied".into(),
        reason: Some("no `http` rule of payments/api ingress[0] matches".into()),
        http: Some(HttpInfo {
            method: "POST".into(),
            path: "/v1/items".into(),
            status: 403,
        }),
        ..Default::default()
    }
}

/// Follows `/flows` on `tcp` until the connection is shut down, counting records and losses.
fn follow(mut tcp: std::net::TcpStream, got: Arc<AtomicU64>, lost: Arc<AtomicU64>) {
    // Only what comes from now on: the ring still holds the previous round's records.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    write!(
        tcp,
        "GET /flows?follow=1&since_ms={now_ms} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut r = BufReader::new(tcp);
    let mut line = String::new();
    // Status line and headers.
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let mut pending = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let Ok(n) = usize::from_str_radix(line.trim(), 16) else {
            return;
        };
        if n == 0 {
            return;
        }
        let mut data = vec![0; n + 2];
        if r.read_exact(&mut data).is_err() {
            return;
        }
        data.truncate(n);
        pending.extend_from_slice(&data);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let rec: Vec<u8> = pending.drain(..=i).collect();
            if rec.starts_with(b"{\"lost\":") {
                let n: u64 = std::str::from_utf8(&rec[8..rec.len() - 2])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                lost.fetch_add(n, Ordering::Relaxed);
            } else {
                got.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let metrics = Arc::new(Metrics::default());
    metrics.flows().set_node("node-a");
    let drain = Drain::new();
    let admin = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = AdminState {
            metrics: metrics.clone(),
            gauges: Arc::new(Default::default),
            readiness: Arc::new(|| Ok(())),
            debug: Arc::new(Default::default),
            status: Arc::new(Default::default),
        };
        drain.spawn(
            "admin",
            serve(listener, state, Duration::from_secs(10), drain.clone()),
        );
        addr
    });
    let seconds = 2;
    let mut best = 0u64;
    let mut rate = 5_000u64;
    println!("flow log: record and stream to one follower, {seconds} s per rate");
    println!(
        "{:>12} {:>12} {:>12} {:>8}",
        "offered/s", "received", "lost", "loss"
    );
    while rate <= 1_280_000 {
        let (got, lost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let tcp = std::net::TcpStream::connect(admin).expect("connect");
        let control = tcp.try_clone().expect("clone");
        let reader = {
            let (got, lost) = (got.clone(), lost.clone());
            std::thread::spawn(move || follow(tcp, got, lost))
        };
        // Let the follower's stream start before records come.
        std::thread::sleep(Duration::from_millis(200));
        let total = rate * seconds;
        let start = Instant::now();
        for i in 0..total {
            metrics.flows().push(record(i));
            // Paced in batches of 100 so the rate holds without a sleep per record.
            if i % 100 == 99 {
                let due = Duration::from_secs_f64((i + 1) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let produced = start.elapsed();
        // What is still in flight reaches the follower, or is reported lost.
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.load(Ordering::Relaxed) + lost.load(Ordering::Relaxed) < total
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (g, l) = (got.load(Ordering::Relaxed), lost.load(Ordering::Relaxed));
        let achieved = total as f64 / produced.as_secs_f64();
        println!(
            "{:>12.0} {:>12} {:>12} {:>7.2}%",
            achieved,
            g,
            l,
            100.0 * l as f64 / total as f64
        );
        let _ = control.shutdown(std::net::Shutdown::Both);
        let _ = reader.join();
        if l > 0 || g < total {
            break;
        }
        best = achieved as u64;
        rate *= 2;
    }
    println!("highest rate with no loss: {best} flows/s (aim: 10,000/s per node)");
    rt.block_on(drain.shutdown(Duration::from_millis(100)));
}
