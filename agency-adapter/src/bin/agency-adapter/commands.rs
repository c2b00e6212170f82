//! The one-shot commands: `send`, `update` and `status`. Each checks its input before it
//! connects, so bad input fails with exit code 2 and nothing sent.
//!
//! A command that sends ([`hand_over`]) goes through the adapter's outbox when no running
//! adapter holds the state directory: if the hub does not answer within `[outbox]
//! queue_after_ms`, the message waits there (printed `"status": "queued"`, exit 0) and the next
//! adapter process using the state directory (`run`, `serve`, or another command) forwards it.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::json;
use yeongye_adapter::json::{MAX_JSON_BYTES, parse_referral_json};
use yeongye_adapter::{Adapter, AdapterConfig, Outgoing, Sealing, Sent, v1};

use crate::{UsageError, print_json};

/// `send <FILE|->`: prints `{"referral_id": ...}` once the referral is stored.
pub(crate) async fn send(cfg: AdapterConfig, file: &Path) -> anyhow::Result<ExitCode> {
    let bytes = read_input(file, "referral")?;
    let referral = parse_referral_json(&bytes).with_context(|| describe(file, "referral"))?;
    let sealing = Sealing::open(cfg.registry.as_deref(), cfg.sealing_key_file.as_deref())?;
    let out = Outgoing::sealed_referral(&cfg.agency, referral, &sealing)
        .with_context(|| describe(file, "referral"))?;
    hand_over(
        cfg,
        &out,
        json!({ "referral_id": out.referral_id(), "message_id": out.message_id() }),
    )
    .await
}

/// Connects (without failing when no server is up), submits `out`, and prints `ids` with
/// `"status": "stored" | "queued"`.
pub(crate) async fn hand_over(
    cfg: AdapterConfig,
    out: &Outgoing,
    ids: serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let adapter = Adapter::builder(cfg)
        .retry_on_initial_connect(true)
        .connect()
        .await?;
    hand_over_with(&adapter, out, ids).await
}

/// [`hand_over`] with an adapter connected already.
pub(crate) async fn hand_over_with(
    adapter: &Adapter,
    out: &Outgoing,
    mut ids: serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let sent = adapter.submit(out).await?;
    if sent == Sent::Stored {
        adapter.flush().await.ok();
    } else if let Ok(Some(outbox)) = adapter.outbox_status().await {
        eprintln!(
            "queued: the hub did not answer in time; {} message(s) wait in the outbox under {} and are forwarded, in order, by the next adapter process using it (run, serve, or another command)",
            outbox.depth,
            adapter.config().state_dir.display()
        );
    }
    ids["status"] = json!(sent.as_str());
    print_json(&ids, false)?;
    Ok(ExitCode::SUCCESS)
}

/// `update <REFERRAL_ID> <STATUS> [--note TEXT]`: prints `{"message_id": ...}`.
pub(crate) async fn update(
    cfg: AdapterConfig,
    referral_id: &str,
    status: v1::Status,
    note: &str,
) -> anyhow::Result<ExitCode> {
    Outgoing::status_update(&cfg.agency, referral_id, status, note)?;
    let adapter = Adapter::builder(cfg)
        .retry_on_initial_connect(true)
        .connect()
        .await?;
    // A note is sealed to the referral's other party (a status query names it).
    let out = adapter
        .prepare_status_update(referral_id, status, note)
        .await?;
    hand_over_with(
        &adapter,
        &out,
        json!({ "referral_id": referral_id, "message_id": out.message_id() }),
    )
    .await
}

/// `status` without a referral id: the outbox (depth, oldest entry's age, whether the hub
/// answers, records set aside), read without connecting.
pub(crate) async fn outbox_status(cfg: AdapterConfig) -> anyhow::Result<ExitCode> {
    let report = yeongye_adapter::outbox_report(&cfg).await?;
    print_json(&report, true)?;
    Ok(ExitCode::SUCCESS)
}

/// `status <REFERRAL_ID>`: prints the `StatusReply` as pretty proto3 JSON; exit 1 if it
/// carries an error.
pub(crate) async fn status(cfg: AdapterConfig, referral_id: &str) -> anyhow::Result<ExitCode> {
    let adapter = Adapter::connect(cfg).await?;
    let reply = adapter.status(referral_id).await?;
    print_json(&reply, true)?;
    Ok(reply_code(reply.error.as_ref()))
}

/// Exit 1 (saying why on stderr) if the broker's reply carries an error, else 0.
pub(crate) fn reply_code(error: Option<&v1::Rejection>) -> ExitCode {
    let Some(err) = error else {
        return ExitCode::SUCCESS;
    };
    let code = v1::ReasonCode::try_from(err.code)
        .map(|c| c.as_str_name().to_owned())
        .unwrap_or_else(|_| err.code.to_string());
    eprintln!("error: the broker answered {code}: {}", err.detail);
    ExitCode::FAILURE
}

pub(crate) fn describe(file: &Path, what: &str) -> String {
    if file == Path::new("-") {
        format!("{what} on stdin")
    } else {
        format!("{what} in {}", file.display())
    }
}

/// Reads FILE (or stdin for `-`), refusing more than [`MAX_JSON_BYTES`].
pub(crate) fn read_input(file: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let limit = u64::try_from(MAX_JSON_BYTES).unwrap_or(u64::MAX) + 1;
    let mut bytes = Vec::new();
    let read = if file == Path::new("-") {
        std::io::stdin().lock().take(limit).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_end(&mut bytes))
    };
    read.map_err(|e| UsageError(format!("cannot read {}: {e}", describe(file, what))))?;
    if bytes.len() > MAX_JSON_BYTES {
        return Err(UsageError(format!(
            "{} is larger than {MAX_JSON_BYTES} bytes",
            describe(file, what)
        ))
        .into());
    }
    Ok(bytes)
}
