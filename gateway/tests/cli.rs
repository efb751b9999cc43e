//! The command line of the real binary: `gateway token` mints tokens that verify with the
//! configured secret and that a gateway with that secret accepts, and refuses clearly what it
//! cannot mint; a gateway started without any key runs in development mode, printing a secret,
//! two ready tokens of users who share a room and a command per token that connects; each
//! subcommand's help lists only its own flags; logs are plain text unless written to a terminal.
//!
//! Tokens are checked with jsonwebtoken directly and connections made with tokio-tungstenite,
//! not with the gateway's own verifier or codec.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TENANT: &str = "acme";

/// Runs `gateway token ARGS` to completion.
fn token_command(args: &[&str]) -> Output {
    gateway_command()
        .arg("token")
        .args(args)
        .output()
        .expect("running gateway token")
}

/// The one line a successful `gateway token` prints.
fn printed_token(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line, the token: {stdout:?}");
    lines[0].to_owned()
}

/// A failed run: exit status 1, nothing on stdout; returns stderr.
fn failure(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(output.stdout.is_empty(), "{output:?}");
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Verifies an HS256 token with `secret` (signature and `exp`, plus `aud` / `iss` when given)
/// and returns its claims.
fn verify(token: &str, secret: &str, audience: Option<&str>, issuer: Option<&str>) -> Value {
    let mut validation = Validation::new(Algorithm::HS256);
    match audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => validation.validate_aud = false,
    }
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
    }
    let key = DecodingKey::from_secret(secret.as_bytes());
    decode::<Value>(token, &key, &validation)
        .unwrap_or_else(|e| panic!("{token} does not verify: {e}"))
        .claims
}

/// `exp` is `ttl` seconds after a moment between `before` and now.
fn assert_expires_in(claims: &Value, before: u64, ttl: u64) {
    let exp = claims["exp"].as_u64().unwrap_or_else(|| panic!("{claims}"));
    let after = gateway::auth::now_secs();
    assert!(
        (before + ttl..=after + ttl).contains(&exp),
        "exp {exp} not {ttl}s after {before}..{after}"
    );
}

// ---------------------------------------------------------------------------------------------
// gateway token

#[test]
fn token_prints_an_hs256_token_with_the_given_claims_signed_with_the_secret() {
    let before = gateway::auth::now_secs();
    let output = token_command(&[
        "--sub",
        "alice",
        "--tenant",
        TENANT,
        "--role",
        "customer",
        "--name",
        "Alice Liddell",
        "--ttl-secs",
        "600",
        "--jwt-secret",
        SECRET,
    ]);
    let token = printed_token(&output);
    assert_eq!(decode_header(&token).unwrap().alg, Algorithm::HS256);
    let claims = verify(&token, SECRET, None, None);
    assert_eq!(claims["sub"], "alice", "{claims}");
    assert_eq!(claims["tenant"], TENANT, "{claims}");
    assert_eq!(claims["role"], "customer", "{claims}");
    assert_eq!(claims["name"], "Alice Liddell", "{claims}");
    assert_expires_in(&claims, before, 600);
    // No audience or issuer is configured, so none is claimed.
    assert!(
        claims.get("aud").is_none() && claims.get("iss").is_none(),
        "{claims}"
    );
    // Signed with that secret and no other.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.validate_aud = false;
    assert!(decode::<Value>(&token, &DecodingKey::from_secret(b"other"), &validation).is_err());
}

#[test]
fn token_defaults_to_an_agent_for_a_day_and_reads_the_secret_from_the_environment() {
    let before = gateway::auth::now_secs();
    let output = gateway_command()
        .args(["token", "--sub", "bob", "--tenant", TENANT])
        .env("GATEWAY_JWT_SECRET", SECRET)
        .output()
        .unwrap();
    let claims = verify(&printed_token(&output), SECRET, None, None);
    assert_eq!(claims["sub"], "bob", "{claims}");
    assert_eq!(claims["role"], "agent", "{claims}");
    assert!(claims.get("name").is_none(), "{claims}");
    assert_expires_in(&claims, before, 86_400);
}

#[test]
fn token_claims_the_configured_audience_and_issuer() {
    let output = token_command(&[
        "--sub",
        "alice",
        "--tenant",
        TENANT,
        "--jwt-secret",
        SECRET,
        "--jwt-audience",
        "chat",
        "--jwt-issuer",
        "https://idp.example",
    ]);
    let claims = verify(
        &printed_token(&output),
        SECRET,
        Some("chat"),
        Some("https://idp.example"),
    );
    assert_eq!(claims["aud"], "chat", "{claims}");
    assert_eq!(claims["iss"], "https://idp.example", "{claims}");
}

