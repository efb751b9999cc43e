//! The ScyllaDB backend (any CQL store: Apache Cassandra runs it in the tests), selected by a
//! URL like `scylla://host1:9042,host2:9042/keyspace?dc=dc1&consistency=local_quorum`.
//!
//! # Schema
//!
//! Versioned files under `storage/cql/`, applied by [`migrate`] (`gateway migrate`); [`CqlStore::connect`]
//! refuses a keyspace whose recorded version is older than [`SCHEMA_VERSION`]. Messages are
//! partitioned by `(tenant_id, room_id, bucket)` with `bucket = seq / 4096` ([`BUCKET_SIZE`]) and
//! clustered by `seq`; `docs/storage.md` explains every table and its access path.
//!
//! # Seq without a sequencer
//!
//! The room's owner assigns `seq` (see [`Store`]); this backend keeps, per room and in process,
//! the last stored seq and note count (recovered at first use from the rooms row's bucket hint
//! and that bucket's last row) and applies each room's operations strictly in call order: one
//! write group in flight per room, and whatever queues for the room meanwhile goes as the next
//! group, while different rooms write concurrently. That is the group commit: no logged batches
//! and no lightweight transaction per message. The fence (`seq == last_seq + 1`) is checked
//! against that in-process state, so it holds for one process; several gateway nodes keep it by
//! the invariant of one owner per room at a time (partition ownership, DESIGN.md), and a node
//! taking a room over must load it only after the old owner stopped writing (the next step is a
//! fencing epoch per room).
//!
//! # Idempotency
//!
//! A claim row `message_ids (tenant, room, message_id) -> seq` is written before the message
//! row. An append whose id has a claim reads the message at the claimed seq: the same id there
//! makes it a duplicate (the original is returned); no message or another one there is a claim
//! left by a crash between the two writes, which is overwritten and the message stored normally.
//!
//! # Writes
//!
//! A group is written in three steps, each only after the one before reached the configured
//! consistency: the claims (and the bucket hint when the group opens a bucket), then the message
//! rows in seq order as single-partition UNLOGGED batches (all-or-nothing per partition, so a
//! failure leaves a stored prefix and never a gap), then the senders' counters. Acks go out after
//! that. Errors say what happened: [`Error::NotApplied`] for a node that was never reached,
//! refused the request (unavailable, overloaded) or a full queue, [`Error::OutcomeUnknown`] for a
//! write timeout or a connection lost after sending.
//!
//! # Reads
//!
//! History and search page across buckets with a `LIMIT` on every request; a read that filters
//! (notes hidden, or a search: Cassandra has no text index) examines at most
//! [`Options::scan_rows`] rows and hands back a continuation cursor, so its cost is bounded by
//! `scan_rows` rows (plus one request per bucket crossed) whatever the room's size.
//!
//! # Records
//!
//! Contacts, inboxes and conversations ([`crate::records`]) live in `records`, one partition per
//! `(tenant_id, kind, id)`. [`Store::put_record`] is a lightweight transaction (Paxos): version 1
//! is `INSERT ... IF NOT EXISTS`, version n `UPDATE ... IF version = n-1`, and a refused one
//! answers with the version stored, which becomes [`Error::VersionConflict`]. They run outside
//! the per-room workers (a record is not a room's), admitted and timed like every other request.
//! An LWT costs four round trips between replicas instead of one, which management writes
//! (a contact edited, a conversation assigned) can afford; nothing per chat message uses one.
//! A listed record's places ([`Store::list_records`]) are in `record_list`, one partition per
//! `(tenant_id, kind)` clustered by `(list_key, id)`, written after the LWT as plain writes that
//! the record's next write repeats (see `Inner::put_record`).
//!
//! # Driver practice
//!
//! Prepared statements only (DDL aside), token-aware routing with the URL's `dc` as the
//! preferred datacenter (shard-aware on ScyllaDB), every statement marked idempotent (all of
//! them write absolute values) except the records' conditional writes, client-side monotonic
//! timestamps, a request timeout, and a bound on admitted operations (`max_pending`): a full
//! store answers [`Error::NotApplied`] at once instead of queueing without end. The driver runs
//! on a runtime of its own, so the store works from any runtime (the gateway's shards are
//! single-threaded runtimes). TLS (rustls, ring) when the URL says `tls=true` or
//! [`Options::tls_ca`] names the CAs to trust; a client certificate ([`Options::tls_cert`],
//! [`Options::tls_key`]) for nodes that require one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use futures_util::StreamExt;
use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{DbError, ExecutionError, NewSessionError, PrepareError, RequestAttemptError};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::policies::timestamp_generator::MonotonicTimestampGenerator;
use scylla::response::query_result::QueryResult;
use scylla::response::{PagingState, PagingStateResponse};
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::model::ScanOutcome;
use crate::records::{ListPage, ListQuery, Listed, MAX_RECORD_BYTES};
use crate::words::{contains_words, words};
use crate::{
    split_params, Appended, Direction, Error, HistoryPage, HistoryQuery, Message, MessageType,
    NewMessage, NewRoom, Options, ReadState, Record, RecordKey, RecordKind, Result, Room, RoomKey,
    RoomKind, SearchQuery, SenderType, Store, Timestamp,
};

/// Messages per partition: `bucket = seq / BUCKET_SIZE`. Part of the schema: changing it needs a
/// migration that moves the rows.
pub const BUCKET_SIZE: u64 = 4096;

/// The schema version this build needs (the number of the newest file under `storage/cql/`).
pub const SCHEMA_VERSION: u32 = 2;

/// The schema files, in order: (version, file name, CQL).
const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "001_initial.cql", include_str!("../cql/001_initial.cql")),
    (2, "002_records.cql", include_str!("../cql/002_records.cql")),
];

/// The row of `schema_version` this build reads and writes.
const SCHEMA_COMPONENT: &str = "gateway";

/// Default of `max_pending`.
pub const DEFAULT_MAX_PENDING: usize = 4096;
/// Default of `timeout_ms`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of each schema statement: a node agrees on a schema change with its peers and
/// flushes it, which takes seconds on a busy node. They are all idempotent (`IF NOT EXISTS`).
const SCHEMA_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A schema statement, with [`SCHEMA_REQUEST_TIMEOUT`].
fn schema_statement(text: impl Into<String>) -> scylla::statement::unprepared::Statement {
    let mut statement = scylla::statement::unprepared::Statement::new(text.into());
    statement.set_request_timeout(Some(SCHEMA_REQUEST_TIMEOUT));
    statement
}
/// Page size of a history query whose `limit` is 0.
const DEFAULT_HISTORY_LIMIT: u32 = 50;
/// Most rows one read request asks for; a longer read continues with another request.
const ROWS_PER_REQUEST: usize = 1000;
/// How far in the past a list read without a time looks (see `list_records`), in milliseconds.
const LIST_READ_LAG_MILLIS: i64 = 2_000;
/// Most message rows in one UNLOGGED batch.
const BATCH_ROWS: usize = 64;
/// Most bytes of message data in one UNLOGGED batch (Cassandra refuses batches above 50 KiB by
/// default); a larger message is written alone, not as a batch.
const BATCH_BYTES: usize = 32 * 1024;
/// Most operations of one room taken in one round of its worker.
const OPS_PER_ROUND: usize = 1024;
/// Idle rooms whose state stays cached; past it, a room going idle drops its state (it is
/// recovered from the table at its next write).
const MAX_CACHED_ROOMS: usize = 100_000;

// ---------------------------------------------------------------------------------------------
// Configuration

/// The settings a `scylla://` URL carries.
#[derive(Clone)]
pub struct CqlConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// The keyspace holding the tables.
    pub keyspace: String,
    /// Preferred (local) datacenter (`dc=`): requests go to its replicas.
    pub datacenter: Option<String>,
    /// Consistency of every read and write (`consistency=local_quorum|quorum|one|...`).
    pub consistency: Consistency,
    /// Credentials (`user=`, `password=`).
    pub credentials: Option<(String, String)>,
    /// Replication of the keyspace that [`migrate`] creates (`replication=3` for
    /// SimpleStrategy, `replication=dc1:3,dc2:3` for NetworkTopologyStrategy); default
    /// SimpleStrategy with one replica.
    pub replication: Option<String>,
    /// Client-side limit of one request (`timeout_ms=`).
    pub request_timeout: Duration,
    /// Most operations admitted and not answered yet (`max_pending=`).
    pub max_pending: usize,
    /// Most rows one filtered read examines ([`Options::scan_rows`]).
    pub scan_rows: u32,
    /// Longest one search runs ([`Options::scan_time`]).
    pub scan_time: Duration,
    /// TLS to the nodes (`tls=true`, or [`Options::tls_ca`] / [`Options::tls_cert`]): the
    /// rustls client configuration every connection uses, made when the URL is parsed.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for CqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqlConfig")
            .field("nodes", &self.nodes)
            .field("keyspace", &self.keyspace)
            .field("datacenter", &self.datacenter)
            .field("consistency", &self.consistency)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("replication", &self.replication)
            .field("request_timeout", &self.request_timeout)
            .field("max_pending", &self.max_pending)
            .field("scan_rows", &self.scan_rows)
            .field("scan_time", &self.scan_time)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl CqlConfig {
    /// Parses `scylla://host1:9042,host2/keyspace?dc=dc1&consistency=local_quorum&user=u&password=p`.
    /// With TLS on (`tls=true`, or a CA or client certificate in `options`) it reads the PEM
    /// files it names, so a missing or unusable one fails here, at start.
    pub fn from_url(url: &str, options: &Options) -> Result<CqlConfig> {
        let rest = url
            .strip_prefix("scylla://")
            .ok_or_else(|| Error::BadUrl(format!("{} is not a scylla:// url", redact(url))))?;
        let (location, params) = split_params(rest);
        let (hosts, keyspace) = location.split_once('/').ok_or_else(|| {
            Error::BadUrl("a scylla:// url names its keyspace: scylla://host:9042/keyspace".into())
        })?;
        let nodes: Vec<String> = hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| {
                if host
                    .rsplit_once(':')
                    .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
                {
                    host.to_owned()
                } else {
                    format!("{host}:9042")
                }
            })
            .collect();
        if nodes.is_empty() {
            return Err(Error::BadUrl(
                "a scylla:// url names at least one host".into(),
            ));
        }
        check_keyspace_name(keyspace)?;
        let mut config = CqlConfig {
            nodes,
            keyspace: keyspace.to_ascii_lowercase(),
            datacenter: None,
            consistency: Consistency::LocalQuorum,
            credentials: None,
            replication: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_pending: DEFAULT_MAX_PENDING,
            scan_rows: options.scan_rows.max(1),
            scan_time: options.scan_time,
            tls: None,
        };
        let mut user = None;
        let mut password = None;
        let mut tls = None;
        for (name, value) in params {
            match name {
                "dc" => config.datacenter = Some(value.to_owned()),
                "consistency" => config.consistency = parse_consistency(value)?,
                "user" => user = Some(value.to_owned()),
                "password" => password = Some(value.to_owned()),
                "replication" => config.replication = Some(value.to_owned()),
                "tls" => tls = Some(crate::param::<bool>(name, value)?),
                "timeout_ms" => {
                    config.request_timeout =
                        Duration::from_millis(crate::param::<u64>(name, value)?.max(1));
                }
                "max_pending" => {
                    config.max_pending = crate::param::<usize>(name, value)?.clamp(1, 1 << 20);
                }
                other => {
                    return Err(Error::BadUrl(format!(
                        "unknown scylla:// parameter {other:?} (known: dc, consistency, user, \
                         password, replication, tls, timeout_ms, max_pending)"
                    )))
                }
            }
        }
        // The URL's credentials win; else those the caller passes (flags, environment).
        let (user, password) = match user {
            Some(user) => (Some(user), password),
            None => (
                options.user.clone(),
                password.or_else(|| options.password.clone()),
            ),
        };
        config.credentials = match (user, password) {
            (None, None) => None,
            (Some(user), password) => Some((user, password.unwrap_or_default())),
            (None, Some(_)) => {
                return Err(Error::BadUrl("password= needs user=".into()));
            }
        };
        let files_given =
            options.tls_ca.is_some() || options.tls_cert.is_some() || options.tls_key.is_some();
        config.tls =
            match tls {
                Some(false) if files_given => return Err(Error::BadUrl(
                    "tls=false, but --store-tls-ca, --store-tls-cert or --store-tls-key asks for \
                     TLS"
                    .into(),
                )),
                Some(true) => Some(tls_config(options)?),
                None if files_given => Some(tls_config(options)?),
                _ => None,
            };
        Ok(config)
    }

    /// The `WITH replication = {...}` map of the keyspace [`migrate`] creates.
    fn replication_map(&self) -> Result<String> {
        let Some(spec) = &self.replication else {
            return Ok("{'class': 'SimpleStrategy', 'replication_factor': 1}".to_owned());
        };
        if let Ok(factor) = spec.parse::<u32>() {
            return Ok(format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}"
            ));
        }
        let mut map = String::from("{'class': 'NetworkTopologyStrategy'");
        for pair in spec.split(',') {
            let (dc, factor) = pair
                .split_once(':')
                .filter(|(dc, _)| {
                    !dc.is_empty()
                        && dc
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                })
                .ok_or_else(|| {
                    Error::BadUrl(format!(
                        "replication={spec:?}: give a factor (3) or datacenters (dc1:3,dc2:3)"
                    ))
                })?;
            let factor: u32 = crate::param("replication", factor)?;
            map.push_str(&format!(", '{dc}': {factor}"));
        }
        map.push('}');
        Ok(map)
    }
}

/// The serial consistency of the records' lightweight transactions (their Paxos rounds): the
/// local datacenter's replicas when the configured consistency counts only those, every
/// replica otherwise.
fn serial_consistency(consistency: Consistency) -> SerialConsistency {
    match consistency {
        Consistency::LocalQuorum | Consistency::LocalOne => SerialConsistency::LocalSerial,
        _ => SerialConsistency::Serial,
    }
}

fn parse_consistency(value: &str) -> Result<Consistency> {
    Ok(match value.to_ascii_lowercase().as_str() {
        "one" => Consistency::One,
        "two" => Consistency::Two,
        "three" => Consistency::Three,
        "quorum" => Consistency::Quorum,
        "all" => Consistency::All,
        "local_quorum" => Consistency::LocalQuorum,
        "each_quorum" => Consistency::EachQuorum,
        "local_one" => Consistency::LocalOne,
        _ => {
            return Err(Error::BadUrl(format!(
                "consistency={value:?} (use local_quorum, quorum, one, local_one, all)"
            )))
        }
    })
}

/// Keyspace names go into DDL text, so only what CQL allows unquoted passes.
fn check_keyspace_name(keyspace: &str) -> Result<()> {
    let valid = !keyspace.is_empty()
        && keyspace.len() <= 48
        && keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        && keyspace.starts_with(|c: char| c.is_ascii_alphabetic());
    if valid {
        Ok(())
    } else {
        Err(Error::BadUrl(format!(
            "keyspace {keyspace:?}: use 1-48 letters, digits or _ starting with a letter"
        )))
    }
}

