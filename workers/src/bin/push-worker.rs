//! `push-worker`: reads `notifications.push` from Kafka and sends each notification to the
//! user's devices through Firebase Cloud Messaging (HTTP v1); tokens FCM no longer knows go
//! back to the gateway on `device.tokens`.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use workers::push::{self, PushConfig, ServiceAccount};
use workers::runtime::{self, KafkaArgs};

/// Sends push notifications through Firebase Cloud Messaging (HTTP v1).
///
/// Reads `notifications.push` from Kafka, signs in with a Google service account (OAuth2, a
/// JWT traded for an access token) and posts one `messages:send` per device token. A token FCM
/// answers UNREGISTERED is published on `device.tokens`; QUOTA_EXCEEDED, UNAVAILABLE and
/// INTERNAL are tried again after FCM's Retry-After; INVALID_ARGUMENT goes to `dead.letters`.
/// Sends are recorded in a ledger, so a redelivered notification is not sent twice. Serves
/// `/healthz` and `/metrics`; stops on SIGTERM or Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "push-worker", version)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    push: PushConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Optional in `PushConfig` (the gateway runs without push), required here; checked before
    // connecting anything so that a bad file is a usage error (exit code 2).
    let Some(path) = args.push.fcm_credentials.as_deref() else {
        Args::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--fcm-credentials <FILE> (or FCM_CREDENTIALS) is required: the Firebase \
                 service-account JSON",
            )
            .exit();
    };
    if let Err(e) = ServiceAccount::load(path) {
        Args::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                format!("--fcm-credentials: {e}"),
            )
            .exit();
    }
    let listen = args.push.push_listen;
    let config = args.push.clone();
    let ran = runtime::run_standalone("push", &args.kafka, listen, |worker, listener, registry| {
        push::run(worker, config, listener, registry)
    })
    .await;
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("push-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
