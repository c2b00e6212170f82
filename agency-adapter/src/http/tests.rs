//! The handler layer end to end in-process: the real router, body parsing, problems, the
//! idempotency store and the queue on a temporary sled store, with a stub [`Backend`] that
//! records what would be published — so each bad input can be shown to send nothing.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use prost::Message as _;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tower::ServiceExt;
use yeongye_proto::v1;

use super::auth::TokenDigest;
use super::backend::Backend;
use super::idempotency::IdempotencyStore;
use super::problem::PROBLEM_JSON;
use super::queue::{Entry, FollowUp, Queue};
use super::worker::finish_all;
use super::{AppState, OPENAPI_JSON, router};
use crate::error::{Error, Result};
use crate::ids;
use crate::outbox::{OutboxStatus, Sent};
use crate::outgoing::Outgoing;
use crate::storage::Storage;

const TOKEN: &str = "test-token-0123456789";
const ME: &str = "cc-1";

#[derive(Clone, Default)]
struct Stub {
    sent: Arc<Mutex<Vec<Outgoing>>>,
    fail: Arc<AtomicBool>,
    /// Answer as an outbox at its bound.
    full: Arc<AtomicBool>,
    /// Answer as when the hub did not acknowledge in time.
    queue: Arc<AtomicBool>,
    status: Arc<Mutex<v1::StatusReply>>,
    consent: Arc<Mutex<v1::ConsentReply>>,
    sealing: crate::sealing::Sealing,
}

impl Backend for Stub {
    fn agency(&self) -> &str {
        ME
    }

    fn sealing(&self) -> &crate::sealing::Sealing {
        &self.sealing
    }

    async fn publish(&self, out: &Outgoing) -> Result<Sent> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(Error::Timeout {
                subject: out.subject().to_owned(),
                timeout: std::time::Duration::from_secs(1),
            });
        }
        if self.full.load(Ordering::SeqCst) {
            return Err(Error::OutboxFull {
                entries: 3,
                bytes: 300,
                max_entries: 3,
                max_bytes: 1000,
            });
        }
        self.sent.lock().unwrap().push(out.clone());
        if self.queue.load(Ordering::SeqCst) {
            return Ok(Sent::Queued);
        }
        Ok(Sent::Stored)
    }

    fn outbox_status(&self) -> Option<OutboxStatus> {
        None
    }

    fn is_queued(&self, _: &str) -> bool {
        false
    }

    async fn status(&self, _: &str) -> Result<v1::StatusReply> {
        Ok(self.status.lock().unwrap().clone())
    }

    async fn consent(&self, _: &str) -> Result<v1::ConsentReply> {
        Ok(self.consent.lock().unwrap().clone())
    }
}

struct Api {
    stub: Stub,
    app: axum::Router,
    queue: Queue,
    _dir: tempfile::TempDir,
}

impl Api {
    fn new() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::open(&dir.path().join("dedup"), 14).unwrap();
        let queue = Queue::open(&store);
        let stub = Stub::default();
        let state = AppState {
            backend: stub.clone(),
            idem: IdempotencyStore::open(&store),
            queue: queue.clone(),
            body_limit: 4096,
            wake: Arc::new(Notify::new()),
        };
        Api {
            app: router(state, TokenDigest::new(TOKEN)),
            stub,
            queue,
            _dir: dir,
        }
    }

    fn sent(&self) -> Vec<Outgoing> {
        self.stub.sent.lock().unwrap().clone()
    }

    async fn call(&self, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        if status.is_client_error() || status.is_server_error() {
            assert_eq!(headers[header::CONTENT_TYPE], PROBLEM_JSON, "{body}");
            assert_eq!(body["status"], status.as_u16(), "{body}");
            assert!(
                body["type"]
                    .as_str()
                    .unwrap()
                    .starts_with("urn:yeongye:problem:")
            );
        }
        (status, headers, body)
    }

    async fn post(
        &self,
        path: &str,
        body: &str,
        key: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut r = Request::post(path)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        self.call(r.body(Body::from(body.to_owned())).unwrap())
            .await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = Request::get(path)
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap();
        let (s, _, b) = self.call(r).await;
        (s, b)
    }
}

