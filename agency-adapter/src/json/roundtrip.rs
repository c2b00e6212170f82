//! JSON <-> protobuf round trips for every message type of `yeongye.v1`, fully populated: the
//! proto3 JSON mapping (pbjson) and the protobuf encoding carry the same message, and the
//! HTTP API's OpenAPI document names every field the adapter can write.

#![allow(clippy::unwrap_used)]

use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use yeongye_proto::v1;

/// JSON -> message -> protobuf -> message -> JSON, checking each step; returns the JSON.
fn round_trip<T>(message: &T) -> Value
where
    T: Message + Default + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned,
{
    let json = serde_json::to_value(message).unwrap();
    let from_json: T = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(&from_json, message, "JSON round trip");
    let bytes = from_json.encode_to_vec();
    let from_bytes = T::decode(bytes.as_slice()).unwrap();
    assert_eq!(&from_bytes, message, "protobuf round trip");
    assert_eq!(serde_json::to_value(&from_bytes).unwrap(), json);
    // The pretty rendering the inbox folder and CLI use parses back too.
    let pretty = crate::json::to_pretty_json(message).unwrap();
    assert_eq!(&serde_json::from_slice::<T>(&pretty).unwrap(), message);
    json
}

fn client() -> v1::Client {
    v1::Client {
        pseudonym_id: "p-7f3a".into(),
        name: "홍길동".into(),
        birth_date: "1950-01-02".into(),
        phone: "010-1234-5678".into(),
        address: "서울시 어딘가 1".into(),
        household: "1인 가구".into(),
    }
}

fn referral(basis: v1::referral::LegalBasis) -> v1::Referral {
    v1::Referral {
        referral_id: "r-1".into(),
        from_agency: "cc-1".into(),
        to_agency: "hope-support".into(),
        client: Some(client()),
        field: v1::FieldOfNeed::Housing as i32,
        urgency: v1::Urgency::Crisis as i32,
        reason: "단전 3개월".into(),
        legal_basis: Some(basis),
        data_categories: vec![
            v1::DataCategory::Identity as i32,
            v1::DataCategory::Contact as i32,
            v1::DataCategory::Household as i32,
        ],
        receive_by_ms: 1_767_225_600_000,
        parent_referral_id: "r-0".into(),
        purpose: v1::Purpose::CaseManagement as i32,
        ..Default::default()
    }
}

fn rejection() -> v1::Rejection {
    v1::Rejection {
        rejected_message_id: "m-0".into(),
        code: v1::ReasonCode::ConsentCategoryNotCovered as i32,
        detail: "DATA_CATEGORY_HEALTH is not covered".into(),
        referral_id: "r-1".into(),
        subject: "yeongye.in.cc-1.referral".into(),
    }
}

fn grant() -> v1::ConsentGrant {
    v1::ConsentGrant {
        consent_id: "c-1".into(),
        client_pseudonym_id: "p-7f3a".into(),
        collected_by: "cc-1".into(),
        recipient_agencies: vec!["hope-support".into()],
        recipient_kinds: vec!["mental_health_centre".into()],
        purposes: vec![
            v1::Purpose::CaseManagement as i32,
            v1::Purpose::CrisisResponse as i32,
        ],
        data_categories: vec![v1::DataCategory::Identity as i32],
        valid_from_ms: 1,
        valid_until_ms: 2,
        form_reference: "동의서-0042".into(),
    }
}

