//! Files: `POST /api/v1/files` uploads one (`multipart/form-data`, a `file` part and an
//! optional `room_id`), `GET /api/v1/files/{id}` reads it back (ranges included). What is
//! known of a file is a record of its tenant ([`FileRecord`]); its bytes live in a
//! [`FileStore`] under the same tenant and id.
//!
//! Access: a file uploaded for a conversation is readable by whoever may read that
//! conversation (`join`'s rule, so a customer only its own); one uploaded without a room by the
//! team and its uploader. Another tenant's file does not exist (`404`).

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyStream;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ACCEPT_RANGES, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE,
    ETAG, RANGE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use storage::records::{self, FileLimits, FileRecord, Versioned};
use storage::{RoomKey, Store, Timestamp};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use utoipa::ToSchema;

use super::{caller, reply, ApiError, ApiResult, ErrorBody, TEAM};
use crate::auth::{may_join, Access, Claims, Role};
use crate::server::{Body, Shared};

/// Longest file name kept, in bytes.
const MAX_NAME_BYTES: usize = 255;
/// Room for the form's other fields and part headers beyond the file itself.
const FORM_OVERHEAD: u64 = 64 * 1024;

/// Where files' bytes are kept. The embedded default is a directory ([`LocalFiles`]).
pub trait FileStore: Send + Sync {
    /// Stores a file's bytes (all or nothing: a failed write leaves no file behind).
    fn put<'a>(
        &'a self,
        tenant: &'a str,
        file_id: &'a str,
        bytes: Bytes,
    ) -> futures_util::future::BoxFuture<'a, std::io::Result<()>>;

    /// Reads `len` bytes of a file from `offset`.
    fn read<'a>(
        &'a self,
        tenant: &'a str,
        file_id: &'a str,
        offset: u64,
        len: u64,
    ) -> futures_util::future::BoxFuture<'a, std::io::Result<Bytes>>;
}

/// A tenant's folder in a file store: named by a digest, as tenant names may hold any
/// character.
fn tenant_folder(tenant: &str) -> String {
    let digest = Sha256::digest(tenant.as_bytes());
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// Files in a directory: `<dir>/<tenant digest>/<file id>`, written to a temporary name and
/// renamed into place.
pub struct LocalFiles {
    dir: PathBuf,
}

impl LocalFiles {
    pub fn new(dir: PathBuf) -> LocalFiles {
        LocalFiles { dir }
    }

    fn path(&self, tenant: &str, file_id: &str) -> PathBuf {
        self.dir.join(tenant_folder(tenant)).join(file_id)
    }
}

impl FileStore for LocalFiles {
    fn put<'a>(
        &'a self,
        tenant: &'a str,
        file_id: &'a str,
        bytes: Bytes,
    ) -> futures_util::future::BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            let path = self.path(tenant, file_id);
            if let Some(folder) = path.parent() {
                tokio::fs::create_dir_all(folder).await?;
            }
            let partial = path.with_extension("partial");
            let mut file = tokio::fs::File::create(&partial).await?;
            let written = async {
                file.write_all(&bytes).await?;
                file.sync_all().await
            }
            .await;
            if let Err(e) = written {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
            tokio::fs::rename(&partial, &path).await
        })
    }

    fn read<'a>(
        &'a self,
        tenant: &'a str,
        file_id: &'a str,
        offset: u64,
        len: u64,
    ) -> futures_util::future::BoxFuture<'a, std::io::Result<Bytes>> {
        Box::pin(async move {
            let mut file = tokio::fs::File::open(self.path(tenant, file_id)).await?;
            file.seek(SeekFrom::Start(offset)).await?;
            let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
            file.take(len).read_to_end(&mut bytes).await?;
            Ok(Bytes::from(bytes))
        })
    }
}

/// Files in an S3-compatible object store (`--files-url s3://bucket/prefix`), through the
/// `object_store` crate: objects `<prefix>/<tenant digest>/<file id>`. The endpoint, region and
/// credentials come from the usual `AWS_*` variables (`AWS_ENDPOINT`, `AWS_DEFAULT_REGION`,
/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, …).
pub struct S3Files {
    store: object_store::aws::AmazonS3,
    prefix: object_store::path::Path,
}

