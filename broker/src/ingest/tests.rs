//! Tests of reading inbound messages.
use super::*;

fn registry() -> Registry {
    Registry::from_toml(
        "[[agency]]\nid = \"a\"\nname = \"에이\"\nkind = \"k\"\n[[agency]]\nid = \"b\"\nname = \"비\"\nkind = \"k\"",
    )
    .unwrap()
}

fn limits() -> Limits<'static> {
    Limits::for_tests(&|_, _| (1000, 5000))
}

fn envelope(sender: &str, ty: v1::PayloadType, payload: Vec<u8>) -> Vec<u8> {
    v1::Envelope {
        message_id: "m-1".into(),
        sender: sender.into(),
        sent_at_ms: 1,
        payload_type: ty as i32,
        payload,
        ..Default::default()
    }
    .encode_to_vec()
}

fn referral() -> v1::Referral {
    v1::Referral {
        referral_id: "r-1".into(),
        from_agency: "a".into(),
        to_agency: "b".into(),
        client: Some(v1::Client {
            pseudonym_id: "p1".into(),
            ..Default::default()
        }),
        field: v1::FieldOfNeed::Livelihood as i32,
        urgency: v1::Urgency::Crisis as i32,
        purpose: v1::Purpose::CaseManagement as i32,
        legal_basis: Some(v1::referral::LegalBasis::StatutoryBasis(
            v1::StatutoryBasis {
                statute: v1::Statute::SocialSecurityBenefitsAct as i32,
                justification: "crisis household".into(),
            },
        )),
        ..Default::default()
    }
}

fn code(i: &Inbound) -> Option<ReasonCode> {
    match &i.request {
        Request::Reject(r) | Request::Refuse(_, r) => Some(r.code),
        _ => None,
    }
}

fn read_ref(r: v1::Referral) -> Inbound {
    let bytes = envelope("a", v1::PayloadType::Referral, r.encode_to_vec());
    read(
        "yeongye.in.a.referral",
        &bytes,
        9,
        100,
        &registry(),
        &limits(),
    )
}

#[test]
fn a_good_referral_is_submitted_with_the_default_deadline() {
    let i = read_ref(referral());
    assert_eq!(i.origin.dedup_key, "a/m-1");
    let Request::Submit(n) = i.request else {
        panic!("{:?}", i.request)
    };
    assert_eq!(
        (n.id.as_str(), n.to.as_str(), n.receive_by),
        ("r-1", "b", 1100)
    );
}

#[test]
fn garbage_and_truncation_are_answered() {
    let reg = registry();
    let garbage = read(
        "yeongye.in.a.referral",
        b"\xff\xfe garbage",
        3,
        0,
        &reg,
        &limits(),
    );
    assert_eq!(code(&garbage), Some(ReasonCode::MalformedEnvelope));
    assert_eq!(garbage.origin.reply_to.as_deref(), Some("a"));
    assert_eq!(garbage.origin.dedup_key, "seq:3");
    let good = envelope("a", v1::PayloadType::Referral, referral().encode_to_vec());
    for cut in 1..good.len() {
        let i = read(
            "yeongye.in.a.referral",
            &good[..cut],
            3,
            100,
            &reg,
            &limits(),
        );
        assert!(code(&i).is_some(), "a truncation at {cut} was accepted");
    }
    let mut inner = envelope("a", v1::PayloadType::Referral, vec![0x0a, 0x50, 0x01]);
    inner.truncate(inner.len());
    assert_eq!(
        code(&read(
            "yeongye.in.a.referral",
            &inner,
            3,
            100,
            &reg,
            &limits()
        )),
        Some(ReasonCode::MalformedPayload)
    );
}

