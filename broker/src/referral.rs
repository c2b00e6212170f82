//! The referral's life as a pure state machine: `apply(&Referral, Event, now) -> Transition`.
//!
//! No I/O, no clock, no async: time comes in as an argument and everything the caller must do
//! comes back as [`Effect`]s. The broker's event loop (`server.rs`) persists the new referral and
//! the effects in one store batch and then performs them. This is what makes a replay reproduce
//! the same history: the same inputs at the same times give the same outputs.
//!
//! # Layout
//! - `state`: [`State`] and what is terminal.
//! - `event`: [`Event`], [`Status`], and the domain [`Referral`] record.
//! - `effect`: [`Effect`], [`Transition`], [`TransitionError`].
//! - `machine` (this file): [`submit`], [`refuse`], [`apply`].

mod effect;
mod event;
mod state;
#[cfg(test)]
mod tests;

pub use effect::{DeadlineKind, Effect, Transition, TransitionError};
pub use event::{Event, HistoryEntry, NewReferral, Referral, Status, Urgency};
pub use state::State;

/// Milliseconds since the Unix epoch. The only notion of time the machine knows.
pub use crate::time::Millis;

/// The party that stands for the broker itself in histories.
pub const BROKER: &str = yeongye_proto::BROKER_ID;

/// A validated new referral enters the system: `SUBMITTED`, to be delivered to its recipient,
/// with a receipt deadline.
pub fn submit(new: NewReferral, cause: &str, now: Millis) -> Transition {
    let from = new.from.clone();
    let to = new.to.clone();
    let receive_by = new.receive_by;
    let referral = Referral {
        id: new.id,
        from: new.from,
        to: new.to,
        client: new.client,
        basis: new.basis,
        purpose: new.purpose,
        categories: new.categories,
        urgency: new.urgency,
        state: State::Submitted,
        created_at: now,
        receive_by,
        accept_within: new.accept_within,
        accept_by: 0,
        overdue: false,
        envelope: new.envelope,
        history: vec![HistoryEntry {
            state: State::Submitted,
            by: from.clone(),
            at: now,
            note: String::new(),
            cause: cause.to_owned(),
            sealed_note: Vec::new(),
            reason: 0,
        }],
    };
    Transition {
        // No notification to the sender yet: the delivery and a `SUBMITTED` notification
        // would leave in the same flight to the same stream, so the `DELIVERED` that follows
        // one turn later tells the sender as much, for one stream write less per referral.
        effects: vec![
            Effect::Deliver { to },
            Effect::Schedule {
                kind: DeadlineKind::Receipt,
                at: receive_by,
            },
        ],
        referral,
    }
}

/// A new referral the broker cannot accept (unknown recipient, invalid, ...) is still recorded,
/// in the terminal state `REFUSED`, so that it can be looked up and, once the cause is fixed,
/// replayed by an operator. The caller tells the sender why (a rejection with the reason code).
pub fn refuse(new: NewReferral, cause: &str, note: &str, now: Millis) -> Transition {
    let referral = Referral {
        state: State::Refused,
        created_at: now,
        history: vec![HistoryEntry {
            state: State::Refused,
            by: BROKER.to_owned(),
            at: now,
            note: note.to_owned(),
            cause: cause.to_owned(),
            sealed_note: Vec::new(),
            reason: 0,
        }],
        id: new.id,
        from: new.from,
        to: new.to,
        client: new.client,
        basis: new.basis,
        purpose: new.purpose,
        categories: new.categories,
        urgency: new.urgency,
        receive_by: new.receive_by,
        accept_within: new.accept_within,
        accept_by: 0,
        overdue: false,
        envelope: new.envelope,
    };
    Transition {
        referral,
        effects: Vec::new(),
    }
}

/// An operator replays a referral that was REFUSED, after fixing the cause (say, registering
/// the recipient): the only way out of a terminal state, and only out of REFUSED. It enters
/// the system as [`submit`] would, keeping its earlier history.
pub fn resubmit(
    previous: &Referral,
    new: NewReferral,
    cause: &str,
    note: &str,
    now: Millis,
) -> Result<Transition, TransitionError> {
    if previous.state != State::Refused {
        return Err(TransitionError::NotReplayable {
            state: previous.state,
        });
    }
    let mut t = submit(new, cause, now);
    let mut history = previous.history.clone();
    history.extend(t.referral.history.drain(..).map(|mut h| {
        h.note = note.to_owned();
        h
    }));
    t.referral.history = history;
    t.referral.created_at = previous.created_at;
    Ok(t)
}

/// Applies one event to a referral. `cause` is the id of the message that carried the event
/// (empty for the broker's own events); it is recorded in the history.
pub fn apply(
    referral: &Referral,
    event: &Event,
    cause: &str,
    now: Millis,
) -> Result<Transition, TransitionError> {
    let from = referral.state;
    if from.is_terminal() {
        return Err(TransitionError::Terminal { state: from });
    }
    let mut next = referral.clone();
    let step = match event {
        Event::DeliveryConfirmed => delivery_confirmed(referral)?,
        Event::DeadlinePassed(DeadlineKind::Receipt) => receipt_missed(referral)?,
        Event::DeadlinePassed(DeadlineKind::Acceptance) => acceptance_missed(referral, &mut next)?,
        Event::ConsentRevoked => consent_revoked(referral, &mut next),
        Event::Status { by, status, note } => {
            status_changed(referral, &mut next, by, *status, note, now)?
        }
    };
    next.state = step.to;
    next.history.push(HistoryEntry {
        state: step.to,
        by: step.by.to_owned(),
        at: now,
        note: step.note.to_owned(),
        cause: cause.to_owned(),
        sealed_note: Vec::new(),
        reason: 0,
    });
    Ok(Transition {
        referral: next,
        effects: step.effects,
    })
}

