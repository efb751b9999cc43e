//! Command line and environment configuration: every setting is a flag with an `GATEWAY_*`
//! environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Real-time conversation gateway: the coded JSON protocol over WebSocket, with durable storage.
// Server flags belong to the server alone, so `gateway token --help` lists only what minting
// takes; they are accepted both without a subcommand and after `serve`.
#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about,
    long_about = None,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<CliCommand>,
    #[command(flatten)]
    pub config: Config,
}

impl Cli {
    /// What to run: `gateway [FLAGS]` and `gateway serve [FLAGS]` both serve.
    pub fn into_command(self) -> CliCommand {
        self.command.unwrap_or(CliCommand::Serve(self.config))
    }
}

// Parsed once at start: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Run the gateway (the default when no subcommand is given).
    Serve(Config),
    /// Mint a token signed with --jwt-secret and print it.
    Token(TokenArgs),
    /// Create the store's schema, or bring it up to the version this build needs, and exit.
    /// The gateway refuses to start on an older schema of a database server (`scylla://`);
    /// the embedded store migrates itself when it opens.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Directory of the embedded store.
    #[arg(long, env = "GATEWAY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Store URL; overrides --data-dir (`sqlite://<path>`, `scylla://host:port,…/keyspace?…`).
    #[arg(long, env = "GATEWAY_STORE")]
    pub store: Option<String>,
    #[command(flatten)]
    pub credentials: StoreCredentials,
}

/// Credentials and TLS files of a database server store, kept out of its URL.
#[derive(Debug, Clone, Default, Args)]
pub struct StoreCredentials {
    /// User name for the store (`scylla://`), when its URL names none.
    #[arg(long, env = "GATEWAY_STORE_USER")]
    pub store_user: Option<String>,
    /// Password for the store (`scylla://`), when its URL names none.
    #[arg(long, env = "GATEWAY_STORE_PASSWORD", hide_env_values = true)]
    pub store_password: Option<String>,
    /// PEM file of the CA certificates the store's nodes must present a certificate from
    /// (`scylla://`); turns TLS on. Without it, `tls=true` in the URL trusts the public roots.
    #[arg(long, env = "GATEWAY_STORE_TLS_CA")]
    pub store_tls_ca: Option<PathBuf>,
    /// PEM client certificate (and chain) for nodes that require one (mutual TLS); needs
    /// --store-tls-key, turns TLS on.
    #[arg(long, env = "GATEWAY_STORE_TLS_CERT", requires = "store_tls_key")]
    pub store_tls_cert: Option<PathBuf>,
    /// PEM private key of --store-tls-cert.
    #[arg(long, env = "GATEWAY_STORE_TLS_KEY", requires = "store_tls_cert")]
    pub store_tls_key: Option<PathBuf>,
}

impl StoreCredentials {
    /// The store options these credentials give, with the default scan budgets.
    pub fn options(&self) -> storage::Options {
        storage::Options {
            user: self.store_user.clone(),
            password: self.store_password.clone(),
            tls_ca: self.store_tls_ca.clone(),
            tls_cert: self.store_tls_cert.clone(),
            tls_key: self.store_tls_key.clone(),
            ..storage::Options::default()
        }
    }
}

impl MigrateArgs {
    /// The store URL in effect.
    pub fn store_url(&self) -> String {
        store_url(self.store.as_deref(), &self.data_dir)
    }
}

/// `store`, or the embedded store in `data_dir`.
fn store_url(store: Option<&str>, data_dir: &std::path::Path) -> String {
    store.map_or_else(
        || format!("sqlite://{}", data_dir.join("gateway.db").display()),
        str::to_owned,
    )
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The user id (`sub` claim).
    #[arg(long)]
    pub sub: String,
    /// The tenant (`tenant` claim).
    #[arg(long)]
    pub tenant: String,
    /// admin | agent | user | customer | service.
    #[arg(long, default_value = "agent")]
    pub role: String,
    /// Display name (`name` claim).
    #[arg(long)]
    pub name: Option<String>,
    /// Lifetime of the token in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl_secs: u64,
    /// HS256 shared secret to sign with: the gateway's --jwt-secret.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// `aud` claim: an audience the gateway requires (--jwt-audience); of several, the first.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,
    /// `iss` claim: an issuer the gateway requires (--jwt-issuer); of several, the first.
    #[arg(long, env = "GATEWAY_JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,
}

