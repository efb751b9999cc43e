//! The real `gateway` binary as a child process, for what only a process shows: crashes,
//! signals, exit statuses and what the command line prints.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gateway::auth::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{token, Client, SECRET};

/// The `gateway` binary with no `GATEWAY_*` variable inherited, so that only the arguments a
/// test passes configure it.
pub fn gateway_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GATEWAY_") {
            command.env_remove(name);
        }
    }
    command.stdin(Stdio::null());
    command
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` that tolerates a server that is not up (or no longer up): `None` when nothing
/// answered within two seconds.
pub async fn try_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.ok()?;
        String::from_utf8_lossy(&out)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// The real binary serving on a free port, killed when dropped.
pub struct GatewayProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl GatewayProcess {
    /// Starts the binary with the test secret, two shards and no practical rate limit, and
    /// waits until `/readyz` answers 200.
    pub async fn spawn(dir: &Path) -> GatewayProcess {
        GatewayProcess::spawn_with(dir, &[]).await
    }

    /// As [`GatewayProcess::spawn`], with extra arguments.
    pub async fn spawn_with(dir: &Path, extra: &[&str]) -> GatewayProcess {
        super::prepare_test_store(dir).await;
        let store: Vec<String> = super::test_store_url(dir)
            .map(|url| vec!["--store".to_owned(), url])
            .unwrap_or_default();
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let child = gateway_command()
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--data-dir")
                .arg(dir)
                .args(&store)
                .args(["--jwt-secret", SECRET, "--shards", "2"])
                .args(["--rate-limit", "1000000", "--rate-burst", "1000000"])
                .args(["--log", "warn"])
                .args(extra)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawning the gateway binary");
            let mut process = GatewayProcess { child, addr };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if process.child.try_wait().unwrap().is_some() {
                    break; // e.g. the port was taken meanwhile: try another
                }
                if try_get_status(addr, "/readyz").await == Some(200) {
                    return process;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        panic!("the gateway binary did not become ready");
    }

    pub fn url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    pub async fn connect(&self, user: &str, tenant: &str, role: Role) -> Client {
        Client::connect(&self.url(&token(user, tenant, role)), user).await
    }

    /// SIGKILL (what `Child::kill` sends), then reap.
    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends a signal by name (`TERM`, `INT`, …) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