/// Every message type, with the name of its OpenAPI schema where the API uses it.
fn every_message() -> Vec<(Option<&'static str>, Value)> {
    let consent_ref = referral(v1::referral::LegalBasis::ConsentId("c-1".into()));
    let statute_ref = referral(v1::referral::LegalBasis::StatutoryBasis(
        v1::StatutoryBasis {
            statute: v1::Statute::ChildWelfareAct as i32,
            justification: "아동학대 의심".into(),
        },
    ));
    let envelope = v1::Envelope {
        message_id: "m-1".into(),
        sender: "cc-1".into(),
        sent_at_ms: 42,
        payload_type: v1::PayloadType::Referral as i32,
        payload: consent_ref.encode_to_vec(),
        signature: vec![1, 2, 3],
        key_id: "k-1".into(),
    };
    let history = v1::HistoryEntry {
        state: v1::ReferralState::Received as i32,
        by_agency: "hope-support".into(),
        at_ms: 5,
        note: "ok".into(),
        cause_message_id: "m-2".into(),
        ..Default::default()
    };
    vec![
        (None, round_trip(&envelope)),
        (Some("Client"), round_trip(&client())),
        (Some("Referral"), round_trip(&consent_ref)),
        (Some("Referral"), round_trip(&statute_ref)),
        (
            Some("StatusUpdate"),
            round_trip(&v1::StatusUpdate {
                referral_id: "r-1".into(),
                status: v1::Status::InProgress as i32,
                note: "가정 방문".into(),
                ..Default::default()
            }),
        ),
        (
            None,
            round_trip(&v1::StatusQuery {
                referral_id: "r-1".into(),
            }),
        ),
        (Some("HistoryEntry"), round_trip(&history)),
        (
            Some("StatusReply"),
            round_trip(&v1::StatusReply {
                referral_id: "r-1".into(),
                state: v1::ReferralState::Received as i32,
                from_agency: "cc-1".into(),
                to_agency: "hope-support".into(),
                history: vec![history.clone()],
                receive_by_ms: 9,
                error: Some(rejection()),
                legal_basis: "consent:c-1".into(),
            }),
        ),
        (
            None,
            round_trip(&v1::Delivery {
                referral_id: "r-1".into(),
                original: Some(envelope.clone()),
            }),
        ),
        (
            Some("Notification"),
            round_trip(&v1::Notification {
                referral_id: "r-1".into(),
                state: v1::ReferralState::Accepted as i32,
                previous: v1::ReferralState::Received as i32,
                by_agency: "hope-support".into(),
                at_ms: 7,
                note: "담당자 배정".into(),
                from_agency: "cc-1".into(),
                to_agency: "hope-support".into(),
                legal_basis: "statute:STATUTE_CHILD_WELFARE_ACT".into(),
                ..Default::default()
            }),
        ),
        (
            Some("Escalation"),
            round_trip(&v1::Escalation {
                referral_id: "r-1".into(),
                kind: v1::DeadlineKind::Acceptance as i32,
                due_at_ms: 8,
                from_agency: "cc-1".into(),
                to_agency: "hope-support".into(),
                state: v1::ReferralState::Received as i32,
            }),
        ),
        (Some("Rejection"), round_trip(&rejection())),
        (Some("ConsentGrant"), round_trip(&grant())),
        (
            Some("ConsentRevocation"),
            round_trip(&v1::ConsentRevocation {
                consent_id: "c-1".into(),
                revoked_at_ms: 3,
                recorded_by: "cc-1".into(),
            }),
        ),
        (
            Some("Withdrawal"),
            round_trip(&v1::Withdrawal {
                referral_id: "r-1".into(),
                consent_id: "c-1".into(),
                client_pseudonym_id: "p-7f3a".into(),
                at_ms: 4,
            }),
        ),
        (
            None,
            round_trip(&v1::PurgeConfirmation {
                referral_id: "r-1".into(),
                consent_id: "c-1".into(),
            }),
        ),
        (
            None,
            round_trip(&v1::ConsentQuery {
                consent_id: "c-1".into(),
            }),
        ),
        (
            Some("PendingPurge"),
            round_trip(&v1::PendingPurge {
                referral_id: "r-1".into(),
                agency: "hope-support".into(),
            }),
        ),
        (
            Some("ConsentReply"),
            round_trip(&v1::ConsentReply {
                grant: Some(grant()),
                revoked: true,
                revoked_at_ms: 3,
                withdrawn_referral_ids: vec!["r-1".into()],
                purge_requested_referral_ids: vec!["r-1".into()],
                pending_purges: vec![v1::PendingPurge {
                    referral_id: "r-1".into(),
                    agency: "hope-support".into(),
                }],
                error: Some(rejection()),
            }),
        ),
    ]
}

#[test]
fn every_message_type_round_trips() {
    let all = every_message();
    assert_eq!(all.len(), 19);
    // Spot checks of the mapping: camelCase names, enum names, int64 as strings, bytes as
    // base64.
    let referral = &all[2].1;
    assert_eq!(referral["toAgency"], "hope-support");
    assert_eq!(referral["urgency"], "URGENCY_CRISIS");
    assert_eq!(referral["receiveByMs"], "1767225600000");
    assert_eq!(referral["consentId"], "c-1");
    assert_eq!(
        all[3].1["statutoryBasis"]["statute"],
        "STATUTE_CHILD_WELFARE_ACT"
    );
    assert_eq!(all[0].1["signature"], "AQID");
}

#[test]
fn snake_case_and_numbers_are_accepted() {
    let r: v1::Referral = serde_json::from_str(
        r#"{"to_agency": "x", "urgency": 3, "receive_by_ms": 5, "data_categories": [1, "DATA_CATEGORY_CONTACT"]}"#,
    )
    .unwrap();
    assert_eq!(r.urgency, v1::Urgency::Crisis as i32);
    assert_eq!(r.receive_by_ms, 5);
    assert_eq!(r.data_categories, vec![1, 2]);
}

/// The OpenAPI document's schemas name every field the adapter writes, so responses conform.
#[test]
fn openapi_schemas_cover_every_field() {
    let doc: Value = serde_json::from_str(crate::http::OPENAPI_JSON).unwrap();
    let schemas = &doc["components"]["schemas"];
    for (name, json) in every_message() {
        let Some(name) = name else { continue };
        let props = schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {name}"));
        for key in json.as_object().unwrap().keys() {
            assert!(props.contains_key(key), "schema {name} lacks {key}");
        }
    }
    // Enums list every value this build knows.
    let urgencies = schemas["Urgency"]["enum"].as_array().unwrap();
    assert!(urgencies.iter().any(|v| v == "URGENCY_CRISIS"));
    let codes = schemas["ReasonCode"]["enum"].as_array().unwrap();
    for code in 0..64 {
        if let Ok(c) = v1::ReasonCode::try_from(code) {
            assert!(
                codes.iter().any(|v| v == c.as_str_name()),
                "{}",
                c.as_str_name()
            );
        }
    }
}
