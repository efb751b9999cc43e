//! The conversation gateway: the coded JSON protocol (`PROTOCOL.md`) over WebSocket, with room
//! shards per core and durable storage.
//!
//! # Layout
//!
//! - [`codec`]: envelope parsing and frame encoding; no I/O.
//! - [`cmd`]: one module per protocol code: its parsing, access rule and effect.
//! - [`connection`]: one WebSocket in one task: frames in, batched writes out, limits.
//! - [`outbox`]: a connection's bounded outbound queue and the slow-consumer policy.
//! - [`liveness`]: each shard's connections and its heartbeat, expiry and shutdown sweep.
//! - [`shard`]: room shards, each a thread that owns its rooms outright.
//! - [`presence`]: who is online, across rooms, and how to reach a user's connections.
//! - [`inbox`]: conversations as the team's inbox sees them: subscriptions, views, changes
//!   and the activity messages cause.
//! - [`integration`]: the gateway on the integration bus: events out, inbound messages and
//!   delivery states in.
//! - [`auth`]: JWT verification, claims, access rules, token minting.
//! - [`server`]: the HTTP front, start-up and graceful shutdown.
//! - [`http`]: the HTTP API (`/api/v1`) and its OpenAPI document.
//! - [`metrics`], [`config`].
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use gateway::{auth::{KeySource, Verifier}, config::Config, server::Gateway};
//! let config = Config::defaults();
//! let verifier = Verifier::new(KeySource::Secret(b"change-me"), &[], &[], 0)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let gateway = Gateway::start(config, verifier, listener).await?;
//! println!("ws://{}/ws", gateway.local_addr());
//! gateway.shutdown().await?;
//! # Ok(()) }
//! ```

pub mod analytics;
pub mod auth;
pub mod cmd;
pub mod codec;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod http;
pub mod inbox;
pub mod integration;
pub mod limits;
pub mod liveness;
pub mod mailbox;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod queue;
pub mod server;
pub mod shard;
pub mod worker_tasks;

/// Builds the token verifier from the configuration. In development mode (no key configured)
/// a random secret is generated and returned so the caller can announce it.
pub fn verifier_from_config(
    config: &config::Config,
) -> Result<(auth::Verifier, Option<String>), auth::AuthError> {
    use auth::{KeySource, Verifier};
    let algorithm = match config.jwt_algorithm.as_deref() {
        None => None,
        Some(name) => Some(
            name.parse::<jsonwebtoken::Algorithm>()
                .map_err(|_| auth::AuthError::Config(format!("unknown algorithm {name:?}")))?,
        ),
    };
    let (source, dev_secret) = match (&config.jwt_secret, &config.jwt_public_key) {
        (Some(_), Some(_)) => {
            return Err(auth::AuthError::Config(
                "set either --jwt-secret or --jwt-public-key, not both".into(),
            ))
        }
        (Some(secret), None) => (secret.clone(), None),
        (None, Some(path)) => {
            let verifier = Verifier::new(
                KeySource::PublicKeyFile(path, algorithm),
                &config.jwt_audience,
                &config.jwt_issuer,
                config.jwt_leeway_secs,
            )?;
            return Ok((verifier, None));
        }
        (None, None) => {
            use rand::RngCore;
            let mut raw = [0u8; 32];
            rand::rng().fill_bytes(&mut raw);
            let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            (secret.clone(), Some(secret))
        }
    };
    let verifier = Verifier::new(
        KeySource::Secret(source.as_bytes()),
        &config.jwt_audience,
        &config.jwt_issuer,
        config.jwt_leeway_secs,
    )?;
    Ok((verifier, dev_secret))
}