impl S3Files {
    /// The store behind `url` (`s3://bucket[/prefix]`).
    pub fn new(url: &str) -> Result<S3Files, object_store::Error> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let prefix = rest.split_once('/').map_or("", |(_, prefix)| prefix);
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_url(url)
            .build()?;
        Ok(S3Files {
            store,
            prefix: object_store::path::Path::from(prefix),
        })
    }

    fn path(&self, tenant: &str, file_id: &str) -> object_store::path::Path {
        self.prefix
            .clone()
            .join(tenant_folder(tenant))
            .join(file_id)
    }
}

fn io_error(error: object_store::Error) -> std::io::Error {
    match error {
        object_store::Error::NotFound { .. } => {
            std::io::Error::new(std::io::ErrorKind::NotFound, error)
        }
        error => std::io::Error::other(error),
    }
}

impl FileStore for S3Files {
    fn put<'a>(
        &'a self,
        tenant: &'a str,
        file_id: &'a str,
        bytes: Bytes,
    ) -> futures_util::future::BoxFuture<'a, std::io::Result<()>> {
        use object_store::ObjectStoreExt;
        Box::pin(async move {
            let path = self.path(tenant, file_id);
            self.store
                .put(&path, bytes.into())
                .await
                .map(|_| ())
                .map_err(io_error)
        })
    }

    fn read<'a>(
        &'a self,
        tenant: &'a str,
        file_id: &'a str,
        offset: u64,
        len: u64,
    ) -> futures_util::future::BoxFuture<'a, std::io::Result<Bytes>> {
        use object_store::ObjectStoreExt;
        Box::pin(async move {
            if len == 0 {
                return Ok(Bytes::new());
            }
            let path = self.path(tenant, file_id);
            self.store
                .get_range(&path, offset..offset + len)
                .await
                .map_err(io_error)
        })
    }
}

/// The file store `files_url` names: the directory `dir` without one, an S3 bucket with
/// `s3://…`.
pub fn file_store(
    files_url: Option<&str>,
    dir: PathBuf,
) -> Result<Box<dyn FileStore>, std::io::Error> {
    match files_url {
        None => Ok(Box::new(LocalFiles::new(dir))),
        Some(url) if url.starts_with("s3://") => S3Files::new(url)
            .map(|s3| Box::new(s3) as Box<dyn FileStore>)
            .map_err(|e| std::io::Error::other(format!("--files-url {url}: {e}"))),
        Some(url) => Err(std::io::Error::other(format!(
            "--files-url {url}: only s3://bucket[/prefix] is supported"
        ))),
    }
}

/// The upload limits in effect for a tenant.
#[derive(Serialize, ToSchema)]
pub(crate) struct Limits {
    /// Largest upload, in bytes.
    max_file_bytes: u64,
    /// Content types an upload may have (`image/*` takes a family).
    file_types: Vec<String>,
}

/// The tenant's limits where it set them, the gateway's elsewhere; never above the gateway's
/// size limit (uploads are held in memory while they arrive).
async fn limits(shared: &Shared, tenant: &str) -> Result<Limits, ApiError> {
    let own = records::load::<FileLimits, _>(&shared.store, tenant, FileLimits::ID)
        .await
        .map_err(|e| ApiError::storage(&e, tenant, "reading file limits"))?
        .map(|found| found.value)
        .unwrap_or_default();
    let config = &shared.config;
    Ok(Limits {
        max_file_bytes: own
            .max_file_bytes
            .map_or(config.max_file_bytes, |max| max.min(config.max_file_bytes)),
        file_types: own.file_types.unwrap_or_else(|| config.file_types.clone()),
    })
}

/// A tenant's upload limits.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsBody {
    /// Largest upload, in bytes (at most the gateway's limit); `null` for the gateway's.
    #[schema(minimum = 1)]
    max_file_bytes: Option<u64>,
    /// Content types (`type/subtype` or `type/*`, at most 50); `null` for the gateway's.
    file_types: Option<Vec<String>>,
}

