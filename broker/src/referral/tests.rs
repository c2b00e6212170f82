//! Exhaustive tests of the state machine.
//!
//! - `transition_table`: every (state × event) pair, one line each, snapshotted with
//!   `expect-test` (`UPDATE_EXPECT=1 cargo test -p yeongye-broker referral` regenerates it; read
//!   the diff against the table in `docs/PROTOCOL.md`, "Status updates", before keeping it).
//! - `submit_*`, `refuse_*`: the initial effects of a new referral.
//! - the `proptest!` block: invariants over random event sequences from a submitted referral.
//!
//! Everything goes through [`check`] and [`render`], so a change in the API touches two functions,
//! not every test.

use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::*;

const SENDER: &str = "hope-support";
const RECIPIENT: &str = "mental-health";
const STRANGER: &str = "cc-saebit";
const PARTIES: [&str; 3] = [SENDER, RECIPIENT, STRANGER];

/// An arbitrary fixed "now" for the submission; the machine never reads a clock.
const T0: Millis = 1_700_000_000_000;
/// The receipt deadline of the test referral, relative to `T0`.
const RECEIPT_AFTER: Millis = 3_600_000;
/// How long the recipient has to accept or decline once it has the referral.
const ACCEPT_WITHIN: Millis = 86_400_000;
/// The note every table status update carries (checked to land in the history).
const NOTE: &str = "a note";

fn new_referral() -> NewReferral {
    NewReferral {
        id: "0190f0e4-0000-7000-8000-000000000001".to_owned(),
        from: SENDER.to_owned(),
        from_kind: "community_service_centre".to_owned(),
        to: RECIPIENT.to_owned(),
        to_kind: "mental_health_centre".to_owned(),
        client: "client-1".to_owned(),
        basis: crate::consent::Basis::Consent("consent-1".to_owned()),
        purpose: 1,
        categories: vec![1, 2],
        urgency: Urgency::Crisis,
        receive_by: T0 + RECEIPT_AFTER,
        accept_within: ACCEPT_WITHIN,
        envelope: vec![1, 2, 3],
    }
}

/// When the test referral was RECEIVED, in the situations that are past it.
const RECEIVED_AT: Millis = T0 + 1;

/// A referral that is in `state` (with a plausible history ending in it and, from RECEIVED on,
/// its acceptance deadline set), and `overdue` if asked.
fn referral_in(state: State, overdue: bool) -> Referral {
    let mut referral = submit(new_referral(), "m-submit", T0).referral;
    if state != State::Submitted {
        referral.state = state;
        referral.history.push(HistoryEntry {
            state,
            by: BROKER.to_owned(),
            at: RECEIVED_AT,
            note: String::new(),
            cause: "m-setup".to_owned(),
            sealed_note: Vec::new(),
            reason: 0,
        });
    }
    if !matches!(state, State::Submitted | State::Delivered) {
        referral.accept_by = RECEIVED_AT + ACCEPT_WITHIN;
    }
    referral.overdue = overdue;
    referral
}

/// The situations the table covers: every state, and RECEIVED once more with its acceptance
/// deadline already passed (the only state in which `overdue` can be set).
fn situations() -> Vec<(State, bool)> {
    let mut all: Vec<(State, bool)> = State::ALL.iter().map(|&s| (s, false)).collect();
    let received = all
        .iter()
        .position(|&(s, _)| s == State::Received)
        .expect("RECEIVED is a state");
    all.insert(received + 1, (State::Received, true));
    all
}

fn show(state: State, overdue: bool) -> String {
    if overdue {
        format!("{state}(overdue)")
    } else {
        state.to_string()
    }
}

/// Every event the machine knows: the broker's, and each status from each kind of party.
fn all_events() -> Vec<Event> {
    let mut events = vec![
        Event::DeliveryConfirmed,
        Event::DeadlinePassed(DeadlineKind::Receipt),
        Event::DeadlinePassed(DeadlineKind::Acceptance),
        Event::ConsentRevoked,
    ];
    for status in Status::ALL {
        for by in PARTIES {
            events.push(Event::Status {
                by: by.to_owned(),
                status,
                note: NOTE.to_owned(),
            });
        }
    }
    events
}

/// How the table names an agency: by its role in the test referral.
fn role(agency: &str) -> &str {
    match agency {
        SENDER => "sender",
        RECIPIENT => "recipient",
        STRANGER => "stranger",
        BROKER => "broker",
        other => other,
    }
}

fn status_name(status: Status) -> &'static str {
    match status {
        Status::Received => "RECEIVED",
        Status::Accepted => "ACCEPTED",
        Status::Declined => "DECLINED",
        Status::InProgress => "IN_PROGRESS",
        Status::Completed => "COMPLETED",
        Status::Cancelled => "CANCELLED",
    }
}

fn render_event(event: &Event) -> String {
    match event {
        Event::DeliveryConfirmed => "delivery confirmed".to_owned(),
        Event::DeadlinePassed(kind) => format!("{} deadline passed", kind.as_str()),
        Event::Status { by, status, .. } => format!("{} says {}", role(by), status_name(*status)),
        Event::ConsentRevoked => "consent revoked".to_owned(),
    }
}

fn render_effects(effects: &[Effect]) -> String {
    let effects: Vec<String> = effects
        .iter()
        .map(|effect| match effect {
            Effect::Deliver { to } => format!("deliver({})", role(to)),
            // `previous` is checked against the source state by `render`, not printed.
            Effect::Notify { to, .. } => format!("notify({})", role(to)),
            Effect::Schedule { kind, at } => format!("schedule({} @T0+{})", kind.as_str(), at - T0),
            Effect::Unschedule { kind, at } => {
                format!("unschedule({} @T0+{})", kind.as_str(), at - T0)
            }
            Effect::Escalate { kind, due } => {
                format!("escalate({} due @T0+{})", kind.as_str(), due - T0)
            }
            Effect::Withdraw { to } => format!("withdraw({})", role(to)),
        })
        .collect();
    format!("[{}]", effects.join(", "))
}