/// The rustls client configuration of [`Options`]' TLS files: the server's certificate must
/// chain to a CA of `tls_ca` (without it, to one of Mozilla's public roots, from
/// `webpki-roots`), and `tls_cert`/`tls_key` are the client certificate shown to a server that
/// asks for one. Any file that cannot be read or holds nothing usable is a [`Error::BadUrl`]
/// naming it and its flag.
fn tls_config(options: &Options) -> Result<Arc<rustls::ClientConfig>> {
    fn unusable(what: &str, path: &Path, flag: &str, error: impl fmt::Display) -> Error {
        Error::BadUrl(format!(
            "TLS {what} {} ({flag}) is not usable: {error}",
            path.display()
        ))
    }
    fn certificates(what: &str, path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>> {
        let certificates = CertificateDer::pem_file_iter(path)
            .and_then(|certificates| certificates.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| unusable(what, path, flag, e))?;
        if certificates.is_empty() {
            return Err(unusable(what, path, flag, "it holds no PEM CERTIFICATE"));
        }
        Ok(certificates)
    }

    let mut roots = rustls::RootCertStore::empty();
    match &options.tls_ca {
        Some(path) => {
            for certificate in certificates("CA file", path, "--store-tls-ca")? {
                roots
                    .add(certificate)
                    .map_err(|e| unusable("CA file", path, "--store-tls-ca", e))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    // The provider is named: scylla's rustls dependency also compiles in aws-lc-rs, and with two
    // providers rustls would not pick one by itself.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::BadUrl(format!("TLS setup failed: {e}")))?
    .with_root_certificates(roots);
    let config = match (&options.tls_cert, &options.tls_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let chain = certificates("client certificate file", cert, "--store-tls-cert")?;
            let private_key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| unusable("private key file", key, "--store-tls-key", e))?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|e| {
                    Error::BadUrl(format!(
                        "TLS client certificate {} and key {} (--store-tls-cert, \
                         --store-tls-key) do not go together: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?
        }
        (Some(_), None) => {
            return Err(Error::BadUrl(
                "--store-tls-cert needs --store-tls-key (the client certificate's private key)"
                    .into(),
            ))
        }
        (None, Some(_)) => {
            return Err(Error::BadUrl(
                "--store-tls-key needs --store-tls-cert (the client certificate)".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let (head, params) = split_params(url);
    if params.is_empty() {
        return head.to_owned();
    }
    let shown: Vec<String> = params
        .into_iter()
        .map(|(name, value)| match name {
            "password" => "password=***".to_owned(),
            _ => format!("{name}={value}"),
        })
        .collect();
    format!("{head}?{}", shown.join("&"))
}

// ---------------------------------------------------------------------------------------------
// The driver's runtime

/// A multi-threaded runtime of the store's own: the driver's connections and every request run
/// there, whatever runtime (or none) the caller uses. It stops when the store is dropped.
struct DriverRuntime {
    handle: tokio::runtime::Handle,
    /// Dropped with the store: the runtime's thread then shuts it down.
    _stop: oneshot::Sender<()>,
}

impl DriverRuntime {
    fn start() -> Result<DriverRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cql-driver")
            .enable_all()
            .build()
            .map_err(|e| Error::NotApplied(format!("cannot start the CQL driver runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("cql-runtime".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| Error::NotApplied(format!("cannot start the CQL driver thread: {e}")))?;
        Ok(DriverRuntime {
            handle,
            _stop: stop,
        })
    }

    /// Runs `work` on this runtime; the returned future may be awaited on any runtime.
    fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T>> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let task = self.handle.spawn(work);
        async move {
            task.await
                .unwrap_or_else(|e| Err(Error::NotApplied(format!("storage task failed: {e}"))))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Whether a failed request could have changed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Maps a driver error to what happened to the request: never sent or refused before applying
/// ([`Error::NotApplied`]), or a write that may have landed ([`Error::OutcomeUnknown`]).
fn request_error(access: Access, what: &str, error: &ExecutionError) -> Error {
    let unknown_if_write = |detail: String| match access {
        Access::Write => Error::OutcomeUnknown(detail),
        Access::Read => Error::NotApplied(detail),
    };
    let detail = format!("{what}: {error}");
    match error {
        ExecutionError::ConnectionPoolError(_) | ExecutionError::EmptyPlan => {
            Error::NotApplied(detail)
        }
        ExecutionError::PrepareError(_) => Error::NotApplied(detail),
        ExecutionError::BadQuery(_) => Error::Invalid(detail),
        ExecutionError::RequestTimeout(_) => unknown_if_write(detail),
        ExecutionError::LastAttemptError(attempt) => match attempt {
            RequestAttemptError::DbError(db, _) => match db {
                DbError::Unavailable { .. }
                | DbError::Overloaded
                | DbError::IsBootstrapping
                | DbError::RateLimitReached { .. }
                | DbError::ReadTimeout { .. }
                | DbError::ReadFailure { .. }
                | DbError::Unprepared { .. }
                | DbError::AuthenticationError
                | DbError::Unauthorized => Error::NotApplied(detail),
                DbError::SyntaxError | DbError::Invalid | DbError::ConfigError => {
                    Error::Schema(format!("{detail} (is the keyspace migrated?)"))
                }
                _ => unknown_if_write(detail),
            },
            RequestAttemptError::SerializationError(_)
            | RequestAttemptError::CqlRequestSerialization(_)
            | RequestAttemptError::UnableToAllocStreamId => Error::NotApplied(detail),
            _ => unknown_if_write(detail),
        },
        _ => unknown_if_write(detail),
    }
}

fn prepare_error(what: &str, error: &PrepareError) -> Error {
    Error::Schema(format!(
        "cannot prepare {what}: {error} (is the keyspace migrated? run `gateway migrate`)"
    ))
}

fn session_error(config: &CqlConfig, error: NewSessionError) -> Error {
    match error {
        NewSessionError::UseKeyspaceError(e) => Error::Schema(format!(
            "keyspace {:?} is not usable ({e}): run `gateway migrate --store <url>` first",
            config.keyspace
        )),
        other => Error::NotApplied(format!(
            "cannot connect to {}{}: {other}",
            config.nodes.join(","),
            if config.tls.is_some() {
                " over TLS"
            } else {
                ""
            }
        )),
    }
}

/// The first row of a read's answer, if any (every read here is a point read or `LIMIT 1`).
fn first_row<R>(result: QueryResult, table: &str) -> Result<Option<R>>
where
    R: for<'frame> DeserializeRow<'frame, 'frame>,
{
    let rows = result.into_rows_result().map_err(|e| bad_row(table, e))?;
    rows.maybe_first_row::<R>().map_err(|e| bad_row(table, e))
}

fn bad_row(what: &str, error: impl fmt::Display) -> Error {
    Error::Schema(format!("unexpected rows from {what}: {error}"))
}

fn missing_room(room: &RoomKey) -> Error {
    Error::Invalid(format!(
        "room {:?} of tenant {:?} does not exist",
        room.room_id, room.tenant_id
    ))
}

/// CQL `bigint` of a seq or count (they never reach `i64::MAX`).
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn bucket_of(seq: u64) -> u64 {
    seq / BUCKET_SIZE
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// The backend's own metrics.
#[derive(Clone)]
struct CqlMetrics {
    /// Operations admitted and not answered yet.
    pending: IntGauge,
    /// Operations refused because `max_pending` were in flight.
    rejected: IntCounter,
    /// CQL write requests (single or batch) in flight.
    writes_in_flight: IntGauge,
    /// Messages stored per write group.
    group_size: Histogram,
    /// Duration of one write group, from its first read to its last write.
    group_seconds: Histogram,
}

impl CqlMetrics {
    fn new() -> Result<CqlMetrics> {
        let metric_error = |e: prometheus::Error| Error::Invalid(format!("metrics: {e}"));
        Ok(CqlMetrics {
            pending: IntGauge::new(
                "gateway_store_cql_pending_operations",
                "operations admitted by the CQL store and not answered yet",
            )
            .map_err(metric_error)?,
            rejected: IntCounter::new(
                "gateway_store_cql_rejected_total",
                "operations refused at once because the CQL store had max_pending in flight",
            )
            .map_err(metric_error)?,
            writes_in_flight: IntGauge::new(
                "gateway_store_cql_writes_in_flight",
                "CQL write requests (single statements or batches) in flight",
            )
            .map_err(metric_error)?,
            group_size: Histogram::with_opts(
                HistogramOpts::new(
                    "gateway_store_cql_group_size",
                    "messages stored by one write group of a room",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
                ]),
            )
            .map_err(metric_error)?,
            group_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "gateway_store_cql_group_seconds",
                    "duration of one write group of a room (claims, messages, counters)",
                )
                .buckets(vec![
                    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0,
                ]),
            )
            .map_err(metric_error)?,
        })
    }
}

/// An admitted operation's place in `max_pending`, released when the operation is answered.
struct Admission {
    _permit: OwnedSemaphorePermit,
    pending: IntGauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.pending.dec();
    }
}

// ---------------------------------------------------------------------------------------------
// Statements

const MESSAGE_COLUMNS: &str = "message_id, seq, sender, sender_type, direction, kind, message, \
                               attached_files, reply_to, mentions, metadata, created_at";

/// A records row's columns after its key, as read, written by `INSERT` and answered by a
/// refused one.
const RECORD_COLUMNS: &str =
    "version, body, updated_at, list_key, listed_at, left_key, left_listed_at, left_at";

/// A records row as read: the columns of [`RECORD_COLUMNS`].
type RecordColumns = (
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

const PLACE_COLUMNS: &str = "list_key, id, listed_at, unlisted_at";

/// A message row as read: the columns of [`MESSAGE_COLUMNS`].
type MessageRow = (
    String,
    i64,
    String,
    String,
    String,
    String,
    String,
    Option<Vec<String>>,
    Option<String>,
    Option<Vec<String>>,
    Option<String>,
    i64,
);

/// The marker columns, in the order of [`MarkerRow::from_row`].
type MarkerColumns = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

/// Every statement the store runs, prepared once at connect.
struct Statements {
    insert_message: PreparedStatement,
    message_at: PreparedStatement,
    last_in_bucket: PreparedStatement,
    page_forwards: PreparedStatement,
    page_backwards: PreparedStatement,
    senders_in_range: PreparedStatement,
    notes_upto_at: PreparedStatement,
    claim: PreparedStatement,
    insert_claim: PreparedStatement,
    room: PreparedStatement,
    insert_room: PreparedStatement,
    set_last_bucket: PreparedStatement,
    participants: PreparedStatement,
    insert_participant: PreparedStatement,
    marker: PreparedStatement,
    set_sent: PreparedStatement,
    set_read: PreparedStatement,
    record: PreparedStatement,
    /// [`Statements::record`] at the serial consistency: sees any Paxos round in progress.
    record_serial: PreparedStatement,
    /// Conditional (LWT): not idempotent, with the serial consistency of the configuration.
    insert_record: PreparedStatement,
    update_record: PreparedStatement,
    /// One place of a list, with the event's time as its write timestamp and a TTL (0: none).
    set_place: PreparedStatement,
    /// A list's places from one end, and after a place, in each order.
    places_down: PreparedStatement,
    places_down_after: PreparedStatement,
    places_up: PreparedStatement,
    places_up_after: PreparedStatement,
}

impl Statements {
    async fn prepare(session: &Session, serial: SerialConsistency) -> Result<Statements> {
        let prepare = |cql: String| async move {
            let mut statement = session
                .prepare(cql.as_str())
                .await
                .map_err(|e| prepare_error(&cql, &e))?;
            // Every statement writes absolute values or reads: safe to retry and to speculate.
            statement.set_is_idempotent(true);
            Ok::<_, Error>(statement)
        };
        // A conditional write retried after a timeout could find its own first attempt applied
        // and report a conflict with itself: never retried, never speculated.
        let conditional = |cql: String| async move {
            let mut statement = prepare(cql).await?;
            statement.set_is_idempotent(false);
            statement.set_serial_consistency(Some(serial));
            Ok::<_, Error>(statement)
        };
        let room_key = "tenant_id = ? AND room_id = ?";
        let bucket_key = "tenant_id = ? AND room_id = ? AND bucket = ?";
        let record_key = "tenant_id = ? AND kind = ? AND id = ?";
        let list = "tenant_id = ? AND kind = ?";
        Ok(Statements {
            insert_message: prepare(
                "INSERT INTO messages (tenant_id, room_id, bucket, seq, message_id, sender, \
                 sender_type, direction, kind, message, attached_files, reply_to, mentions, \
                 metadata, created_at, notes_upto) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    .to_owned(),
            )
            .await?,
            message_at: prepare(format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE {bucket_key} AND seq = ?"
            ))
            .await?,
            last_in_bucket: prepare(format!(
                "SELECT seq, notes_upto FROM messages WHERE {bucket_key} \
                 ORDER BY seq DESC LIMIT 1"
            ))
            .await?,
            page_forwards: prepare(format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE {bucket_key} \
                 AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            page_backwards: prepare(format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE {bucket_key} \
                 AND seq > ? AND seq < ? ORDER BY seq DESC LIMIT ?"
            ))
            .await?,
            senders_in_range: prepare(format!(
                "SELECT seq, sender, direction FROM messages WHERE {bucket_key} \
                 AND seq > ? AND seq <= ? ORDER BY seq ASC LIMIT ?"
            ))
            .await?,
            notes_upto_at: prepare(format!(
                "SELECT notes_upto FROM messages WHERE {bucket_key} AND seq = ?"
            ))
            .await?,
            claim: prepare(format!(
                "SELECT seq FROM message_ids WHERE {room_key} AND message_id = ?"
            ))
            .await?,
            insert_claim: prepare(
                "INSERT INTO message_ids (tenant_id, room_id, message_id, seq) VALUES (?, ?, ?, ?)"
                    .to_owned(),
            )
            .await?,
            room: prepare(format!(
                "SELECT kind, title, status, created_at, last_bucket FROM rooms WHERE {room_key}"
            ))
            .await?,
            insert_room: prepare(
                "INSERT INTO rooms (tenant_id, room_id, kind, title, status, created_at) \
                 VALUES (?, ?, ?, ?, ?, ?)"
                    .to_owned(),
            )
            .await?,
            set_last_bucket: prepare(format!("UPDATE rooms SET last_bucket = ? WHERE {room_key}"))
                .await?,
            participants: prepare(format!(
                "SELECT position, user_id FROM room_participants WHERE {room_key}"
            ))
            .await?,
            insert_participant: prepare(
                "INSERT INTO room_participants (tenant_id, room_id, position, user_id) \
                 VALUES (?, ?, ?, ?)"
                    .to_owned(),
            )
            .await?,
            marker: prepare(format!(
                "SELECT read_seq, notes_read, sent_total, sent_notes_total, sent_read, \
                 sent_notes_read, last_sent_seq FROM read_markers WHERE {room_key} AND user_id = ?"
            ))
            .await?,
            set_sent: prepare(format!(
                "UPDATE read_markers SET sent_total = ?, sent_notes_total = ?, last_sent_seq = ? \
                 WHERE {room_key} AND user_id = ?"
            ))
            .await?,
            set_read: prepare(format!(
                "UPDATE read_markers SET read_seq = ?, notes_read = ?, sent_read = ?, \
                 sent_notes_read = ? WHERE {room_key} AND user_id = ?"
            ))
            .await?,
            record: prepare(format!(
                "SELECT {RECORD_COLUMNS} FROM records WHERE {record_key}"
            ))
            .await?,
            record_serial: {
                let mut statement = prepare(format!(
                    "SELECT {RECORD_COLUMNS} FROM records WHERE {record_key}"
                ))
                .await?;
                statement.set_consistency(match serial {
                    SerialConsistency::LocalSerial => Consistency::LocalSerial,
                    SerialConsistency::Serial => Consistency::Serial,
                });
                statement
            },
            insert_record: conditional(format!(
                "INSERT INTO records (tenant_id, kind, id, {RECORD_COLUMNS}) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            update_record: conditional(format!(
                "UPDATE records SET version = ?, body = ?, updated_at = ?, list_key = ?, \
                 listed_at = ?, left_key = ?, left_listed_at = ?, left_at = ? \
                 WHERE {record_key} IF version = ?"
            ))
            .await?,
            set_place: prepare(
                "INSERT INTO record_list (tenant_id, kind, list_key, id, listed_at, unlisted_at) \
                 VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?"
                    .to_owned(),
            )
            .await?,
            places_down: prepare(format!(
                "SELECT {PLACE_COLUMNS} FROM record_list WHERE {list}"
            ))
            .await?,
            places_down_after: prepare(format!(
                "SELECT {PLACE_COLUMNS} FROM record_list WHERE {list} AND (list_key, id) < (?, ?)"
            ))
            .await?,
            places_up: prepare(format!(
                "SELECT {PLACE_COLUMNS} FROM record_list WHERE {list} \
                 ORDER BY list_key ASC, id ASC"
            ))
            .await?,
            places_up_after: prepare(format!(
                "SELECT {PLACE_COLUMNS} FROM record_list WHERE {list} AND (list_key, id) > (?, ?) \
                 ORDER BY list_key ASC, id ASC"
            ))
            .await?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Sessions and migrations

async fn open_session(config: &CqlConfig, keyspace: Option<&str>) -> Result<Session> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &config.datacenter {
        // Requests stay in the local datacenter; consistency LOCAL_* counts its replicas only.
        policy = policy
            .prefer_datacenter(dc.clone())
            .permit_dc_failover(false);
    }
    let profile = ExecutionProfile::builder()
        .consistency(config.consistency)
        .request_timeout(Some(config.request_timeout))
        .load_balancing_policy(policy.build())
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&config.nodes)
        .default_execution_profile_handle(profile.into_handle())
        .timestamp_generator(Arc::new(MonotonicTimestampGenerator::new()))
        .connection_timeout(config.request_timeout);
    if let Some(dc) = &config.datacenter {
        builder = builder.prefer_datacenter(dc.clone());
    }
    if let Some((user, password)) = &config.credentials {
        builder = builder.user(user.clone(), password.clone());
    }
    if let Some(tls) = &config.tls {
        builder = builder.tls_context(Some(Arc::clone(tls)));
    }
    if let Some(keyspace) = keyspace {
        builder = builder.use_keyspace(keyspace, false);
    }
    builder.build().await.map_err(|e| session_error(config, e))
}

/// The statements of a schema file, comments removed.
fn statements_of(file: &str) -> Vec<String> {
    let without_comments: String = file
        .lines()
        .map(|line| line.split_once("--").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(';')
        .map(str::trim)
        .filter(|statement| !statement.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn recorded_version(session: &Session) -> Result<u32> {
    let result = session
        .query_unpaged(
            "SELECT version FROM schema_version WHERE component = ?",
            (SCHEMA_COMPONENT,),
        )
        .await;
    match result {
        Ok(result) => Ok(version_from(result)?.unwrap_or(0)),
        // No table yet: nothing was applied.
        Err(ExecutionError::LastAttemptError(RequestAttemptError::DbError(
            DbError::Invalid,
            _,
        ))) => Ok(0),
        Err(e) => Err(request_error(
            Access::Read,
            "reading the schema version",
            &e,
        )),
    }
}

fn version_from(result: QueryResult) -> Result<Option<u32>> {
    let version =
        first_row::<(Option<i32>,)>(result, "schema_version")?.and_then(|(version,)| version);
    Ok(version.map(|v| u32::try_from(v).unwrap_or(0)))
}

/// Creates the URL's keyspace if it is missing and applies the schema files it lacks, in order;
/// returns the schema version now recorded. Safe to run again and on an up-to-date keyspace.
pub async fn migrate(url: &str, options: &Options) -> Result<u32> {
    migrate_to(url, options, SCHEMA_VERSION).await
}

/// [`migrate`], applying no file past version `target` (the tests make older keyspaces so).
async fn migrate_to(url: &str, options: &Options, target: u32) -> Result<u32> {
    let config = CqlConfig::from_url(url, options)?;
    let runtime = DriverRuntime::start()?;
    runtime
        .run(async move {
            let session = open_session(&config, None).await?;
            let create = format!(
                "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}",
                config.keyspace,
                config.replication_map()?
            );
            session
                .query_unpaged(schema_statement(create), ())
                .await
                .map_err(|e| request_error(Access::Write, "creating the keyspace", &e))?;
            session
                .use_keyspace(&config.keyspace, false)
                .await
                .map_err(|e| Error::Schema(format!("cannot use the keyspace: {e}")))?;
            let mut version = recorded_version(&session).await?;
            if version > SCHEMA_VERSION {
                return Err(newer_schema(version));
            }
            for &(file_version, name, cql) in MIGRATIONS {
                if file_version <= version || file_version > target {
                    continue;
                }
                for statement in statements_of(cql) {
                    let statement = schema_statement(statement);
                    session.query_unpaged(statement, ()).await.map_err(|e| {
                        request_error(Access::Write, &format!("applying {name}"), &e)
                    })?;
                }
                session
                    .query_unpaged(
                        "INSERT INTO schema_version (component, version, applied_at) \
                         VALUES (?, ?, toTimestamp(now()))",
                        (
                            SCHEMA_COMPONENT,
                            i32::try_from(file_version).unwrap_or(i32::MAX),
                        ),
                    )
                    .await
                    .map_err(|e| {
                        request_error(Access::Write, "recording the schema version", &e)
                    })?;
                tracing::info!(
                    file = name,
                    version = file_version,
                    "applied CQL schema file"
                );
                version = file_version;
            }
            Ok(version)
        })
        .await
}

fn newer_schema(version: u32) -> Error {
    Error::Schema(format!(
        "the keyspace has schema version {version}, newer than this build knows \
         ({SCHEMA_VERSION}): run a newer gateway"
    ))
}

// ---------------------------------------------------------------------------------------------
// The store

/// The CQL backend. Cheap to clone; clones share one session.
#[derive(Clone)]
pub struct CqlStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    statements: Statements,
    config: CqlConfig,
    /// Per-room queues and cached state, keyed by room.
    rooms: Mutex<HashMap<RoomKey, RoomSlot>>,
    /// One permit per operation admitted and not answered.
    admission: Arc<Semaphore>,
    closed: AtomicBool,
    metrics: CqlMetrics,
    /// Last: the runtime stops once everything above is dropped.
    runtime: DriverRuntime,
}

impl fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqlStore")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl CqlStore {
    /// Connects to the URL's nodes and checks the keyspace's schema version; works from any
    /// runtime (the driver gets one of its own).
    pub async fn connect(url: &str, options: &Options) -> Result<CqlStore> {
        let config = CqlConfig::from_url(url, options)?;
        let runtime = DriverRuntime::start()?;
        let redacted = redact(url);
        let connecting = runtime.run(async move { connect_session(&config, &redacted).await });
        let (session, statements, config) = connecting.await?;
        CqlStore::assemble(session, statements, config, runtime)
    }

    /// [`CqlStore::connect`] for callers without a runtime (or inside `spawn_blocking`): blocks
    /// the calling thread until connected.
    pub fn open(url: &str, options: &Options) -> Result<CqlStore> {
        let config = CqlConfig::from_url(url, options)?;
        let runtime = DriverRuntime::start()?;
        let redacted = redact(url);
        let (done, result) = std::sync::mpsc::channel();
        runtime.handle.spawn(async move {
            let _ = done.send(connect_session(&config, &redacted).await);
        });
        let (session, statements, config) = result
            .recv()
            .map_err(|_| Error::NotApplied("the CQL connect task stopped".to_owned()))??;
        CqlStore::assemble(session, statements, config, runtime)
    }

    fn assemble(
        session: Session,
        statements: Statements,
        config: CqlConfig,
        runtime: DriverRuntime,
    ) -> Result<CqlStore> {
        Ok(CqlStore {
            inner: Arc::new(Inner {
                session,
                statements,
                admission: Arc::new(Semaphore::new(config.max_pending)),
                config,
                rooms: Mutex::new(HashMap::new()),
                closed: AtomicBool::new(false),
                metrics: CqlMetrics::new()?,
                runtime,
            }),
        })
    }

    /// The backend's own metrics, for the caller's registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let metrics = &self.inner.metrics;
        vec![
            Box::new(metrics.pending.clone()),
            Box::new(metrics.rejected.clone()),
            Box::new(metrics.writes_in_flight.clone()),
            Box::new(metrics.group_size.clone()),
            Box::new(metrics.group_seconds.clone()),
        ]
    }

    /// The settings in use.
    pub fn config(&self) -> &CqlConfig {
        &self.inner.config
    }

    /// A place among the admitted operations, or why there is none.
    fn admit(&self) -> Result<Admission> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        match Arc::clone(&self.inner.admission).try_acquire_owned() {
            Ok(permit) => {
                self.inner.metrics.pending.inc();
                Ok(Admission {
                    _permit: permit,
                    pending: self.inner.metrics.pending.clone(),
                })
            }
            Err(TryAcquireError::Closed) => Err(Error::Closed),
            Err(TryAcquireError::NoPermits) => {
                self.inner.metrics.rejected.inc();
                Err(Error::NotApplied(format!(
                    "overloaded: {} storage operations in flight",
                    self.inner.config.max_pending
                )))
            }
        }
    }

    /// Runs a read (or a write outside the room queues) on the driver's runtime.
    fn run<T: Send + 'static, F>(
        &self,
        work: impl FnOnce(Arc<Inner>) -> F,
    ) -> impl Future<Output = Result<T>> + Send + 'static
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let started = self.admit().map(|admission| {
            let work = work(Arc::clone(&self.inner));
            self.inner.runtime.run(async move {
                let _admission = admission;
                work.await
            })
        });
        async move { started?.await }
    }

    /// Queues `op` behind the room's earlier operations (now, not when the future is polled).
    fn enqueue<T: Send + 'static>(
        &self,
        room: RoomKey,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> RoomOp,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let queued = self.admit().map(|admission| {
            let (reply, answer) = oneshot::channel();
            let op = Queued {
                op: make(reply),
                _admission: admission,
            };
            let mut rooms = self.inner.lock_rooms();
            let slot = rooms.entry(room.clone()).or_default();
            slot.ops.push_back(op);
            if !slot.running {
                slot.running = true;
                let state = slot.state.take();
                let inner = Arc::clone(&self.inner);
                self.inner
                    .runtime
                    .handle
                    .spawn(async move { inner.run_room(room, state).await });
            }
            answer
        });
        async move {
            queued?
                .await
                .unwrap_or_else(|_| Err(Error::NotApplied("the room's writer stopped".into())))
        }
    }
}

async fn connect_session(
    config: &CqlConfig,
    redacted_url: &str,
) -> Result<(Session, Statements, CqlConfig)> {
    let session = open_session(config, Some(&config.keyspace)).await?;
    let version = recorded_version(&session).await?;
    if version < SCHEMA_VERSION {
        return Err(Error::Schema(format!(
            "keyspace {:?} has schema version {version}, this build needs {SCHEMA_VERSION}: \
             run `gateway migrate --store '{redacted_url}'`",
            config.keyspace
        )));
    }
    if version > SCHEMA_VERSION {
        return Err(newer_schema(version));
    }
    let statements = Statements::prepare(&session, serial_consistency(config.consistency)).await?;
    Ok((session, statements, config.clone()))
}

// ---------------------------------------------------------------------------------------------
// Per-room queues

/// One room's operations in call order, and its state while no worker holds it.
#[derive(Default)]
struct RoomSlot {
    ops: VecDeque<Queued>,
    /// A worker task is draining `ops` (and holds the state).
    running: bool,
    state: Option<RoomState>,
}

struct Queued {
    op: RoomOp,
    _admission: Admission,
}

type Reply<T> = oneshot::Sender<Result<T>>;

/// The operations that run in a room's order.
enum RoomOp {
    Append(NewMessage, Reply<Appended>),
    CreateRoom(NewRoom, Reply<(Room, bool)>),
    AddParticipant(String, Reply<Room>),
    MarkRead(String, u64, Reply<ReadState>),
    ReadState(String, Reply<ReadState>),
}

/// What the room's owner knows of a room, recovered from the tables at first use.
#[derive(Debug, Clone, Default)]
struct RoomState {
    last_seq: u64,
    note_count: u64,
    /// The bucket hint as stored in the rooms row.
    last_bucket: u64,
    /// Senders' counters, as stored in their marker rows.
    senders: HashMap<String, SentCounters>,
}

/// What one user sent in a room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SentCounters {
    total: u64,
    notes_total: u64,
    last_seq: u64,
}

/// A user's marker row.
#[derive(Debug, Clone, Copy, Default)]
struct MarkerRow {
    read_seq: u64,
    notes_read: u64,
    sent: SentCounters,
    sent_read: u64,
    sent_notes_read: u64,
}

impl MarkerRow {
    fn from_row(row: MarkerColumns) -> MarkerRow {
        let value = |column: Option<i64>| column.map_or(0, to_u64);
        MarkerRow {
            read_seq: value(row.0),
            notes_read: value(row.1),
            sent: SentCounters {
                total: value(row.2),
                notes_total: value(row.3),
                last_seq: value(row.6),
            },
            sent_read: value(row.4),
            sent_notes_read: value(row.5),
        }
    }

    /// The reader's counts against the room's counters (saturating: counters a crash left
    /// behind never make a count wrap).
    fn state(&self, room: &RoomState) -> ReadState {
        let above = room.last_seq.saturating_sub(self.read_seq);
        let own_above = self.sent.total.saturating_sub(self.sent_read);
        let own_notes_above = self.sent.notes_total.saturating_sub(self.sent_notes_read);
        let notes_above = room.note_count.saturating_sub(self.notes_read);
        let unread_with_notes = above.saturating_sub(own_above);
        let others_notes_above = notes_above.saturating_sub(own_notes_above);
        ReadState {
            read_seq: self.read_seq,
            unread_with_notes,
            unread: unread_with_notes.saturating_sub(others_notes_above),
        }
    }
}

/// What a group decided for one append.
enum Plan {
    /// Answered already (invalid, or a duplicate of a stored message).
    Answered,
    /// Refused by the fence after this many of the group's rows: answered with the room's
    /// last seq at that point of the call order, as if the appends had run one by one, not
    /// with the seq the whole group ends at (the owner renumbers from it).
    Conflict { rows_before: usize },
    /// The same id as the append at this index of the group.
    SameAs(usize),
    /// To store, at this index of `rows`.
    Store(usize),
}

/// The answer to an append of a group that an earlier failed write of the room kept back.
fn not_sent_after_a_failure() -> Error {
    Error::NotApplied("not sent: an earlier write of the room failed".to_owned())
}

/// A message to store with its row values.
struct PlannedRow {
    message: NewMessage,
    notes_upto: u64,
    metadata: String,
}

impl PlannedRow {
    fn bytes(&self) -> usize {
        let m = &self.message;
        m.message_id.len()
            + m.sender.len()
            + m.message.len()
            + self.metadata.len()
            + m.attached_files.iter().map(String::len).sum::<usize>()
            + m.mentions.iter().map(String::len).sum::<usize>()
            + m.reply_to.as_ref().map_or(0, String::len)
            + 64
    }
}

impl Inner {
    fn lock_rooms(&self) -> MutexGuard<'_, HashMap<RoomKey, RoomSlot>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drains one room's queue in call order until it is empty, then hands the state back.
    async fn run_room(self: Arc<Self>, room: RoomKey, mut state: Option<RoomState>) {
        loop {
            let ops: Vec<Queued> = {
                let mut rooms = self.lock_rooms();
                let idle_rooms = rooms.len();
                let Some(slot) = rooms.get_mut(&room) else {
                    return;
                };
                if slot.ops.is_empty() {
                    slot.running = false;
                    // A room that does not exist (or that failed to load) keeps no entry, and
                    // past the cap idle rooms give their state up.
                    if state.is_none() || idle_rooms > MAX_CACHED_ROOMS {
                        rooms.remove(&room);
                    } else {
                        slot.state = state;
                    }
                    return;
                }
                let take = slot.ops.len().min(OPS_PER_ROUND);
                slot.ops.drain(..take).collect()
            };
            let mut ops = ops.into_iter().peekable();
            while let Some(queued) = ops.next() {
                match queued.op {
                    RoomOp::Append(message, reply) => {
                        let mut group = vec![(message, reply, queued._admission)];
                        while let Some(Queued {
                            op: RoomOp::Append(..),
                            ..
                        }) = ops.peek()
                        {
                            if let Some(Queued {
                                op: RoomOp::Append(message, reply),
                                _admission,
                            }) = ops.next()
                            {
                                group.push((message, reply, _admission));
                            }
                        }
                        self.write_group(&room, &mut state, group).await;
                    }
                    RoomOp::CreateRoom(new, reply) => {
                        let _ = reply.send(self.create_room(&room, &mut state, new).await);
                    }
                    RoomOp::AddParticipant(user, reply) => {
                        let _ = reply.send(self.add_participant(&room, &mut state, &user).await);
                    }
                    RoomOp::MarkRead(user, seq, reply) => {
                        let _ = reply.send(self.mark_read(&room, &mut state, &user, seq).await);
                    }
                    RoomOp::ReadState(user, reply) => {
                        let _ = reply.send(self.read_state(&room, &mut state, &user).await);
                    }
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Room state

    /// The room's state, loaded from the tables when not cached; `None` when the room does not
    /// exist.
    async fn state<'s>(
        &self,
        room: &RoomKey,
        state: &'s mut Option<RoomState>,
    ) -> Result<Option<&'s mut RoomState>> {
        if state.is_none() {
            let Some((_, last_bucket)) = self.room_row(room).await? else {
                return Ok(None);
            };
            let (last_seq, note_count) = self.recover_last(room, last_bucket).await?;
            *state = Some(RoomState {
                last_seq,
                note_count,
                last_bucket,
                senders: HashMap::new(),
            });
        }
        Ok(state.as_mut())
    }

    /// The rooms row: the room without participants and `last_seq`, and its bucket hint.
    async fn room_row(&self, room: &RoomKey) -> Result<Option<(Room, u64)>> {
        let result = self
            .session
            .execute_unpaged(&self.statements.room, (&room.tenant_id, &room.room_id))
            .await
            .map_err(|e| request_error(Access::Read, "reading a room", &e))?;
        let row = first_row::<(
            Option<String>,
            Option<String>,
            Option<String>,
            Option<i64>,
            Option<i64>,
        )>(result, "rooms")?;
        let Some((kind, title, status, created_at, last_bucket)) = row else {
            return Ok(None);
        };
        let kind = kind
            .as_deref()
            .and_then(RoomKind::parse)
            .ok_or_else(|| bad_row("rooms", format!("unknown kind {kind:?}")))?;
        let stored = Room {
            room_id: room.room_id.clone(),
            tenant_id: room.tenant_id.clone(),
            kind,
            title: title.unwrap_or_default(),
            status: status.unwrap_or_default(),
            participants: Vec::new(),
            created_at: Timestamp(created_at.unwrap_or(0)),
            last_seq: 0,
        };
        Ok(Some((stored, last_bucket.map_or(0, to_u64))))
    }

    /// The last stored seq and the note count at it: the last row of the highest non-empty
    /// bucket at or below the hint (the hint is never below it, and is at most a bucket or two
    /// above it after a failed write, so this is one or two reads).
    async fn recover_last(&self, room: &RoomKey, hint: u64) -> Result<(u64, u64)> {
        let mut bucket = hint;
        loop {
            let result = self
                .session
                .execute_unpaged(
                    &self.statements.last_in_bucket,
                    (&room.tenant_id, &room.room_id, to_i64(bucket)),
                )
                .await
                .map_err(|e| request_error(Access::Read, "reading a room's last message", &e))?;
            if let Some((seq, notes_upto)) = first_row::<(i64, Option<i64>)>(result, "messages")? {
                return Ok((to_u64(seq), notes_upto.map_or(0, to_u64)));
            }
            if bucket == 0 {
                return Ok((0, 0));
            }
            bucket -= 1;
        }
    }

    /// Participants in join order (a user stored twice counts at the first position), and the
    /// highest position.
    async fn participants(&self, room: &RoomKey) -> Result<(Vec<String>, i64)> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.participants,
                (&room.tenant_id, &room.room_id),
            )
            .await
            .map_err(|e| request_error(Access::Read, "reading participants", &e))?;
        let rows = result
            .into_rows_result()
            .map_err(|e| bad_row("room_participants", e))?;
        let mut seen = HashSet::new();
        let mut participants = Vec::new();
        let mut highest = i64::MIN;
        for row in rows
            .rows::<(i64, String)>()
            .map_err(|e| bad_row("room_participants", e))?
        {
            let (position, user) = row.map_err(|e| bad_row("room_participants", e))?;
            highest = highest.max(position);
            if seen.insert(user.clone()) {
                participants.push(user);
            }
        }
        Ok((participants, highest))
    }

    /// The whole room as stored, with `last_seq` recovered from the tables.
    async fn load_room(&self, room: &RoomKey) -> Result<Option<Room>> {
        let Some((mut stored, hint)) = self.room_row(room).await? else {
            return Ok(None);
        };
        let ((participants, _), (last_seq, _)) =
            futures_util::try_join!(self.participants(room), self.recover_last(room, hint))?;
        stored.participants = participants;
        stored.last_seq = last_seq;
        Ok(Some(stored))
    }

    async fn create_room(
        &self,
        room: &RoomKey,
        state: &mut Option<RoomState>,
        new: NewRoom,
    ) -> Result<(Room, bool)> {
        if let Some((mut existing, hint)) = self.room_row(room).await? {
            let (participants, _) = self.participants(room).await?;
            existing.participants = participants;
            existing.last_seq = match state {
                Some(state) => state.last_seq,
                None => self.recover_last(room, hint).await?.0,
            };
            return Ok((existing, false));
        }
        let mut participants = Vec::new();
        for user in &new.participants {
            if !participants.contains(user) {
                participants.push(user.clone());
            }
        }
        // Participants first, the rooms row last: a room exists only once it is complete.
        let base = now_micros();
        let writes = participants.iter().enumerate().map(|(index, user)| {
            let position = base.saturating_add(i64::try_from(index).unwrap_or(i64::MAX));
            self.write(
                &self.statements.insert_participant,
                (&room.tenant_id, &room.room_id, position, user),
                "adding a participant",
            )
        });
        for result in join_all(writes).await {
            result?;
        }
        self.write(
            &self.statements.insert_room,
            (
                &room.tenant_id,
                &room.room_id,
                new.kind.as_str(),
                &new.title,
                &new.status,
                new.created_at.0,
            ),
            "creating a room",
        )
        .await?;
        *state = Some(RoomState::default());
        Ok((
            Room {
                room_id: room.room_id.clone(),
                tenant_id: room.tenant_id.clone(),
                kind: new.kind,
                title: new.title,
                status: new.status,
                participants,
                created_at: new.created_at,
                last_seq: 0,
            },
            true,
        ))
    }

    async fn add_participant(
        &self,
        room: &RoomKey,
        state: &mut Option<RoomState>,
        user: &str,
    ) -> Result<Room> {
        let Some((mut stored, hint)) = self.room_row(room).await? else {
            return Err(missing_room(room));
        };
        let (mut participants, highest) = self.participants(room).await?;
        if !participants.iter().any(|p| p == user) {
            let position = now_micros().max(highest.saturating_add(1));
            self.write(
                &self.statements.insert_participant,
                (&room.tenant_id, &room.room_id, position, user),
                "adding a participant",
            )
            .await?;
            participants.push(user.to_owned());
        }
        stored.participants = participants;
        stored.last_seq = match self.state(room, state).await? {
            Some(state) => state.last_seq,
            None => self.recover_last(room, hint).await?.0,
        };
        Ok(stored)
    }

    // -----------------------------------------------------------------------------------------
    // Appends

    /// Stores one group of a room's appends (see the module doc) and answers each.
    async fn write_group(
        &self,
        room: &RoomKey,
        state: &mut Option<RoomState>,
        group: Vec<(NewMessage, Reply<Appended>, Admission)>,
    ) {
        let started = Instant::now();
        let current = match self.state(room, state).await {
            Ok(Some(current)) => current.clone(),
            Ok(None) => {
                for (_, reply, _) in group {
                    let _ = reply.send(Err(missing_room(room)));
                }
                return;
            }
            Err(error) => {
                for (_, reply, _) in group {
                    let _ = reply.send(Err(clone_error(&error)));
                }
                return;
            }
        };

        // Claims and senders' counters, read concurrently.
        let ids: Vec<&str> = group
            .iter()
            .map(|(m, _, _)| m.message_id.as_str())
            .filter(|id| !id.is_empty())
            .collect();
        let senders: Vec<&str> = {
            let mut unique: Vec<&str> = group.iter().map(|(m, _, _)| m.sender.as_str()).collect();
            unique.sort_unstable();
            unique.dedup();
            unique
                .into_iter()
                .filter(|s| !current.senders.contains_key(*s))
                .collect()
        };
        let looked_up = futures_util::try_join!(self.claims(room, &ids, current.last_seq), async {
            let markers = join_all(senders.iter().map(|s| self.marker(room, s))).await;
            markers.into_iter().collect::<Result<Vec<_>>>()
        });
        let (originals, markers) = match looked_up {
            Ok(found) => found,
            Err(error) => {
                for (_, reply, _) in group {
                    let _ = reply.send(Err(clone_error(&error)));
                }
                return;
            }
        };
        let mut counters = current.senders.clone();
        for (sender, marker) in senders.iter().zip(markers) {
            counters.insert((*sender).to_owned(), marker.sent);
        }

        // The fence and the ids, in call order.
        let mut plans = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        let mut rows: Vec<PlannedRow> = Vec::new();
        let mut in_group: HashMap<String, usize> = HashMap::new();
        let mut next_seq = current.last_seq + 1;
        let mut note_count = current.note_count;
        for (index, (message, reply, admission)) in group.into_iter().enumerate() {
            let mut reply = Some(reply);
            let mut answer_now = |answer: Result<Appended>| {
                if let Some(reply) = reply.take() {
                    let _ = reply.send(answer);
                }
                Plan::Answered
            };
            let plan = if message.message_id.is_empty() {
                answer_now(Err(Error::Invalid("empty message_id".to_owned())))
            } else if let Some(&first) = in_group.get(&message.message_id) {
                Plan::SameAs(first)
            } else if let Some(original) = originals.get(&message.message_id) {
                answer_now(Ok(Appended {
                    message: original.clone(),
                    duplicate: true,
                }))
            } else if message.seq != next_seq {
                Plan::Conflict {
                    rows_before: rows.len(),
                }
            } else {
                match serde_json::to_string(&message.metadata) {
                    Err(e) => answer_now(Err(Error::Invalid(format!("metadata: {e}")))),
                    Ok(metadata) => {
                        note_count += u64::from(message.direction == Direction::Note);
                        next_seq += 1;
                        in_group.insert(message.message_id.clone(), index);
                        rows.push(PlannedRow {
                            message,
                            notes_upto: note_count,
                            metadata,
                        });
                        Plan::Store(rows.len() - 1)
                    }
                }
            };
            plans.push(plan);
            replies.push((reply, admission));
        }

        // Write what the fence let through; `stored` is how many rows (a prefix) are durable.
        let (stored, failure) = if rows.is_empty() {
            (0, None)
        } else {
            self.write_rows(room, &current, &rows).await
        };
        if let Some((_, Error::OutcomeUnknown(_))) = &failure {
            // The rows may land later: reload the room from the tables before the next write.
            *state = None;
        }

        // Senders' counters for the stored rows (after the rows: a crash in between leaves
        // them behind, which only over-counts the sender's own messages until they read on).
        let mut changed: Vec<&str> = Vec::new();
        for row in &rows[..stored] {
            let m = &row.message;
            let entry = counters.entry(m.sender.clone()).or_default();
            entry.total += 1;
            entry.notes_total += u64::from(m.direction == Direction::Note);
            entry.last_seq = m.seq;
            if !changed.contains(&m.sender.as_str()) {
                changed.push(&m.sender);
            }
        }
        let counter_writes = changed.iter().map(|sender| {
            let sent = counters.get(*sender).copied().unwrap_or_default();
            self.write(
                &self.statements.set_sent,
                (
                    to_i64(sent.total),
                    to_i64(sent.notes_total),
                    to_i64(sent.last_seq),
                    &room.tenant_id,
                    &room.room_id,
                    *sender,
                ),
                "updating a sender's counters",
            )
        });
        let counters_failed = join_all(counter_writes)
            .await
            .into_iter()
            .any(|r| r.is_err());

        let last_seq = current.last_seq + stored as u64;
        if let Some(state) = state.as_mut() {
            state.last_seq = last_seq;
            state.note_count = rows[..stored]
                .last()
                .map_or(current.note_count, |row| row.notes_upto);
            // Only a stored row proves the hint write before it succeeded.
            state.last_bucket = state.last_bucket.max(
                rows[..stored]
                    .last()
                    .map_or(0, |row| bucket_of(row.message.seq)),
            );
            if counters_failed {
                // Re-read from the marker rows next time, whatever they hold.
                state.senders.clear();
                tracing::warn!(room = ?room, "sender counters not updated after a stored group");
            } else {
                state.senders = counters;
                if state.senders.len() > 1024 {
                    state.senders.clear();
                }
            }
        }
        self.metrics.group_size.observe(stored as f64);
        self.metrics
            .group_seconds
            .observe(started.elapsed().as_secs_f64());

        // Answers, in call order.
        let outcome = |row: usize| -> Result<Appended> {
            if row < stored {
                Ok(Appended {
                    message: rows[row].message.clone().into_message(),
                    duplicate: false,
                })
            } else {
                match &failure {
                    Some((failed, error)) if *failed == row => Err(clone_error(error)),
                    _ => Err(not_sent_after_a_failure()),
                }
            }
        };
        for (index, (reply, _admission)) in replies.into_iter().enumerate() {
            let Some(reply) = reply else {
                continue;
            };
            let answer = match plans[index] {
                Plan::Answered => continue,
                Plan::Conflict { rows_before } if rows_before <= stored => {
                    Err(Error::SeqConflict {
                        last_seq: current.last_seq + rows_before as u64,
                    })
                }
                Plan::Conflict { .. } => Err(not_sent_after_a_failure()),
                Plan::Store(row) => outcome(row),
                Plan::SameAs(first) => match plans[first] {
                    Plan::Store(row) => outcome(row).map(|mut appended| {
                        appended.duplicate = true;
                        appended
                    }),
                    _ => Err(Error::NotApplied("its first copy was not stored".into())),
                },
            };
            let _ = reply.send(answer);
        }
    }

    /// The stored originals of the ids that have a valid claim. A claim whose seq holds no
    /// message or another id is stale (a crash between the claim and the message) and ignored:
    /// the append overwrites it.
    async fn claims(
        &self,
        room: &RoomKey,
        ids: &[&str],
        last_seq: u64,
    ) -> Result<HashMap<String, Message>> {
        let lookups = ids.iter().map(|id| async move {
            let result = self
                .session
                .execute_unpaged(
                    &self.statements.claim,
                    (&room.tenant_id, &room.room_id, *id),
                )
                .await
                .map_err(|e| request_error(Access::Read, "reading a message id claim", &e))?;
            let claimed = first_row::<(Option<i64>,)>(result, "message_ids")?
                .and_then(|(seq,)| seq)
                .map(to_u64);
            let original = match claimed {
                Some(seq) if seq >= 1 && seq <= last_seq => self
                    .message_at(room, seq)
                    .await?
                    .filter(|m| m.message_id == *id),
                _ => None,
            };
            Ok::<_, Error>(original)
        });
        let mut originals = HashMap::new();
        for original in join_all(lookups).await {
            if let Some(message) = original? {
                originals.insert(message.message_id.clone(), message);
            }
        }
        Ok(originals)
    }

    /// Writes claims and the bucket hint, then the rows in seq order. Returns how many rows are
    /// stored (a prefix) and, when not all, which row failed and how.
    async fn write_rows(
        &self,
        room: &RoomKey,
        current: &RoomState,
        rows: &[PlannedRow],
    ) -> (usize, Option<(usize, Error)>) {
        let highest_bucket = rows
            .iter()
            .map(|row| bucket_of(row.message.seq))
            .max()
            .unwrap_or(0);
        let claims = rows.iter().map(|row| {
            self.write(
                &self.statements.insert_claim,
                (
                    &room.tenant_id,
                    &room.room_id,
                    &row.message.message_id,
                    to_i64(row.message.seq),
                ),
                "writing a message id claim",
            )
        });
        let hint = async {
            if highest_bucket > current.last_bucket {
                self.write(
                    &self.statements.set_last_bucket,
                    (to_i64(highest_bucket), &room.tenant_id, &room.room_id),
                    "writing a room's bucket hint",
                )
                .await
            } else {
                Ok(())
            }
        };
        let (claimed, hinted) = tokio::join!(join_all(claims), hint);
        // No message row is written yet: whatever failed, the messages are not stored (a
        // claim that landed is a stale claim, which a retry overwrites).
        if let Some(Err(error)) = claimed.into_iter().chain([hinted]).find(Result::is_err) {
            let error = match error {
                Error::OutcomeUnknown(detail) => {
                    Error::NotApplied(format!("message not written: {detail}"))
                }
                other => other,
            };
            return (0, Some((0, error)));
        }

        // Single-partition batches in seq order, each all-or-nothing.
        let mut start = 0;
        while start < rows.len() {
            let bucket = bucket_of(rows[start].message.seq);
            let mut end = start;
            let mut bytes = 0;
            while end < rows.len()
                && end - start < BATCH_ROWS
                && bucket_of(rows[end].message.seq) == bucket
                && (end == start || bytes + rows[end].bytes() <= BATCH_BYTES)
            {
                bytes += rows[end].bytes();
                end += 1;
            }
            if let Err(error) = self.insert_messages(room, &rows[start..end]).await {
                return (start, Some((start, error)));
            }
            start = end;
        }
        (rows.len(), None)
    }

    async fn insert_messages(&self, room: &RoomKey, rows: &[PlannedRow]) -> Result<()> {
        let values: Vec<_> = rows
            .iter()
            .map(|row| {
                let m = &row.message;
                (
                    &room.tenant_id,
                    &room.room_id,
                    to_i64(bucket_of(m.seq)),
                    to_i64(m.seq),
                    &m.message_id,
                    &m.sender,
                    m.sender_type.as_str(),
                    m.direction.as_str(),
                    m.kind.as_str(),
                    &m.message,
                    &m.attached_files,
                    m.reply_to.as_deref(),
                    &m.mentions,
                    &row.metadata,
                    m.created_at.0,
                    to_i64(row.notes_upto),
                )
            })
            .collect();
        self.write_together(&self.statements.insert_message, &values, "writing messages")
            .await
    }

    /// Writes rows of one statement (one partition's) together: one statement, or one
    /// unlogged batch of them (idempotent: each row is written whole).
    async fn write_together<V: scylla::serialize::row::SerializeRow>(
        &self,
        statement: &PreparedStatement,
        values: &[V],
        what: &str,
    ) -> Result<()> {
        self.metrics.writes_in_flight.inc();
        let result = if let [single] = values {
            self.session.execute_unpaged(statement, single).await
        } else {
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in values {
                batch.append_statement(statement.clone());
            }
            batch.set_is_idempotent(true);
            self.session.batch(&batch, values).await
        };
        self.metrics.writes_in_flight.dec();
        result
            .map(|_| ())
            .map_err(|e| request_error(Access::Write, what, &e))
    }

    /// Runs one write statement.
    async fn write(
        &self,
        statement: &PreparedStatement,
        values: impl scylla::serialize::row::SerializeRow,
        what: &str,
    ) -> Result<()> {
        self.metrics.writes_in_flight.inc();
        let result = self.session.execute_unpaged(statement, values).await;
        self.metrics.writes_in_flight.dec();
        result
            .map(|_| ())
            .map_err(|e| request_error(Access::Write, what, &e))
    }

    // -----------------------------------------------------------------------------------------
    // Read markers

    async fn marker(&self, room: &RoomKey, user: &str) -> Result<MarkerRow> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.marker,
                (&room.tenant_id, &room.room_id, user),
            )
            .await
            .map_err(|e| request_error(Access::Read, "reading a read marker", &e))?;
        Ok(first_row::<MarkerColumns>(result, "read_markers")?
            .map(MarkerRow::from_row)
            .unwrap_or_default())
    }

    /// The marker row with the sender counters this process wrote last (fresher than the row
    /// if a counter write failed).
    async fn current_marker(
        &self,
        room: &RoomKey,
        state: &RoomState,
        user: &str,
    ) -> Result<MarkerRow> {
        let mut marker = self.marker(room, user).await?;
        if let Some(sent) = state.senders.get(user) {
            marker.sent = *sent;
        }
        Ok(marker)
    }

    async fn read_state(
        &self,
        room: &RoomKey,
        state: &mut Option<RoomState>,
        user: &str,
    ) -> Result<ReadState> {
        let Some(current) = self.state(room, state).await? else {
            return Ok(ReadState::default());
        };
        let current = current.clone();
        Ok(self
            .current_marker(room, &current, user)
            .await?
            .state(&current))
    }

    async fn mark_read(
        &self,
        room: &RoomKey,
        state: &mut Option<RoomState>,
        user: &str,
        seq: u64,
    ) -> Result<ReadState> {
        let Some(current) = self.state(room, state).await? else {
            return Err(missing_room(room));
        };
        let current = current.clone();
        if seq > current.last_seq {
            return Err(Error::Invalid(format!(
                "seq {seq} is beyond the room's last message ({})",
                current.last_seq
            )));
        }
        let mut marker = self.current_marker(room, &current, user).await?;
        if seq <= marker.read_seq {
            return Ok(marker.state(&current));
        }
        if seq >= marker.sent.last_seq {
            marker.sent_read = marker.sent.total;
            marker.sent_notes_read = marker.sent.notes_total;
        } else {
            // The marker stops below the user's own latest message: count their messages
            // between the old marker and the new one (a bounded range, never the whole room).
            let (own, own_notes) = self.count_sent(room, user, marker.read_seq, seq).await?;
            marker.sent_read += own;
            marker.sent_notes_read += own_notes;
        }
        marker.notes_read = if seq == current.last_seq {
            current.note_count
        } else {
            self.notes_upto(room, seq).await?
        };
        marker.read_seq = seq;
        self.write(
            &self.statements.set_read,
            (
                to_i64(marker.read_seq),
                to_i64(marker.notes_read),
                to_i64(marker.sent_read),
                to_i64(marker.sent_notes_read),
                &room.tenant_id,
                &room.room_id,
                user,
            ),
            "moving a read marker",
        )
        .await?;
        Ok(marker.state(&current))
    }

    /// Messages (and notes) `user` sent with `after < seq <= upto`.
    async fn count_sent(
        &self,
        room: &RoomKey,
        user: &str,
        after: u64,
        upto: u64,
    ) -> Result<(u64, u64)> {
        let (mut own, mut own_notes) = (0, 0);
        let mut from = after;
        while from < upto {
            let bucket = bucket_of(from + 1);
            let bucket_end = ((bucket + 1) * BUCKET_SIZE - 1).min(upto);
            let result = self
                .session
                .execute_unpaged(
                    &self.statements.senders_in_range,
                    (
                        &room.tenant_id,
                        &room.room_id,
                        to_i64(bucket),
                        to_i64(from),
                        to_i64(bucket_end),
                        ROWS_PER_REQUEST as i32,
                    ),
                )
                .await
                .map_err(|e| request_error(Access::Read, "counting own messages", &e))?;
            let rows = result
                .into_rows_result()
                .map_err(|e| bad_row("messages", e))?;
            let mut read = 0;
            let mut last = from;
            for row in rows
                .rows::<(i64, String, String)>()
                .map_err(|e| bad_row("messages", e))?
            {
                let (seq, sender, direction) = row.map_err(|e| bad_row("messages", e))?;
                read += 1;
                last = to_u64(seq);
                if sender == user {
                    own += 1;
                    own_notes += u64::from(direction == Direction::Note.as_str());
                }
            }
            from = if read == ROWS_PER_REQUEST {
                last
            } else {
                bucket_end
            };
        }
        Ok((own, own_notes))
    }

    async fn notes_upto(&self, room: &RoomKey, seq: u64) -> Result<u64> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.notes_upto_at,
                (
                    &room.tenant_id,
                    &room.room_id,
                    to_i64(bucket_of(seq)),
                    to_i64(seq),
                ),
            )
            .await
            .map_err(|e| request_error(Access::Read, "reading a message's note count", &e))?;
        Ok(first_row::<(Option<i64>,)>(result, "messages")?
            .and_then(|(n,)| n)
            .map_or(0, to_u64))
    }

    // -----------------------------------------------------------------------------------------
    // Messages

    async fn message_at(&self, room: &RoomKey, seq: u64) -> Result<Option<Message>> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.message_at,
                (
                    &room.tenant_id,
                    &room.room_id,
                    to_i64(bucket_of(seq)),
                    to_i64(seq),
                ),
            )
            .await
            .map_err(|e| request_error(Access::Read, "reading a message", &e))?;
        first_row::<MessageRow>(result, "messages")?
            .map(|row| message_from_row(room, row))
            .transpose()
    }

    async fn message_by_id(&self, room: &RoomKey, message_id: &str) -> Result<Option<Message>> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.claim,
                (&room.tenant_id, &room.room_id, message_id),
            )
            .await
            .map_err(|e| request_error(Access::Read, "reading a message id claim", &e))?;
        let Some(seq) = first_row::<(Option<i64>,)>(result, "message_ids")?.and_then(|(seq,)| seq)
        else {
            return Ok(None);
        };
        // A stale claim points at no message or at another one.
        Ok(self
            .message_at(room, to_u64(seq))
            .await?
            .filter(|m| m.message_id == message_id))
    }

    /// One page of history or search results (see [`Page`]).
    async fn read_page(&self, room: &RoomKey, page: Page) -> Result<HistoryPage> {
        let Some((_, hint)) = self.room_row(room).await? else {
            return Ok(HistoryPage::default());
        };
        let limit = match page.limit {
            0 => DEFAULT_HISTORY_LIMIT,
            limit => limit,
        } as usize;
        let filtered = !page.words.is_empty() || !page.include_notes;
        let forwards = page.after_seq.is_some();
        // The open interval (low, high) of seqs to read.
        let low = page.after_seq.unwrap_or(0);
        let high = page.before_seq.unwrap_or(u64::MAX).min(i64::MAX as u64);
        let scan_budget = u64::from(self.config.scan_rows.max(1));
        let deadline = (!page.words.is_empty()).then(|| Instant::now() + self.config.scan_time);

        let mut messages = Vec::new();
        let mut examined = 0u64;
        let mut last_examined = None;
        let mut budget_spent = false;
        let mut bytes = 0usize;
        let mut cut = false;
        let mut done = high <= low.saturating_add(1);
        // Buckets in reading order; the hint is at or above the highest stored bucket.
        let first_bucket = bucket_of(low + 1);
        let last_bucket = bucket_of(high.saturating_sub(1)).min(hint);
        let mut bucket = if forwards { first_bucket } else { last_bucket };
        // The part of the interval not read yet.
        let (mut open_low, mut open_high) = (low, high);
        while !done {
            if first_bucket > last_bucket {
                break;
            }
            let rows_wanted = if filtered {
                (scan_budget + 1 - examined) as usize
            } else {
                limit + 1 - messages.len()
            }
            .min(ROWS_PER_REQUEST);
            let statement = if forwards {
                &self.statements.page_forwards
            } else {
                &self.statements.page_backwards
            };
            let result = self
                .session
                .execute_unpaged(
                    statement,
                    (
                        &room.tenant_id,
                        &room.room_id,
                        to_i64(bucket),
                        to_i64(open_low),
                        to_i64(open_high),
                        i32::try_from(rows_wanted).unwrap_or(i32::MAX),
                    ),
                )
                .await
                .map_err(|e| request_error(Access::Read, "reading history", &e))?;
            let rows = result
                .into_rows_result()
                .map_err(|e| bad_row("messages", e))?;
            let mut read = 0;
            for row in rows
                .rows::<MessageRow>()
                .map_err(|e| bad_row("messages", e))?
            {
                let row = row.map_err(|e| bad_row("messages", e))?;
                read += 1;
                let seq = to_u64(row.1);
                if forwards {
                    open_low = seq;
                } else {
                    open_high = seq;
                }
                if filtered {
                    if examined == scan_budget {
                        budget_spent = true;
                        done = true;
                        break;
                    }
                    examined += 1;
                    last_examined = Some(seq);
                    let is_note = row.4 == Direction::Note.as_str();
                    if (is_note && !page.include_notes)
                        || (!page.words.is_empty() && !contains_words(&row.6, &page.words))
                    {
                        continue;
                    }
                } else {
                    examined += 1;
                }
                let message = message_from_row(room, row)?;
                let size = message_bytes(&message);
                if page.max_bytes > 0
                    && !messages.is_empty()
                    && messages.len() < limit
                    && bytes + size > page.max_bytes
                {
                    cut = true;
                    done = true;
                    break;
                }
                bytes += size;
                messages.push(message);
                if messages.len() > limit {
                    done = true;
                    break;
                }
            }
            if done {
                break;
            }
            if read < rows_wanted {
                // This bucket's part of the interval is read: on to the next bucket.
                if forwards {
                    if bucket >= last_bucket {
                        break;
                    }
                    bucket += 1;
                } else {
                    if bucket <= first_bucket {
                        break;
                    }
                    bucket -= 1;
                }
            }
            if deadline.is_some_and(|d| Instant::now() > d) && last_examined.is_some() {
                // The search's time is spent: what it found, and where to go on from.
                budget_spent = true;
                break;
            }
        }

        Ok(ScanOutcome {
            messages,
            limit,
            forwards,
            filtered,
            cut,
            budget_spent,
            examined,
            last_examined,
        }
        .into_page())
    }
}

