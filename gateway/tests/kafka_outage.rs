//! Kafka stopped while the gateway runs: chat goes on (stored, acknowledged, delivered), the
//! events wait in the producer's bounded buffer, `/readyz` says the bus is unavailable, and
//! once Kafka is back every event reaches the topic, once. It stops the shared broker, so
//! `scripts/test` runs it alone, after the other tests (`KAFKA_NODE_DIR`, `KAFKA_NODE_PORT`).

mod common;
#[path = "common/kafka.rs"]
mod kafka;

use std::process::Command;
use std::time::{Duration, Instant};

use common::inbox::TENANT;
use common::*;
use gateway::auth::Role;
use kafka::{brokers, gateway_on_kafka, prefix, read_topic, repo_root};
use serde_json::Value;

fn scripts_kafka(args: &[&str]) {
    let status = Command::new(repo_root().join("scripts/kafka"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/kafka {args:?}");
}

async fn bus_status(server: &TestServer) -> Value {
    let (status, body) = http_get(server.addr, "/readyz").await;
    assert_eq!(status, 200, "chat is up whatever the bus: {body}");
    let ready: Value = serde_json::from_str(&body).unwrap();
    ready["bus"].clone()
}

async fn wait_bus(server: &TestServer, wanted: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let bus = bus_status(server).await;
        if bus["status"] == wanted {
            return bus;
        }
        assert!(Instant::now() < deadline, "bus never {wanted}: {bus}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_kafka_down_chat_goes_on_and_every_event_arrives_once_kafka_is_back() {
    let Some(brokers) = brokers() else { return };
    let (Ok(node_dir), Ok(node_port)) = (
        std::env::var("KAFKA_NODE_DIR"),
        std::env::var("KAFKA_NODE_PORT"),
    ) else {
        let why = "KAFKA_NODE_DIR and KAFKA_NODE_PORT are not set (scripts/test sets them)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    let prefix = prefix();
    let server = gateway_on_kafka(&brokers, &prefix).await;
    let room = "outage-room";
    create_room(
        &server,
        &token("root", TENANT, Role::Admin),
        serde_json::json!({"room_id": room, "kind": "team", "participants": ["alice", "bob"]}),
    )
    .await;
    let mut alice = server.connect("alice", TENANT, Role::Agent).await;
    let mut bob = server.connect("bob", TENANT, Role::Agent).await;
    alice.join(room).await;
    bob.join(room).await;
    let ack = alice.chat(room, "before").await;
    assert_eq!(ack["status"], "success", "{ack}");
    wait_bus(&server, "ok", Duration::from_secs(20)).await;

    scripts_kafka(&["stop", &node_dir]);
    let down = wait_bus(&server, "unavailable", Duration::from_secs(30)).await;
    assert_eq!(down["kind"], "kafka");
    const DURING: usize = 20;
    for i in 0..DURING {
        let ack = alice.chat(room, &format!("during {i}")).await;
        assert_eq!(
            ack["status"], "success",
            "chat goes on without Kafka: {ack}"
        );
    }
    // Delivered to the room's sockets as always.
    let mut seen = 0;
    while seen < DURING + 1 {
        let frame = bob.recv_code("chat_response").await;
        if frame["data"]["sender"] == "alice" {
            seen += 1;
        }
    }

    scripts_kafka(&["start", &node_dir, &node_port]);
    wait_bus(&server, "ok", Duration::from_secs(60)).await;
    let topic = format!("{prefix}conversation.events");
    let deadline = Instant::now() + Duration::from_secs(60);
    let texts = loop {
        let events = read_topic(&brokers, &topic);
        let texts: Vec<String> = events
            .iter()
            .filter(|e| e["type"] == "message.created" && e["room_id"] == room)
            .map(|e| {
                e["message"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect();
        if texts.len() > DURING || Instant::now() > deadline {
            break texts;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut expected = vec!["before".to_owned()];
    expected.extend((0..DURING).map(|i| format!("during {i}")));
    // Every event, once, in the room's order (one key, one partition).
    assert_eq!(texts, expected);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("gateway_bus_events_total{outcome=\"dropped\"} 0"),
        "{metrics}"
    );
    server.stop().await;
}