fn referral() -> Value {
    json!({
        "toAgency": "hope-support",
        "client": {"pseudonymId": "p-7f3a", "name": "홍길동"},
        "field": "FIELD_OF_NEED_HOUSING",
        "urgency": "URGENCY_CRISIS",
        "purpose": "PURPOSE_CASE_MANAGEMENT",
        "statutoryBasis": {"statute": "STATUTE_SOCIAL_SECURITY_BENEFITS_ACT", "justification": "위기가구 발굴"},
        "dataCategories": ["DATA_CATEGORY_IDENTITY"],
        "reason": "단전 3개월"
    })
}

#[tokio::test]
async fn sends_a_referral() {
    let api = Api::new();
    let (status, _, body) = api
        .post("/v1/referrals", &referral().to_string(), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let sent = api.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].subject(), "yeongye.in.cc-1.referral");
    assert_eq!(body["referral_id"], sent[0].referral_id());
    assert_eq!(body["message_id"], sent[0].message_id());
    let r = v1::Referral::decode(sent[0].envelope().payload.as_ref()).unwrap();
    assert_eq!(r.from_agency, ME);
    assert_eq!(r.client.unwrap().name, "홍길동");
}

#[tokio::test]
async fn auth_and_public_routes() {
    let api = Api::new();
    for auth in [None, Some("Bearer wrong-token-xxxxxxx"), Some(TOKEN)] {
        let mut r = Request::post("/v1/referrals").header(header::CONTENT_TYPE, "application/json");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION, a);
        }
        let (status, headers, body) = api
            .call(r.body(Body::from(referral().to_string())).unwrap())
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        assert_eq!(body["type"], "urn:yeongye:problem:unauthorized");
    }
    assert!(api.sent().is_empty());
    let (status, _, body) = api
        .call(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["openapi"], "3.1.0");
    let (status, _, _) = api
        .call(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = api
        .call(Request::get("/nowhere").body(Body::empty()).unwrap())
        .await;
    assert_eq!(
        (status, body["type"].as_str()),
        (StatusCode::NOT_FOUND, Some("urn:yeongye:problem:not-found"))
    );
    let r = Request::delete("/v1/referrals")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let (status, _, _) = api.call(r).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// Every bad input: its problem document, and nothing sent.
#[tokio::test]
async fn bad_input_gets_a_problem_and_sends_nothing() {
    let api = Api::new();
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = referral();
        f(&mut v);
        v.to_string()
    };
    let cases: Vec<(String, u16, &str, Option<&str>)> = vec![
        (
            r#"{"toAgency": "hope-support",}"#.into(),
            400,
            "malformed-json",
            None,
        ),
        (r#"{"toAgency": "hope"#.into(), 400, "malformed-json", None),
        (
            with(&|v| v["clientName"] = json!("홍길동")),
            422,
            "unknown-field",
            Some("clientName"),
        ),
        (
            with(&|v| v["client"]["ssn"] = json!("x")),
            422,
            "unknown-field",
            Some("client.ssn"),
        ),
        (
            with(&|v| v["toAgency"] = json!(5)),
            422,
            "wrong-type",
            Some("toAgency"),
        ),
        (
            with(&|v| v["dataCategories"] = json!("DATA_CATEGORY_IDENTITY")),
            422,
            "wrong-type",
            Some("dataCategories"),
        ),
        ("[]".into(), 422, "wrong-type", None),
        (
            with(&|v| v["urgency"] = json!("URGENCY_WHENEVER")),
            422,
            "invalid-field",
            Some("urgency"),
        ),
        (
            with(&|v| {
                v.as_object_mut().unwrap().remove("toAgency");
            }),
            422,
            "missing-field",
            Some("toAgency"),
        ),
        (
            with(&|v| {
                v.as_object_mut().unwrap().remove("client");
            }),
            422,
            "missing-field",
            Some("client.pseudonymId"),
        ),
        (
            with(&|v| {
                v.as_object_mut().unwrap().remove("purpose");
            }),
            422,
            "missing-field",
            Some("purpose"),
        ),
        (
            with(&|v| {
                v.as_object_mut().unwrap().remove("statutoryBasis");
            }),
            422,
            "missing-field",
            Some("legalBasis"),
        ),
        (
            with(&|v| v["statutoryBasis"]["justification"] = json!("")),
            422,
            "missing-field",
            Some("statutoryBasis.justification"),
        ),
        (
            with(&|v| v["toAgency"] = json!("Hope Support")),
            422,
            "invalid-field",
            Some("toAgency"),
        ),
        (
            with(&|v| v["toAgency"] = json!(ME)),
            422,
            "invalid-field",
            Some("toAgency"),
        ),
        (
            with(&|v| v["fromAgency"] = json!("someone-else")),
            422,
            "invalid-field",
            Some("fromAgency"),
        ),
        (
            with(&|v| v["referralId"] = json!("../etc")),
            422,
            "invalid-field",
            Some("referralId"),
        ),
        (
            with(&|v| v["client"]["phone"] = json!("010-1234-5678")),
            422,
            "invalid-field",
            Some("dataCategories"),
        ),
        (
            with(&|v| v["reason"] = json!("가".repeat(2000))),
            413,
            "payload-too-large",
            None,
        ),
        (String::new(), 400, "malformed-json", None),
    ];
    for (body, status, kind, field) in cases {
        let (got, _, problem) = api.post("/v1/referrals", &body, None).await;
        let shown = &body[..body.len().min(80)];
        assert_eq!(got.as_u16(), status, "{shown}: {problem}");
        assert_eq!(
            problem["type"],
            format!("urn:yeongye:problem:{kind}"),
            "{shown}: {problem}"
        );
        assert_eq!(problem["field"].as_str(), field, "{shown}: {problem}");
        // Details never echo personal data.
        let text = problem.to_string();
        assert!(!text.contains("홍길동") && !text.contains("5678"), "{text}");
    }
    // Wrong media type; a bad Idempotency-Key.
    let r = Request::post("/v1/referrals")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(referral().to_string()))
        .unwrap();
    let (status, _, problem) = api.call(r).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{problem}");
    let (status, _, problem) = api
        .post("/v1/referrals", &referral().to_string(), Some("has space"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["field"], "Idempotency-Key");
    assert!(api.sent().is_empty(), "bad input sent something");
}

#[tokio::test]
async fn idempotency_key_sends_once() {
    let api = Api::new();
    let body = referral().to_string();
    let (s1, h1, b1) = api.post("/v1/referrals", &body, Some("key-1")).await;
    let (s2, h2, b2) = api.post("/v1/referrals", &body, Some("key-1")).await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(b1, b2);
    assert!(h1.get("idempotent-replayed").is_none());
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(api.sent().len(), 1);
    // The same key with another body is refused; nothing more is sent.
    let other = referral().to_string().replace("단전 3개월", "단수");
    let (s3, _, problem) = api.post("/v1/referrals", &other, Some("key-1")).await;
    assert_eq!(s3, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        problem["type"],
        "urn:yeongye:problem:idempotency-key-reused"
    );
    assert_eq!(api.sent().len(), 1);

    // A publish that fails (503) and is retried with its key sends the same message.
    api.stub.fail.store(true, Ordering::SeqCst);
    let (s4, _, problem) = api.post("/v1/referrals", &body, Some("key-2")).await;
    assert_eq!(s4, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    api.stub.fail.store(false, Ordering::SeqCst);
    let (s5, _, b5) = api.post("/v1/referrals", &body, Some("key-2")).await;
    assert_eq!(s5, StatusCode::ACCEPTED);
    let sent = api.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(b5["message_id"], sent[1].message_id());
    assert_ne!(b5["referral_id"], b1["referral_id"]);
}

#[tokio::test]
async fn answers_say_stored_or_queued_and_a_full_outbox_is_a_503_problem() {
    let api = Api::new();
    let body = referral().to_string();
    let (s, _, b) = api.post("/v1/referrals", &body, None).await;
    assert_eq!(
        (s, &b["status"]),
        (StatusCode::ACCEPTED, &json!("stored")),
        "{b}"
    );
    api.stub.queue.store(true, Ordering::SeqCst);
    let (s, _, b) = api.post("/v1/referrals", &body, Some("k-q")).await;
    assert_eq!(
        (s, &b["status"]),
        (StatusCode::ACCEPTED, &json!("queued")),
        "{b}"
    );
    assert_eq!(b["message_id"], api.sent()[1].message_id());
    assert!(b["referral_id"].is_string());
    api.stub.queue.store(false, Ordering::SeqCst);
    api.stub.full.store(true, Ordering::SeqCst);
    let (s, _, problem) = api.post("/v1/referrals", &body, None).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(
        problem["type"], "urn:yeongye:problem:outbox-full",
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("outbox is full"),
        "{problem}"
    );
    assert_eq!(api.sent().len(), 2, "nothing more accepted");
}

#[tokio::test]
async fn status_updates() {
    let api = Api::new();
    let (s, _, b) = api
        .post(
            "/v1/referrals/r-1/status",
            r#"{"status": "STATUS_ACCEPTED", "note": "담당자 배정"}"#,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    assert_eq!(b["referral_id"], "r-1");
    let sent = api.sent();
    assert_eq!(sent[0].subject(), "yeongye.in.cc-1.status");
    let u = v1::StatusUpdate::decode(sent[0].envelope().payload.as_ref()).unwrap();
    assert_eq!(
        (u.status, u.referral_id.as_str()),
        (v1::Status::Accepted as i32, "r-1")
    );
    for (path, body, status, field) in [
        (
            "/v1/referrals/r-1/status",
            r#"{"status": "STATUS_MAYBE"}"#,
            422,
            Some("status"),
        ),
        (
            "/v1/referrals/r-1/status",
            r#"{"note": "x"}"#,
            422,
            Some("status"),
        ),
        (
            "/v1/referrals/r-1/status",
            r#"{"status": "STATUS_ACCEPTED", "referralId": "r-2"}"#,
            422,
            Some("referralId"),
        ),
        (
            "/v1/referrals/r-1/status",
            r#"{"status": "STATUS_ACCEPTED", "extra": 1}"#,
            422,
            Some("extra"),
        ),
        (
            "/v1/referrals/bad%20id/status",
            r#"{"status": "STATUS_ACCEPTED"}"#,
            400,
            Some("referral_id"),
        ),
    ] {
        let (s, _, p) = api.post(path, body, None).await;
        assert_eq!(s.as_u16(), status, "{body}: {p}");
        assert_eq!(p["field"].as_str(), field, "{body}: {p}");
    }
    assert_eq!(api.sent().len(), 1);
}

#[tokio::test]
async fn lookups() {
    let api = Api::new();
    *api.stub.status.lock().unwrap() = v1::StatusReply {
        referral_id: "r-1".into(),
        state: v1::ReferralState::Received as i32,
        receive_by_ms: 1_767_225_600_000,
        ..Default::default()
    };
    let (s, b) = api.get("/v1/referrals/r-1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["state"], "REFERRAL_STATE_RECEIVED");
    assert_eq!(b["receiveByMs"], "1767225600000");
    api.stub.status.lock().unwrap().error = Some(v1::Rejection {
        code: v1::ReasonCode::UnknownReferral as i32,
        detail: "unknown referral".into(),
        ..Default::default()
    });
    let (s, b) = api.get("/v1/referrals/r-1").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b["code"], "REASON_CODE_UNKNOWN_REFERRAL");
    let (s, b) = api.get("/v1/referrals/..").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");

    *api.stub.consent.lock().unwrap() = v1::ConsentReply {
        revoked: true,
        withdrawn_referral_ids: vec!["r-1".into()],
        purge_requested_referral_ids: vec!["r-1".into()],
        ..Default::default()
    };
    let (s, b) = api.get("/v1/consents/c-1").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["revoked"], true);
    api.stub.consent.lock().unwrap().error = Some(v1::Rejection {
        code: v1::ReasonCode::ConsentUnknown as i32,
        ..Default::default()
    });
    let (s, b) = api.get("/v1/consents/c-1").await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("REASON_CODE_CONSENT_UNKNOWN"))
    );
}

