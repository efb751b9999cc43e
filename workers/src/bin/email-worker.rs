//! `email-worker`: the email integration as its own process over Kafka (see
//! [`workers::email`]).

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use workers::email::{self, EmailConfig};
use workers::runtime::{self, KafkaArgs};

/// Sends agents' replies to contacts' mailboxes and turns contacts' mail into inbound messages.
/// It reads `outbound.email` from Kafka and sends each message once through the SMTP relay of
/// `--smtp-url`, threaded (Message-ID, In-Reply-To, References) so that a contact's reply lands
/// back in its conversation, and tells the gateway on `delivery.status`; it takes inbound mail
/// as SendGrid's Inbound Parse posts it (`POST /inbound`, a multipart form), strips quoted
/// replies and signatures, and publishes it to `inbound.messages`. `/healthz` and `/metrics`
/// are served next to the webhook on `--email-listen`; SIGTERM or Ctrl-C stops it after the
/// record under way.
#[derive(Parser)]
#[command(name = "email-worker", version)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    email: EmailConfig,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // A usage error (exit code 2), before anything starts.
    if let Err(e) = args.email.check() {
        let kind = if args.email.smtp_url.is_none() {
            clap::error::ErrorKind::MissingRequiredArgument
        } else {
            clap::error::ErrorKind::ValueValidation
        };
        Args::command().error(kind, e).exit();
    }
    let listen = args.email.email_listen;
    let config = args.email.clone();
    let ran = runtime::run_standalone(
        "email",
        &args.kafka,
        listen,
        |worker, listener, registry| email::run(worker, config, listener, registry),
    )
    .await;
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("email-worker: {e}");
            ExitCode::FAILURE
        }
    }
}
