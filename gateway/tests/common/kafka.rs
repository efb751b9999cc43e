//! Helpers of the tests on a real Kafka broker: the broker's address, a topic prefix of each
//! test's own, Kafka's console tools as an independent client, a gateway on the Kafka bus.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{Client, TestServer};

/// The broker, or `None` (the test is skipped) outside CI when none was started.
pub fn brokers() -> Option<String> {
    match std::env::var("KAFKA_BROKERS") {
        Ok(brokers) if !brokers.is_empty() => Some(brokers),
        _ => {
            let why = "KAFKA_BROKERS is not set: run scripts/test (it starts Kafka)";
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// A topic prefix no other test uses.
pub fn prefix() -> String {
    format!("t{}.", ulid::Ulid::new().to_string().to_lowercase())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs one of Kafka's command-line tools (`scripts/kafka tool …`), feeding `input`.
pub fn kafka_tool(args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(repo_root().join("scripts/kafka"))
        .arg("tool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "kafka {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every record of `topic` so far (read by Kafka's console consumer), as JSON.
pub fn read_topic(brokers: &str, topic: &str) -> Vec<Value> {
    let out = kafka_tool(
        &[
            "console-consumer",
            "--bootstrap-server",
            brokers,
            "--topic",
            topic,
            "--from-beginning",
            "--timeout-ms",
            "8000",
        ],
        "",
    );
    out.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| json!({"raw": line})))
        .collect()
}

/// Produces one keyed record with Kafka's console producer.
pub fn produce(brokers: &str, topic: &str, key: &str, payload: &str) {
    kafka_tool(
        &[
            "console-producer",
            "--bootstrap-server",
            brokers,
            "--topic",
            topic,
            "--reader-property",
            "parse.key=true",
            "--reader-property",
            "key.separator=|",
        ],
        &format!("{key}|{payload}\n"),
    );
}

/// The next frame with `code`, waiting up to `within` (the bus adds hops: consumers joining
/// their group, batching).
pub async fn frame(client: &mut Client, code: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.recv_within(left).await {
            Some(frame) if frame["code"] == code => return frame,
            Some(_) => {}
            None => panic!("no {code} within {within:?}"),
        }
    }
}

pub async fn gateway_on_kafka(brokers: &str, prefix: &str) -> TestServer {
    let (brokers, prefix) = (brokers.to_owned(), prefix.to_owned());
    TestServer::start_with(move |config| {
        config.kafka_brokers = Some(brokers);
        config.bus_topic_prefix = prefix;
    })
    .await
}
