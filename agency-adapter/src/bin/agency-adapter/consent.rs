//! The consent commands: `consent grant`, `consent revoke`, `consent show`, and
//! `purge-confirm`. Like the other one-shot commands, each checks its input before it connects
//! (exit 2, nothing sent, on bad input).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use serde_json::json;
use yeongye_adapter::json::parse_consent_grant_json;
use yeongye_adapter::{Adapter, AdapterConfig, Outgoing, is_valid_id};

use crate::commands::{describe, hand_over, read_input, reply_code};
use crate::{UsageError, print_json};

/// `consent grant <FILE|->`: a `ConsentGrant` in proto3 JSON; prints `{"consent_id": ...}` once
/// the grant is stored.
pub(crate) async fn grant(cfg: AdapterConfig, file: &Path) -> anyhow::Result<ExitCode> {
    let bytes = read_input(file, "consent grant")?;
    let grant =
        parse_consent_grant_json(&bytes).with_context(|| describe(file, "consent grant"))?;
    let out = Outgoing::consent_grant(&cfg.agency, grant)
        .with_context(|| describe(file, "consent grant"))?;
    hand_over(
        cfg,
        &out,
        json!({ "consent_id": out.consent_id(), "message_id": out.message_id() }),
    )
    .await
}

/// `consent revoke <CONSENT_ID> [--at-ms N]`: prints `{"message_id": ...}`.
pub(crate) async fn revoke(
    cfg: AdapterConfig,
    consent_id: &str,
    at_ms: Option<i64>,
) -> anyhow::Result<ExitCode> {
    let out = Outgoing::consent_revocation(&cfg.agency, consent_id, at_ms)?;
    hand_over(cfg, &out, json!({ "message_id": out.message_id() })).await
}

/// `consent show <CONSENT_ID>`: prints the `ConsentReply` as pretty proto3 JSON; exit 1 if it
/// carries an error.
pub(crate) async fn show(cfg: AdapterConfig, consent_id: &str) -> anyhow::Result<ExitCode> {
    if !is_valid_id(consent_id) {
        return Err(UsageError(format!(
            "consent id {consent_id:?} is not {}",
            yeongye_proto::rules::ID_SYNTAX
        ))
        .into());
    }
    let adapter = Adapter::connect(cfg).await?;
    let reply = adapter.consent(consent_id).await?;
    print_json(&reply, true)?;
    Ok(reply_code(reply.error.as_ref()))
}

/// `purge-confirm <REFERRAL_ID> <CONSENT_ID>`: tells the broker the withdrawn referral's data is
/// purged (fresh message id); prints `{"message_id": ...}`.
pub(crate) async fn purge_confirm(
    cfg: AdapterConfig,
    referral_id: &str,
    consent_id: &str,
) -> anyhow::Result<ExitCode> {
    let out = Outgoing::purge_confirmation(&cfg.agency, referral_id, consent_id, None)?;
    hand_over(cfg, &out, json!({ "message_id": out.message_id() })).await
}