/// What [`Inner::read_page`] reads: a history query, or a search (`words` not empty).
struct Page {
    before_seq: Option<u64>,
    after_seq: Option<u64>,
    limit: u32,
    include_notes: bool,
    max_bytes: usize,
    words: Vec<String>,
}

fn message_from_row(room: &RoomKey, row: MessageRow) -> Result<Message> {
    let (
        message_id,
        seq,
        sender,
        sender_type,
        direction,
        kind,
        message,
        attached_files,
        reply_to,
        mentions,
        metadata,
        created_at,
    ) = row;
    let unknown =
        |what: &str, value: &str| bad_row("messages", format!("unknown {what} {value:?}"));
    Ok(Message {
        message_id,
        seq: to_u64(seq),
        room_id: room.room_id.clone(),
        sender,
        sender_type: SenderType::parse(&sender_type)
            .ok_or_else(|| unknown("sender_type", &sender_type))?,
        direction: Direction::parse(&direction).ok_or_else(|| unknown("direction", &direction))?,
        kind: MessageType::parse(&kind).ok_or_else(|| unknown("kind", &kind))?,
        message,
        attached_files: attached_files.unwrap_or_default(),
        reply_to,
        mentions: mentions.unwrap_or_default(),
        metadata: match metadata.as_deref() {
            None | Some("") => serde_json::Map::new(),
            Some(text) => serde_json::from_str(text).map_err(|e| bad_row("messages", e))?,
        },
        created_at: Timestamp(created_at),
    })
}

