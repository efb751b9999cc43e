//! A real SMTP server for the tests: aiosmtpd (Python, from PyPI; `scripts/smtp install` puts
//! it in `.tools/aiosmtpd`) runs a small handler that saves every mail it accepts, refuses
//! `bounce…@` recipients for good (550), answers `later…@` recipients "not now" (451) once,
//! requires AUTH when started with credentials and offers STARTTLS when given a certificate.
//! The tests read the saved mails back (envelope, headers, decoded body).
//!
//! Shared by `workers/tests/email_worker.rs` and `gateway/tests/kafka_workers.rs` (included with
//! `#[path]`): it uses only crates both packages have.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use tempfile::TempDir;

/// The SMTP server: saves each accepted mail as `NNNN.eml` and `NNNN.json` (envelope, headers,
/// the decoded plain-text body read with Python's `email` package, whether the session was
/// authenticated and encrypted) in the directory it is given, and prints its port once it
/// listens. `SMTP_USER` / `SMTP_PASSWORD`: it takes mail only after AUTH with them;
/// `SMTP_CERT` / `SMTP_KEY`: it offers STARTTLS and takes mail only after it.
pub const SERVER: &str = r#"
import asyncio, json, os, sys
from email import policy
from email.parser import BytesParser
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

directory = sys.argv[1]
credentials = None
if os.environ.get("SMTP_USER"):
    credentials = (os.environ["SMTP_USER"].encode(), os.environ["SMTP_PASSWORD"].encode())
tls = None
if os.environ.get("SMTP_CERT"):
    import ssl
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(os.environ["SMTP_CERT"], os.environ["SMTP_KEY"])
tries = {}
saved = 0

class Handler:
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@")[0].lower()
        if local.startswith("bounce"):
            return "550 5.1.1 no such mailbox here"
        if local.startswith("later"):
            tries[address] = tries.get(address, 0) + 1
            if tries[address] == 1:
                return "451 4.3.2 not now, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        global saved
        saved += 1
        name = os.path.join(directory, "%04d" % saved)
        raw = envelope.original_content or envelope.content
        message = BytesParser(policy=policy.default).parsebytes(raw)
        body = message.get_body(("plain",))
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "headers": [[key, str(value)] for key, value in message.items()],
            "body": body.get_content() if body is not None else "",
            "authenticated": bool(session.authenticated),
            "tls": session.ssl is not None,
        }
        with open(name + ".eml", "wb") as f:
            f.write(raw)
        with open(name + ".partial", "w") as f:
            json.dump(record, f)
        os.rename(name + ".partial", name + ".json")
        return "250 2.0.0 accepted"

def authenticator(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == credentials
    return AuthResult(success=ok)

def connection():
    options = {}
    if credentials is not None:
        options.update(authenticator=authenticator, auth_required=True, auth_require_tls=False)
    if tls is not None:
        options.update(tls_context=tls, require_starttls=True)
    return SMTP(Handler(), **options)

async def main():
    server = await asyncio.get_running_loop().create_server(connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"#;

/// The python that has aiosmtpd: `SMTP_TEST_PYTHON`, else the venv `scripts/smtp install` makes.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("SMTP_TEST_PYTHON") {
        return python.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/aiosmtpd/bin/python");
    assert!(
        venv.exists(),
        "the SMTP server for these tests (aiosmtpd) is not installed: run `scripts/smtp install` \
         (a venv in .tools/aiosmtpd, aiosmtpd from PyPI), or set SMTP_TEST_PYTHON to a python \
         that has aiosmtpd"
    );
    venv
}

/// A mail the SMTP server accepted.
#[derive(Debug, Deserialize)]
pub struct Mail {
    pub mail_from: String,
    pub rcpt_tos: Vec<String>,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub authenticated: bool,
    pub tls: bool,
}

impl Mail {
    /// A header's value, unfolded (whitespace runs as one space); none when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let mut values = self
            .headers
            .iter()
            .filter(|(key, _)| key.eq_ignore_ascii_case(name));
        let (_, value) = values.next()?;
        assert!(values.next().is_none(), "two {name} headers in {self:#?}");
        Some(value.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

/// An aiosmtpd server on a port of its own, stopped when dropped.
pub struct SmtpServer {
    child: Child,
    dir: TempDir,
    pub port: u16,
}

impl SmtpServer {
    /// Starts a server with its settings (`SMTP_USER`, `SMTP_PASSWORD`, `SMTP_CERT`, `SMTP_KEY`).
    pub fn start(settings: &[(&str, &str)]) -> SmtpServer {
        let python = python();
        let dir = tempfile::tempdir().unwrap();
        let mail = dir.path().join("mail");
        std::fs::create_dir(&mail).unwrap();
        let script = dir.path().join("server.py");
        std::fs::write(&script, SERVER).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .arg(&mail)
            .envs(settings.iter().copied());
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", python.display()));
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().unwrap()).read_line(&mut line);
        let Ok(port) = line.trim().parse() else {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            panic!(
                "the SMTP server (aiosmtpd) did not start; is it installed (`scripts/smtp install`)?\n{log}"
            );
        };
        SmtpServer { child, dir, port }
    }

    /// The mails accepted so far, in order.
    pub fn mails(&self) -> Vec<Mail> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("mail"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|path| serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap())
            .collect()
    }

    /// Waits until `count` mails were accepted (up to 15 s).
    pub async fn wait_for(&self, count: usize) -> Vec<Mail> {
        self.wait_for_within(count, Duration::from_secs(15)).await
    }

    /// Waits until `count` mails were accepted, for up to `within`.
    pub async fn wait_for_within(&self, count: usize, within: Duration) -> Vec<Mail> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mails = self.mails();
            if mails.len() >= count {
                return mails;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "the SMTP server got {} mails, not {count}, within {within:?}: {mails:#?}",
                    mails.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