#[test]
fn each_envelope_check_has_its_code() {
    let reg = registry();
    let r = referral().encode_to_vec();
    let cases = [
        (
            "yeongye.in.zz.referral",
            envelope("zz", v1::PayloadType::Referral, r.clone()),
            ReasonCode::UnknownSender,
        ),
        (
            "yeongye.in.a.bogus",
            envelope("a", v1::PayloadType::Referral, r.clone()),
            ReasonCode::UnknownSubject,
        ),
        (
            "yeongye.in.a.referral",
            envelope("b", v1::PayloadType::Referral, r.clone()),
            ReasonCode::SenderMismatch,
        ),
        (
            "yeongye.in.a.status",
            envelope("a", v1::PayloadType::Referral, r.clone()),
            ReasonCode::WrongPayloadType,
        ),
        (
            "yeongye.in.a.referral",
            vec![0u8; 70_000],
            ReasonCode::TooLarge,
        ),
    ];
    for (subject, bytes, want) in cases {
        let i = read(subject, &bytes, 1, 100, &reg, &limits());
        assert_eq!(code(&i), Some(want), "{subject}");
    }
    let unknown = read("yeongye.in.zz.referral", b"x", 1, 0, &reg, &limits());
    assert_eq!(
        unknown.origin.reply_to, None,
        "an unregistered agency gets no answer"
    );
}

#[test]
fn each_referral_check_has_its_code() {
    type Mutation = fn(&mut v1::Referral);
    let cases: Vec<(Mutation, ReasonCode)> = vec![
        (|r| r.referral_id = String::new(), ReasonCode::InvalidField),
        (|r| r.referral_id = "a.b".into(), ReasonCode::InvalidField),
        (|r| r.from_agency = "b".into(), ReasonCode::SenderMismatch),
        (
            |r| r.to_agency = "nobody".into(),
            ReasonCode::UnknownRecipient,
        ),
        (|r| r.to_agency = "a".into(), ReasonCode::InvalidField),
        (|r| r.urgency = 0, ReasonCode::InvalidField),
        (|r| r.urgency = 77, ReasonCode::InvalidField),
        (|r| r.client = None, ReasonCode::InvalidField),
        (|r| r.field = 0, ReasonCode::InvalidField),
        (|r| r.receive_by_ms = 50, ReasonCode::InvalidField),
        (|r| r.receive_by_ms = i64::MAX, ReasonCode::InvalidField),
    ];
    for (mutate, want) in cases {
        let mut r = referral();
        mutate(&mut r);
        assert_eq!(code(&read_ref(r.clone())), Some(want), "{r:?}");
    }
    // Unknown recipient is recorded (REFUSED), not just rejected.
    let mut r = referral();
    r.to_agency = "nobody".into();
    assert!(matches!(read_ref(r).request, Request::Refuse(..)));
}

#[test]
fn status_updates() {
    let reg = registry();
    let upd = |status: i32, note: String| {
        let p = v1::StatusUpdate {
            referral_id: "r-1".into(),
            status,
            note,
            ..Default::default()
        }
        .encode_to_vec();
        read(
            "yeongye.in.b.status",
            &envelope("b", v1::PayloadType::StatusUpdate, p),
            1,
            0,
            &reg,
            &limits(),
        )
    };
    assert!(matches!(
        upd(2, "ok".into()).request,
        Request::Status {
            status: Status::Accepted,
            ..
        }
    ));
    assert_eq!(code(&upd(0, String::new())), Some(ReasonCode::InvalidField));
    assert_eq!(
        code(&upd(42, String::new())),
        Some(ReasonCode::InvalidField)
    );
    assert_eq!(
        code(&upd(2, "가".repeat(MAX_NOTE_CHARS + 1))),
        Some(ReasonCode::InvalidField)
    );
}

mod authenticity {
    use proptest::prelude::*;
    use yeongye_proto::signing::PrivateKey;

    use super::*;

    fn signed_registry(key: &PrivateKey, not_after_ms: i64) -> Registry {
        Registry::from_toml(&format!(
            "[[agency]]\nid = \"a\"\nname = \"에이\"\nkind = \"k\"\n\
             [[agency.keys]]\nid = \"{}\"\npublic_key = \"{}\"\nnot_after_ms = {not_after_ms}\n\
             [[agency]]\nid = \"b\"\nname = \"비\"\nkind = \"k\"\n",
            key.id,
            key.public_b64()
        ))
        .unwrap()
    }

