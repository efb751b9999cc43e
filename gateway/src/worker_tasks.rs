//! The integration workers inside the gateway: with no Kafka configured, each worker whose
//! provider is configured runs here as tasks on the in-process bus, with its webhooks on its
//! own listen address and its metrics in the gateway's registry (`worker` label). With Kafka,
//! the workers are their own processes (`sms-worker`, `email-worker`, `push-worker`).

use std::sync::Arc;

use workers::runtime::{Ledger, Worker, WorkerMetrics};

use crate::server::Shared;

/// Starts the configured workers (none when Kafka carries the bus).
pub(crate) async fn start(shared: &Arc<Shared>) -> std::io::Result<()> {
    let config = &shared.config;
    if config.kafka_brokers.is_some() {
        return Ok(());
    }
    if config.sms.twilio_account_sid.is_some() {
        let sms = config.sms.clone();
        spawn(shared, "sms", sms.sms_listen, |w, l, r| {
            workers::sms::run(w, sms, l, r)
        })
        .await?;
    }
    if config.email.smtp_url.is_some() {
        // A relay URL that cannot work stops the start, as the email-worker binary does.
        config.email.check().map_err(std::io::Error::other)?;
        let email = config.email.clone();
        spawn(shared, "email", email.email_listen, |w, l, r| {
            workers::email::run(w, email, l, r)
        })
        .await?;
    }
    if config.push.fcm_credentials.is_some() {
        let push = config.push.clone();
        spawn(shared, "push", push.push_listen, |w, l, r| {
            workers::push::run(w, push, l, r)
        })
        .await?;
    }
    Ok(())
}

/// Runs worker `name` as a task: `run` gets its share of the gateway, its listener and the
/// gateway's registry.
async fn spawn<F, Fut>(
    shared: &Arc<Shared>,
    name: &'static str,
    listen: std::net::SocketAddr,
    run: F,
) -> std::io::Result<()>
where
    F: FnOnce(Arc<Worker>, tokio::net::TcpListener, prometheus::Registry) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (worker, listener) = prepare(shared, name, listen).await?;
    tokio::spawn(run(worker, listener, shared.metrics.registry().clone()));
    Ok(())
}

/// A worker's share of the gateway: the bus, the metrics, a ledger in the data directory, the
/// gateway's shutdown; and its listener.
async fn prepare(
    shared: &Arc<Shared>,
    name: &'static str,
    listen: std::net::SocketAddr,
) -> std::io::Result<(Arc<Worker>, tokio::net::TcpListener)> {
    let failed = |what: String| std::io::Error::other(format!("the {name} worker: {what}"));
    let metrics =
        WorkerMetrics::new(name, shared.metrics.registry()).map_err(|e| failed(e.to_string()))?;
    let path = shared
        .config
        .data_dir
        .join("workers")
        .join(format!("{name}.sqlite"));
    let ledger = Ledger::open(&path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| failed(format!("listening on {listen}: {e}")))?;
    tracing::info!(addr = %listen, "the {name} worker runs inside the gateway");
    let worker = Worker {
        name,
        bus: shared.integration.bus.clone(),
        topics: shared.integration.topics.clone(),
        metrics,
        ledger,
        stop: shared.shutdown_signal(),
    };
    Ok((Arc::new(worker), listener))
}