/// Bytes of message data, as the embedded backend counts a row (text plus 8 per number).
fn message_bytes(m: &Message) -> usize {
    m.message_id.len()
        + m.sender.len()
        + m.sender_type.as_str().len()
        + m.direction.as_str().len()
        + m.kind.as_str().len()
        + m.message.len()
        + m.attached_files.iter().map(|f| f.len() + 3).sum::<usize>()
        + m.reply_to.as_ref().map_or(8, String::len)
        + m.mentions.iter().map(|f| f.len() + 3).sum::<usize>()
        + 16
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A copy of an error for each of the appends it failed.
fn clone_error(error: &Error) -> Error {
    match error {
        Error::NotApplied(s) => Error::NotApplied(s.clone()),
        Error::SeqConflict { last_seq } => Error::SeqConflict {
            last_seq: *last_seq,
        },
        Error::Invalid(s) => Error::Invalid(s.clone()),
        Error::BadUrl(s) => Error::BadUrl(s.clone()),
        Error::Schema(s) => Error::Schema(s.clone()),
        Error::Closed => Error::Closed,
        Error::OutcomeUnknown(s) => Error::OutcomeUnknown(s.clone()),
        Error::VersionConflict { stored } => Error::VersionConflict { stored: *stored },
    }
}

// ---------------------------------------------------------------------------------------------
// Records

/// How long a closed place outlives the list's snapshot window: room for the clocks of the
/// writers, the readers and the nodes (a TTL counts on the node's clock) to disagree.
const PLACE_TTL_MARGIN_MILLIS: i64 = 60_000;
/// Record reads in flight for one list page.
const LIST_READS_IN_FLIGHT: usize = 16;
/// Places asked for beyond what a list page still needs: room for the places the page passes
/// over (closed before its time, or opened after it), so one request usually answers.
const LIST_SLACK_ROWS: usize = 32;

/// Where a record stands in its kind's list, as its row keeps it (see `002_records.cql`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Listing {
    /// Its place (`list_key`) and since when.
    open: Option<(i64, i64)>,
    /// The place it left last: its key, since when and until when.
    left: Option<(i64, i64, i64)>,
}