/// Every runtime setting.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on (HTTP API, /ws, /metrics on one port).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory of the embedded store.
    #[arg(long, env = "GATEWAY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Store URL; overrides --data-dir: `sqlite://<path>`, or
    /// `scylla://host1:9042,host2:9042/keyspace?dc=dc1&consistency=local_quorum` (run
    /// `gateway migrate` with the same URL first).
    #[arg(long, env = "GATEWAY_STORE")]
    pub store: Option<String>,

    #[command(flatten)]
    pub store_credentials: StoreCredentials,

    /// Room shards (threads); 0 = one per CPU core.
    #[arg(long, env = "GATEWAY_SHARDS", default_value_t = 0)]
    pub shards: usize,

    /// HS256 shared secret for client tokens. Without it (and without --jwt-public-key) the
    /// gateway runs in development mode with a random secret it prints at start.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key file for RS256/ES256/EdDSA tokens (instead of --jwt-secret).
    #[arg(long, env = "GATEWAY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// Algorithm of --jwt-public-key: RS256, RS384, RS512, ES256, ES384 or EdDSA (detected from
    /// the key when omitted).
    #[arg(long, env = "GATEWAY_JWT_ALGORITHM")]
    pub jwt_algorithm: Option<String>,

    /// Required `aud` claim (repeatable; any of them matches). Not checked when unset.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,

    /// Required `iss` claim (repeatable). Not checked when unset.
    #[arg(long, env = "GATEWAY_JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,

    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[arg(long, env = "GATEWAY_JWT_LEEWAY_SECS", default_value_t = 0)]
    pub jwt_leeway_secs: u64,

    /// Allowed `Origin` of WebSocket handshakes (repeatable). None = any origin.
    #[arg(long, env = "GATEWAY_ALLOWED_ORIGIN", value_delimiter = ',')]
    pub allowed_origin: Vec<String>,

    /// Interval of server pings; a peer silent for 3 intervals is closed with 1001.
    #[arg(long, env = "GATEWAY_HEARTBEAT_MS", default_value_t = 30_000)]
    pub heartbeat_ms: u64,

    /// Largest accepted frame and message, in bytes (bigger: close 1009).
    #[arg(long, env = "GATEWAY_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Outbound queue bound per connection, in frames (see the slow-consumer policy).
    #[arg(long, env = "GATEWAY_OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Outbound queue bound per connection, in bytes: everything queued for it, written or
    /// not, counts (see the slow-consumer policy).
    #[arg(
        long,
        env = "GATEWAY_OUTBOUND_QUEUE_BYTES",
        default_value_t = 8 * 1024 * 1024
    )]
    pub outbound_queue_bytes: usize,

    /// Byte budget of one `join` `missed` or `historic` page: a page is cut where the next
    /// message would pass it (always at least one message) and says `has_more`.
    #[arg(
        long,
        env = "GATEWAY_MAX_REPLY_BYTES",
        default_value_t = 1024 * 1024
    )]
    pub max_reply_bytes: usize,

    /// Rooms one connection's joins may create over its life; further creations get
    /// RATE_LIMITED.
    #[arg(long, env = "GATEWAY_ROOMS_PER_CONNECTION", default_value_t = 100)]
    pub rooms_per_connection: u32,

    /// Rooms one tenant's joins may create per minute across the process (burst: the same
    /// number, so a tenant may open that many at once); further creations get RATE_LIMITED.
    #[arg(
        long,
        env = "GATEWAY_ROOMS_PER_TENANT_MINUTE",
        default_value_t = 10_000
    )]
    pub rooms_per_tenant_minute: u32,

    /// Sustained requests per second per connection (token bucket); excess gets RATE_LIMITED.
    #[arg(long, env = "GATEWAY_RATE_LIMIT", default_value_t = 100)]
    pub rate_limit: u32,

    /// Burst size of the per-connection request bucket.
    #[arg(long, env = "GATEWAY_RATE_BURST", default_value_t = 200)]
    pub rate_burst: u32,

    /// Sustained `typing` frames per second per connection (burst: twice as many).
    #[arg(long, env = "GATEWAY_TYPING_RATE", default_value_t = 5)]
    pub typing_rate: u32,

    /// Time allowed for a client to send its HTTP request headers and complete the upgrade.
    #[arg(long, env = "GATEWAY_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,

    /// Time allowed for one batch of frames to be written to a client before it is dropped.
    #[arg(long, env = "GATEWAY_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,

    /// Capacity of each shard's command queue.
    #[arg(long, env = "GATEWAY_SHARD_QUEUE", default_value_t = 8192)]
    pub shard_queue: usize,

    /// Deadline of every store call, in milliseconds. A read past it fails (UNAVAILABLE); a
    /// write past it fails with an unknown outcome, which clients retry with the same ids.
    #[arg(long, env = "GATEWAY_STORE_TIMEOUT_MS", default_value_t = 5_000)]
    pub store_timeout_ms: u64,

    /// Most messages of a room one `historic` search examines before it answers with the hits
    /// found and a cursor to continue from (the embedded store: hits of its word index; a CQL
    /// store: rows it scans).
    #[arg(
        long,
        env = "GATEWAY_SEARCH_SCAN_ROWS",
        default_value_t = storage::DEFAULT_SCAN_ROWS
    )]
    pub search_scan_rows: u32,

    /// Longest one `historic` search may keep a storage reader busy, in milliseconds; a search
    /// that runs out answers with what it found and a cursor to continue from.
    #[arg(long, env = "GATEWAY_SEARCH_TIME_MS", default_value_t = 100)]
    pub search_time_ms: u64,

    /// Directory of the analytics files (`track_activity`, `page_view`: one JSON Lines file a
    /// day); default `<data-dir>/analytics`.
    #[arg(long, env = "GATEWAY_ANALYTICS_DIR")]
    pub analytics_dir: Option<PathBuf>,

    /// Analytics events a tenant may send a second (together, from all its connections); more
    /// are dropped and counted.
    #[arg(long, env = "GATEWAY_ANALYTICS_RATE", default_value_t = 200)]
    pub analytics_rate: u32,

    /// Most analytics written a day, in MiB; past it the day's events are dropped and counted.
    #[arg(long, env = "GATEWAY_ANALYTICS_MAX_DAY_MIB", default_value_t = 1024)]
    pub analytics_max_day_mib: u64,

    /// Days of analytics files kept; older ones are deleted when a day's file is opened.
    #[arg(long, env = "GATEWAY_ANALYTICS_RETENTION_DAYS", default_value_t = 30)]
    pub analytics_retention_days: u32,

    /// Most events waiting for the integration bus, in MiB; past it the oldest are dropped
    /// (counted in `gateway_bus_events_total{outcome="dropped"}`).
    #[arg(long, env = "GATEWAY_BUS_BUFFER_MIB", default_value_t = 64)]
    pub bus_buffer_mib: usize,

    /// Apache Kafka brokers (`host:port,…`) to carry the integration bus. Without it the bus
    /// is in-process and the workers configured here run inside the gateway.
    #[arg(long, env = "GATEWAY_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,

    /// Most bytes, in MiB, of records the Kafka producer holds for the brokers (while Kafka is
    /// down they wait there; past it events wait in `--bus-buffer-mib`).
    #[arg(long, env = "GATEWAY_KAFKA_BUFFER_MIB", default_value_t = 64)]
    pub kafka_buffer_mib: usize,

    /// A prefix of every bus topic's name (`staging.` makes `staging.outbound.sms`, …); the
    /// workers take the same with `--topic-prefix`.
    #[arg(long, env = "GATEWAY_BUS_TOPIC_PREFIX", default_value = "")]
    pub bus_topic_prefix: String,

    /// The SMS worker (Twilio): inside the gateway when it is configured and there is no Kafka.
    #[command(flatten)]
    pub sms: workers::sms::SmsConfig,

    /// The email worker (SMTP out, inbound-parse webhook in): as the SMS worker.
    #[command(flatten)]
    pub email: workers::email::EmailConfig,

    /// The push worker (FCM): as the SMS worker.
    #[command(flatten)]
    pub push: workers::push::PushConfig,

    /// Widget sessions (`POST /api/v1/widget/sessions`) one client address may open a minute.
    #[arg(
        long,
        env = "GATEWAY_WIDGET_SESSIONS_PER_IP_MINUTE",
        default_value_t = 20
    )]
    pub widget_sessions_per_ip_minute: u32,

    /// How long a widget session's customer token lasts, in seconds.
    #[arg(long, env = "GATEWAY_WIDGET_SESSION_TTL_SECS", default_value_t = 3600)]
    pub widget_session_ttl_secs: u64,

    /// An S3-compatible bucket for uploaded files (`s3://bucket[/prefix]`; endpoint, region and
    /// credentials from the `AWS_*` variables). Without it files are kept in `--files-dir`.
    #[arg(long, env = "GATEWAY_FILES_URL")]
    pub files_url: Option<String>,

    /// Where uploaded files are kept (the embedded file store); default `<data-dir>/files`.
    #[arg(long, env = "GATEWAY_FILES_DIR")]
    pub files_dir: Option<PathBuf>,

    /// Largest upload, in bytes.
    #[arg(long, env = "GATEWAY_MAX_FILE_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_file_bytes: u64,

    /// Most bytes of uploads held at once across the process, in MiB (an upload is held in
    /// memory while it arrives); an upload that does not fit gets 503 with `Retry-After`.
    #[arg(long, env = "GATEWAY_UPLOADS_IN_FLIGHT_MIB", default_value_t = 256)]
    pub uploads_in_flight_mib: u32,

    /// Content types an upload may have (comma-separated; `image/*` takes every image type).
    #[arg(
        long,
        env = "GATEWAY_FILE_TYPES",
        value_delimiter = ',',
        default_value = "image/*,audio/*,video/*,application/pdf,text/plain,text/csv,application/zip,application/json"
    )]
    pub file_types: Vec<String>,

    /// Serve an echo WebSocket route at /conformance/echo (for the Autobahn test suite); it goes
    /// through the same connection code and limits. Off by default.
    #[arg(long, env = "GATEWAY_CONFORMANCE_ECHO")]
    pub conformance_echo: bool,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,gateway=debug`.
    #[arg(long, env = "GATEWAY_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// The store URL in effect.
    pub fn store_url(&self) -> String {
        store_url(self.store.as_deref(), &self.data_dir)
    }

    /// The analytics directory in effect.
    pub fn analytics_dir(&self) -> PathBuf {
        self.analytics_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("analytics"))
    }

    /// The file store's directory in effect.
    pub fn files_dir(&self) -> PathBuf {
        self.files_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("files"))
    }

    /// The number of shards in effect.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Defaults as the CLI would give them (for tests and embedding).
    pub fn defaults() -> Config {
        Cli::parse_from(["gateway"]).config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_timeout_defaults_to_five_seconds_and_is_a_flag() {
        assert_eq!(Config::defaults().store_timeout_ms, 5_000);
        let cli = Cli::parse_from(["gateway", "--store-timeout-ms", "250"]);
        assert_eq!(cli.config.store_timeout_ms, 250);
    }
}