/// Renders a new referral's transition (from [`submit`] or [`refuse`]) as one line.
fn render_new(t: &Transition) -> String {
    let entry = &t.referral.history[0];
    assert_eq!(
        t.referral.history.len(),
        1,
        "a new referral has one history entry"
    );
    assert_eq!(entry.state, t.referral.state);
    let note = if entry.note.is_empty() {
        String::new()
    } else {
        format!(" note={:?}", entry.note)
    };
    format!(
        "-> {} by {}{note} {}",
        t.referral.state,
        role(&entry.by),
        render_effects(&t.effects)
    )
}

/// Applies `event` to a referral in `from` and renders the outcome as one line:
/// `FROM + EVENT -> TO by WHO [effects]` or `FROM + EVENT -> error CODE`. Checks on the way what
/// the line does not show: the history entry's time, cause and note, each effect's `previous`,
/// and that an error's details match the input.
fn render(from: State, overdue: bool, event: &Event) -> String {
    let referral = referral_in(from, overdue);
    let now = T0 + 10_000;
    let head = format!("{} + {}", show(from, overdue), render_event(event));
    match apply(&referral, event, "m-event", now) {
        Ok(t) => {
            let entry = t.referral.history.last().expect("history is never empty");
            assert_eq!(
                t.referral.history.len(),
                referral.history.len() + 1,
                "{head}"
            );
            assert_eq!(entry.state, t.referral.state, "{head}");
            assert_eq!(entry.at, now, "{head}");
            assert_eq!(entry.cause, "m-event", "{head}");
            for effect in &t.effects {
                if let Effect::Notify { previous, .. } = effect {
                    assert_eq!(*previous, from, "{head}: notify's previous state");
                }
            }
            let note = match event {
                Event::Status { note, .. } => {
                    assert_eq!(&entry.note, note, "{head}: the update's note is kept");
                    String::new()
                }
                _ if entry.note.is_empty() => String::new(),
                _ => format!(" note={:?}", entry.note),
            };
            format!(
                "{head} -> {} by {}{note} {}",
                show(t.referral.state, t.referral.overdue),
                role(&entry.by),
                render_effects(&t.effects)
            )
        }
        Err(err) => {
            let code = match &err {
                TransitionError::Terminal { state } => {
                    assert_eq!(*state, from, "{head}");
                    "TERMINAL_STATE"
                }
                TransitionError::Illegal { from: f, status: s } => {
                    assert_eq!(*f, from, "{head}");
                    assert!(matches!(event, Event::Status { status, .. } if status == s));
                    "ILLEGAL_TRANSITION"
                }
                TransitionError::NotAParty { agency, status: s } => {
                    assert!(
                        matches!(event, Event::Status { by, status, .. } if by == agency && status == s)
                    );
                    "NOT_A_PARTY"
                }
                TransitionError::Superseded { state } => {
                    assert_eq!(*state, from, "{head}");
                    "superseded (dropped)"
                }
                TransitionError::NotReplayable { .. } => {
                    panic!("{head}: only resubmit refuses a replay, not apply: {err}")
                }
            };
            format!("{head} -> error {code}")
        }
    }
}

/// The one helper the table tests go through: every situation (state, overdue) × every event,
/// one line each, against the snapshot.
fn check(situations: &[(State, bool)], events: &[Event], expect: Expect) {
    let mut table = String::new();
    for &(state, overdue) in situations {
        for event in events {
            table.push_str(&render(state, overdue, event));
            table.push('\n');
        }
    }
    expect.assert_eq(&table);
}

