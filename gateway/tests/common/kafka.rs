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

/// A binary of the `workers` package (next to the test binary), built when it is missing.
pub fn worker_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/kafka-… → target/debug/{name}
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "workers", "--bin", name])
            .current_dir(repo_root())
            .status()
            .unwrap();
        assert!(status.success(), "building {name}");
    }
    path
}

/// A worker binary (`email-worker`, `push-worker`, …) as a child process on the Kafka bus: its
/// topics behind `prefix`, its ledger in `state`, its HTTP server (`/healthz`, webhooks) on a
/// free port given in `listen_var`; its log in `state/{name}.log`, shown when a test fails.
/// Killed when dropped.
pub struct WorkerProcess {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    name: String,
    log: PathBuf,
}

impl WorkerProcess {
    /// Starts `name` and waits until its `/healthz` answers 200 (a port taken meanwhile: another).
    pub async fn start(
        name: &str,
        brokers: &str,
        prefix: &str,
        state: &Path,
        listen_var: &str,
        env: &[(&str, String)],
    ) -> WorkerProcess {
        let binary = worker_binary(name);
        let log = state.join(format!("{name}.log"));
        for _ in 0..5 {
            let addr: std::net::SocketAddr = format!("127.0.0.1:{}", crate::common::free_port())
                .parse()
                .unwrap();
            // Its stdout and stderr both (wherever its logging writes).
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .unwrap();
            let child = Command::new(&binary)
                .env("KAFKA_BROKERS", brokers)
                .env("BUS_TOPIC_PREFIX", prefix)
                .env("WORKER_STATE_DIR", state)
                .env(listen_var, addr.to_string())
                .env("RUST_LOG", "info,librdkafka=warn")
                .env("NO_COLOR", "1")
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(stderr.try_clone().unwrap())
                .stderr(stderr)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            let mut worker = WorkerProcess {
                child,
                addr,
                name: name.to_owned(),
                log: log.clone(),
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if worker.child.try_wait().unwrap().is_some() {
                    break;
                }
                if crate::common::try_get_status(addr, "/healthz").await == Some(200) {
                    return worker;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = worker.child.kill();
            let _ = worker.child.wait();
        }
        panic!(
            "{name} did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM (with kill(1): the workspace forbids unsafe code), and its exit status within
    /// `within`.
    pub async fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} did not stop within {within:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- the last lines {} logged:", self.name);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
