//! A small measuring client: throughput of one busy room and memory per idle connection.
//!
//! ```sh
//! cargo run --release -p gateway -- --jwt-secret s --shards 1 --rate-limit 1000000 &     # the server under test
//! cargo run --release -p gateway --example fanout_probe -- fanout ws://127.0.0.1:8080 s 100 10 20
//! cargo run --release -p gateway --example fanout_probe -- idle ws://127.0.0.1:8080 s 5000 <server-pid>
//! ```
//!
//! `fanout URL SECRET MEMBERS SENDERS SECONDS`: MEMBERS connections join one room; SENDERS of them
//! send chat messages as fast as the server acknowledges them (a window of 32 in flight each);
//! prints messages/s accepted and deliveries/s received by the other members.
//! `idle URL SECRET N PID`: opens N idle connections and prints the server's RSS growth per
//! connection (from /proc/PID/status).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gateway::auth::{now_secs, Claims, KeySource, Role, Verifier};
use tokio_tungstenite::tungstenite::Message;

fn token(secret: &str, user: &str) -> String {
    Verifier::new(KeySource::Secret(secret.as_bytes()), &[], &[], 0)
        .unwrap()
        .mint(&Claims {
            sub: user.to_owned(),
            tenant: "bench".to_owned(),
            role: Role::Admin,
            exp: now_secs() + 3600,
            name: None,
            aud: None,
            iss: None,
        })
        .unwrap()
}

fn rss_kib(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, url, secret) = (args[1].as_str(), args[2].clone(), args[3].clone());
    match mode {
        "fanout" => {
            let members: usize = args[4].parse().unwrap();
            let senders: usize = args[5].parse().unwrap();
            let seconds: u64 = args[6].parse().unwrap();
            fanout(&url, &secret, members, senders, seconds).await
        }
        "idle" => idle(&url, &secret, args[4].parse().unwrap(), &args[5]).await,
        other => panic!("unknown mode {other}"),
    }
}

async fn fanout(url: &str, secret: &str, members: usize, senders: usize, seconds: u64) {
    let room = format!("bench-{}", now_secs());
    let accepted = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    let ready = Arc::new(tokio::sync::Barrier::new(members + 1));
    for i in 0..members {
        let user = format!("u{i}");
        let (ws, _) =
            tokio_tungstenite::connect_async(format!("{url}/ws?token={}", token(secret, &user)))
                .await
                .unwrap();
        let (mut tx, mut rx) = ws.split();
        rx.next().await.unwrap().unwrap(); // connected
        tx.send(Message::text(format!(
            r#"{{"code":"join","user_id":"{user}","room_id":"{room}","data":{{}}}}"#
        )))
        .await
        .unwrap();
        loop {
            if let Message::Text(t) = rx.next().await.unwrap().unwrap() {
                if t.contains("join_response") {
                    break;
                }
            }
        }
        let sender = i < senders;
        let room = room.clone();
        let (accepted, delivered, stop, ready) = (
            accepted.clone(),
            delivered.clone(),
            stop.clone(),
            ready.clone(),
        );
        tasks.push(tokio::spawn(async move {
            ready.wait().await;
            let window = Arc::new(tokio::sync::Semaphore::new(if sender { 32 } else { 0 }));
            let send_window = window.clone();
            let send_stop = stop.clone();
            let writer = tokio::spawn(async move {
                let body = "x".repeat(100);
                while sender && !send_stop.load(Ordering::Relaxed) {
                    send_window.acquire().await.unwrap().forget();
                    let frame = format!(
                        r#"{{"code":"chat","user_id":"{user}","room_id":"{room}","data":{{"message":"{body}","sender":"{user}"}},"ref":"r"}}"#
                    );
                    if tx.send(Message::text(frame)).await.is_err() {
                        break;
                    }
                }
                tx
            });
            while let Some(Ok(message)) = rx.next().await {
                if let Message::Text(t) = message {
                    if t.contains("\"ref\":\"r\"") {
                        assert!(t.contains("\"status\":\"success\""), "request failed: {t}");
                        accepted.fetch_add(1, Ordering::Relaxed);
                        window.add_permits(1);
                    } else if t.contains("chat_response") {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            drop(writer);
        }));
    }
    ready.wait().await;
    tokio::time::sleep(Duration::from_secs(1)).await; // warm-up
    let (a0, d0, t0) = (
        accepted.load(Ordering::Relaxed),
        delivered.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let a = accepted.load(Ordering::Relaxed) - a0;
    let d = delivered.load(Ordering::Relaxed) - d0;
    stop.store(true, Ordering::Relaxed);
    println!(
        "room of {members} members, {senders} senders, {seconds}s: {:.0} messages/s accepted, {:.0} deliveries/s",
        a as f64 / elapsed,
        d as f64 / elapsed
    );
    std::process::exit(0);
}

async fn idle(url: &str, secret: &str, n: usize, pid: &str) {
    let before = rss_kib(pid);
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "{url}/ws?token={}",
            token(secret, &format!("idle{i}"))
        ))
        .await
        .unwrap();
        ws.next().await.unwrap().unwrap();
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    println!(
        "{n} idle connections: server RSS {before} KiB -> {after} KiB, {:.2} KiB per connection",
        (after.saturating_sub(before)) as f64 / n as f64
    );
}