/// The upload limits in effect for the caller's tenant (the team).
#[utoipa::path(get, path = "/api/v1/settings/files", tag = "files",
    responses(
        (status = 200, body = Limits),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn get_limits(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    super::require(&claims, TEAM, "read file limits")?;
    reply(StatusCode::OK, &limits(&shared, &claims.tenant).await?)
}

/// Sets the tenant's own upload limits (admins); answers the limits now in effect.
#[utoipa::path(put, path = "/api/v1/settings/files", tag = "files", request_body = LimitsBody,
    responses(
        (status = 200, body = Limits),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 415, body = ErrorBody), (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn put_limits(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    super::require(&claims, &[Role::Admin], "set file limits")?;
    let body: LimitsBody = super::json_body(req).await?;
    let max = shared.config.max_file_bytes;
    if body.max_file_bytes.is_some_and(|n| n == 0 || n > max) {
        return Err(ApiError::bad_request(format!(
            "max_file_bytes must be 1 to {max} (the gateway's limit)"
        )));
    }
    if let Some(types) = &body.file_types {
        let valid = |t: &String| {
            t.len() <= 127
                && t.split_once('/').is_some_and(|(family, sub)| {
                    let token = |s: &str| {
                        !s.is_empty()
                            && s.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
                    };
                    token(family) && (sub == "*" || token(sub))
                })
        };
        if types.len() > 50 || !types.iter().all(valid) {
            return Err(ApiError::bad_request(
                "file_types: at most 50 content types, each type/subtype or type/*",
            ));
        }
    }
    let own = FileLimits {
        max_file_bytes: body.max_file_bytes,
        file_types: body.file_types,
    };
    let tenant = claims.tenant.as_str();
    records::update::<FileLimits, _, _>(&shared.store, tenant, FileLimits::ID, |_| {
        Ok(Some(own.clone()))
    })
    .await
    .map_err(|e| ApiError::storage(&e, tenant, "saving file limits"))?;
    reply(StatusCode::OK, &limits(&shared, tenant).await?)
}

/// The upload form (`multipart/form-data`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct UploadForm {
    /// The file; its part's `Content-Type` is the file's.
    #[schema(value_type = String, format = Binary)]
    file: Vec<u8>,
    /// The conversation it is for (required of customers: their own).
    room_id: Option<String>,
}

/// Longest an upload's body may go without sending a byte: a client that stalls gives its
/// share of the upload budget back (`408`) instead of holding it.
const UPLOAD_IDLE: Duration = Duration::from_secs(10);

/// Bytes of uploads the process holds in memory while they arrive, in KiB: shared by every
/// tenant, and no tenant may hold more than half (or one upload, if that is larger), so that
/// one tenant's uploads (stalled ones, say) cannot keep every other tenant's out.
pub struct UploadBudget {
    total: Arc<tokio::sync::Semaphore>,
    tenant_share: usize,
    /// KiB each tenant holds now (a tenant with none has no entry).
    held: Arc<Mutex<HashMap<String, usize>>>,
}

/// An upload's share of the budget, given back when dropped.
pub(crate) struct HeldUpload {
    _permit: tokio::sync::OwnedSemaphorePermit,
    tenant: String,
    kib: usize,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl UploadBudget {
    pub fn new(kib: usize) -> UploadBudget {
        UploadBudget {
            total: Arc::new(tokio::sync::Semaphore::new(kib)),
            tenant_share: (kib / 2).max(1),
            held: Arc::default(),
        }
    }

    /// Takes `kib` for one upload of `tenant`, or `None` when the process or the tenant has no
    /// room for it now.
    pub(crate) fn try_hold(&self, tenant: &str, kib: usize) -> Option<HeldUpload> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let tenant_held = held.get(tenant).copied().unwrap_or(0);
        // A tenant's first upload may be larger than its share (a file up to the limit fits
        // whatever the budget's size), its others not.
        if tenant_held > 0 && tenant_held + kib > self.tenant_share {
            return None;
        }
        let permit = self
            .total
            .clone()
            .try_acquire_many_owned(u32::try_from(kib).ok()?)
            .ok()?;
        held.insert(tenant.to_owned(), tenant_held + kib);
        Some(HeldUpload {
            _permit: permit,
            tenant: tenant.to_owned(),
            kib,
            held: self.held.clone(),
        })
    }
}

impl Drop for HeldUpload {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tenant_held) = held.get_mut(&self.tenant) {
            *tenant_held = tenant_held.saturating_sub(self.kib);
            if *tenant_held == 0 {
                held.remove(&self.tenant);
            }
        }
    }
}