#[tokio::test]
async fn consents() {
    let api = Api::new();
    let grant = json!({
        "clientPseudonymId": "p-7f3a",
        "recipientAgencies": ["hope-support"],
        "purposes": ["PURPOSE_CASE_MANAGEMENT"],
        "dataCategories": ["DATA_CATEGORY_IDENTITY"],
        "formReference": "동의서-0042"
    });
    let (s, _, b) = api
        .post("/v1/consents", &grant.to_string(), Some("g-1"))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let consent_id = b["consent_id"].as_str().unwrap().to_owned();
    let sent = api.sent();
    let g = v1::ConsentGrant::decode(sent[0].envelope().payload.as_ref()).unwrap();
    assert_eq!(
        (g.consent_id.as_str(), g.collected_by.as_str()),
        (consent_id.as_str(), ME)
    );

    let mut bad = grant.clone();
    bad["collectedBy"] = json!("other-agency");
    let (s, _, p) = api.post("/v1/consents", &bad.to_string(), None).await;
    assert_eq!(
        (s.as_u16(), p["field"].as_str()),
        (422, Some("collectedBy"))
    );
    let mut bad = grant.clone();
    bad.as_object_mut().unwrap().remove("purposes");
    let (s, _, p) = api.post("/v1/consents", &bad.to_string(), None).await;
    assert_eq!(
        (s.as_u16(), p["type"].as_str()),
        (422, Some("urn:yeongye:problem:missing-field"))
    );

    // Revoke: with no body, with a time, with a mismatched id.
    let r = Request::post(format!("/v1/consents/{consent_id}/revoke"))
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let (s, _, b) = api.call(r).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let (s, _, _) = api
        .post(
            &format!("/v1/consents/{consent_id}/revoke"),
            r#"{"revokedAtMs": "1000"}"#,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let sent = api.sent();
    let r = v1::ConsentRevocation::decode(sent[2].envelope().payload.as_ref()).unwrap();
    assert_eq!((r.revoked_at_ms, r.recorded_by.as_str()), (1000, ME));
    let (s, _, p) = api
        .post(
            &format!("/v1/consents/{consent_id}/revoke"),
            r#"{"consentId": "other"}"#,
            None,
        )
        .await;
    assert_eq!((s.as_u16(), p["field"].as_str()), (422, Some("consentId")));
    assert_eq!(api.sent().len(), 3);
}

#[tokio::test]
async fn pull_inbox_and_follow_ups() {
    let api = Api::new();
    let delivery = Entry {
        kind: "delivery".into(),
        message_id: "m-1".into(),
        referral_id: Some("r-1".into()),
        queued_at_ms: 5,
        item: json!({"referralId": "r-1"}),
        follow_up: Some(FollowUp::Receipt {
            referral_id: "r-1".into(),
        }),
    };
    let withdrawal = Entry {
        kind: "withdrawal".into(),
        message_id: "m-2".into(),
        referral_id: Some("r-9".into()),
        queued_at_ms: 6,
        item: json!({"referralId": "r-9", "consentId": "c-1"}),
        follow_up: Some(FollowUp::PurgeConfirmation {
            referral_id: "r-9".into(),
            consent_id: "c-1".into(),
        }),
    };
    let note = Entry {
        kind: "notification".into(),
        message_id: "m-3".into(),
        follow_up: None,
        ..delivery.clone()
    };
    for e in [&delivery, &withdrawal, &note] {
        assert!(api.queue.enqueue(e).await.unwrap());
    }
    let (s, b) = api.get("/v1/inbox").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["pending"], 3);
    let kinds: Vec<_> = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["delivery", "withdrawal", "notification"]);
    assert_eq!(b["items"][0]["item"]["referralId"], "r-1");
    let (_, b) = api.get("/v1/inbox?limit=1").await;
    assert_eq!(b["items"].as_array().unwrap().len(), 1);
    let (s, _) = api.get("/v1/inbox?limit=0").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    for id in ["m-1", "m-2", "m-3"] {
        let (s, _, b) = api.post(&format!("/v1/inbox/{id}/ack"), "", None).await;
        assert_eq!(
            (s, b["already"].as_bool()),
            (StatusCode::OK, Some(false)),
            "{b}"
        );
    }
    let (s, _, b) = api.post("/v1/inbox/m-1/ack", "", None).await;
    assert_eq!((s, b["already"].as_bool()), (StatusCode::OK, Some(true)));
    let (s, _, _) = api.post("/v1/inbox/never/ack", "", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, b) = api.get("/v1/inbox").await;
    assert_eq!(b["pending"], 0);

    // Nothing is published until the worker finishes the taken items: the receipt and the
    // purge confirmation, under their derived ids.
    assert!(api.sent().is_empty());
    assert_eq!(finish_all(&api.stub, &api.queue).await.unwrap(), 2);
    let sent = api.sent();
    assert_eq!(sent[0].message_id(), ids::receipt_message_id("m-1"));
    assert_eq!(sent[0].subject(), "yeongye.in.cc-1.status");
    assert_eq!(sent[1].message_id(), ids::purge_message_id("m-2"));
    assert_eq!(sent[1].subject(), "yeongye.in.cc-1.purge");
    assert_eq!(finish_all(&api.stub, &api.queue).await.unwrap(), 0);
}