#[test]
fn token_with_an_unknown_role_fails_naming_it_and_the_valid_roles() {
    let output = token_command(&[
        "--sub",
        "alice",
        "--tenant",
        TENANT,
        "--role",
        "wizard",
        "--jwt-secret",
        SECRET,
    ]);
    let stderr = failure(&output);
    assert!(stderr.contains(r#"unknown role "wizard""#), "{stderr}");
    assert!(
        stderr.contains("admin, agent, user, customer, service"),
        "{stderr}"
    );
}

#[test]
fn token_without_a_secret_fails_naming_the_flag_and_takes_no_public_key() {
    let stderr = failure(&token_command(&["--sub", "alice", "--tenant", TENANT]));
    assert!(stderr.contains("minting needs --jwt-secret"), "{stderr}");
    // A public key verifies tokens but cannot sign them, so minting does not take one.
    let public_key = key_file("rsa-public.pem");
    let output = token_command(&[
        "--sub",
        "alice",
        "--tenant",
        TENANT,
        "--jwt-public-key",
        public_key.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--jwt-public-key"), "{stderr}");
}

/// The long flags a `--help` text lists.
fn flags_in_help(args: &[&str]) -> Vec<String> {
    let output = gateway_command().args(args).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8(output.stdout).unwrap();
    let mut flags: Vec<String> = help
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| flag.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .filter(|flag| !flag.is_empty())
        .map(str::to_owned)
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

#[test]
fn token_help_lists_only_what_minting_takes() {
    assert_eq!(
        flags_in_help(&["token", "--help"]),
        [
            "help",
            "jwt-audience",
            "jwt-issuer",
            "jwt-secret",
            "name",
            "role",
            "sub",
            "tenant",
            "ttl-secs"
        ],
    );
    // The server's flags are where the server is: with no subcommand and after `serve`.
    for args in [&["--help"][..], &["serve", "--help"]] {
        let flags = flags_in_help(args);
        for flag in ["listen", "data-dir", "shards", "jwt-public-key", "log"] {
            assert!(flags.iter().any(|f| f == flag), "{args:?} lacks --{flag}");
        }
    }
}

#[tokio::test]
async fn serve_takes_the_server_flags_after_the_subcommand_too() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = gateway_command()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--jwt-secret", SECRET, "--shards", "1", "--log", "warn"])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while try_get_status(addr, "/readyz").await != Some(200) {
        assert!(child.try_wait().unwrap().is_none(), "the gateway exited");
        assert!(
            Instant::now() < deadline,
            "the gateway did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let process = GatewayProcess { child, addr };
    let mut client = process
        .connect("alice", TENANT, gateway::auth::Role::Agent)
        .await;
    client.ping().await;
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = gateway_command()
        .args(["--listen", "127.0.0.1:0", "--shards", "1", "--log", "info"])
        .args(["--jwt-secret", SECRET])
        .arg("--data-dir")
        .arg(dir.path())
        // tracing-subscriber honours NO_COLOR on its own; the pipe alone must be enough.
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("gateway listening"))
    {
        let line = lines
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no start-up log line in {seen:#?}"));
        seen.push(line);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.iter().all(|l| !l.contains('\x1b')),
        "colour codes in {seen:#?}"
    );
}

#[tokio::test]
async fn minted_token_is_accepted_by_a_gateway_with_the_same_secret_only() {
    let dir = tempfile::tempdir().unwrap();
    let process = GatewayProcess::spawn(dir.path()).await;
    let minted = printed_token(&token_command(&[
        "--sub",
        "alice",
        "--tenant",
        TENANT,
        "--role",
        "agent",
        "--jwt-secret",
        SECRET,
    ]));
    let mut client = Client::connect(&process.url(&minted), "alice").await;
    assert_eq!(client.connected["user_id"], "alice");
    assert_eq!(client.connected["data"]["tenant_id"], TENANT);
    client.join("minted").await;
    client.ping().await;

    let foreign = printed_token(&token_command(&[
        "--sub",
        "alice",
        "--tenant",
        TENANT,
        "--jwt-secret",
        "another-secret",
    ]));
    let request = process.url(&foreign).into_client_request().unwrap();
    assert_eq!(handshake_status(request).await, 401);
}

#[tokio::test]
async fn minted_token_satisfies_a_gateway_that_requires_audience_and_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let required = ["--jwt-audience", "chat", "--jwt-issuer", "idp"];
    let process = GatewayProcess::spawn_with(dir.path(), &required).await;
    let mut args = vec!["--sub", "alice", "--tenant", TENANT, "--jwt-secret", SECRET];
    let plain = printed_token(&token_command(&args));
    args.extend(required);
    let claimed = printed_token(&token_command(&args));
    let mut client = Client::connect(&process.url(&claimed), "alice").await;
    client.ping().await;
    // The same token without the claims is refused.
    let request = process.url(&plain).into_client_request().unwrap();
    assert_eq!(handshake_status(request).await, 401);
}

// ---------------------------------------------------------------------------------------------
// Development mode

/// What the development-mode banner says.
struct Banner {
    text: String,
    secret: String,
    /// The tokens, in the order printed.
    tokens: Vec<String>,
    /// The whole `connect:` lines, one per token.
    commands: Vec<String>,
    /// The URL inside each command.
    urls: Vec<String>,
}

/// The lines a child writes to stderr, read on a thread of their own that keeps draining, so
/// the child never blocks on a full pipe.
fn stderr_lines(stderr: std::process::ChildStderr) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    rx
}

/// Reads the binary's stderr until the banner's closing line of stars.
fn read_banner(stderr: std::process::ChildStderr) -> Banner {
    let rx = stderr_lines(stderr);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines: Vec<String> = Vec::new();
    while lines
        .iter()
        .filter(|l| l.trim().starts_with("****"))
        .count()
        < 2
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => panic!("no complete banner on stderr; got {lines:#?}"),
        }
    }
    let after = |prefix: &str| -> Vec<String> {
        lines
            .iter()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .map(|rest| rest.trim().to_owned())
            .collect()
    };
    let secret = after("secret:")
        .pop()
        .unwrap_or_else(|| panic!("no secret line in {lines:#?}"));
    let tokens = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim().starts_with("token ("))
        .map(|(i, _)| lines[i + 1].trim().to_owned())
        .collect();
    let commands = after("connect:");
    let urls = commands
        .iter()
        .map(|command| {
            command
                .split('\'')
                .nth(1)
                .unwrap_or_else(|| panic!("no quoted URL in {command:?}"))
                .to_owned()
        })
        .collect();
    Banner {
        text: lines.join("\n"),
        secret,
        tokens,
        commands,
        urls,
    }
}