/// The upload's body as a stream of bytes that fails with a `TimedOut` I/O error when the
/// client sends nothing for [`UPLOAD_IDLE`].
fn body_until_stalled(
    body: Incoming,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures_util::stream::try_unfold(BodyStream::new(body), |mut body| async move {
        loop {
            match tokio::time::timeout(UPLOAD_IDLE, body.next()).await {
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the upload stalled",
                    ))
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => return Err(std::io::Error::other(e)),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some((data, body)));
                    }
                }
            }
        }
    })
}

/// Whether a form error is the body stalling ([`body_until_stalled`]).
fn stalled(error: &multer::Error) -> bool {
    matches!(error, multer::Error::StreamReadFailed(e)
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut))
}

fn stalled_error() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "TIMEOUT",
        format!("the upload sent nothing for {} s", UPLOAD_IDLE.as_secs()),
    )
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "TOO_LARGE",
        format!("files are at most {max} bytes"),
    )
}

/// Whether `content_type` is one of `allowed` (`image/*` takes every image type).
fn type_allowed(content_type: &str, allowed: &[String]) -> bool {
    let content_type = content_type.to_ascii_lowercase();
    allowed.iter().any(|a| {
        let a = a.trim().to_ascii_lowercase();
        match a.strip_suffix("/*") {
            Some(family) => content_type
                .split_once('/')
                .is_some_and(|(f, sub)| f == family && !sub.is_empty()),
            None => a == content_type,
        }
    })
}

/// Uploads a file; its id goes into a message's `attached_files`.
#[utoipa::path(post, path = "/api/v1/files", tag = "files",
    request_body(content = UploadForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, body = FileRecord),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 413, description = "Over the size limit", body = ErrorBody),
        (status = 408, description = "The body sent nothing for 10 s", body = ErrorBody),
        (status = 415, description = "Not an allowed content type", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn upload(shared: Arc<Shared>, req: Request<Incoming>) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let limits = limits(&shared, &claims.tenant).await?;
    let max = limits.max_file_bytes;
    let boundary = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                "the body must be multipart/form-data",
            )
        })?;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max + FORM_OVERHEAD) {
        return Err(too_large(max));
    }
    // Held in memory while it arrives: the process holds a bounded number of bytes of uploads
    // at once, counting each at its declared length (or the largest it may be).
    let kib = declared
        .unwrap_or(max + FORM_OVERHEAD)
        .div_ceil(1024)
        .max(1);
    let held = usize::try_from(kib)
        .ok()
        .and_then(|kib| shared.upload_budget.try_hold(&claims.tenant, kib));
    let Some(_held) = held else {
        // Read and dropped as it arrives (nothing is held), so that the client, still sending,
        // gets the answer instead of a broken connection.
        let mut body = std::pin::pin!(body_until_stalled(req.into_body()));
        let mut left = max + FORM_OVERHEAD;
        while let Some(Ok(data)) = body.next().await {
            match left.checked_sub(data.len() as u64) {
                Some(rest) => left = rest,
                None => break,
            }
        }
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "too many uploads in progress, retry later",
        ));
    };
    let stream = body_until_stalled(req.into_body());
    let constraints = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(max + FORM_OVERHEAD)
            .per_field(max),
    );
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let form_error = |e: multer::Error| match e {
        multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
            too_large(max)
        }
        e if stalled(&e) => stalled_error(),
        e => ApiError::bad_request(format!("invalid form: {e}")),
    };
    let mut file: Option<(String, String, Bytes)> = None;
    let mut room_id: Option<String> = None;
    while let Some(field) = form.next_field().await.map_err(form_error)? {
        match field.name() {
            Some("file") if file.is_none() => {
                let name = field.file_name().unwrap_or("file").to_owned();
                let content_type = field
                    .content_type()
                    .map(|m| m.essence_str().to_owned())
                    .unwrap_or_else(|| "application/octet-stream".to_owned());
                if !type_allowed(&content_type, &limits.file_types) {
                    return Err(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UNSUPPORTED_MEDIA_TYPE",
                        format!("{content_type} files are not accepted"),
                    ));
                }
                let bytes = field.bytes().await.map_err(form_error)?;
                if bytes.len() as u64 > max {
                    return Err(too_large(max));
                }
                file = Some((name, content_type, bytes));
            }
            Some("room_id") if room_id.is_none() => {
                room_id = Some(field.text().await.map_err(form_error)?);
            }
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "unexpected form field {other:?} (or given twice)"
                )))
            }
            None => return Err(ApiError::bad_request("a form part has no name")),
        }
    }
    let (name, content_type, bytes) =
        file.ok_or_else(|| ApiError::bad_request("the form has no file part"))?;
    let tenant = claims.tenant.as_str();
    match &room_id {
        Some(room_id) => check_room(&shared, &claims, room_id).await?,
        None if claims.role == Role::Customer => {
            return Err(ApiError::bad_request(
                "room_id: a customer uploads into its conversation",
            ))
        }
        None => {}
    }
    let mut name: String = name.chars().filter(|c| !c.is_control()).collect();
    while name.len() > MAX_NAME_BYTES {
        name.pop();
    }
    let file_id = ulid::Ulid::new().to_string();
    let record = FileRecord {
        file_id: file_id.clone(),
        name,
        content_type,
        size: bytes.len() as u64,
        room_id,
        uploaded_by: claims.sub.clone(),
        sha256: Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
        created_at: Timestamp::now(),
    };
    shared
        .files
        .put(tenant, &file_id, bytes)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, tenant, "writing an uploaded file failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "file storage unavailable, retry later",
            )
        })?;
    let saved = records::save(
        &shared.store,
        tenant,
        &file_id,
        Versioned {
            value: record,
            version: 0,
        },
    )
    .await
    .map_err(|e| ApiError::storage(&e, tenant, "saving a file record"))?;
    reply(StatusCode::CREATED, &saved.value)
}