    fn strict() -> Limits<'static> {
        Limits {
            max_message_bytes: 64 * 1024,
            deadlines: &|_, _| (1000, 5000),
            require_signatures: true,
            max_skew_ms: 300_000,
            max_age_ms: 86_400_000,
            accept_plaintext: true,
        }
    }

    fn signed(key: &PrivateKey, sent_at: i64, tamper: impl FnOnce(&mut v1::Envelope)) -> Vec<u8> {
        let mut e = v1::Envelope {
            message_id: "m-1".into(),
            sender: "a".into(),
            sent_at_ms: sent_at,
            payload_type: v1::PayloadType::Referral as i32,
            payload: referral().encode_to_vec(),
            ..Default::default()
        };
        key.sign(&mut e);
        tamper(&mut e);
        e.encode_to_vec()
    }

    const NOW: i64 = 1_800_000_000_000;

    fn read_at(reg: &Registry, bytes: &[u8], now: i64) -> Inbound {
        read("yeongye.in.a.referral", bytes, 1, now, reg, &strict())
    }

    #[test]
    fn each_authenticity_check_has_its_code() {
        let key = PrivateKey::generate("a-1").unwrap();
        let other = PrivateKey::generate("a-1").unwrap();
        let reg = signed_registry(&key, 0);
        assert!(matches!(
            read_at(&reg, &signed(&key, NOW, |_| {}), NOW).request,
            Request::Submit(_)
        ));
        let cases: Vec<(Vec<u8>, ReasonCode)> = vec![
            (
                signed(&key, NOW, |e| e.signature.clear()),
                ReasonCode::SignatureMissing,
            ),
            (
                signed(&key, NOW, |e| e.payload[3] ^= 1),
                ReasonCode::SignatureInvalid,
            ),
            (signed(&other, NOW, |_| {}), ReasonCode::SignatureInvalid),
            (
                signed(&key, NOW, |e| e.key_id = "a-9".into()),
                ReasonCode::SignatureUnknownKey,
            ),
            (
                signed(&key, NOW, |e| e.signature.truncate(10)),
                ReasonCode::SignatureInvalid,
            ),
            (
                signed(&key, NOW + 600_000, |_| {}),
                ReasonCode::TimestampSkew,
            ),
            (
                signed(&key, NOW - 2 * 86_400_000, |_| {}),
                ReasonCode::TimestampSkew,
            ),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            assert_eq!(code(&read_at(&reg, &bytes, NOW)), Some(want), "case {i}");
        }
    }

    #[test]
    fn a_rotated_out_key_holds_until_its_cutoff_only() {
        let old = PrivateKey::generate("a-1").unwrap();
        let reg = signed_registry(&old, NOW + 1000);
        let msg = |at| signed(&old, at, |_| {});
        assert!(matches!(
            read_at(&reg, &msg(NOW + 1000), NOW + 1000).request,
            Request::Submit(_)
        ));
        assert_eq!(
            code(&read_at(&reg, &msg(NOW + 1001), NOW + 1001)),
            Some(ReasonCode::SignatureKeyExpired)
        );
    }

    /// What a refused message leaves behind for logs, rejections and dead letters.
    fn left_behind(i: &Inbound) -> String {
        match &i.request {
            Request::Reject(r) => format!("{:?} {r:?}", i.origin),
            // A refused referral is stored (and audited) as well: its recipient counts too.
            Request::Refuse(new, r) => format!("{:?} {r:?} to={}", i.origin, new.to),
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Text from the wire reaches a detail, an origin (and so a log or a dead letter) only once
    /// it is well-formed: a hostile agency cannot write personal data into the broker's logs.
    #[test]
    fn nothing_off_the_wire_is_echoed_unless_well_formed() {
        const PD: &str = "Hong Gildong 010-1234-5678";
        let key = PrivateKey::generate("a-1").unwrap();
        let reg = signed_registry(&key, 0);
        let i = read_at(&reg, &signed(&key, NOW, |e| e.key_id = PD.into()), NOW);
        assert_eq!(code(&i), Some(ReasonCode::SignatureUnknownKey));
        let shown = left_behind(&i);
        assert!(
            !shown.contains("Gildong") && shown.contains("not well-formed"),
            "{shown}"
        );
        let i = read_at(&reg, &signed(&key, NOW, |e| e.key_id = "a-9".into()), NOW);
        assert!(left_behind(&i).contains("a-9"), "a well-formed id is named");

        let unsigned = |message_id: &str, ty: v1::PayloadType, payload: Vec<u8>| {
            v1::Envelope {
                message_id: message_id.into(),
                sender: "a".into(),
                sent_at_ms: 1,
                payload_type: ty as i32,
                payload,
                ..Default::default()
            }
            .encode_to_vec()
        };
        let grant = |recipient: &str| v1::ConsentGrant {
            consent_id: "c-1".into(),
            client_pseudonym_id: "p1".into(),
            collected_by: "a".into(),
            recipient_agencies: vec![recipient.into()],
            purposes: vec![v1::Purpose::CaseManagement as i32],
            data_categories: vec![v1::DataCategory::Identity as i32],
            form_reference: "F-1".into(),
            ..Default::default()
        };
        let hostile_referral = |tamper: fn(&mut v1::Referral)| {
            let mut r = referral();
            tamper(&mut r);
            unsigned("m-1", v1::PayloadType::Referral, r.encode_to_vec())
        };
        let cases: Vec<(&str, Vec<u8>, ReasonCode)> = vec![
            (
                "yeongye.in.a.consent",
                unsigned(
                    "m-1",
                    v1::PayloadType::ConsentGrant,
                    grant(PD).encode_to_vec(),
                ),
                ReasonCode::UnknownRecipient,
            ),
            (
                "yeongye.in.a.Hong Gildong 010-1234-5678",
                unsigned("m-1", v1::PayloadType::Referral, referral().encode_to_vec()),
                ReasonCode::UnknownSubject,
            ),
            (
                "yeongye.in.a.referral",
                unsigned(PD, v1::PayloadType::Referral, referral().encode_to_vec()),
                ReasonCode::MalformedEnvelope,
            ),
            (
                "yeongye.in.a.referral",
                hostile_referral(|r| r.referral_id = PD.into()),
                ReasonCode::InvalidField,
            ),
            (
                "yeongye.in.a.referral",
                hostile_referral(|r| {
                    r.legal_basis = Some(v1::referral::LegalBasis::ConsentId(PD.into()))
                }),
                ReasonCode::InvalidField,
            ),
            (
                "yeongye.in.a.referral",
                hostile_referral(|r| r.to_agency = PD.into()),
                ReasonCode::UnknownRecipient,
            ),
            (
                "yeongye.in.a.referral",
                hostile_referral(|r| r.from_agency = PD.into()),
                ReasonCode::SenderMismatch,
            ),
        ];
        for (subject, bytes, want) in cases {
            let i = read(subject, &bytes, 1, NOW, &reg, &limits());
            assert_eq!(code(&i), Some(want), "{subject}");
            let shown = left_behind(&i);
            assert!(!shown.contains("Gildong"), "{shown}");
        }
        let i = read(
            "yeongye.in.a.consent",
            &unsigned(
                "m-1",
                v1::PayloadType::ConsentGrant,
                grant("zz-9").encode_to_vec(),
            ),
            1,
            NOW,
            &reg,
            &limits(),
        );
        assert!(
            left_behind(&i).contains("zz-9"),
            "a well-formed agency id is named"
        );
        assert_eq!(
            shown_subject("yeongye.in.a.referral"),
            "yeongye.in.a.referral"
        );
        assert!(!shown_subject("yeongye.in.Hong.x").contains("Hong"));
    }

    proptest! {
        /// Whatever bytes arrive, reading never panics and anything refused has a reason; the
        /// same for an envelope whose payload is random.
        #[test]
        fn random_bytes_get_a_reason_never_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), ty in 0i32..20) {
            let key = PrivateKey::generate("a-1").unwrap();
            let reg = signed_registry(&key, 0);
            for subject in ["yeongye.in.a.referral", "yeongye.in.a.status", "yeongye.in.a.consent", "yeongye.in.a.purge", "yeongye.in.a"] {
                let i = read(subject, &bytes, 1, NOW, &reg, &strict());
                if let Request::Reject(r) = &i.request {
                    prop_assert!(r.code != ReasonCode::Unspecified);
                }
                let mut e = v1::Envelope { message_id: "m".into(), sender: "a".into(), sent_at_ms: NOW, payload_type: ty, payload: bytes.clone(), ..Default::default() };
                key.sign(&mut e);
                let i = read(subject, &e.encode_to_vec(), 1, NOW, &reg, &strict());
                if let Request::Reject(r) | Request::Refuse(_, r) = &i.request {
                    prop_assert!(r.code != ReasonCode::Unspecified);
                }
            }
        }
    }
}