impl Listing {
    /// The time of the record's latest list event.
    fn last_event(&self) -> Option<i64> {
        self.open
            .map(|(_, at)| at)
            .max(self.left.map(|(_, _, at)| at))
    }

    /// Whether `place`, open in the list, was left open by two interrupted writes in a row:
    /// neither the record's place nor the one it left last, so it was closed by the record's
    /// last event at the latest, and is not held at any time after that.
    fn disowns(&self, place: &Place, as_of: i64) -> bool {
        place.unlisted_at.is_none()
            && self.open.map(|(key, _)| key) != Some(place.list_key)
            && self.left.map(|(key, _, _)| key) != Some(place.list_key)
            && self.last_event().is_some_and(|last| last <= as_of)
    }
}

/// One row of `record_list` for a record: its key in the list and when it was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    list_key: i64,
    listed_at: i64,
    unlisted_at: Option<i64>,
}

impl Place {
    /// Whether the record was at this place at `as_of`.
    fn held_at(&self, as_of: i64) -> bool {
        self.listed_at <= as_of && self.unlisted_at.is_none_or(|until| as_of < until)
    }
}

/// What a record write that takes the record from `was` to the list key `to` does to its list,
/// at `clock` (now): the row's next listing, and the places to write after the row (as SQLite's
/// `move_in_list` does in its transaction). Each write also sends again the place the record
/// holds and the one it left last, so a write whose list writes were lost (a crash or a failed
/// request after its row was written) is made good by the record's next write.
fn move_in_list(was: Listing, to: Option<i64>, clock: i64) -> (Listing, Vec<Place>) {
    // After the record's last event whatever the writer's clock says: a place closes after it
    // opened, and each place write's timestamp (its event's time) is above the one before.
    let now = was
        .last_event()
        .map_or(clock, |last| clock.max(last.saturating_add(1)));
    let mut places = Vec::new();
    if let Some((key, listed_at, left_at)) = was.left {
        // Not when this write reopens it.
        if Some(key) != to {
            places.push(Place {
                list_key: key,
                listed_at,
                unlisted_at: Some(left_at),
            });
        }
    }
    let next = match (was.open, to) {
        (Some((key, _)), Some(to)) if key == to => was,
        (Some((key, since)), to) => {
            places.push(Place {
                list_key: key,
                listed_at: since,
                unlisted_at: Some(now),
            });
            Listing {
                open: to.map(|to| (to, now)),
                left: Some((key, since, now)),
            }
        }
        (None, to) => Listing {
            open: to.map(|to| (to, now)),
            left: was.left.filter(|&(key, _, _)| Some(key) != to),
        },
    };
    if let Some((list_key, listed_at)) = next.open {
        places.push(Place {
            list_key,
            listed_at,
            unlisted_at: None,
        });
    }
    (next, places)
}

