//! The operators' view: per-agency queues, states, overdue and unacknowledged referrals, dead
//! letters — kept in memory by the event loop, updated after each commit from what changed, and
//! rebuilt from the store at start. Serves `/metrics`, the JSON API and the dashboard without
//! scanning the store. Ids, agencies, states and times only: no personal data.

use std::collections::{BTreeMap, BTreeSet};

use crate::dead_letter::{DeadLetter, DeadLetterStatus};
use crate::referral::{Millis, Referral, State};

/// What the view keeps of a referral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub id: String,
    pub from: String,
    pub to: String,
    pub state: State,
    pub created_at: Millis,
    pub overdue: bool,
}

impl Summary {
    pub fn of(r: &Referral) -> Summary {
        Summary {
            id: r.id.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            state: r.state,
            created_at: r.created_at,
            overdue: r.overdue,
        }
    }

    /// Whether the view keeps this referral itself (not only counts it): not yet RECEIVED,
    /// or overdue and not ended. The store keeps summaries of these only.
    pub fn watched(&self) -> bool {
        matches!(self.state, State::Submitted | State::Delivered)
            || (self.overdue && !self.state.is_terminal())
    }
}

/// One agency's row in the queue table.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AgencyQueue {
    /// Referrals this agency sent, ever.
    pub sent: u64,
    /// Referrals to this agency not yet RECEIVED (SUBMITTED or DELIVERED).
    pub awaiting_receipt: u64,
    /// Referrals to this agency RECEIVED but not yet accepted or declined.
    pub awaiting_acceptance: u64,
    /// Referrals to this agency ACCEPTED or IN_PROGRESS.
    pub in_progress: u64,
    /// Referrals to this agency past a deadline and not ended.
    pub overdue: u64,
    /// Messages from this agency the broker could not apply, not yet replayed or discarded.
    pub dead_letters: u64,
}

/// The view's counters over every stored referral. The store keeps them (written with each
/// commit that changes a referral), so that a start reads them and the watched referrals'
/// summaries, never every referral.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Counts {
    pub by_state: BTreeMap<State, u64>,
    /// Per agency; `dead_letters` is not kept here (the view counts dead letters itself).
    pub agencies: BTreeMap<String, AgencyQueue>,
}

impl Counts {
    /// Records that a referral changed from `old` (None: it is new) to `new`.
    pub fn change(&mut self, old: Option<&Summary>, new: &Summary) {
        if let Some(old) = old {
            self.count(old, false);
        }
        self.count(new, true);
    }