mod sealed {
    use super::*;

    /// The referral sealed to b's (test) key: personal fields inside, metadata in clear.
    fn sealed_referral() -> v1::Referral {
        let key = yeongye_proto::seal::PrivateKey::derive(
            "b-seal-1",
            b"b's test sealing key material...",
        );
        let mut r = referral();
        r.reason = "생계 곤란".into();
        r.client.as_mut().unwrap().name = "홍길동".into();
        r.data_categories = vec![v1::DataCategory::Identity as i32];
        seal::seal_referral(&mut r, &key.public()).unwrap();
        r
    }

    fn read_with(r: v1::Referral, accept_plaintext: bool) -> Inbound {
        let bytes = envelope("a", v1::PayloadType::Referral, r.encode_to_vec());
        let deadlines = |_, _| (1000, 5000);
        let mut limits = Limits::for_tests(&deadlines);
        limits.accept_plaintext = accept_plaintext;
        read(
            "yeongye.in.a.referral",
            &bytes,
            9,
            100,
            &registry(),
            &limits,
        )
    }

    #[test]
    fn a_sealed_referral_is_submitted_and_the_broker_keeps_no_personal_field() {
        let i = read_with(sealed_referral(), false);
        let Request::Submit(n) = &i.request else {
            panic!("{:?}", i.request)
        };
        // A statutory basis's justification is inside the seal: not required in clear.
        assert!(
            matches!(&n.basis, Basis::Statute { justification, .. } if justification.is_empty())
        );
        assert_eq!(n.client, "p1");
    }