fn record_from_row(key: RecordKey, row: RecordColumns) -> (Record, Listing) {
    let (version, body, updated_at, list_key, listed_at, left_key, left_listed_at, left_at) = row;
    let updated_at = updated_at.unwrap_or(0);
    let listing = Listing {
        open: list_key.map(|key| (key, listed_at.unwrap_or(updated_at))),
        left: match (left_key, left_listed_at, left_at) {
            (Some(key), Some(since), Some(until)) => Some((key, since, until)),
            _ => None,
        },
    };
    let record = Record {
        key,
        version: version.map_or(0, to_u64),
        body: body.unwrap_or_default(),
        updated_at: Timestamp(updated_at),
        list_key,
    };
    (record, listing)
}

impl Inner {
    /// One record, read at the configured consistency. On one node that sees every write
    /// acknowledged before it. Across replicas an LWT's commit reaches only the configured
    /// consistency, and a round a coordinator left half done is finished only by the next Paxos
    /// round or SERIAL read: to read every acknowledged write there, run QUORUM (or
    /// LOCAL_QUORUM) for both, or read at SERIAL. A stale read costs no data: the write built
    /// on it names the old version and gets a conflict.
    async fn record(&self, key: &RecordKey) -> Result<Option<Record>> {
        Ok(self.record_row(key, false).await?.map(|(record, _)| record))
    }

    /// A record and its listing, at the configured consistency or at the serial one.
    async fn record_row(&self, key: &RecordKey, serial: bool) -> Result<Option<(Record, Listing)>> {
        let statement = if serial {
            &self.statements.record_serial
        } else {
            &self.statements.record
        };
        let result = self
            .session
            .execute_unpaged(statement, (&key.tenant_id, key.kind.as_str(), &key.id))
            .await
            .map_err(|e| request_error(Access::Read, "reading a record", &e))?;
        let row = first_row::<RecordColumns>(result, "records")?;
        Ok(row.map(|row| record_from_row(key.clone(), row)))
    }

    /// The listing of the version `record` is written over, or the conflict that will refuse
    /// it. Every write rewrites the whole row, so a read that shows that version shows its
    /// listing, however far behind other replicas are; and when the conditional write applies,
    /// nobody wrote in between. A read that shows an older version may be a replica behind: a
    /// serial read settles it.
    async fn listing_before(&self, record: &Record) -> Result<Listing> {
        let over = record.version - 1;
        let mut stored = 0;
        for serial in [false, true] {
            let row = self.record_row(&record.key, serial).await?;
            stored = row.as_ref().map_or(0, |(record, _)| record.version);
            if stored == over {
                return Ok(row.map(|(_, listing)| listing).unwrap_or_default());
            }
            if stored > over {
                break;
            }
        }
        Err(Error::VersionConflict { stored })
    }

    /// The compare-and-set of [`Store::put_record`], one lightweight transaction, then the
    /// record's list writes. Those are plain writes after it: a crash (or a failed request) in
    /// between leaves the list holding the record at its old place, or not yet at its new one,
    /// until the record's next write sends them again. That is acceptable for a list read to
    /// page through (a conversation shows at its previous activity for a while); answering with
    /// an error instead would have the caller apply its change again over a write that applied.
    async fn put_record(&self, record: Record) -> Result<Record> {
        let places = self.write_record(&record).await?;
        let key = &record.key;
        if let Err(error) = self.write_places(key, &places).await {
            tracing::warn!(
                tenant = %key.tenant_id,
                kind = key.kind.as_str(),
                id = %key.id,
                %error,
                "record written, its list places not: they follow with its next write"
            );
        }
        Ok(record)
    }

    /// The conditional write of [`Inner::put_record`]; returns the places to write after it.
    async fn write_record(&self, record: &Record) -> Result<Vec<Place>> {
        let key = &record.key;
        if record.version == 0 {
            // No write creates version 0: a conflict with whatever is stored.
            let stored = self.record(key).await?.map_or(0, |r| r.version);
            return Err(Error::VersionConflict { stored });
        }
        let was = if record.version == 1 {
            Listing::default()
        } else {
            self.listing_before(record).await?
        };
        let (listing, places) = move_in_list(was, record.list_key, Timestamp::now().0);
        let (listed_at, left) = (listing.open.map(|(_, at)| at), listing.left);
        let left_key = left.map(|(key, _, _)| key);
        let left_listed_at = left.map(|(_, since, _)| since);
        let left_at = left.map(|(_, _, until)| until);
        self.metrics.writes_in_flight.inc();
        let result = if record.version == 1 {
            self.session
                .execute_unpaged(
                    &self.statements.insert_record,
                    (
                        &key.tenant_id,
                        key.kind.as_str(),
                        &key.id,
                        to_i64(record.version),
                        &record.body,
                        record.updated_at.0,
                        record.list_key,
                        listed_at,
                        left_key,
                        left_listed_at,
                        left_at,
                    ),
                )
                .await
        } else {
            self.session
                .execute_unpaged(
                    &self.statements.update_record,
                    (
                        to_i64(record.version),
                        &record.body,
                        record.updated_at.0,
                        record.list_key,
                        listed_at,
                        left_key,
                        left_listed_at,
                        left_at,
                        &key.tenant_id,
                        key.kind.as_str(),
                        &key.id,
                        to_i64(record.version - 1),
                    ),
                )
                .await
        };
        self.metrics.writes_in_flight.dec();
        // A timeout here (the driver's, or the coordinator's CAS write timeout) is an unknown
        // outcome: the Paxos round may still be completed by the next one on the partition.
        let result = result.map_err(|e| request_error(Access::Write, "writing a record", &e))?;
        match conditional_outcome(result)? {
            None => Ok(places),
            Some(stored) => Err(Error::VersionConflict { stored }),
        }
    }

    /// A record's places, in one UNLOGGED batch on the list's partition (all or nothing on each
    /// replica). Each carries its event's time as its write timestamp, so sending it again, or
    /// late, changes nothing a later event wrote; a closed place expires after the snapshot
    /// window, and one already past it is not written.
    async fn write_places(&self, key: &RecordKey, places: &[Place]) -> Result<()> {
        let clock = Timestamp::now().0;
        let keep = crate::records::LIST_SNAPSHOT_MILLIS + PLACE_TTL_MARGIN_MILLIS;
        let values: Vec<_> = places
            .iter()
            .filter_map(|place| {
                let ttl_seconds = match place.unlisted_at {
                    None => 0,
                    Some(until) => {
                        let left = until.saturating_add(keep).saturating_sub(clock);
                        if left <= 0 {
                            return None;
                        }
                        i32::try_from((left + 999) / 1000).unwrap_or(i32::MAX)
                    }
                };
                let event = place.unlisted_at.unwrap_or(place.listed_at);
                Some((
                    &key.tenant_id,
                    key.kind.as_str(),
                    place.list_key,
                    &key.id,
                    place.listed_at,
                    place.unlisted_at,
                    event.saturating_mul(1000),
                    ttl_seconds,
                ))
            })
            .collect();
        if values.is_empty() {
            return Ok(());
        }
        self.write_together(&self.statements.set_place, &values, "writing list places")
            .await
    }

    /// A page of a list as it was at `query.as_of`: its places in order from the query's
    /// bound, read in pages of the list's partition, those held at `as_of` kept, each with its
    /// record's current row (read [`LIST_READS_IN_FLIGHT`] at a time). A page passes over at
    /// most `scan_rows` places it does not return (checked between requests): it then answers
    /// with what it found, or, having found nothing, with [`Error::NotApplied`], since an empty
    /// page would read as the end of the list.
    async fn list_records(
        &self,
        tenant_id: &str,
        kind: RecordKind,
        query: &ListQuery,
    ) -> Result<Vec<Listed>> {
        let limit = usize::try_from(query.limit).unwrap_or(usize::MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let statements = &self.statements;
        let scan = ListScan {
            tenant_id,
            kind,
            as_of: query.as_of.unwrap_or_default().0,
            limit,
        };
        let list = (tenant_id, kind.as_str());
        match (&query.after, query.descending) {
            (None, true) => self.scan_list(&scan, &statements.places_down, &list).await,
            (None, false) => self.scan_list(&scan, &statements.places_up, &list).await,
            (Some((key, id)), descending) => {
                let statement = if descending {
                    &statements.places_down_after
                } else {
                    &statements.places_up_after
                };
                let values = (tenant_id, kind.as_str(), *key, id.as_str());
                self.scan_list(&scan, statement, &values).await
            }
        }
    }

    async fn scan_list<V: scylla::serialize::row::SerializeRow + Sync>(
        &self,
        scan: &ListScan<'_>,
        statement: &PreparedStatement,
        values: &V,
    ) -> Result<Vec<Listed>> {
        let budget = usize::try_from(self.config.scan_rows).unwrap_or(usize::MAX);
        let mut found = Vec::new();
        let mut held = VecDeque::new();
        let mut passed = 0;
        let mut paging = Some(PagingState::start());
        loop {
            while found.len() < scan.limit && !held.is_empty() {
                let take = held.len().min(scan.limit - found.len());
                let places: Vec<(String, Place)> = held.drain(..take).collect();
                let (listed, left_out) = self.current_records(scan, places).await?;
                found.extend(listed);
                passed += left_out;
            }
            if found.len() >= scan.limit {
                break;
            }
            let Some(state) = paging.take() else {
                break;
            };
            if passed >= budget {
                if found.is_empty() {
                    return Err(Error::NotApplied(format!(
                        "a list page passed over {passed} places without one held at its \
                         time (the scan budget)"
                    )));
                }
                break;
            }
            let mut page = statement.clone();
            let wanted = (scan.limit - found.len()).saturating_add(LIST_SLACK_ROWS);
            page.set_page_size(i32::try_from(wanted.min(ROWS_PER_REQUEST)).unwrap_or(1));
            let (result, next) = self
                .session
                .execute_single_page(&page, values, state)
                .await
                .map_err(|e| request_error(Access::Read, "reading a list", &e))?;
            if let PagingStateResponse::HasMorePages { state } = next {
                paging = Some(state);
            }
            let rows = result
                .into_rows_result()
                .map_err(|e| bad_row("record_list", e))?;
            for row in rows
                .rows::<(i64, String, Option<i64>, Option<i64>)>()
                .map_err(|e| bad_row("record_list", e))?
            {
                let (list_key, id, listed_at, unlisted_at) =
                    row.map_err(|e| bad_row("record_list", e))?;
                let place = Place {
                    list_key,
                    listed_at: listed_at.unwrap_or(i64::MAX),
                    unlisted_at,
                };
                if place.held_at(scan.as_of) {
                    held.push_back((id, place));
                } else {
                    passed += 1;
                }
            }
        }
        Ok(found)
    }

    /// The held places' records as they are now, in order, and how many places were left out:
    /// one whose record is not there, or one [`Listing::disowns`].
    async fn current_records(
        &self,
        scan: &ListScan<'_>,
        places: Vec<(String, Place)>,
    ) -> Result<(Vec<Listed>, usize)> {
        // Made first: a closure inside the stream keeps the compiler from proving the whole
        // operation's future `Send`.
        let reads: Vec<_> = places
            .iter()
            .map(|(id, _)| {
                let key = RecordKey::new(scan.tenant_id, scan.kind, id);
                async move { self.record_row(&key, false).await }
            })
            .collect();
        let rows: Vec<_> = futures_util::stream::iter(reads)
            .buffered(LIST_READS_IN_FLIGHT)
            .collect()
            .await;
        let mut listed = Vec::with_capacity(places.len());
        let mut left_out = 0;
        for ((_, place), row) in places.into_iter().zip(rows) {
            match row? {
                Some((record, listing)) if !listing.disowns(&place, scan.as_of) => {
                    listed.push(Listed {
                        list_key: place.list_key,
                        record,
                    });
                }
                _ => left_out += 1,
            }
        }
        Ok((listed, left_out))
    }
}

/// What one list page reads.
struct ListScan<'a> {
    tenant_id: &'a str,
    kind: RecordKind,
    as_of: i64,
    limit: usize,
}

/// What a conditional write's answer says: `None` when it was applied, else the version stored
/// now (0: no record). Columns are found by name: a refused INSERT answers with the stored row,
/// a refused UPDATE with the condition's column, null (or left out) when there is no row.
fn conditional_outcome(result: QueryResult) -> Result<Option<u64>> {
    let rows = result
        .into_rows_result()
        .map_err(|e| bad_row("records", e))?;
    let specs = rows.column_specs();
    let applied_at = specs
        .get_by_name("[applied]")
        .map(|(index, _)| index)
        .ok_or_else(|| bad_row("records", "a conditional write's answer has no [applied]"))?;
    let version_at = specs.get_by_name("version").map(|(index, _)| index);
    let row = rows
        .maybe_first_row::<Row>()
        .map_err(|e| bad_row("records", e))?
        .ok_or_else(|| bad_row("records", "a conditional write's answer has no row"))?;
    let column = |index: usize| row.columns.get(index).and_then(Option::as_ref);
    match column(applied_at).and_then(CqlValue::as_boolean) {
        Some(true) => Ok(None),
        Some(false) => Ok(Some(
            version_at
                .and_then(column)
                .and_then(CqlValue::as_bigint)
                .map_or(0, to_u64),
        )),
        None => Err(bad_row("records", "[applied] is not a boolean")),
    }
}

// ---------------------------------------------------------------------------------------------
// The trait