/// What an event does to a referral that is not terminal: the state it moves to, who made
/// the move and why (for the history), and what the caller must do.
struct Step<'e> {
    to: State,
    by: &'e str,
    note: &'e str,
    effects: Vec<Effect>,
}

/// The stream acknowledged the delivery: `DELIVERED`, the sender told.
fn delivery_confirmed(referral: &Referral) -> Result<Step<'static>, TransitionError> {
    let from = referral.state;
    if from != State::Submitted {
        return Err(TransitionError::Superseded { state: from });
    }
    Ok(Step {
        to: State::Delivered,
        by: BROKER,
        note: "",
        effects: vec![notify(&referral.from, from)],
    })
}

/// Not received by its receipt deadline: `EXPIRED`, both parties told, the sender (and the
/// coordinator) escalated to.
fn receipt_missed(referral: &Referral) -> Result<Step<'static>, TransitionError> {
    let from = referral.state;
    if !matches!(from, State::Submitted | State::Delivered) {
        return Err(TransitionError::Superseded { state: from });
    }
    Ok(Step {
        to: State::Expired,
        by: BROKER,
        note: "not received by the deadline",
        effects: vec![
            notify(&referral.from, from),
            notify(&referral.to, from),
            Effect::Escalate {
                kind: DeadlineKind::Receipt,
                due: referral.receive_by,
            },
        ],
    })
}

/// Received but neither accepted nor declined by its acceptance deadline: stays `RECEIVED`,
/// marked overdue, escalated once.
fn acceptance_missed(
    referral: &Referral,
    next: &mut Referral,
) -> Result<Step<'static>, TransitionError> {
    let from = referral.state;
    if from != State::Received || referral.overdue {
        return Err(TransitionError::Superseded { state: from });
    }
    next.overdue = true;
    Ok(Step {
        to: State::Received,
        by: BROKER,
        note: "not accepted or declined by the deadline: escalated",
        effects: vec![Effect::Escalate {
            kind: DeadlineKind::Acceptance,
            due: referral.accept_by,
        }],
    })
}

/// The consent it cites was revoked: `WITHDRAWN` from any open state, the sender told, its
/// deadline ended, the recipient asked to purge.
fn consent_revoked(referral: &Referral, next: &mut Referral) -> Step<'static> {
    let mut effects = vec![notify(&referral.from, referral.state)];
    effects.extend(end_wait(referral));
    next.overdue = false;
    effects.push(Effect::Withdraw {
        to: referral.to.clone(),
    });
    Step {
        to: State::Withdrawn,
        by: BROKER,
        note: "consent revoked",
        effects,
    }
}

/// A party's status update: allowed only from the party the status belongs to (the sender
/// cancels, the recipient does the rest) and only from the states [`status_table`] names.
fn status_changed<'e>(
    referral: &Referral,
    next: &mut Referral,
    by: &'e str,
    status: Status,
    note: &'e str,
    now: Millis,
) -> Result<Step<'e>, TransitionError> {
    let from = referral.state;
    let (allowed_from, to) = status_table(status);
    let party = if status == Status::Cancelled {
        &referral.from
    } else {
        &referral.to
    };
    if by != party.as_str() {
        return Err(TransitionError::NotAParty {
            agency: by.to_owned(),
            status,
        });
    }
    if !allowed_from.contains(&from) {
        return Err(TransitionError::Illegal { from, status });
    }
    let mut effects = vec![notify(&referral.from, from)];
    if status == Status::Cancelled {
        effects.push(notify(&referral.to, from));
    }
    // Whatever the recipient or sender did, it ends the wait that a deadline guarded.
    effects.extend(end_wait(referral));
    if from == State::Received {
        next.overdue = false;
    }
    if status == Status::Received {
        next.accept_by = now.saturating_add(referral.accept_within);
        effects.push(Effect::Schedule {
            kind: DeadlineKind::Acceptance,
            at: next.accept_by,
        });
    }
    Ok(Step {
        to,
        by,
        note,
        effects,
    })
}

/// The states a status may be reported from, and the state it moves to.
fn status_table(status: Status) -> (&'static [State], State) {
    match status {
        Status::Received => (&[State::Submitted, State::Delivered], State::Received),
        Status::Accepted => (&[State::Received], State::Accepted),
        Status::Declined => (&[State::Received], State::Declined),
        Status::InProgress => (&[State::Accepted], State::InProgress),
        Status::Completed => (&[State::Accepted, State::InProgress], State::Completed),
        Status::Cancelled => (
            &[
                State::Submitted,
                State::Delivered,
                State::Received,
                State::Accepted,
                State::InProgress,
            ],
            State::Cancelled,
        ),
    }
}

/// The deadline that guards the wait `referral` is in, cancelled: receipt while it is
/// submitted or delivered, acceptance while it is received; none in any other state.
fn end_wait(referral: &Referral) -> Option<Effect> {
    match referral.state {
        State::Submitted | State::Delivered => Some(Effect::Unschedule {
            kind: DeadlineKind::Receipt,
            at: referral.receive_by,
        }),
        State::Received => Some(Effect::Unschedule {
            kind: DeadlineKind::Acceptance,
            at: referral.accept_by,
        }),
        _ => None,
    }
}

fn notify(to: &str, previous: State) -> Effect {
    Effect::Notify {
        to: to.to_owned(),
        previous,
    }
}