/// Checks that every file id a message attaches names a file of the room's tenant, uploaded
/// for this room or for none: `BAD_REQUEST` for an unknown one (another tenant's, or another
/// conversation's, is unknown here too).
pub(crate) async fn check_attachments(
    shared: &Shared,
    room: &RoomKey,
    file_ids: &[String],
) -> Result<(), crate::codec::ProtocolError> {
    use crate::codec::{ErrorCode, ProtocolError};
    for (i, id) in file_ids.iter().enumerate() {
        let file = records::load::<FileRecord, _>(&shared.store, &room.tenant_id, id)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "reading a file record failed");
                ProtocolError::new(ErrorCode::Unavailable, "storage unavailable, retry later")
            })?;
        let known = file.is_some_and(|file| {
            file.value
                .room_id
                .as_deref()
                .is_none_or(|r| r == room.room_id)
        });
        if !known {
            return Err(ProtocolError::bad_request(format!(
                "data.attached_files[{i}]: no file {id:?} (upload files with POST \
                 /api/v1/files; links start with https://)"
            )));
        }
    }
    Ok(())
}

/// `404` unless the caller may read room `room_id` of its tenant.
async fn check_room(shared: &Shared, claims: &Claims, room_id: &str) -> Result<(), ApiError> {
    let room = shared
        .store
        .room(&RoomKey::new(&claims.tenant, room_id))
        .await
        .map_err(|e| ApiError::storage(&e, &claims.tenant, "reading a room"))?;
    match room.map(|room| may_join(claims, &room)) {
        Some(Access::Allowed) => Ok(()),
        _ => Err(ApiError::not_found("no such room")),
    }
}

/// A single byte range of a file of `size` bytes (`bytes=a-b`, `bytes=a-`, `bytes=-n`), as
/// `(offset, len)`; `Ok(None)` for a header this answer ignores (several ranges: the whole
/// file is answered); `Err` when it cannot be satisfied.
fn byte_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = (start.trim(), end.trim());
    let (offset, last) = if start.is_empty() {
        let suffix: u64 = end.parse().map_err(|_| ())?;
        if suffix == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(suffix), size - 1)
    } else {
        let start: u64 = start.parse().map_err(|_| ())?;
        let end: u64 = if end.is_empty() {
            size.saturating_sub(1)
        } else {
            end.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some((offset, last - offset + 1)))
}

/// Reads a file: the tenant and conversation access check, ranges (`206`), its type and name.
#[utoipa::path(get, path = "/api/v1/files/{file_id}", tag = "files",
    params(("file_id" = String, Path),
        ("Range" = Option<String>, Header, description = "One byte range: `bytes=0-99`")),
    responses(
        (status = 200, description = "The file, with the type it was uploaded with", content_type = "*/*", body = Vec<u8>),
        (status = 206, description = "The range asked for", content_type = "*/*", body = Vec<u8>),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 416, description = "The range is outside the file", body = ErrorBody),
        (status = 503, body = ErrorBody),
    ))]