impl Store for CqlStore {
    fn append(
        &self,
        message: NewMessage,
    ) -> impl Future<Output = Result<Appended>> + Send + 'static {
        let room = message.room_key();
        self.enqueue(room, |reply| RoomOp::Append(message, reply))
    }

    async fn create_room(&self, room: NewRoom) -> Result<(Room, bool)> {
        let key = room.key();
        self.enqueue(key, |reply| RoomOp::CreateRoom(room, reply))
            .await
    }

    async fn room(&self, room: &RoomKey) -> Result<Option<Room>> {
        let room = room.clone();
        self.run(|inner| async move { inner.load_room(&room).await })
            .await
    }

    async fn add_participant(&self, room: &RoomKey, user_id: &str) -> Result<Room> {
        let user = user_id.to_owned();
        self.enqueue(room.clone(), |reply| RoomOp::AddParticipant(user, reply))
            .await
    }

    async fn history(&self, room: &RoomKey, query: HistoryQuery) -> Result<HistoryPage> {
        // A search without words is the plain read: one scan for both.
        self.search(room, query.search("")).await
    }

    async fn search(&self, room: &RoomKey, query: SearchQuery) -> Result<HistoryPage> {
        let room = room.clone();
        let page = Page {
            before_seq: query.before_seq,
            after_seq: query.after_seq,
            limit: query.limit,
            include_notes: query.include_notes,
            max_bytes: query.max_bytes,
            words: words(&query.words),
        };
        self.run(|inner| async move { inner.read_page(&room, page).await })
            .await
    }

    async fn message_by_id(&self, room: &RoomKey, message_id: &str) -> Result<Option<Message>> {
        let room = room.clone();
        let message_id = message_id.to_owned();
        self.run(|inner| async move { inner.message_by_id(&room, &message_id).await })
            .await
    }

    async fn mark_read(&self, room: &RoomKey, user_id: &str, seq: u64) -> Result<ReadState> {
        let user = user_id.to_owned();
        self.enqueue(room.clone(), |reply| RoomOp::MarkRead(user, seq, reply))
            .await
    }

    async fn read_state(&self, room: &RoomKey, user_id: &str) -> Result<ReadState> {
        let user = user_id.to_owned();
        self.enqueue(room.clone(), |reply| RoomOp::ReadState(user, reply))
            .await
    }

    async fn record(&self, key: &RecordKey) -> Result<Option<Record>> {
        let key = key.clone();
        self.run(|inner| async move { inner.record(&key).await })
            .await
    }

    async fn put_record(&self, record: Record) -> Result<Record> {
        if record.body.len() > MAX_RECORD_BYTES {
            return Err(Error::Invalid(format!(
                "record body of {} bytes is over the limit of {MAX_RECORD_BYTES}",
                record.body.len()
            )));
        }
        self.run(|inner| async move { inner.put_record(record).await })
            .await
    }

    async fn list_records(
        &self,
        tenant_id: &str,
        kind: RecordKind,
        query: ListQuery,
    ) -> Result<ListPage> {
        // Writers to a CQL store share no clock that orders their commits: a read without a
        // time takes one a moment in the past, so that writes still under way at the read are
        // not on the walk (one that takes longer than this may be missed by it; it still
        // reaches an inbox subscriber live).
        let as_of = query
            .as_of
            .unwrap_or_else(|| Timestamp(Timestamp::now().0 - LIST_READ_LAG_MILLIS));
        let query = ListQuery {
            as_of: Some(as_of),
            ..query
        };
        let tenant_id = tenant_id.to_owned();
        let entries = self
            .run(|inner| async move { inner.list_records(&tenant_id, kind, &query).await })
            .await?;
        Ok(ListPage { as_of, entries })
    }

    async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        let all = u32::try_from(self.inner.config.max_pending).unwrap_or(u32::MAX);
        // Every admitted operation holds a permit until it is answered: having them all means
        // everything accepted is done. A second close finds the semaphore closed.
        if let Ok(permits) = Arc::clone(&self.inner.admission)
            .acquire_many_owned(all)
            .await
        {
            permits.forget();
            self.inner.admission.close();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU32;

    use super::*;

    /// The node under test, from `CQL_URL` (say
    /// `scylla://127.0.0.1:9042/gateway_test?consistency=one`; the keyspace names a prefix).
    /// Without it the CQL tests fail in CI and are skipped, saying so, elsewhere.
    fn node_url() -> Option<String> {
        match std::env::var("CQL_URL") {
            Ok(url) if !url.trim().is_empty() => Some(url),
            _ if std::env::var("CI").as_deref() == Ok("true") => panic!(
                "CQL_URL is not set: CI runs the CQL tests against a real node \
                 (scripts/cassandra start <dir> <port>, then \
                 CQL_URL=scylla://127.0.0.1:<port>/gateway_test?consistency=one)"
            ),
            _ => {
                eprintln!(
                    "SKIPPED: CQL_URL is not set, so the CQL backend tests did not run. Start a \
                     node (scripts/cassandra install && scripts/cassandra start /tmp/cql 9042) and \
                     set CQL_URL='scylla://127.0.0.1:9042/gateway_test?consistency=one'"
                );
                None
            }
        }
    }

    /// `url` with a keyspace of its own: the URL's keyspace, the process id and a counter.
    fn unique_keyspace_url(url: &str) -> (String, String) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let (head, query) = url.split_once('?').unwrap_or((url, ""));
        let rest = head
            .strip_prefix("scylla://")
            .expect("CQL_URL starts with scylla://");
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, "gateway_test"));
        let prefix: String = prefix.chars().take(24).collect();
        let keyspace = format!(
            "{prefix}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let url = format!("scylla://{hosts}/{keyspace}?{query}");
        (url, keyspace)
    }

    /// Drops its keyspace when the test ends.
    struct KeyspaceGuard {
        store: CqlStore,
        keyspace: String,
    }

    impl Drop for KeyspaceGuard {
        fn drop(&mut self) {
            let inner = Arc::clone(&self.store.inner);
            let drop_keyspace = format!("DROP KEYSPACE IF EXISTS {}", self.keyspace);
            let (done, dropped) = std::sync::mpsc::channel();
            self.store.inner.runtime.handle.spawn(async move {
                let result = inner.session.query_unpaged(drop_keyspace, ()).await;
                let _ = done.send(result.map(|_| ()));
            });
            match dropped.recv_timeout(Duration::from_secs(60)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("could not drop keyspace {}: {e}", self.keyspace),
                Err(_) => eprintln!("dropping keyspace {} timed out", self.keyspace),
            }
        }
    }

    /// A migrated keyspace of its own and a store on it, with `options`.
    async fn fresh_store_with(options: &Options) -> Option<(CqlStore, KeyspaceGuard, String)> {
        let url = node_url()?;
        let (url, keyspace) = unique_keyspace_url(&url);
        assert_eq!(
            migrate(&url, &Options::default()).await.expect("migrate"),
            SCHEMA_VERSION
        );
        let store = CqlStore::connect(&url, options).await.expect("connect");
        let guard = KeyspaceGuard {
            store: store.clone(),
            keyspace,
        };
        Some((store, guard, url))
    }

    async fn fresh_cql_store() -> Option<(CqlStore, KeyspaceGuard)> {
        fresh_store_with(&Options::default())
            .await
            .map(|(store, guard, _)| (store, guard))
    }

    /// The whole backend suite, each case on a keyspace of its own (skipped without a node).
    mod conformance {
        use super::*;

        crate::conformance_tests!(optional fresh_cql_store);
    }

    fn key(room_id: &str) -> RoomKey {
        RoomKey::new("tenant", room_id)
    }

    async fn room_with_messages(store: &CqlStore, room_id: &str, count: u64) {
        store
            .create_room(NewRoom::team(room_id, "tenant", "alice"))
            .await
            .unwrap();
        let room = key(room_id);
        // Pipelined as an owner does, in windows well below `max_pending`.
        for window in (1..=count).collect::<Vec<_>>().chunks(1000) {
            let pending: Vec<_> = window
                .iter()
                .map(|&seq| store.append(NewMessage::text(&room, seq, "alice", &format!("m{seq}"))))
                .collect();
            for (&seq, appended) in window.iter().zip(pending) {
                assert_eq!(appended.await.unwrap().message.seq, seq);
            }
        }
    }

    /// Writes a claim row by hand, as a crash between the claim and the message leaves it.
    async fn write_claim(store: &CqlStore, room: &RoomKey, message_id: &str, seq: u64) {
        let inner = Arc::clone(&store.inner);
        let (room, message_id) = (room.clone(), message_id.to_owned());
        store
            .inner
            .runtime
            .run(async move {
                inner
                    .write(
                        &inner.statements.insert_claim,
                        (&room.tenant_id, &room.room_id, &message_id, to_i64(seq)),
                        "a stale claim",
                    )
                    .await
            })
            .await
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stale_claim_from_a_crash_is_overwritten() {
        let Some((store, _guard)) = fresh_cql_store().await else {
            return;
        };
        room_with_messages(&store, "r", 2).await;
        let room = key("r");
        // Claims whose message never landed: one past the end, one at a seq that another
        // message holds.
        write_claim(&store, &room, "lost-past-the-end", 5).await;
        write_claim(&store, &room, "lost-at-a-taken-seq", 1).await;
        assert!(store
            .message_by_id(&room, "lost-past-the-end")
            .await
            .unwrap()
            .is_none());
        assert!(store
            .message_by_id(&room, "lost-at-a-taken-seq")
            .await
            .unwrap()
            .is_none());

        for (seq, id) in [(3, "lost-past-the-end"), (4, "lost-at-a-taken-seq")] {
            let mut message = NewMessage::text(&room, seq, "bob", id);
            message.message_id = id.to_owned();
            let appended = store.append(message.clone()).await.unwrap();
            assert!(!appended.duplicate, "{id}");
            assert_eq!(appended.message.seq, seq);
            // The claim now points at the stored message: a retry is a duplicate.
            let found = store.message_by_id(&room, id).await.unwrap().unwrap();
            assert_eq!(found, appended.message);
            message.seq = seq + 1;
            let retried = store.append(message).await.unwrap();
            assert!(retried.duplicate);
            assert_eq!(retried.message, appended.message);
        }
        let page = store.history(&room, HistoryQuery::default()).await.unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(page.messages[0].message, "m1");
    }

    /// A room longer than one bucket: pages cross bucket boundaries, a new store recovers
    /// `last_seq` from the bucket hint, and filtered reads stop at their row budget.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rooms_span_buckets_and_filtered_reads_are_bounded() {
        let options = Options {
            scan_rows: 500,
            ..Options::default()
        };
        let Some((store, _guard, url)) = fresh_store_with(&options).await else {
            return;
        };
        let count = BUCKET_SIZE * 2 + 100;
        room_with_messages(&store, "big", count).await;
        let room = key("big");

        let page = |after_seq, before_seq, limit| HistoryQuery {
            after_seq,
            before_seq,
            limit,
            include_notes: true,
            ..HistoryQuery::default()
        };
        let seqs = |page: &HistoryPage| page.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
        let across = store
            .history(&room, page(None, Some(BUCKET_SIZE + 5), 10))
            .await
            .unwrap();
        assert_eq!(
            seqs(&across),
            (BUCKET_SIZE - 5..BUCKET_SIZE + 5).collect::<Vec<_>>()
        );
        assert!(across.has_more);
        let forwards = store
            .history(&room, page(Some(2 * BUCKET_SIZE - 3), None, 6))
            .await
            .unwrap();
        assert_eq!(
            seqs(&forwards),
            (2 * BUCKET_SIZE - 2..2 * BUCKET_SIZE + 4).collect::<Vec<_>>()
        );
        let newest = store.history(&room, page(None, None, 3)).await.unwrap();
        assert_eq!(seqs(&newest), [count - 2, count - 1, count]);

        // A store that never saw the room recovers its counter from the tables.
        let other = CqlStore::connect(&url, &options).await.unwrap();
        assert_eq!(other.room(&room).await.unwrap().unwrap().last_seq, count);
        let next = NewMessage::text(&room, count + 1, "bob", "after a restart");
        assert_eq!(other.append(next).await.unwrap().message.seq, count + 1);
        let stale = NewMessage::text(&room, count + 1, "mallory", "stale counter");
        let error = other.append(stale).await.unwrap_err();
        assert!(
            matches!(error, Error::SeqConflict { last_seq } if last_seq == count + 1),
            "{error:?}"
        );

        // A search that matches nothing examines its budget and hands back a cursor, across
        // buckets, until the room is covered.
        let mut before = None;
        let mut requests = 0;
        loop {
            let query = SearchQuery {
                words: "nowhere".to_owned(),
                before_seq: before,
                limit: 10,
                include_notes: true,
                ..SearchQuery::default()
            };
            let found = other.search(&room, query).await.unwrap();
            assert!(found.messages.is_empty());
            assert!(found.examined <= 500, "{}", found.examined);
            requests += 1;
            if !found.has_more {
                break;
            }
            before = found.next_before_seq;
            assert!(before.is_some());
        }
        assert_eq!(requests, (count + 1).div_ceil(500));
        other.close().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unmigrated_keyspace_is_refused_with_the_command_to_run() {
        let Some(url) = node_url() else {
            return;
        };
        let (url, _) = unique_keyspace_url(&url);
        let error = CqlStore::connect(&url, &Options::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::Schema(text) if text.contains("gateway migrate")),
            "{error}"
        );
        let Some((store, _guard, url)) = fresh_store_with(&Options::default()).await else {
            return;
        };
        // Migrating again changes nothing.
        assert_eq!(
            migrate(&url, &Options::default()).await.unwrap(),
            SCHEMA_VERSION
        );
        drop(store);
    }

    /// A keyspace at schema version 1 (before records): the store refuses it, naming the
    /// command; `migrate` takes it to the current version, after which records work.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_version_1_keyspace_is_refused_until_migrated() {
        let Some(url) = node_url() else {
            return;
        };
        let (url, keyspace) = unique_keyspace_url(&url);
        assert_eq!(migrate_to(&url, &Options::default(), 1).await.unwrap(), 1);
        let error = CqlStore::connect(&url, &Options::default())
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::Schema(text)
                if text.contains("schema version 1") && text.contains("gateway migrate")),
            "{error}"
        );
        assert_eq!(
            migrate(&url, &Options::default()).await.unwrap(),
            SCHEMA_VERSION
        );
        let store = CqlStore::connect(&url, &Options::default()).await.unwrap();
        let _guard = KeyspaceGuard {
            store: store.clone(),
            keyspace,
        };
        let statements = &store.inner.statements;
        for conditional in [&statements.insert_record, &statements.update_record] {
            assert!(!conditional.get_is_idempotent());
            assert_eq!(
                conditional.get_serial_consistency(),
                Some(serial_consistency(store.config().consistency))
            );
        }
        let key = RecordKey::new("tenant", crate::records::RecordKind::Inbox, "i-1");
        let record = Record {
            key: key.clone(),
            version: 1,
            body: "{}".to_owned(),
            updated_at: Timestamp(7),
            list_key: None,
        };
        assert_eq!(store.put_record(record.clone()).await.unwrap(), record);
        assert_eq!(store.record(&key).await.unwrap(), Some(record));
    }

    /// Writes a conversation at list place `list_key` without its list writes, as a crash
    /// between the record's row and its places leaves it.
    async fn write_row_only(store: &CqlStore, id: &str, version: u64, list_key: Option<i64>) {
        let record = Record {
            key: RecordKey::new("tenant", RecordKind::Conversation, id),
            version,
            body: "{}".to_owned(),
            updated_at: Timestamp::now(),
            list_key,
        };
        let inner = Arc::clone(&store.inner);
        store
            .inner
            .runtime
            .run(async move { inner.write_record(&record).await })
            .await
            .unwrap();
    }

    async fn put_place(store: &CqlStore, id: &str, version: u64, list_key: Option<i64>) {
        let record = Record {
            key: RecordKey::new("tenant", RecordKind::Conversation, id),
            version,
            body: "{}".to_owned(),
            updated_at: Timestamp::now(),
            list_key,
        };
        store.put_record(record).await.unwrap();
    }

    async fn listed(store: &CqlStore, as_of: Timestamp) -> Result<Vec<(i64, String)>> {
        let query = ListQuery {
            as_of: Some(as_of),
            descending: true,
            after: None,
            limit: 10,
        };
        let page = store
            .list_records("tenant", RecordKind::Conversation, query)
            .await?;
        Ok(page
            .entries
            .into_iter()
            .map(|l| (l.list_key, l.record.key.id))
            .collect())
    }

    /// `(list_key, TTL of listed_at)` of every place of the tenant's conversations.
    async fn places_with_ttl(store: &CqlStore) -> Vec<(i64, Option<i32>)> {
        let inner = Arc::clone(&store.inner);
        store
            .inner
            .runtime
            .run(async move {
                let result = inner
                    .session
                    .query_unpaged(
                        "SELECT list_key, TTL(listed_at) FROM record_list \
                         WHERE tenant_id = 'tenant' AND kind = 'conversation'",
                        (),
                    )
                    .await
                    .unwrap();
                let rows = result.into_rows_result().unwrap();
                Ok(rows
                    .rows::<(i64, Option<i32>)>()
                    .unwrap()
                    .map(Result::unwrap)
                    .collect())
            })
            .await
            .unwrap()
    }

    async fn tick() -> Timestamp {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = Timestamp::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        now
    }

    /// A record write whose list writes were lost leaves the record at its old place until its
    /// next write, which puts the list right as of the lost write's time; a place two lost
    /// writes in a row left open is not listed after the record's last move.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lost_list_writes_are_made_good_by_the_next_write() {
        let Some((store, _guard)) = fresh_cql_store().await else {
            return;
        };
        put_place(&store, "a", 1, Some(10)).await;
        tick().await;
        write_row_only(&store, "a", 2, Some(20)).await;
        let after_lost = tick().await;
        let now = listed(&store, after_lost).await.unwrap();
        assert_eq!(now, [(10, "a".to_owned())], "at its old place meanwhile");
        put_place(&store, "a", 3, Some(20)).await;
        let repaired = listed(&store, after_lost).await.unwrap();
        assert_eq!(
            repaired,
            [(20, "a".to_owned())],
            "moved as of the lost write"
        );
        // The closed place expires after the snapshot window (and a margin); the open one not.
        let ttl = places_with_ttl(&store).await;
        assert_eq!(ttl.len(), 2, "{ttl:?}");
        assert_eq!(ttl[0], (20, None));
        assert_eq!(ttl[1].0, 10);
        assert!(
            ttl[1].1.is_some_and(|t| (300..=360).contains(&t)),
            "{ttl:?}"
        );

        write_row_only(&store, "a", 4, Some(30)).await;
        tick().await;
        write_row_only(&store, "a", 5, Some(40)).await;
        let after_two_lost = tick().await;
        // 20 is still open in the table, but the record left it before this time.
        assert_eq!(listed(&store, after_two_lost).await.unwrap(), []);
        put_place(&store, "a", 6, Some(40)).await;
        assert_eq!(
            listed(&store, Timestamp::now()).await.unwrap(),
            [(40, "a".to_owned())]
        );
        // Unlisting closes the place.
        put_place(&store, "a", 7, None).await;
        assert_eq!(listed(&store, Timestamp::now()).await.unwrap(), []);
    }

    /// A list page passes over at most `scan_rows` places it does not return.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_list_page_passes_over_a_bounded_number_of_places() {
        let options = Options {
            scan_rows: 20,
            ..Options::default()
        };
        let Some((store, _guard, url)) = fresh_store_with(&options).await else {
            return;
        };
        put_place(&store, "a", 1, Some(1)).await;
        // "b" moves 40 times: 40 closed places between it and "a".
        for (version, key) in (1..=41).zip(100..) {
            put_place(&store, "b", version, Some(key)).await;
        }
        let query = ListQuery {
            as_of: Some(Timestamp::now()),
            descending: true,
            after: Some((140, "b".to_owned())),
            limit: 1,
        };
        let error = store
            .list_records("tenant", RecordKind::Conversation, query.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::NotApplied(text) if text.contains("passed over")),
            "{error:?}"
        );
        // A page that finds something answers with it, having passed over the budget.
        let from_top = ListQuery {
            after: None,
            limit: 2,
            ..query.clone()
        };
        let found = store
            .list_records("tenant", RecordKind::Conversation, from_top)
            .await
            .unwrap()
            .entries;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].list_key, found[0].record.key.id.as_str()),
            (140, "b")
        );
        // With a larger budget the page reaches "a".
        let roomy = CqlStore::connect(&url, &Options::default()).await.unwrap();
        let found = roomy
            .list_records("tenant", RecordKind::Conversation, query)
            .await
            .unwrap()
            .entries;
        assert_eq!(
            (found[0].list_key, found[0].record.key.id.as_str()),
            (1, "a")
        );
    }

    #[test]
    fn a_move_closes_the_old_place_and_opens_the_new_one() {
        let none = Listing::default();
        let place = |list_key, listed_at, unlisted_at| Place {
            list_key,
            listed_at,
            unlisted_at,
        };
        // Listed for the first time.
        let (first, places) = move_in_list(none, Some(10), 1000);
        assert_eq!(
            first,
            Listing {
                open: Some((10, 1000)),
                left: None
            }
        );
        assert_eq!(places, [place(10, 1000, None)]);
        // Moved, by a writer whose clock is behind: still after the last event.
        let (moved, places) = move_in_list(first, Some(20), 900);
        assert_eq!(
            moved,
            Listing {
                open: Some((20, 1001)),
                left: Some((10, 1000, 1001))
            }
        );
        assert_eq!(places, [place(10, 1000, Some(1001)), place(20, 1001, None)]);
        // Staying: the same row, its places sent again.
        let (stayed, places) = move_in_list(moved, Some(20), 2000);
        assert_eq!(stayed, moved);
        assert_eq!(places, [place(10, 1000, Some(1001)), place(20, 1001, None)]);
        // Back to the place it left: reopened, not closed again.
        let (back, places) = move_in_list(moved, Some(10), 3000);
        assert_eq!(
            back,
            Listing {
                open: Some((10, 3000)),
                left: Some((20, 1001, 3000))
            }
        );
        assert_eq!(places, [place(20, 1001, Some(3000)), place(10, 3000, None)]);
        // Unlisted, then listed again at the place it left.
        let (out, places) = move_in_list(back, None, 4000);
        assert_eq!(
            out,
            Listing {
                open: None,
                left: Some((10, 3000, 4000))
            }
        );
        assert_eq!(
            places,
            [place(20, 1001, Some(3000)), place(10, 3000, Some(4000))]
        );
        let (again, places) = move_in_list(out, Some(10), 5000);
        assert_eq!(
            again,
            Listing {
                open: Some((10, 5000)),
                left: None
            }
        );
        assert_eq!(places, [place(10, 5000, None)]);
        // A record never listed has no places to write.
        assert_eq!(move_in_list(none, None, 1000), (none, Vec::new()));
    }

    /// A full store refuses at once instead of queueing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_store_refuses_with_not_applied() {
        let Some((_, _guard, url)) = fresh_store_with(&Options::default()).await else {
            return;
        };
        let store = CqlStore::connect(&format!("{url}&max_pending=4"), &Options::default())
            .await
            .unwrap();
        room_with_messages(&store, "r", 1).await;
        let room = key("r");
        let pending: Vec<_> = (2..=20)
            .map(|seq| store.append(NewMessage::text(&room, seq, "alice", "burst")))
            .collect();
        let mut refused = 0;
        for result in pending {
            match result.await {
                Ok(_) => {}
                Err(Error::NotApplied(text)) if text.contains("overloaded") => refused += 1,
                Err(Error::SeqConflict { .. }) => {}
                Err(other) => panic!("{other:?}"),
            }
        }
        // Four are admitted at once; most of the rest find no place (some find one freed).
        assert!(refused >= 8, "{refused}");
        assert_eq!(store.collectors().len(), 5);
    }

    /// No node at the address: nothing was sent, so the error says not applied.
    #[tokio::test]
    async fn an_unreachable_node_is_not_applied() {
        let error = CqlStore::connect(
            "scylla://127.0.0.1:1/gateway?consistency=one&timeout_ms=2000",
            &Options::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(error, Error::NotApplied(_)), "{error:?}");
    }

    #[test]
    fn urls_are_parsed_and_checked() {
        let config = CqlConfig::from_url(
            "scylla://h1:9142,h2/chat?dc=dc1&consistency=one&user=u&password=secret",
            &Options::default(),
        )
        .unwrap();
        assert_eq!(config.nodes, ["h1:9142", "h2:9042"]);
        assert_eq!(config.keyspace, "chat");
        assert_eq!(config.datacenter.as_deref(), Some("dc1"));
        assert_eq!(config.consistency, Consistency::One);
        assert!(!format!("{config:?}").contains("secret"));
        let default = CqlConfig::from_url("scylla://h/chat", &Options::default()).unwrap();
        assert_eq!(default.consistency, Consistency::LocalQuorum);
        assert_eq!(
            default.replication_map().unwrap(),
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        );
        let spread = CqlConfig::from_url(
            "scylla://h/chat?replication=dc1:3,dc2:2",
            &Options::default(),
        )
        .unwrap();
        assert_eq!(
            spread.replication_map().unwrap(),
            "{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"
        );
        for bad in [
            "scylla://h",
            "scylla:///chat",
            "scylla://h/chat;drop",
            "scylla://h/chat?consistency=most",
            "scylla://h/chat?colour=blue",
            "scylla://h/chat?password=p",
        ] {
            let error = CqlConfig::from_url(bad, &Options::default()).unwrap_err();
            assert!(matches!(error, Error::BadUrl(_)), "{bad}: {error:?}");
        }
        assert_eq!(
            redact("scylla://h/chat?user=u&password=secret"),
            "scylla://h/chat?user=u&password=***"
        );
        // Credentials from flags or the environment, when the URL names none.
        let from_flags = Options {
            user: Some("gw".into()),
            password: Some("pw".into()),
            ..Options::default()
        };
        let config = CqlConfig::from_url("scylla://h/chat", &from_flags).unwrap();
        assert_eq!(config.credentials, Some(("gw".into(), "pw".into())));
        let config = CqlConfig::from_url("scylla://h/chat?user=u&password=p", &from_flags).unwrap();
        assert_eq!(config.credentials, Some(("u".into(), "p".into())));
    }

    /// The node under test and its directory (`CQL_NODE_DIR`, as `scripts/cassandra start`
    /// made it: its CA is `tls/ca.pem`, a client certificate `tls/client.pem`), or a skip.
    fn tls_node() -> Option<(String, PathBuf)> {
        let url = node_url()?;
        match std::env::var_os("CQL_NODE_DIR") {
            Some(dir) if !dir.is_empty() => Some((url, PathBuf::from(dir))),
            _ if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("CQL_NODE_DIR is not set: CI runs the CQL TLS tests (scripts/test sets it)")
            }
            _ => {
                eprintln!(
                    "SKIPPED: CQL_NODE_DIR is not set, so the CQL TLS tests did not run. Set it \
                     to the directory of the node CQL_URL names (scripts/cassandra start <dir>)"
                );
                None
            }
        }
    }

    /// `url` with `tls=true` added.
    fn with_tls(url: &str) -> String {
        let separator = if url.contains('?') { "&" } else { "?" };
        format!("{url}{separator}tls=true")
    }

    /// Over TLS, trusting the node's CA and showing a client certificate: the schema migrates,
    /// a message is stored and read back, and the node counts the session's connections as TLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_with_the_node_ca_migrates_stores_and_reads() {
        let Some((url, node)) = tls_node() else {
            return;
        };
        let (url, keyspace) = unique_keyspace_url(&url);
        let url = with_tls(&url);
        let options = Options {
            tls_ca: Some(node.join("tls/ca.pem")),
            tls_cert: Some(node.join("tls/client.pem")),
            tls_key: Some(node.join("tls/client.key")),
            ..Options::default()
        };
        assert_eq!(
            migrate(&url, &options).await.expect("migrate over TLS"),
            SCHEMA_VERSION
        );
        let store = CqlStore::connect(&url, &options)
            .await
            .expect("connect over TLS");
        let _guard = KeyspaceGuard {
            store: store.clone(),
            keyspace,
        };
        assert!(store.config().tls.is_some());
        room_with_messages(&store, "tls", 3).await;
        let page = store
            .history(&key("tls"), HistoryQuery::default())
            .await
            .unwrap();
        let seqs: Vec<u64> = page.messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(page.messages[0].message, "m1");

        // The node's own view: some client connection (this session's) is encrypted.
        let inner = Arc::clone(&store.inner);
        let encrypted = store
            .inner
            .runtime
            .handle
            .spawn(async move {
                let result = inner
                    .session
                    .query_unpaged("SELECT ssl_enabled FROM system_views.clients", ())
                    .await
                    .expect("system_views.clients");
                let rows = result.into_rows_result().expect("rows");
                let flags: Vec<Option<bool>> = rows
                    .rows::<(Option<bool>,)>()
                    .expect("ssl_enabled")
                    .map(|row| row.expect("row").0)
                    .collect();
                flags
            })
            .await
            .unwrap();
        assert!(encrypted.contains(&Some(true)), "{encrypted:?}");
    }

    /// A CA that did not sign the node's certificate: the connection is refused before any
    /// request, so the error is not applied, and it says why.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_with_another_ca_is_refused_as_not_applied() {
        let Some((url, _)) = tls_node() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("other-ca.pem");
        let made = std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=not the node's CA", "-keyout"])
            .arg(dir.path().join("other-ca.key"))
            .arg("-out")
            .arg(&ca)
            .output()
            .expect("openssl");
        assert!(made.status.success(), "{made:?}");
        let (url, _) = unique_keyspace_url(&url);
        let options = Options {
            tls_ca: Some(ca),
            ..Options::default()
        };
        let error = migrate(&with_tls(&format!("{url}&timeout_ms=5000")), &options)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, Error::NotApplied(text)
                if text.contains("TLS") && text.contains("certificate")),
            "{error:?}"
        );
    }

    /// A throwaway CA (not the node's) and a client certificate it signed, in `dir`:
    /// `(ca.pem, client.pem, client.key)`.
    fn foreign_client_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let openssl = |command: &str| {
            let made = std::process::Command::new("openssl")
                .args(command.split_whitespace())
                .current_dir(dir)
                .output()
                .expect("openssl");
            assert!(made.status.success(), "{made:?}");
        };
        openssl(
            "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=other-ca \
             -keyout other-ca.key -out other-ca.pem",
        );
        openssl(
            "req -newkey rsa:2048 -nodes -subj /CN=stranger -keyout client.key -out client.csr",
        );
        // Extensions make it an X.509 v3 certificate, as TLS clients require.
        std::fs::write(
            dir.join("client.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        openssl(
            "x509 -req -days 1 -in client.csr -CA other-ca.pem -CAkey other-ca.key \
             -CAcreateserial -extfile client.ext -out client.pem",
        );
        (
            dir.join("other-ca.pem"),
            dir.join("client.pem"),
            dir.join("client.key"),
        )
    }

    /// Mutual TLS: the node (`scripts/cassandra`) requires a client certificate signed by its
    /// CA over TLS. Trusting the node but showing no certificate, or one from another CA, is
    /// refused before any request (not applied); the node's own certificate shown by
    /// [`tls_with_the_node_ca_migrates_stores_and_reads`] is accepted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_without_a_client_certificate_the_node_trusts_is_refused_as_not_applied() {
        let Some((url, node)) = tls_node() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (_, stranger_cert, stranger_key) = foreign_client_certificate(dir.path());
        let (url, _) = unique_keyspace_url(&url);
        let url = with_tls(&format!("{url}&timeout_ms=5000"));
        let attempts = [
            (
                "no client certificate",
                "CertificateRequired",
                Options {
                    tls_ca: Some(node.join("tls/ca.pem")),
                    ..Options::default()
                },
            ),
            (
                "a client certificate of another CA",
                "over TLS",
                Options {
                    tls_ca: Some(node.join("tls/ca.pem")),
                    tls_cert: Some(stranger_cert),
                    tls_key: Some(stranger_key),
                    ..Options::default()
                },
            ),
        ];
        for (what, says, options) in attempts {
            let error = migrate(&url, &options).await.unwrap_err();
            assert!(
                matches!(&error, Error::NotApplied(text) if text.contains(says)),
                "{what}: {error:?}"
            );
        }
    }

    #[test]
    fn tls_settings_are_parsed_and_their_files_checked() {
        let dir = tempfile::tempdir().unwrap();
        // tls=true alone trusts the public roots.
        let config = CqlConfig::from_url("scylla://h/chat?tls=true", &Options::default()).unwrap();
        assert!(config.tls.is_some());
        assert!(format!("{config:?}").contains("tls: true"));
        let plain = CqlConfig::from_url("scylla://h/chat?tls=false", &Options::default()).unwrap();
        assert!(plain.tls.is_none());
        let missing = dir.path().join("missing-ca.pem");
        let with = |tls_ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>| Options {
            tls_ca: tls_ca.map(Path::to_path_buf),
            tls_cert: cert.map(Path::to_path_buf),
            tls_key: key.map(Path::to_path_buf),
            ..Options::default()
        };
        // A CA file turns TLS on, and must be there.
        let error =
            CqlConfig::from_url("scylla://h/chat", &with(Some(&missing), None, None)).unwrap_err();
        assert!(
            matches!(&error, Error::BadUrl(text)
                if text.contains("missing-ca.pem") && text.contains("--store-tls-ca")),
            "{error:?}"
        );
        let not_pem = dir.path().join("not-pem.txt");
        std::fs::write(&not_pem, "no certificate here\n").unwrap();
        let error = CqlConfig::from_url(
            "scylla://h/chat?tls=true",
            &with(Some(&not_pem), None, None),
        )
        .unwrap_err();
        assert!(
            matches!(&error, Error::BadUrl(text) if text.contains("not-pem.txt")),
            "{error:?}"
        );
        for (url, options, says) in [
            ("scylla://h/chat?tls=maybe", Options::default(), "tls"),
            (
                "scylla://h/chat?tls=false",
                with(Some(&missing), None, None),
                "tls=false",
            ),
            (
                "scylla://h/chat?tls=true",
                with(None, Some(&missing), None),
                "--store-tls-key",
            ),
            (
                "scylla://h/chat?tls=true",
                with(None, None, Some(&missing)),
                "--store-tls-cert",
            ),
        ] {
            let error = CqlConfig::from_url(url, &options).unwrap_err();
            assert!(
                matches!(&error, Error::BadUrl(text) if text.contains(says)),
                "{url}: {error:?}"
            );
        }
    }

    #[test]
    fn schema_files_split_into_statements() {
        let statements = statements_of(MIGRATIONS[0].2);
        assert_eq!(statements.len(), 6);
        assert!(statements
            .iter()
            .all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
        let records = statements_of(MIGRATIONS[1].2);
        assert_eq!(records.len(), 2);
        assert!(records[0].starts_with("CREATE TABLE IF NOT EXISTS records"));
        assert!(records[1].starts_with("CREATE TABLE IF NOT EXISTS record_list"));
        // Versions 1, 2, …: one file each, the last the version this build needs.
        for (index, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, index + 1);
            assert!(name.starts_with(&format!("{version:03}_")), "{name}");
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.0), Some(SCHEMA_VERSION));
    }

    #[test]
    fn records_use_the_serial_consistency_of_the_configured_one() {
        for (consistency, serial) in [
            (Consistency::LocalQuorum, SerialConsistency::LocalSerial),
            (Consistency::LocalOne, SerialConsistency::LocalSerial),
            (Consistency::Quorum, SerialConsistency::Serial),
            (Consistency::One, SerialConsistency::Serial),
            (Consistency::All, SerialConsistency::Serial),
            (Consistency::EachQuorum, SerialConsistency::Serial),
        ] {
            assert_eq!(serial_consistency(consistency), serial, "{consistency:?}");
        }
    }
}