    #[test]
    fn a_plaintext_referral_is_refused_unless_the_broker_accepts_plaintext() {
        assert_eq!(
            code(&read_with(referral(), false)),
            Some(ReasonCode::PlaintextRefused)
        );
        assert!(matches!(
            read_with(referral(), true).request,
            Request::Submit(_)
        ));
        // Accepted in clear, the implied categories are still the broker's to check.
        let mut named = referral();
        named.client.as_mut().unwrap().name = "홍길동".into();
        assert_eq!(
            code(&read_with(named, true)),
            Some(ReasonCode::InvalidField)
        );
    }

    #[test]
    fn a_sealed_referral_with_personal_data_in_clear_or_a_bad_seal_is_refused() {
        let mut cases: Vec<(&str, v1::Referral)> = Vec::new();
        let mut r = sealed_referral();
        r.client.as_mut().unwrap().phone = "010-1111-2222".into();
        cases.push(("a phone in clear", r));
        let mut r = sealed_referral();
        r.reason = "사유".into();
        cases.push(("a reason in clear", r));
        let mut r = sealed_referral();
        if let Some(v1::referral::LegalBasis::StatutoryBasis(b)) = &mut r.legal_basis {
            b.justification = "근거".into();
        }
        cases.push(("a justification in clear", r));
        let mut r = sealed_referral();
        r.sealed.as_mut().unwrap().enc.pop();
        cases.push(("a short enc", r));
        let mut r = sealed_referral();
        r.sealed.as_mut().unwrap().ciphertext.truncate(3);
        cases.push(("a short ciphertext", r));
        let mut r = sealed_referral();
        r.sealed.as_mut().unwrap().key_id = "b/../../etc".into();
        cases.push(("a hostile key id", r));
        for (what, r) in cases {
            let i = read_with(r, true);
            assert_eq!(code(&i), Some(ReasonCode::SealedMalformed), "{what}");
            let Request::Refuse(_, refusal) = &i.request else {
                panic!("{what}: {:?}", i.request)
            };
            for leaked in ["010-1111-2222", "사유", "근거", "etc"] {
                assert!(
                    !refusal.detail.contains(leaked),
                    "{what}: {}",
                    refusal.detail
                );
            }
        }
    }