pub(crate) async fn download(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    file_id: &str,
) -> ApiResult {
    let claims = caller(&shared, &req)?;
    let tenant = claims.tenant.as_str();
    let file = records::load::<FileRecord, _>(&shared.store, tenant, file_id)
        .await
        .map_err(|e| ApiError::storage(&e, tenant, "reading a file record"))?
        .ok_or_else(|| ApiError::not_found("no such file"))?
        .value;
    match &file.room_id {
        Some(room_id) => check_room(&shared, &claims, room_id)
            .await
            .map_err(|_| ApiError::not_found("no such file"))?,
        None if TEAM.contains(&claims.role) || claims.sub == file.uploaded_by => {}
        None => return Err(ApiError::not_found("no such file")),
    }
    let range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| byte_range(v, file.size));
    let (status, offset, len) = match range {
        None | Some(Ok(None)) => (StatusCode::OK, 0, file.size),
        Some(Ok(Some((offset, len)))) => (StatusCode::PARTIAL_CONTENT, offset, len),
        Some(Err(())) => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_NOT_SATISFIABLE",
                format!("the file has {} bytes", file.size),
            )
            .response();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{}", file.size)) {
                response.headers_mut().insert(CONTENT_RANGE, value);
            }
            return Ok(response);
        }
    };
    let bytes = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        shared
            .files
            .read(tenant, &file.file_id, offset, len)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, tenant, "reading a stored file failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    "file storage unavailable, retry later",
                )
            })?
    };
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let header = |text: String| HeaderValue::from_str(&text).ok();
    if let Some(value) = header(file.content_type.clone()) {
        headers.insert(CONTENT_TYPE, value);
    }
    if let Some(value) = header(content_disposition(&file)) {
        headers.insert(CONTENT_DISPOSITION, value);
    }
    if let Some(value) = header(format!("\"{}\"", file.sha256)) {
        headers.insert(ETAG, value);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let last = offset + len - 1;
        if let Some(value) = header(format!("bytes {offset}-{last}/{}", file.size)) {
            headers.insert(CONTENT_RANGE, value);
        }
    }
    if req.method() == Method::HEAD {
        if let Some(value) = header(len.to_string()) {
            headers.insert(CONTENT_LENGTH, value);
        }
    }
    headers.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // Uploaded bytes are never run as a page of this origin.
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("sandbox"),
    );
    Ok(response)
}

/// Shown in the browser for media and PDFs, saved otherwise (an SVG can carry script);
/// the name in ASCII and, per RFC 6266, in UTF-8.
fn content_disposition(file: &FileRecord) -> String {
    let inline = ["image/", "audio/", "video/"]
        .iter()
        .any(|family| file.content_type.starts_with(family))
        && file.content_type != "image/svg+xml"
        || file.content_type == "application/pdf";
    let kind = if inline { "inline" } else { "attachment" };
    let ascii: String = file
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = file
        .name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        assert_eq!(byte_range("bytes=0-99", 1000), Ok(Some((0, 100))));
        assert_eq!(byte_range("bytes=990-", 1000), Ok(Some((990, 10))));
        assert_eq!(byte_range("bytes=-10", 1000), Ok(Some((990, 10))));
        assert_eq!(byte_range("bytes=900-5000", 1000), Ok(Some((900, 100))));
        assert_eq!(byte_range("bytes=0-1,5-6", 1000), Ok(None));
        assert_eq!(byte_range("items=0-1", 1000), Ok(None));
        assert_eq!(byte_range("bytes=1000-", 1000), Err(()));
        assert_eq!(byte_range("bytes=5-1", 1000), Err(()));
        assert_eq!(byte_range("bytes=-0", 1000), Err(()));
        assert_eq!(byte_range("bytes=x-1", 1000), Err(()));
    }

    #[test]
    fn content_types_match_exactly_or_by_family() {
        let allowed = vec!["image/*".to_owned(), "application/pdf".to_owned()];
        assert!(type_allowed("image/png", &allowed));
        assert!(type_allowed("IMAGE/PNG", &allowed));
        assert!(type_allowed("application/pdf", &allowed));
        assert!(!type_allowed("application/pdfx", &allowed));
        assert!(!type_allowed("text/html", &allowed));
        assert!(!type_allowed("image/", &allowed));
    }
}