/// A status report on a referral whose delivery is still queued sends the receipt first.
#[tokio::test]
async fn status_report_sends_the_pending_receipt_first() {
    let api = Api::new();
    let delivery = Entry {
        kind: "delivery".into(),
        message_id: "m-1".into(),
        referral_id: Some("r-1".into()),
        queued_at_ms: 5,
        item: json!({"referralId": "r-1"}),
        follow_up: Some(FollowUp::Receipt {
            referral_id: "r-1".into(),
        }),
    };
    api.queue.enqueue(&delivery).await.unwrap();
    // Bad input does nothing, not even the receipt.
    let (s, _, _) = api
        .post("/v1/referrals/r-1/status", r#"{"status": 99}"#, None)
        .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(api.sent().is_empty());
    let (s, _, _) = api
        .post(
            "/v1/referrals/r-1/status",
            r#"{"status": "STATUS_ACCEPTED"}"#,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let sent = api.sent();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].message_id(), ids::receipt_message_id("m-1"));
    let u = v1::StatusUpdate::decode(sent[1].envelope().payload.as_ref()).unwrap();
    assert_eq!(u.status, v1::Status::Accepted as i32);
    assert_eq!(api.queue.pending_len(), 0);
}

#[test]
fn openapi_documents_every_route() {
    let doc: Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/openapi.json", "get"),
        ("/healthz", "get"),
        ("/metrics", "get"),
        ("/v1/referrals", "post"),
        ("/v1/referrals/{referral_id}", "get"),
        ("/v1/referrals/{referral_id}/status", "post"),
        ("/v1/consents", "post"),
        ("/v1/consents/{consent_id}", "get"),
        ("/v1/consents/{consent_id}/revoke", "post"),
        ("/v1/inbox", "get"),
        ("/v1/inbox/{message_id}/ack", "post"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} undocumented"
        );
    }
    let problem = &doc["components"]["schemas"]["Problem"]["properties"];
    for slug in [
        "malformed-json",
        "invalid-parameter",
        "unauthorized",
        "not-found",
        "method-not-allowed",
        "payload-too-large",
        "unsupported-media-type",
        "unknown-field",
        "wrong-type",
        "missing-field",
        "invalid-field",
        "idempotency-key-reused",
        "unavailable",
        "outbox-full",
        "internal",
    ] {
        let uri = format!("urn:yeongye:problem:{slug}");
        assert!(
            problem["type"]["enum"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v == &json!(uri)),
            "{uri} undocumented"
        );
    }
}