/// The binary in development mode (no key) on port 0, with its banner.
fn spawn_dev_mode(dir: &std::path::Path) -> (std::process::Child, Banner) {
    let mut child = gateway_command()
        .args(["--listen", "127.0.0.1:0", "--shards", "1", "--log", "warn"])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let banner = read_banner(child.stderr.take().unwrap());
    (child, banner)
}

#[tokio::test]
async fn without_a_key_the_gateway_prints_a_secret_two_tokens_and_commands_that_connect() {
    let dir = tempfile::tempdir().unwrap();
    // Port 0: the banner must report the address actually bound.
    let (child, banner) = spawn_dev_mode(dir.path());
    let text = &banner.text;
    assert!(text.contains("DEVELOPMENT MODE"), "{text}");
    assert!(text.contains("random secret"), "{text}");
    assert!(
        text.contains("Do not run like this in production"),
        "{text}"
    );
    assert_eq!(banner.secret.len(), 64, "{text}");
    assert!(
        banner.secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "{text}"
    );
    assert_eq!(banner.tokens.len(), 2, "{text}");
    assert_eq!(banner.commands.len(), 2, "{text}");

    let before = gateway::auth::now_secs() - 60;
    let expected = [
        ("dev-admin", "admin", "Developer"),
        ("dev-agent", "agent", "Second Developer"),
    ];
    let mut port = 0;
    for (i, (sub, role, name)) in expected.into_iter().enumerate() {
        let claims = verify(&banner.tokens[i], &banner.secret, None, None);
        assert_eq!(claims["sub"], sub, "{claims}");
        assert_eq!(claims["tenant"], "dev", "{claims}");
        assert_eq!(claims["role"], role, "{claims}");
        assert_eq!(claims["name"], name, "{claims}");
        assert!(
            claims["exp"].as_u64().unwrap() > before + 86_400 - 120,
            "{claims}"
        );
        // --yes: npx would otherwise stop at a prompt to install wscat.
        assert!(
            banner.commands[i].starts_with("npx --yes wscat -c '"),
            "{}",
            banner.commands[i]
        );
        let rest = banner.urls[i]
            .strip_prefix("ws://127.0.0.1:")
            .unwrap_or_else(|| panic!("{}", banner.urls[i]));
        let (printed_port, query) = rest.split_once("/ws?token=").unwrap();
        port = printed_port.parse().unwrap();
        assert_ne!(port, 0, "the banner names the bound port");
        assert_eq!(query, banner.tokens[i]);
    }

    let process = GatewayProcess {
        child,
        addr: ([127, 0, 0, 1], port).into(),
    };
    let mut admin = Client::connect(&banner.urls[0], "dev-admin").await;
    assert_eq!(admin.connected["status"], "success");
    assert_eq!(admin.connected["user_id"], "dev-admin");
    assert_eq!(admin.connected["data"]["tenant_id"], "dev");
    let mut agent = Client::connect(&banner.urls[1], "dev-agent").await;
    assert_eq!(agent.connected["data"]["tenant_id"], "dev");

    // Both printed users take part in the lobby and hear each other there.
    for client in [&mut admin, &mut agent] {
        let v = client.join("lobby").await;
        assert_eq!(v["data"]["room"]["kind"], "team", "{v}");
    }
    let r = admin.chat("lobby", "hello from dev mode").await;
    assert_eq!(r["status"], "success", "{r}");
    let heard = agent.recv_code("chat_response").await;
    assert_eq!(heard["user_id"], "dev-admin", "{heard}");
    assert_eq!(heard["data"]["message"], "hello from dev mode", "{heard}");
    agent.chat("lobby", "hello back").await;
    let heard = admin.recv_code("chat_response").await;
    assert_eq!(heard["user_id"], "dev-agent", "{heard}");
    assert_eq!(heard["data"]["message"], "hello back", "{heard}");
    // The README's other example frames, exactly as written there.
    agent
        .send(
            serde_json::json!({"code": "typing", "user_id": "dev-agent", "room_id": "lobby",
            "data": {"status": "started", "sender": "dev-agent"}}),
        )
        .await;
    let typing = admin.recv_code("typing_response").await;
    assert_eq!(typing["data"]["status"], "started", "{typing}");
    agent
        .send(
            serde_json::json!({"code": "read_receipt", "user_id": "dev-agent",
            "room_id": "lobby", "data": {"message_id": r["data"]["message_id"],
            "sender": "dev-agent"}}),
        )
        .await;
    let receipt = admin.recv_code("read_receipt_response").await;
    assert_eq!(receipt["data"]["seq"], r["data"]["seq"], "{receipt}");
    agent
        .send(
            serde_json::json!({"code": "presence", "user_id": "dev-agent",
            "data": {"status": "away", "sender": "dev-agent"}}),
        )
        .await;
    let presence = admin.recv_code("presence_response").await;
    assert_eq!(presence["data"]["status"], "away", "{presence}");

    // Any other room is created on join, as outside development mode.
    let v = admin.join("dev-room").await;
    assert_eq!(v["data"]["room"]["kind"], "team", "{v}");

    // The printed secret is the one in effect: tokens minted with it get in too.
    let minted = printed_token(&token_command(&[
        "--sub",
        "bob",
        "--tenant",
        "dev",
        "--jwt-secret",
        &banner.secret,
    ]));
    let mut bob = Client::connect(&process.url(&minted), "bob").await;
    bob.ping().await;
}

