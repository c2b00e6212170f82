//! A minimal agency system on the Rust SDK: records a consent, sends one referral under it, then
//! receives until Ctrl-C, "handing over" each item by logging its ids, and marking it done.
//!
//! ```text
//! cargo run -p yeongye-adapter --example minimal_agency -- cc-haengbok1 hope-support nats://127.0.0.1:4222
//! ```
//!
//! Needs a running NATS with the referral broker (which creates the streams and the agency's
//! consumer). State (the dedup store) goes to `./.demo/adapter-<agency>`.

use anyhow::Context as _;
use yeongye_adapter::{Adapter, AdapterConfig, ItemKind, v1};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let mut args = std::env::args().skip(1);
    let agency = args
        .next()
        .context("usage: minimal_agency <agency> <to_agency> [nats_url]")?;
    let to_agency = args
        .next()
        .context("usage: minimal_agency <agency> <to_agency> [nats_url]")?;
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());

    let cfg = AdapterConfig::new(&agency, [url], format!(".demo/adapter-{agency}"));
    let adapter = Adapter::connect(cfg).await?;

    // 1. Record the client's consent to share with `to_agency`, for case management, their
    //    identity and household situation.
    let consent_id = adapter
        .grant_consent(v1::ConsentGrant {
            client_pseudonym_id: "p-example-0001".into(),
            recipient_agencies: vec![to_agency.clone()],
            purposes: vec![v1::Purpose::CaseManagement as i32],
            data_categories: vec![
                v1::DataCategory::Identity as i32,
                v1::DataCategory::Household as i32,
            ],
            form_reference: "signed-form-0001".into(),
            ..Default::default()
        })
        .await?;
    tracing::info!(%consent_id, "consent recorded");

    // 2. Send a referral under it. The legal basis, the purpose and the categories of the
    //    personal data it carries are the caller's to state; the broker checks the consent
    //    covers them (and answers with a rejection if not).
    let referral_id = adapter
        .send(v1::Referral {
            to_agency,
            client: Some(v1::Client {
                pseudonym_id: "p-example-0001".into(),
                household: "2인 가구, 월세 체납".into(),
                ..Default::default()
            }),
            field: v1::FieldOfNeed::Livelihood as i32,
            urgency: v1::Urgency::Priority as i32,
            purpose: v1::Purpose::CaseManagement as i32,
            reason: "example referral".into(),
            legal_basis: Some(v1::referral::LegalBasis::ConsentId(consent_id)),
            data_categories: vec![v1::DataCategory::Household as i32],
            ..Default::default()
        })
        .await?;
    tracing::info!(%referral_id, "referral stored");

    // 3. Receive. Each item is handed over, then marked done (which sends the receipt for a
    //    delivery and acknowledges). Repeats are filtered out by the SDK.
    let mut incoming = adapter.incoming().await?;
    loop {
        let item = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            item = incoming.next() => match item {
                Some(item) => item,
                None => break,
            },
        };
        let item = match item {
            Ok(item) => item,
            Err(e) => {
                tracing::warn!(cause = %e, "receive failed; retrying");
                continue;
            }
        };
        match item.kind() {
            ItemKind::Delivery { referral, .. } => tracing::info!(
                referral_id = %referral.referral_id,
                from = %referral.from_agency,
                "new referral for us"
            ),
            ItemKind::Notification(n) => tracing::info!(
                referral_id = %n.referral_id,
                state = v1::ReferralState::try_from(n.state).map_or("?", |s| s.as_str_name()),
                "referral changed state"
            ),
            ItemKind::Rejection(r) => tracing::warn!(
                referral_id = %r.referral_id,
                code = v1::ReasonCode::try_from(r.code).map_or("?", |c| c.as_str_name()),
                detail = %r.detail,
                "the broker refused a message"
            ),
            ItemKind::Withdrawal(w) => {
                // Consent revoked: purge what came with the referral, then confirm.
                tracing::info!(referral_id = %w.referral_id, "withdrawn: purging");
                item.confirm_purge().await?;
            }
            _ => tracing::info!(message_id = item.message_id(), "something new"),
        }
        item.done().await?;
    }
    adapter.drain().await?;
    Ok(())
}