#[test]
fn transition_table() {
    check(
        &situations(),
        &all_events(),
        expect![[r#"
            SUBMITTED + delivery confirmed -> DELIVERED by broker [notify(sender)]
            SUBMITTED + receipt deadline passed -> EXPIRED by broker note="not received by the deadline" [notify(sender), notify(recipient), escalate(receipt due @T0+3600000)]
            SUBMITTED + acceptance deadline passed -> error superseded (dropped)
            SUBMITTED + consent revoked -> WITHDRAWN by broker note="consent revoked" [notify(sender), unschedule(receipt @T0+3600000), withdraw(recipient)]
            SUBMITTED + sender says RECEIVED -> error NOT_A_PARTY
            SUBMITTED + recipient says RECEIVED -> RECEIVED by recipient [notify(sender), unschedule(receipt @T0+3600000), schedule(acceptance @T0+86410000)]
            SUBMITTED + stranger says RECEIVED -> error NOT_A_PARTY
            SUBMITTED + sender says ACCEPTED -> error NOT_A_PARTY
            SUBMITTED + recipient says ACCEPTED -> error ILLEGAL_TRANSITION
            SUBMITTED + stranger says ACCEPTED -> error NOT_A_PARTY
            SUBMITTED + sender says DECLINED -> error NOT_A_PARTY
            SUBMITTED + recipient says DECLINED -> error ILLEGAL_TRANSITION
            SUBMITTED + stranger says DECLINED -> error NOT_A_PARTY
            SUBMITTED + sender says IN_PROGRESS -> error NOT_A_PARTY
            SUBMITTED + recipient says IN_PROGRESS -> error ILLEGAL_TRANSITION
            SUBMITTED + stranger says IN_PROGRESS -> error NOT_A_PARTY
            SUBMITTED + sender says COMPLETED -> error NOT_A_PARTY
            SUBMITTED + recipient says COMPLETED -> error ILLEGAL_TRANSITION
            SUBMITTED + stranger says COMPLETED -> error NOT_A_PARTY
            SUBMITTED + sender says CANCELLED -> CANCELLED by sender [notify(sender), notify(recipient), unschedule(receipt @T0+3600000)]
            SUBMITTED + recipient says CANCELLED -> error NOT_A_PARTY
            SUBMITTED + stranger says CANCELLED -> error NOT_A_PARTY
            DELIVERED + delivery confirmed -> error superseded (dropped)
            DELIVERED + receipt deadline passed -> EXPIRED by broker note="not received by the deadline" [notify(sender), notify(recipient), escalate(receipt due @T0+3600000)]
            DELIVERED + acceptance deadline passed -> error superseded (dropped)
            DELIVERED + consent revoked -> WITHDRAWN by broker note="consent revoked" [notify(sender), unschedule(receipt @T0+3600000), withdraw(recipient)]
            DELIVERED + sender says RECEIVED -> error NOT_A_PARTY
            DELIVERED + recipient says RECEIVED -> RECEIVED by recipient [notify(sender), unschedule(receipt @T0+3600000), schedule(acceptance @T0+86410000)]
            DELIVERED + stranger says RECEIVED -> error NOT_A_PARTY
            DELIVERED + sender says ACCEPTED -> error NOT_A_PARTY
            DELIVERED + recipient says ACCEPTED -> error ILLEGAL_TRANSITION
            DELIVERED + stranger says ACCEPTED -> error NOT_A_PARTY
            DELIVERED + sender says DECLINED -> error NOT_A_PARTY
            DELIVERED + recipient says DECLINED -> error ILLEGAL_TRANSITION
            DELIVERED + stranger says DECLINED -> error NOT_A_PARTY
            DELIVERED + sender says IN_PROGRESS -> error NOT_A_PARTY
            DELIVERED + recipient says IN_PROGRESS -> error ILLEGAL_TRANSITION
            DELIVERED + stranger says IN_PROGRESS -> error NOT_A_PARTY
            DELIVERED + sender says COMPLETED -> error NOT_A_PARTY
            DELIVERED + recipient says COMPLETED -> error ILLEGAL_TRANSITION
            DELIVERED + stranger says COMPLETED -> error NOT_A_PARTY
            DELIVERED + sender says CANCELLED -> CANCELLED by sender [notify(sender), notify(recipient), unschedule(receipt @T0+3600000)]
            DELIVERED + recipient says CANCELLED -> error NOT_A_PARTY
            DELIVERED + stranger says CANCELLED -> error NOT_A_PARTY
            RECEIVED + delivery confirmed -> error superseded (dropped)
            RECEIVED + receipt deadline passed -> error superseded (dropped)
            RECEIVED + acceptance deadline passed -> RECEIVED(overdue) by broker note="not accepted or declined by the deadline: escalated" [escalate(acceptance due @T0+86400001)]
            RECEIVED + consent revoked -> WITHDRAWN by broker note="consent revoked" [notify(sender), unschedule(acceptance @T0+86400001), withdraw(recipient)]
            RECEIVED + sender says RECEIVED -> error NOT_A_PARTY
            RECEIVED + recipient says RECEIVED -> error ILLEGAL_TRANSITION
            RECEIVED + stranger says RECEIVED -> error NOT_A_PARTY
            RECEIVED + sender says ACCEPTED -> error NOT_A_PARTY
            RECEIVED + recipient says ACCEPTED -> ACCEPTED by recipient [notify(sender), unschedule(acceptance @T0+86400001)]
            RECEIVED + stranger says ACCEPTED -> error NOT_A_PARTY
            RECEIVED + sender says DECLINED -> error NOT_A_PARTY
            RECEIVED + recipient says DECLINED -> DECLINED by recipient [notify(sender), unschedule(acceptance @T0+86400001)]
            RECEIVED + stranger says DECLINED -> error NOT_A_PARTY
            RECEIVED + sender says IN_PROGRESS -> error NOT_A_PARTY
            RECEIVED + recipient says IN_PROGRESS -> error ILLEGAL_TRANSITION
            RECEIVED + stranger says IN_PROGRESS -> error NOT_A_PARTY
            RECEIVED + sender says COMPLETED -> error NOT_A_PARTY
            RECEIVED + recipient says COMPLETED -> error ILLEGAL_TRANSITION
            RECEIVED + stranger says COMPLETED -> error NOT_A_PARTY
            RECEIVED + sender says CANCELLED -> CANCELLED by sender [notify(sender), notify(recipient), unschedule(acceptance @T0+86400001)]
            RECEIVED + recipient says CANCELLED -> error NOT_A_PARTY
            RECEIVED + stranger says CANCELLED -> error NOT_A_PARTY
            RECEIVED(overdue) + delivery confirmed -> error superseded (dropped)
            RECEIVED(overdue) + receipt deadline passed -> error superseded (dropped)
            RECEIVED(overdue) + acceptance deadline passed -> error superseded (dropped)
            RECEIVED(overdue) + consent revoked -> WITHDRAWN by broker note="consent revoked" [notify(sender), unschedule(acceptance @T0+86400001), withdraw(recipient)]
            RECEIVED(overdue) + sender says RECEIVED -> error NOT_A_PARTY
            RECEIVED(overdue) + recipient says RECEIVED -> error ILLEGAL_TRANSITION
            RECEIVED(overdue) + stranger says RECEIVED -> error NOT_A_PARTY
            RECEIVED(overdue) + sender says ACCEPTED -> error NOT_A_PARTY
            RECEIVED(overdue) + recipient says ACCEPTED -> ACCEPTED by recipient [notify(sender), unschedule(acceptance @T0+86400001)]
            RECEIVED(overdue) + stranger says ACCEPTED -> error NOT_A_PARTY
            RECEIVED(overdue) + sender says DECLINED -> error NOT_A_PARTY
            RECEIVED(overdue) + recipient says DECLINED -> DECLINED by recipient [notify(sender), unschedule(acceptance @T0+86400001)]
            RECEIVED(overdue) + stranger says DECLINED -> error NOT_A_PARTY
            RECEIVED(overdue) + sender says IN_PROGRESS -> error NOT_A_PARTY
            RECEIVED(overdue) + recipient says IN_PROGRESS -> error ILLEGAL_TRANSITION
            RECEIVED(overdue) + stranger says IN_PROGRESS -> error NOT_A_PARTY
            RECEIVED(overdue) + sender says COMPLETED -> error NOT_A_PARTY
            RECEIVED(overdue) + recipient says COMPLETED -> error ILLEGAL_TRANSITION
            RECEIVED(overdue) + stranger says COMPLETED -> error NOT_A_PARTY
            RECEIVED(overdue) + sender says CANCELLED -> CANCELLED by sender [notify(sender), notify(recipient), unschedule(acceptance @T0+86400001)]
            RECEIVED(overdue) + recipient says CANCELLED -> error NOT_A_PARTY
            RECEIVED(overdue) + stranger says CANCELLED -> error NOT_A_PARTY
            ACCEPTED + delivery confirmed -> error superseded (dropped)
            ACCEPTED + receipt deadline passed -> error superseded (dropped)
            ACCEPTED + acceptance deadline passed -> error superseded (dropped)
            ACCEPTED + consent revoked -> WITHDRAWN by broker note="consent revoked" [notify(sender), withdraw(recipient)]
            ACCEPTED + sender says RECEIVED -> error NOT_A_PARTY
            ACCEPTED + recipient says RECEIVED -> error ILLEGAL_TRANSITION
            ACCEPTED + stranger says RECEIVED -> error NOT_A_PARTY
            ACCEPTED + sender says ACCEPTED -> error NOT_A_PARTY
            ACCEPTED + recipient says ACCEPTED -> error ILLEGAL_TRANSITION
            ACCEPTED + stranger says ACCEPTED -> error NOT_A_PARTY
            ACCEPTED + sender says DECLINED -> error NOT_A_PARTY
            ACCEPTED + recipient says DECLINED -> error ILLEGAL_TRANSITION
            ACCEPTED + stranger says DECLINED -> error NOT_A_PARTY
            ACCEPTED + sender says IN_PROGRESS -> error NOT_A_PARTY
            ACCEPTED + recipient says IN_PROGRESS -> IN_PROGRESS by recipient [notify(sender)]
            ACCEPTED + stranger says IN_PROGRESS -> error NOT_A_PARTY
            ACCEPTED + sender says COMPLETED -> error NOT_A_PARTY
            ACCEPTED + recipient says COMPLETED -> COMPLETED by recipient [notify(sender)]
            ACCEPTED + stranger says COMPLETED -> error NOT_A_PARTY
            ACCEPTED + sender says CANCELLED -> CANCELLED by sender [notify(sender), notify(recipient)]
            ACCEPTED + recipient says CANCELLED -> error NOT_A_PARTY
            ACCEPTED + stranger says CANCELLED -> error NOT_A_PARTY
            IN_PROGRESS + delivery confirmed -> error superseded (dropped)
            IN_PROGRESS + receipt deadline passed -> error superseded (dropped)
            IN_PROGRESS + acceptance deadline passed -> error superseded (dropped)
            IN_PROGRESS + consent revoked -> WITHDRAWN by broker note="consent revoked" [notify(sender), withdraw(recipient)]
            IN_PROGRESS + sender says RECEIVED -> error NOT_A_PARTY
            IN_PROGRESS + recipient says RECEIVED -> error ILLEGAL_TRANSITION
            IN_PROGRESS + stranger says RECEIVED -> error NOT_A_PARTY
            IN_PROGRESS + sender says ACCEPTED -> error NOT_A_PARTY
            IN_PROGRESS + recipient says ACCEPTED -> error ILLEGAL_TRANSITION
            IN_PROGRESS + stranger says ACCEPTED -> error NOT_A_PARTY
            IN_PROGRESS + sender says DECLINED -> error NOT_A_PARTY
            IN_PROGRESS + recipient says DECLINED -> error ILLEGAL_TRANSITION
            IN_PROGRESS + stranger says DECLINED -> error NOT_A_PARTY
            IN_PROGRESS + sender says IN_PROGRESS -> error NOT_A_PARTY
            IN_PROGRESS + recipient says IN_PROGRESS -> error ILLEGAL_TRANSITION
            IN_PROGRESS + stranger says IN_PROGRESS -> error NOT_A_PARTY
            IN_PROGRESS + sender says COMPLETED -> error NOT_A_PARTY
            IN_PROGRESS + recipient says COMPLETED -> COMPLETED by recipient [notify(sender)]
            IN_PROGRESS + stranger says COMPLETED -> error NOT_A_PARTY
            IN_PROGRESS + sender says CANCELLED -> CANCELLED by sender [notify(sender), notify(recipient)]
            IN_PROGRESS + recipient says CANCELLED -> error NOT_A_PARTY
            IN_PROGRESS + stranger says CANCELLED -> error NOT_A_PARTY
            COMPLETED + delivery confirmed -> error TERMINAL_STATE
            COMPLETED + receipt deadline passed -> error TERMINAL_STATE
            COMPLETED + acceptance deadline passed -> error TERMINAL_STATE
            COMPLETED + consent revoked -> error TERMINAL_STATE
            COMPLETED + sender says RECEIVED -> error TERMINAL_STATE
            COMPLETED + recipient says RECEIVED -> error TERMINAL_STATE
            COMPLETED + stranger says RECEIVED -> error TERMINAL_STATE
            COMPLETED + sender says ACCEPTED -> error TERMINAL_STATE
            COMPLETED + recipient says ACCEPTED -> error TERMINAL_STATE
            COMPLETED + stranger says ACCEPTED -> error TERMINAL_STATE
            COMPLETED + sender says DECLINED -> error TERMINAL_STATE
            COMPLETED + recipient says DECLINED -> error TERMINAL_STATE
            COMPLETED + stranger says DECLINED -> error TERMINAL_STATE
            COMPLETED + sender says IN_PROGRESS -> error TERMINAL_STATE
            COMPLETED + recipient says IN_PROGRESS -> error TERMINAL_STATE
            COMPLETED + stranger says IN_PROGRESS -> error TERMINAL_STATE
            COMPLETED + sender says COMPLETED -> error TERMINAL_STATE
            COMPLETED + recipient says COMPLETED -> error TERMINAL_STATE
            COMPLETED + stranger says COMPLETED -> error TERMINAL_STATE
            COMPLETED + sender says CANCELLED -> error TERMINAL_STATE
            COMPLETED + recipient says CANCELLED -> error TERMINAL_STATE
            COMPLETED + stranger says CANCELLED -> error TERMINAL_STATE
            DECLINED + delivery confirmed -> error TERMINAL_STATE
            DECLINED + receipt deadline passed -> error TERMINAL_STATE
            DECLINED + acceptance deadline passed -> error TERMINAL_STATE
            DECLINED + consent revoked -> error TERMINAL_STATE
            DECLINED + sender says RECEIVED -> error TERMINAL_STATE
            DECLINED + recipient says RECEIVED -> error TERMINAL_STATE
            DECLINED + stranger says RECEIVED -> error TERMINAL_STATE
            DECLINED + sender says ACCEPTED -> error TERMINAL_STATE
            DECLINED + recipient says ACCEPTED -> error TERMINAL_STATE
            DECLINED + stranger says ACCEPTED -> error TERMINAL_STATE
            DECLINED + sender says DECLINED -> error TERMINAL_STATE
            DECLINED + recipient says DECLINED -> error TERMINAL_STATE
            DECLINED + stranger says DECLINED -> error TERMINAL_STATE
            DECLINED + sender says IN_PROGRESS -> error TERMINAL_STATE
            DECLINED + recipient says IN_PROGRESS -> error TERMINAL_STATE
            DECLINED + stranger says IN_PROGRESS -> error TERMINAL_STATE
            DECLINED + sender says COMPLETED -> error TERMINAL_STATE
            DECLINED + recipient says COMPLETED -> error TERMINAL_STATE
            DECLINED + stranger says COMPLETED -> error TERMINAL_STATE
            DECLINED + sender says CANCELLED -> error TERMINAL_STATE
            DECLINED + recipient says CANCELLED -> error TERMINAL_STATE
            DECLINED + stranger says CANCELLED -> error TERMINAL_STATE
            CANCELLED + delivery confirmed -> error TERMINAL_STATE
            CANCELLED + receipt deadline passed -> error TERMINAL_STATE
            CANCELLED + acceptance deadline passed -> error TERMINAL_STATE
            CANCELLED + consent revoked -> error TERMINAL_STATE
            CANCELLED + sender says RECEIVED -> error TERMINAL_STATE
            CANCELLED + recipient says RECEIVED -> error TERMINAL_STATE
            CANCELLED + stranger says RECEIVED -> error TERMINAL_STATE
            CANCELLED + sender says ACCEPTED -> error TERMINAL_STATE
            CANCELLED + recipient says ACCEPTED -> error TERMINAL_STATE
            CANCELLED + stranger says ACCEPTED -> error TERMINAL_STATE
            CANCELLED + sender says DECLINED -> error TERMINAL_STATE
            CANCELLED + recipient says DECLINED -> error TERMINAL_STATE
            CANCELLED + stranger says DECLINED -> error TERMINAL_STATE
            CANCELLED + sender says IN_PROGRESS -> error TERMINAL_STATE
            CANCELLED + recipient says IN_PROGRESS -> error TERMINAL_STATE
            CANCELLED + stranger says IN_PROGRESS -> error TERMINAL_STATE
            CANCELLED + sender says COMPLETED -> error TERMINAL_STATE
            CANCELLED + recipient says COMPLETED -> error TERMINAL_STATE
            CANCELLED + stranger says COMPLETED -> error TERMINAL_STATE
            CANCELLED + sender says CANCELLED -> error TERMINAL_STATE
            CANCELLED + recipient says CANCELLED -> error TERMINAL_STATE
            CANCELLED + stranger says CANCELLED -> error TERMINAL_STATE
            EXPIRED + delivery confirmed -> error TERMINAL_STATE
            EXPIRED + receipt deadline passed -> error TERMINAL_STATE
            EXPIRED + acceptance deadline passed -> error TERMINAL_STATE
            EXPIRED + consent revoked -> error TERMINAL_STATE
            EXPIRED + sender says RECEIVED -> error TERMINAL_STATE
            EXPIRED + recipient says RECEIVED -> error TERMINAL_STATE
            EXPIRED + stranger says RECEIVED -> error TERMINAL_STATE
            EXPIRED + sender says ACCEPTED -> error TERMINAL_STATE
            EXPIRED + recipient says ACCEPTED -> error TERMINAL_STATE
            EXPIRED + stranger says ACCEPTED -> error TERMINAL_STATE
            EXPIRED + sender says DECLINED -> error TERMINAL_STATE
            EXPIRED + recipient says DECLINED -> error TERMINAL_STATE
            EXPIRED + stranger says DECLINED -> error TERMINAL_STATE
            EXPIRED + sender says IN_PROGRESS -> error TERMINAL_STATE
            EXPIRED + recipient says IN_PROGRESS -> error TERMINAL_STATE
            EXPIRED + stranger says IN_PROGRESS -> error TERMINAL_STATE
            EXPIRED + sender says COMPLETED -> error TERMINAL_STATE
            EXPIRED + recipient says COMPLETED -> error TERMINAL_STATE
            EXPIRED + stranger says COMPLETED -> error TERMINAL_STATE
            EXPIRED + sender says CANCELLED -> error TERMINAL_STATE
            EXPIRED + recipient says CANCELLED -> error TERMINAL_STATE
            EXPIRED + stranger says CANCELLED -> error TERMINAL_STATE
            REFUSED + delivery confirmed -> error TERMINAL_STATE
            REFUSED + receipt deadline passed -> error TERMINAL_STATE
            REFUSED + acceptance deadline passed -> error TERMINAL_STATE
            REFUSED + consent revoked -> error TERMINAL_STATE
            REFUSED + sender says RECEIVED -> error TERMINAL_STATE
            REFUSED + recipient says RECEIVED -> error TERMINAL_STATE
            REFUSED + stranger says RECEIVED -> error TERMINAL_STATE
            REFUSED + sender says ACCEPTED -> error TERMINAL_STATE
            REFUSED + recipient says ACCEPTED -> error TERMINAL_STATE
            REFUSED + stranger says ACCEPTED -> error TERMINAL_STATE
            REFUSED + sender says DECLINED -> error TERMINAL_STATE
            REFUSED + recipient says DECLINED -> error TERMINAL_STATE
            REFUSED + stranger says DECLINED -> error TERMINAL_STATE
            REFUSED + sender says IN_PROGRESS -> error TERMINAL_STATE
            REFUSED + recipient says IN_PROGRESS -> error TERMINAL_STATE
            REFUSED + stranger says IN_PROGRESS -> error TERMINAL_STATE
            REFUSED + sender says COMPLETED -> error TERMINAL_STATE
            REFUSED + recipient says COMPLETED -> error TERMINAL_STATE
            REFUSED + stranger says COMPLETED -> error TERMINAL_STATE
            REFUSED + sender says CANCELLED -> error TERMINAL_STATE
            REFUSED + recipient says CANCELLED -> error TERMINAL_STATE
            REFUSED + stranger says CANCELLED -> error TERMINAL_STATE
            WITHDRAWN + delivery confirmed -> error TERMINAL_STATE
            WITHDRAWN + receipt deadline passed -> error TERMINAL_STATE
            WITHDRAWN + acceptance deadline passed -> error TERMINAL_STATE
            WITHDRAWN + consent revoked -> error TERMINAL_STATE
            WITHDRAWN + sender says RECEIVED -> error TERMINAL_STATE
            WITHDRAWN + recipient says RECEIVED -> error TERMINAL_STATE
            WITHDRAWN + stranger says RECEIVED -> error TERMINAL_STATE
            WITHDRAWN + sender says ACCEPTED -> error TERMINAL_STATE
            WITHDRAWN + recipient says ACCEPTED -> error TERMINAL_STATE
            WITHDRAWN + stranger says ACCEPTED -> error TERMINAL_STATE
            WITHDRAWN + sender says DECLINED -> error TERMINAL_STATE
            WITHDRAWN + recipient says DECLINED -> error TERMINAL_STATE
            WITHDRAWN + stranger says DECLINED -> error TERMINAL_STATE
            WITHDRAWN + sender says IN_PROGRESS -> error TERMINAL_STATE
            WITHDRAWN + recipient says IN_PROGRESS -> error TERMINAL_STATE
            WITHDRAWN + stranger says IN_PROGRESS -> error TERMINAL_STATE
            WITHDRAWN + sender says COMPLETED -> error TERMINAL_STATE
            WITHDRAWN + recipient says COMPLETED -> error TERMINAL_STATE
            WITHDRAWN + stranger says COMPLETED -> error TERMINAL_STATE
            WITHDRAWN + sender says CANCELLED -> error TERMINAL_STATE
            WITHDRAWN + recipient says CANCELLED -> error TERMINAL_STATE
            WITHDRAWN + stranger says CANCELLED -> error TERMINAL_STATE
        "#]],
    );
}

#[test]
fn submit_delivers_and_schedules_the_receipt_deadline_and_tells_the_sender_at_delivered() {
    let t = submit(new_referral(), "m-submit", T0);
    expect!["-> SUBMITTED by sender [deliver(recipient), schedule(receipt @T0+3600000)]"]
        .assert_eq(&render_new(&t));
    let entry = &t.referral.history[0];
    assert_eq!((entry.at, entry.cause.as_str()), (T0, "m-submit"));
    assert_eq!(t.referral.created_at, T0);
    assert_eq!(t.referral.envelope, new_referral().envelope);
    // The sender hears of it once the delivery is in the recipient's stream.
    let delivered = apply(
        &t.referral,
        &Event::DeliveryConfirmed,
        "r/delivered",
        T0 + 1,
    )
    .expect("SUBMITTED -> DELIVERED");
    assert_eq!(
        delivered.effects,
        [Effect::Notify {
            to: SENDER.to_owned(),
            previous: State::Submitted,
        }]
    );
}

#[test]
fn refuse_records_a_terminal_referral_and_does_nothing_else() {
    let t = refuse(new_referral(), "m-bad", "unknown recipient", T0);
    expect![[r#"-> REFUSED by broker note="unknown recipient" []"#]].assert_eq(&render_new(&t));
    assert!(t.referral.state.is_terminal());
    let entry = &t.referral.history[0];
    assert_eq!((entry.at, entry.cause.as_str()), (T0, "m-bad"));
    // Nothing can happen to a refused referral afterwards.
    for event in all_events() {
        assert_eq!(
            apply(&t.referral, &event, "m-late", T0 + 1),
            Err(TransitionError::Terminal {
                state: State::Refused
            })
        );
    }
}

#[test]
fn only_a_refused_referral_can_be_resubmitted() {
    let mut table = String::new();
    for &(state, overdue) in &situations() {
        let previous = if state == State::Refused {
            refuse(new_referral(), "m-bad", "unknown recipient", T0).referral
        } else {
            referral_in(state, overdue)
        };
        let line = match resubmit(&previous, new_referral(), "m-replay", "replayed", T0 + 50) {
            Ok(t) => {
                let states: Vec<String> = t
                    .referral
                    .history
                    .iter()
                    .map(|h| h.state.to_string())
                    .collect();
                // The earlier history is kept; the new entries carry the operator's note.
                assert_eq!(
                    t.referral.history[..previous.history.len()],
                    previous.history[..]
                );
                assert_eq!(t.referral.created_at, previous.created_at);
                let added = &t.referral.history[previous.history.len()..];
                assert!(
                    added
                        .iter()
                        .all(|h| h.note == "replayed" && h.cause == "m-replay" && h.at == T0 + 50)
                );
                format!(
                    "{} -> {} history {} {}",
                    show(state, overdue),
                    t.referral.state,
                    states.join(","),
                    render_effects(&t.effects)
                )
            }
            Err(e) => {
                assert_eq!(e, TransitionError::NotReplayable { state });
                format!("{} -> error not replayable", show(state, overdue))
            }
        };
        table.push_str(&line);
        table.push('\n');
    }
    expect![[r#"
        SUBMITTED -> error not replayable
        DELIVERED -> error not replayable
        RECEIVED -> error not replayable
        RECEIVED(overdue) -> error not replayable
        ACCEPTED -> error not replayable
        IN_PROGRESS -> error not replayable
        COMPLETED -> error not replayable
        DECLINED -> error not replayable
        CANCELLED -> error not replayable
        EXPIRED -> error not replayable
        REFUSED -> SUBMITTED history REFUSED,SUBMITTED [deliver(recipient), schedule(receipt @T0+3600000)]
        WITHDRAWN -> error not replayable
    "#]].assert_eq(&table);
}

fn arb_event() -> impl Strategy<Value = Event> {
    prop_oneof![
        1 => Just(Event::DeliveryConfirmed),
        1 => Just(Event::DeadlinePassed(DeadlineKind::Receipt)),
        1 => Just(Event::DeadlinePassed(DeadlineKind::Acceptance)),
        1 => Just(Event::ConsentRevoked),
        8 => (
            proptest::sample::select(PARTIES.to_vec()),
            proptest::sample::select(Status::ALL.to_vec()),
            "[a-z ]{0,8}",
        )
            .prop_map(|(by, status, note)| Event::Status {
                by: by.to_owned(),
                status,
                note,
            }),
    ]
}

/// One step of a run: the event, how much later it comes, and its outcome.
struct Step {
    event: Event,
    now: Millis,
    cause: String,
    outcome: Result<Transition, TransitionError>,
}

/// Submits the test referral and applies `events` in order (legal or not), keeping every outcome.
fn run(events: &[(Event, Millis)]) -> (Referral, Vec<Step>) {
    let mut referral = submit(new_referral(), "m-submit", T0).referral;
    let mut now = T0;
    let mut steps = Vec::new();
    for (i, (event, gap)) in events.iter().enumerate() {
        now += gap;
        let cause = format!("m-{i}");
        let outcome = apply(&referral, event, &cause, now);
        if let Ok(t) = &outcome {
            referral = t.referral.clone();
        }
        steps.push(Step {
            event: event.clone(),
            now,
            cause,
            outcome,
        });
    }
    (referral, steps)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn invariants_over_random_event_sequences(
        events in proptest::collection::vec((arb_event(), 0..100_000i64), 0..40)
    ) {
        let (last, steps) = run(&events);
        let mut referral = submit(new_referral(), "m-submit", T0).referral;
        for step in &steps {
            let before = referral.state;
            let is_status = matches!(step.event, Event::Status { .. });
            // Deterministic: the same inputs give the same output.
            prop_assert_eq!(&apply(&referral, &step.event, &step.cause, step.now), &step.outcome);
            match &step.outcome {
                Ok(t) => {
                    let next = &t.referral;
                    prop_assert!(!before.is_terminal(), "left terminal {}", before);
                    // Exactly one history entry appended, naming the new state; the rest is kept.
                    prop_assert_eq!(next.history.len(), referral.history.len() + 1);
                    prop_assert_eq!(&next.history[..referral.history.len()], &referral.history[..]);
                    let entry = next.history.last().expect("non-empty");
                    prop_assert_eq!(entry.state, next.state);
                    prop_assert_eq!(entry.at, step.now);
                    prop_assert_eq!(&entry.cause, &step.cause);
                    // Only the state, the history and the acceptance deadline's bookkeeping change.
                    let mut same = next.clone();
                    same.state = referral.state;
                    same.history.pop();
                    same.accept_by = referral.accept_by;
                    same.overdue = referral.overdue;
                    prop_assert_eq!(&same, &referral);
                    // Only a referral waiting on its recipient's decision can be overdue.
                    prop_assert!(!next.overdue || next.state == State::Received);
                    let notified: Vec<&str> = t.effects.iter().filter_map(|e| match e {
                        Effect::Notify { to, previous } => {
                            assert_eq!(*previous, before);
                            Some(to.as_str())
                        }
                        _ => None,
                    }).collect();
                    let escalations: Vec<&Effect> = t.effects.iter()
                        .filter(|e| matches!(e, Effect::Escalate { .. })).collect();
                    match &step.event {
                        Event::DeadlinePassed(DeadlineKind::Acceptance) => {
                            // RECEIVED stays RECEIVED, marked overdue and escalated, once.
                            prop_assert_eq!((before, next.state), (State::Received, State::Received));
                            prop_assert!(!referral.overdue && next.overdue);
                            let escalate = Effect::Escalate { kind: DeadlineKind::Acceptance, due: referral.accept_by };
                            prop_assert_eq!(&t.effects, &vec![escalate]);
                        }
                        event => {
                            // A real change: the sender is told once, the recipient at most once,
                            // nobody else.
                            prop_assert_ne!(next.state, before);
                            prop_assert!(notified.iter().all(|to| *to == SENDER || *to == RECIPIENT), "{:?}", notified);
                            prop_assert_eq!(notified.iter().filter(|to| **to == SENDER).count(), 1);
                            prop_assert!(notified.iter().filter(|to| **to == RECIPIENT).count() <= 1);
                            if matches!(event, Event::DeadlinePassed(DeadlineKind::Receipt)) {
                                prop_assert_eq!(next.state, State::Expired);
                                let escalate = Effect::Escalate { kind: DeadlineKind::Receipt, due: referral.receive_by };
                                prop_assert_eq!(escalations, vec![&escalate]);
                            } else {
                                prop_assert!(escalations.is_empty(), "{:?}", t.effects);
                            }
                        }
                    }
                    // Only a submission delivers.
                    let delivers = t.effects.iter().any(|e| matches!(e, Effect::Deliver { .. }));
                    prop_assert!(!delivers, "{:?}", t.effects);
                    // Entering RECEIVED starts the acceptance deadline; nothing else schedules.
                    let schedules: Vec<&Effect> = t.effects.iter()
                        .filter(|e| matches!(e, Effect::Schedule { .. })).collect();
                    if next.state == State::Received && before != State::Received {
                        prop_assert_eq!(next.accept_by, step.now + ACCEPT_WITHIN);
                        let schedule = Effect::Schedule { kind: DeadlineKind::Acceptance, at: next.accept_by };
                        prop_assert_eq!(schedules, vec![&schedule]);
                    } else {
                        prop_assert!(schedules.is_empty(), "{:?}", t.effects);
                        prop_assert_eq!(next.accept_by, referral.accept_by);
                    }
                    // No timer outlives the wait it guards.
                    let waiting = |s: State| matches!(s, State::Submitted | State::Delivered);
                    if waiting(before) && !waiting(next.state) && next.state != State::Expired {
                        let unschedule = Effect::Unschedule { kind: DeadlineKind::Receipt, at: referral.receive_by };
                        prop_assert!(t.effects.contains(&unschedule), "{:?}", t.effects);
                    }
                    if before == State::Received && next.state != State::Received {
                        let unschedule = Effect::Unschedule { kind: DeadlineKind::Acceptance, at: referral.accept_by };
                        prop_assert!(t.effects.contains(&unschedule), "{:?}", t.effects);
                    }
                    referral = next.clone();
                }
                Err(TransitionError::Terminal { state }) => {
                    prop_assert_eq!(*state, before);
                    prop_assert!(before.is_terminal());
                }
                Err(err) => {
                    // Outside a terminal state, every event gets a specific answer.
                    prop_assert!(!before.is_terminal(), "{} in terminal {}", err, before);
                    match err {
                        TransitionError::Superseded { .. } => prop_assert!(!is_status, "Superseded for a status update"),
                        TransitionError::NotReplayable { .. } => prop_assert!(false, "apply refused a replay: {}", err),
                        _ => prop_assert!(is_status, "{} for a broker event", err),
                    }
                }
            }
        }
        prop_assert_eq!(&referral, &last);
        // Once terminal, always terminal: a terminal state can only be the last entry.
        let states: Vec<State> = last.history.iter().map(|h| h.state).collect();
        prop_assert_eq!(states[0], State::Submitted);
        if let Some(i) = states.iter().position(|s| s.is_terminal()) {
            prop_assert_eq!(i, states.len() - 1, "history {:?}", states);
        }
        prop_assert_eq!(*states.last().expect("non-empty"), last.state);
        // The whole run is deterministic.
        let (again, steps_again) = run(&events);
        prop_assert_eq!(&again, &last);
        prop_assert_eq!(
            steps_again.iter().map(|s| &s.outcome).collect::<Vec<_>>(),
            steps.iter().map(|s| &s.outcome).collect::<Vec<_>>()
        );
    }

    #[test]
    fn terminal_states_stay_terminal(
        state in proptest::sample::select(State::ALL.iter().copied().filter(|s| s.is_terminal()).collect::<Vec<_>>()),
        event in arb_event(),
        now in any::<i64>(),
    ) {
        prop_assert_eq!(
            apply(&referral_in(state, false), &event, "m", now),
            Err(TransitionError::Terminal { state })
        );
    }
}