    fn status(u: v1::StatusUpdate) -> Inbound {
        let bytes = envelope("b", v1::PayloadType::StatusUpdate, u.encode_to_vec());
        read(
            "yeongye.in.b.status",
            &bytes,
            9,
            100,
            &registry(),
            &limits(),
        )
    }

    #[test]
    fn a_sealed_note_is_carried_as_it_came_and_a_bad_one_is_rejected() {
        let key = yeongye_proto::seal::PrivateKey::derive(
            "a-seal-1",
            b"a's test sealing key material...",
        );
        let aad = seal::note_aad("r-1", "b", "a", v1::Status::Declined as i32, "a-seal-1");
        let sealed = seal::seal(&key.public(), &aad, "정신건강 사례로 등록".as_bytes()).unwrap();
        let update = v1::StatusUpdate {
            referral_id: "r-1".into(),
            status: v1::Status::Declined as i32,
            sealed_note: Some(sealed.clone()),
            reason: ReasonCode::SealedCategoryNotDeclared as i32,
            ..Default::default()
        };
        let Request::Status {
            sealed_note,
            reason,
            note,
            ..
        } = status(update.clone()).request
        else {
            panic!("not a status")
        };
        assert_eq!(sealed_note, sealed.encode_to_vec());
        assert_eq!(reason, ReasonCode::SealedCategoryNotDeclared as i32);
        assert!(note.is_empty());

        let mut both = update.clone();
        both.note = "in clear too".into();
        assert_eq!(code(&status(both)), Some(ReasonCode::SealedMalformed));
        let mut short = update.clone();
        short.sealed_note.as_mut().unwrap().enc.clear();
        assert_eq!(code(&status(short)), Some(ReasonCode::SealedMalformed));
        let mut long = update.clone();
        long.sealed_note.as_mut().unwrap().ciphertext = vec![0; MAX_SEALED_NOTE_BYTES + 1];
        assert_eq!(code(&status(long)), Some(ReasonCode::InvalidField));
        let mut unknown = update;
        unknown.reason = 9999;
        assert_eq!(code(&status(unknown)), Some(ReasonCode::InvalidField));
    }

    /// A refused message with client data in clear leaves no copy where plaintext is refused,
    /// whatever it is refused for (here: an unregistered recipient, checked before privacy).
    #[test]
    fn a_message_with_client_data_in_clear_is_marked_to_leave_no_copy() {
        let mut named = referral();
        named.to_agency = "nobody".into();
        named.client.as_mut().unwrap().name = "홍길동".into();
        let bytes = envelope("a", v1::PayloadType::Referral, named.encode_to_vec());
        assert!(holds_clear_personal_data(&bytes));
        let i = read_with(named.clone(), false);
        assert_eq!(code(&i), Some(ReasonCode::UnknownRecipient));
        assert!(i.origin.clear_personal_data);
        // Accepted in clear (a migration): kept like any referral, for a replay.
        assert!(!read_with(named, true).origin.clear_personal_data);
        // Sealed, or not a referral: nothing personal in clear.
        let sealed = envelope(
            "a",
            v1::PayloadType::Referral,
            sealed_referral().encode_to_vec(),
        );
        assert!(!holds_clear_personal_data(&sealed));
        assert!(!holds_clear_personal_data(b"garbage"));
    }
}