#[tokio::test]
async fn development_mode_restarted_on_the_same_data_keeps_both_users_in_the_lobby() {
    let dir = tempfile::tempdir().unwrap();
    for run in 0..2 {
        let (mut child, banner) = spawn_dev_mode(dir.path());
        let mut agent = Client::connect(&banner.urls[1], "dev-agent").await;
        let v = agent.join("lobby").await;
        assert_eq!(v["status"], "success", "run {run}: {v}");
        let r = agent.chat("lobby", "still here").await;
        assert_eq!(r["data"]["seq"], run + 1, "run {run}: {r}");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// `gateway migrate` creates the embedded store's schema (and is a no-op the second time); a
/// URL it cannot use fails naming the problem.
#[test]
fn migrate_creates_the_schema_and_reports_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    for _ in 0..2 {
        let output = gateway_command()
            .args(["migrate", "--data-dir"])
            .arg(&data_dir)
            .output()
            .expect("running gateway migrate");
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert_eq!(
            stdout.trim(),
            format!(
                "store schema is at version {}",
                storage::sqlite::SCHEMA_VERSION
            )
        );
    }
    assert!(data_dir.join("gateway.db").exists());
    let output = gateway_command()
        .args(["migrate", "--store", "postgres://db/chat"])
        .output()
        .unwrap();
    let stderr = failure(&output);
    assert!(
        stderr.contains("unsupported store scheme \"postgres\""),
        "{stderr}"
    );
}
