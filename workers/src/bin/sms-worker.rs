//! `sms-worker`: sends the gateway's SMS and WhatsApp messages through Twilio and turns
//! Twilio's webhooks (inbound messages, status callbacks) into bus records, over Kafka.

use clap::Parser;
use workers::runtime::{self, KafkaArgs};
use workers::sms::{self, SmsConfig};

/// Twilio SMS and WhatsApp for the gateway, over Apache Kafka: reads `outbound.sms`, sends
/// each message once, and publishes what Twilio says (`delivery.status`) and what contacts
/// write (`inbound.messages`). Point Twilio's messaging webhook at `{public URL}/twilio/inbound`.
#[derive(Debug, Parser)]
#[command(name = "sms-worker", version)]
struct Args {
    #[command(flatten)]
    kafka: KafkaArgs,
    #[command(flatten)]
    sms: SmsConfig,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.sms.twilio_account_sid.is_none() || args.sms.twilio_auth_token.is_none() {
        eprintln!("sms-worker: --twilio-account-sid and --twilio-auth-token are required");
        std::process::exit(2);
    }
    let config = args.sms.clone();
    let listen = config.sms_listen;
    let result =
        runtime::run_standalone("sms", &args.kafka, listen, |worker, listener, registry| {
            sms::run(worker, config, listener, registry)
        })
        .await;
    if let Err(e) = result {
        eprintln!("sms-worker: {e}");
        std::process::exit(1);
    }
}
