//! Bad input gets a clear answer and never stops the broker: illegal or unauthorised status
//! changes, and bytes that are not what the subject says, each answered with a rejection and the
//! right reason code, while good referrals keep flowing.

use prost::Message as _;
use yeongye_proto::subject::{self, InKind};
use yeongye_tests::wire::{ReferralBuilder, envelope, new_id};
use yeongye_tests::{AdapterProcess, Line, System, v1};

use crate::{CENTRE, HOPE, SHORT, WELFARE};

/// Waits for the rejection of the message `message_id` at `adapter` and returns it.
async fn rejection_of(adapter: &AdapterProcess, message_id: &str) -> Line {
    adapter.wait_rejection_of(message_id, SHORT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_that_are_not_allowed_are_refused_and_change_nothing() {
    let system = System::builder()
        .adapters(&[CENTRE, HOPE, WELFARE])
        .start()
        .await;
    let (centre, hope, welfare) = (
        system.wire(CENTRE).await,
        system.wire(HOPE).await,
        system.wire(WELFARE).await,
    );
    let referral = ReferralBuilder::new(CENTRE, HOPE).build();
    let rid = referral.referral_id.clone();
    centre.send_referral(&referral).await;
    system
        .adapter(CENTRE)
        .wait_notified(&rid, "RECEIVED", SHORT)
        .await;

    // Completing a referral that was never accepted.
    let id = hope.update_status(&rid, v1::Status::Completed, "").await;
    let rejection = rejection_of(system.adapter(HOPE), &id).await;
    assert_eq!(
        rejection.code().as_deref(),
        Some("ILLEGAL_TRANSITION"),
        "{}",
        rejection.raw
    );
    assert_eq!(rejection.referral_id(), Some(rid.as_str()));
    // The sender may not accept its own referral.
    let id = centre.update_status(&rid, v1::Status::Accepted, "").await;
    let rejection = rejection_of(system.adapter(CENTRE), &id).await;
    assert_eq!(
        rejection.code().as_deref(),
        Some("NOT_A_PARTY"),
        "{}",
        rejection.raw
    );
    // A third agency learns nothing, not even that the referral exists: the same answer as
    // for an id nobody sent (as with status lookups).
    let id = welfare.update_status(&rid, v1::Status::Cancelled, "").await;
    let rejection = rejection_of(system.adapter(WELFARE), &id).await;
    assert_eq!(
        rejection.code().as_deref(),
        Some("UNKNOWN_REFERRAL"),
        "{}",
        rejection.raw
    );
    // An update for a referral nobody sent.
    let unknown = new_id();
    let id = hope.update_status(&unknown, v1::Status::Accepted, "").await;
    let rejection = rejection_of(system.adapter(HOPE), &id).await;
    assert_eq!(
        rejection.code().as_deref(),
        Some("UNKNOWN_REFERRAL"),
        "{}",
        rejection.raw
    );

    // Nothing changed.
    let reply = centre.query(&rid).await;
    assert_eq!(reply.state(), v1::ReferralState::Received);
    assert_eq!(reply.history.len(), 3, "{reply:?}");
    assert_eq!(
        system.adapter(CENTRE).notified_states(&rid),
        ["DELIVERED", "RECEIVED"]
    );
    // And the legal way still works afterwards.
    hope.update_status(&rid, v1::Status::Accepted, "").await;
    system
        .adapter(CENTRE)
        .wait_notified(&rid, "ACCEPTED", SHORT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_rejected_with_a_reason_and_good_ones_still_flow() {
    let mut system = System::builder().adapters(&[CENTRE, HOPE]).start().await;
    let centre = system.wire(CENTRE).await;
    let on_referral = subject::inbound(CENTRE, InKind::Referral);

    // A valid referral's envelope, to break in various ways.
    let referral = ReferralBuilder::new(CENTRE, HOPE).build();
    let good = centre.referral_envelope(&referral);
    let good_bytes = good.encode_to_vec();
    // Cut inside the first field (the 36-byte message id): not an envelope any more.
    let truncated_envelope = good_bytes[..12].to_vec();
    // A whole envelope whose payload is a Referral cut inside its first field.
    let mut truncated_payload = centre.referral_envelope(&referral);
    truncated_payload.payload.truncate(12);
    // Signed as sent, so that what is tested is the payload check, not the signature's.
    yeongye_tests::wire::sign(&mut truncated_payload);
    let status_on_referral_subject =
        centre.status_envelope(&referral.referral_id, v1::Status::Cancelled, "");
    let mut spoofed = centre.referral_envelope(&referral);
    spoofed.sender = HOPE.to_owned();
    let to_nobody = ReferralBuilder::new(CENTRE, "no-such-agency").build();
    let to_nobody_envelope = centre.referral_envelope(&to_nobody);

    struct Case {
        what: &'static str,
        subject: String,
        bytes: Vec<u8>,
        /// The envelope's message id, when the broker can read it.
        message_id: Option<String>,
        code: &'static str,
    }
    let cases = [
        Case {
            what: "garbage bytes",
            subject: on_referral.clone(),
            bytes: b"this is not protobuf \xff\xff\xff\xff".to_vec(),
            message_id: None,
            code: "MALFORMED_ENVELOPE",
        },
        Case {
            what: "a truncated envelope",
            subject: on_referral.clone(),
            bytes: truncated_envelope,
            message_id: None,
            code: "MALFORMED_ENVELOPE",
        },
        Case {
            what: "an empty message",
            subject: on_referral.clone(),
            bytes: Vec::new(),
            message_id: None,
            code: "MALFORMED_ENVELOPE",
        },
        Case {
            what: "a truncated referral payload",
            subject: on_referral.clone(),
            bytes: truncated_payload.encode_to_vec(),
            message_id: Some(truncated_payload.message_id.clone()),
            code: "MALFORMED_PAYLOAD",
        },
        Case {
            what: "a status update on the referral subject",
            subject: on_referral.clone(),
            bytes: status_on_referral_subject.encode_to_vec(),
            message_id: Some(status_on_referral_subject.message_id.clone()),
            code: "WRONG_PAYLOAD_TYPE",
        },
        Case {
            what: "another agency's name in the envelope",
            subject: on_referral.clone(),
            bytes: spoofed.encode_to_vec(),
            message_id: Some(spoofed.message_id.clone()),
            code: "SENDER_MISMATCH",
        },
        Case {
            what: "a referral to an unregistered agency",
            subject: on_referral.clone(),
            bytes: to_nobody_envelope.encode_to_vec(),
            message_id: Some(to_nobody_envelope.message_id.clone()),
            code: "UNKNOWN_RECIPIENT",
        },
        Case {
            what: "an unknown subject kind",
            subject: format!("yeongye.in.{CENTRE}.gossip"),
            bytes: envelope(CENTRE, v1::PayloadType::Referral, referral.encode_to_vec())
                .encode_to_vec(),
            message_id: None,
            code: "UNKNOWN_SUBJECT",
        },
    ];
    // One at a time, so that each rejection is known to answer its own message.
    for (i, case) in cases.iter().enumerate() {
        centre
            .publish(&case.subject, case.bytes.clone(), Some(&new_id()))
            .await;
        let adapter = system.adapter(CENTRE);
        adapter
            .wait_lines(
                &format!("rejection #{} ({})", i + 1, case.what),
                SHORT,
                |lines| lines.iter().filter(|l| l.kind() == "rejection").count() > i,
            )
            .await;
        let rejection = adapter.rejections().remove(i);
        assert_eq!(
            rejection.code().as_deref(),
            Some(case.code),
            "{}: {}",
            case.what,
            rejection.raw
        );
        if let Some(id) = &case.message_id {
            assert_eq!(
                adapter.rejected_message_id(&rejection).as_deref(),
                Some(id.as_str()),
                "{}: {}",
                case.what,
                rejection.raw
            );
        }
        assert!(
            system.broker.is_running(),
            "the broker died on {}",
            case.what
        );
    }
    // A referral to an unknown agency is kept as REFUSED.
    assert_eq!(
        centre.state(&to_nobody.referral_id).await,
        Some(v1::ReferralState::Refused)
    );
    // Nothing reached the recipient, and the sender's good referral still goes through.
    assert!(system.adapter(HOPE).lines_of("delivery").is_empty());
    centre.publish_envelope(InKind::Referral, &good).await;
    system
        .adapter(CENTRE)
        .wait_notified(&referral.referral_id, "RECEIVED", SHORT)
        .await;
    assert_eq!(system.adapter(HOPE).deliveries_of(&referral.referral_id), 1);
    assert_eq!(system.adapter(HOPE).lines_of("delivery").len(), 1);
    assert!(system.broker.is_running());
}