    fn count(&mut self, s: &Summary, add: bool) {
        fn bump(n: &mut u64, add: bool) {
            *n = if add {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            };
        }
        bump(self.by_state.entry(s.state).or_default(), add);
        bump(
            &mut self.agencies.entry(s.from.clone()).or_default().sent,
            add,
        );
        let to = self.agencies.entry(s.to.clone()).or_default();
        match s.state {
            State::Submitted | State::Delivered => bump(&mut to.awaiting_receipt, add),
            State::Received => bump(&mut to.awaiting_acceptance, add),
            State::Accepted | State::InProgress => bump(&mut to.in_progress, add),
            _ => {}
        }
        if s.overdue && !s.state.is_terminal() {
            bump(&mut to.overdue, add);
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct View {
    counts: Counts,
    /// Per recipient: (created_at, id) of referrals not yet RECEIVED.
    unacked: BTreeMap<String, BTreeSet<(Millis, String)>>,
    /// Referrals past a deadline and not ended: id -> (created_at, from, to, state).
    overdue: BTreeMap<String, Summary>,
    /// Dead letters by reason code.
    refusals: BTreeMap<i32, u64>,
    dead_letters: u64,
    /// Open dead letters by sender.
    dead_by_sender: BTreeMap<String, u64>,
}

impl View {
    pub fn start(counts: Counts) -> View {
        View {
            counts,
            ..View::default()
        }
    }

    /// Adds a watched referral that `counts` already counted (at start).
    pub fn watch(&mut self, s: &Summary) {
        self.track(s, true);
    }

    /// Records that a referral changed from `old` (None: it is new) to `new`.
    pub fn change(&mut self, old: Option<&Summary>, new: &Summary) {
        self.counts.change(old, new);
        self.track_change(old, new);
    }

    /// The counters once `changes` (before, after) are applied: what the event loop commits
    /// with them, and then hands to [`View::committed`].
    pub fn counts_after(&self, changes: &[(Option<Summary>, Summary)]) -> Counts {
        let mut counts = self.counts.clone();
        for (old, new) in changes {
            counts.change(old.as_ref(), new);
        }
        counts
    }

    /// Takes in committed `changes` with the counters [`View::counts_after`] made for them (and
    /// the store now holds), so the view's counters are the stored ones.
    pub fn committed(&mut self, counts: Counts, changes: &[(Option<Summary>, Summary)]) {
        self.counts = counts;
        for (old, new) in changes {
            self.track_change(old.as_ref(), new);
        }
    }

    fn track_change(&mut self, old: Option<&Summary>, new: &Summary) {
        if let Some(old) = old {
            self.track(old, false);
        }
        self.track(new, true);
    }

    /// Counts new dead letters: every one in the refusals by reason, the open ones as dead
    /// letters awaiting an operator.
    pub fn add_dead_letters(&mut self, dead: &[DeadLetter]) {
        for d in dead {
            *self.refusals.entry(d.code).or_default() += 1;
            if d.status == DeadLetterStatus::Open {
                self.open_dead_letter(&d.sender, true);
            }
        }
    }

    /// An operator replayed or discarded a dead letter that was open.
    pub fn dead_letter_resolved(&mut self, sender: &str) {
        self.open_dead_letter(sender, false);
    }

    fn open_dead_letter(&mut self, sender: &str, add: bool) {
        let step = |n: u64| {
            if add {
                n.saturating_add(1)
            } else {
                n.saturating_sub(1)
            }
        };
        self.dead_letters = step(self.dead_letters);
        if !sender.is_empty() {
            let n = self.dead_by_sender.entry(sender.to_owned()).or_default();
            *n = step(*n);
        }
    }

    /// The referrals the view keeps by id: not yet RECEIVED, and overdue.
    fn track(&mut self, s: &Summary, add: bool) {
        if matches!(s.state, State::Submitted | State::Delivered) {
            let set = self.unacked.entry(s.to.clone()).or_default();
            if add {
                set.insert((s.created_at, s.id.clone()));
            } else {
                set.remove(&(s.created_at, s.id.clone()));
            }
        }
        if s.overdue && !s.state.is_terminal() {
            if add {
                self.overdue.insert(s.id.clone(), s.clone());
            } else {
                self.overdue.remove(&s.id);
            }
        }
    }

    pub fn by_state(&self) -> impl Iterator<Item = (State, u64)> + '_ {
        State::ALL
            .into_iter()
            .map(|s| (s, self.counts.by_state.get(&s).copied().unwrap_or(0)))
    }

    pub fn queue(&self, agency: &str) -> AgencyQueue {
        let mut q = self
            .counts
            .agencies
            .get(agency)
            .cloned()
            .unwrap_or_default();
        q.dead_letters = self.dead_by_sender.get(agency).copied().unwrap_or(0);
        q
    }

    /// When the oldest referral to `agency` that is not yet RECEIVED was submitted.
    pub fn oldest_unacked(&self, agency: &str) -> Option<Millis> {
        self.unacked
            .get(agency)
            .and_then(|s| s.first())
            .map(|(at, _)| *at)
    }

    pub fn overdue(&self) -> impl Iterator<Item = &Summary> {
        self.overdue.values()
    }

    pub fn overdue_count(&self) -> u64 {
        self.overdue.len() as u64
    }

    pub fn refusals(&self) -> &BTreeMap<i32, u64> {
        &self.refusals
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead_letters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, state: State, overdue: bool) -> Summary {
        Summary {
            id: id.into(),
            from: "a".into(),
            to: "b".into(),
            state,
            created_at: 10,
            overdue,
        }
    }

    #[test]
    fn changes_move_counts_between_columns() {
        let mut v = View::default();
        v.change(None, &s("r1", State::Submitted, false));
        v.change(None, &s("r2", State::Submitted, false));
        assert_eq!(v.queue("b").awaiting_receipt, 2);
        assert_eq!(v.queue("a").sent, 2);
        assert_eq!(v.oldest_unacked("b"), Some(10));
        v.change(
            Some(&s("r1", State::Submitted, false)),
            &s("r1", State::Received, false),
        );
        v.change(
            Some(&s("r2", State::Submitted, false)),
            &s("r2", State::Received, true),
        );
        let q = v.queue("b");
        assert_eq!(
            (q.awaiting_receipt, q.awaiting_acceptance, q.overdue),
            (0, 2, 1)
        );
        assert_eq!(v.oldest_unacked("b"), None);
        assert_eq!(v.overdue_count(), 1);
        v.change(
            Some(&s("r2", State::Received, true)),
            &s("r2", State::Declined, true),
        );
        assert_eq!(
            v.overdue_count(),
            0,
            "an ended referral is no longer overdue"
        );
        assert_eq!(v.queue("a").sent, 2);
        let states: BTreeMap<_, _> = v.by_state().collect();
        assert_eq!(states[&State::Received], 1);
        assert_eq!(states[&State::Declined], 1);
        assert_eq!(states[&State::Submitted], 0);
    }

    #[test]
    fn a_committed_batch_is_the_same_as_its_changes_one_by_one() {
        let changes = vec![
            (None, s("r1", State::Submitted, false)),
            (None, s("r2", State::Submitted, false)),
            (
                Some(s("r1", State::Submitted, false)),
                s("r1", State::Received, true),
            ),
        ];
        let mut one_by_one = View::default();
        for (old, new) in &changes {
            one_by_one.change(old.as_ref(), new);
        }
        let mut batched = View::default();
        let counts = batched.counts_after(&changes);
        assert_eq!(counts, one_by_one.counts, "the counters to store");
        batched.committed(counts, &changes);
        assert_eq!(batched.counts, one_by_one.counts);
        assert_eq!(batched.queue("b"), one_by_one.queue("b"));
        assert_eq!(batched.oldest_unacked("b"), one_by_one.oldest_unacked("b"));
        assert_eq!(batched.overdue_count(), 1);
    }
}
