//! Consent as the broker enforces it: a recorded grant, its revocation, the purges a
//! revocation demands, and [`check`] — whether a consent covers a referral at a moment. Pure:
//! no I/O, time as an argument. The event loop (`server/batch.rs`) loads and stores consents.

use crate::time::Millis;

/// What allows a referral to carry personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Basis {
    /// A recorded consent, by id.
    Consent(String),
    /// A statute (a `yeongye.v1.Statute` number) and the sender's justification.
    Statute {
        statute: i32,
        name: String,
        justification: String,
    },
}

impl Basis {
    /// `consent:<id>` or `statute:<STATUTE_NAME>`: how the basis is shown in histories,
    /// notifications and the audit log.
    pub fn label(&self) -> String {
        match self {
            Basis::Consent(id) => format!("consent:{id}"),
            Basis::Statute { name, .. } => format!("statute:{name}"),
        }
    }

    pub fn consent_id(&self) -> Option<&str> {
        match self {
            Basis::Consent(id) => Some(id),
            Basis::Statute { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub at: Millis,
    pub by: String,
}

/// A recipient that must purge a withdrawn referral's data, and whether it confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purge {
    pub referral_id: String,
    pub agency: String,
    pub requested_at: Millis,
    pub confirmed_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consent {
    pub id: String,
    pub client: String,
    pub collected_by: String,
    pub recipient_agencies: Vec<String>,
    pub recipient_kinds: Vec<String>,
    /// `yeongye.v1.Purpose` numbers.
    pub purposes: Vec<i32>,
    /// `yeongye.v1.DataCategory` numbers.
    pub categories: Vec<i32>,
    pub valid_from: Millis,
    /// `None`: no end.
    pub valid_until: Option<Millis>,
    pub form_reference: String,
    pub granted_at: Millis,
    pub revoked: Option<Revocation>,
    /// Referrals that cited this consent, in the order they arrived.
    pub referrals: Vec<String>,
    pub purges: Vec<Purge>,
}

impl Consent {
    /// Whether `agency` (of `kind`) may cite this consent: it collected it, or the consent covers
    /// it as a recipient.
    pub fn may_cite(&self, agency: &str, kind: &str) -> bool {
        self.collected_by == agency || self.covers_recipient(agency, kind)
    }

    pub fn covers_recipient(&self, agency: &str, kind: &str) -> bool {
        self.recipient_agencies.iter().any(|a| a == agency)
            || self.recipient_kinds.iter().any(|k| k == kind)
    }

    /// Purges still awaiting confirmation.
    pub fn outstanding(&self) -> impl Iterator<Item = &Purge> {
        self.purges.iter().filter(|p| p.confirmed_at.is_none())
    }
}

/// What a referral asks a consent to cover.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The citing agency and its kind: only a party to the consent may cite it.
    pub from: &'a str,
    pub from_kind: &'a str,
    pub client: &'a str,
    pub to: &'a str,
    pub to_kind: &'a str,
    pub purpose: i32,
    pub categories: &'a [i32],
}

/// Why a consent does not cover a referral. Each maps to one wire reason code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotCovered {
    #[error("no consent with this id is recorded")]
    Unknown,
    #[error("the consent was given by another client")]
    OtherClient,
    #[error("the consent does not cover the recipient")]
    Recipient,
    #[error("the consent does not cover the purpose")]
    Purpose,
    #[error("the consent does not cover data category {}", category_name(*.0))]
    Category(i32),
    #[error("the consent has expired")]
    Expired,
    #[error("the consent is not valid yet")]
    NotYetValid,
    #[error("the consent was revoked")]
    Revoked,
}

fn category_name(c: i32) -> String {
    yeongye_proto::v1::DataCategory::try_from(c)
        .map_or_else(|_| c.to_string(), |d| d.as_str_name().to_owned())
}

/// Whether `consent` covers `ask` at `now`. Checks run in a fixed order, so that the reason
/// given is stable: existence and the citing agency's standing, revocation, client, validity,
/// recipient, purpose, categories.
///
/// Only a party may cite a consent: the agency that collected it, or an agency it covers
/// (referring on to another agency it covers — the district's chain). To anyone else the
/// consent does not exist: [`NotCovered::Unknown`], never a reason that would tell them
/// something about it (its client, its validity, whom it covers).
pub fn check(consent: Option<&Consent>, ask: Ask<'_>, now: Millis) -> Result<(), NotCovered> {
    let c = consent
        .filter(|c| c.may_cite(ask.from, ask.from_kind))
        .ok_or(NotCovered::Unknown)?;
    if c.revoked.as_ref().is_some_and(|r| r.at <= now) {
        return Err(NotCovered::Revoked);
    }
    if c.client != ask.client {
        return Err(NotCovered::OtherClient);
    }
    if now < c.valid_from {
        return Err(NotCovered::NotYetValid);
    }
    if c.valid_until.is_some_and(|until| now >= until) {
        return Err(NotCovered::Expired);
    }
    if !c.covers_recipient(ask.to, ask.to_kind) {
        return Err(NotCovered::Recipient);
    }
    if !c.purposes.contains(&ask.purpose) {
        return Err(NotCovered::Purpose);
    }
    if let Some(cat) = ask
        .categories
        .iter()
        .find(|cat| !c.categories.contains(cat))
    {
        return Err(NotCovered::Category(*cat));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consent() -> Consent {
        Consent {
            id: "c1".into(),
            client: "p1".into(),
            collected_by: "a".into(),
            recipient_agencies: vec!["b".into()],
            recipient_kinds: vec!["mental_health_centre".into()],
            purposes: vec![1],
            categories: vec![1, 2, 6],
            valid_from: 100,
            valid_until: Some(1000),
            form_reference: "form-1".into(),
            granted_at: 100,
            revoked: None,
            referrals: vec![],
            purges: vec![],
        }
    }

    fn ask<'a>(to: &'a str, kind: &'a str, cats: &'a [i32]) -> Ask<'a> {
        Ask {
            from: "a",
            from_kind: "community_centre",
            client: "p1",
            to,
            to_kind: kind,
            purpose: 1,
            categories: cats,
        }
    }

    #[test]
    fn only_parties_cite_and_others_learn_nothing() {
        let c = consent();
        let by = |from: &'static str, kind: &'static str| Ask {
            from,
            from_kind: kind,
            ..ask("z", "mental_health_centre", &[6])
        };
        assert_eq!(check(Some(&c), by("a", "x"), 500), Ok(()), "the collector");
        assert_eq!(
            check(Some(&c), by("b", "x"), 500),
            Ok(()),
            "a covered agency refers on to another covered one"
        );
        assert_eq!(
            check(Some(&c), by("m", "mental_health_centre"), 500),
            Ok(()),
            "covered by kind"
        );
        // A non-party gets what an unknown consent gets, whatever else is wrong with its ask.
        let stranger = by("s", "x");
        assert_eq!(check(Some(&c), stranger, 500), Err(NotCovered::Unknown));
        for (what, ask) in [
            (
                "other client",
                Ask {
                    client: "p2",
                    ..stranger
                },
            ),
            (
                "other purpose",
                Ask {
                    purpose: 9,
                    ..stranger
                },
            ),
            (
                "other recipient",
                Ask {
                    to: "q",
                    to_kind: "q",
                    ..stranger
                },
            ),
        ] {
            assert_eq!(
                check(Some(&c), ask, 500),
                Err(NotCovered::Unknown),
                "{what}"
            );
        }
        assert_eq!(
            check(Some(&c), stranger, 99),
            Err(NotCovered::Unknown),
            "not yet valid"
        );
        assert_eq!(
            check(Some(&c), stranger, 5000),
            Err(NotCovered::Unknown),
            "expired"
        );
        let mut revoked = c.clone();
        revoked.revoked = Some(Revocation {
            at: 1,
            by: "a".into(),
        });
        assert_eq!(
            check(Some(&revoked), stranger, 500),
            Err(NotCovered::Unknown),
            "revoked"
        );
    }

    #[test]
    fn each_reason() {
        let c = consent();
        assert_eq!(check(Some(&c), ask("b", "x", &[1, 2]), 500), Ok(()));
        assert_eq!(
            check(Some(&c), ask("z", "mental_health_centre", &[6]), 500),
            Ok(()),
            "covered by kind"
        );
        assert_eq!(
            check(None, ask("b", "x", &[1]), 500),
            Err(NotCovered::Unknown)
        );
        assert_eq!(
            check(
                Some(&c),
                Ask {
                    client: "p2",
                    ..ask("b", "x", &[1])
                },
                500
            ),
            Err(NotCovered::OtherClient)
        );
        assert_eq!(
            check(Some(&c), ask("z", "x", &[1]), 500),
            Err(NotCovered::Recipient)
        );
        assert_eq!(
            check(
                Some(&c),
                Ask {
                    purpose: 2,
                    ..ask("b", "x", &[1])
                },
                500
            ),
            Err(NotCovered::Purpose)
        );
        assert_eq!(
            check(Some(&c), ask("b", "x", &[1, 7]), 500),
            Err(NotCovered::Category(7))
        );
        assert_eq!(
            check(Some(&c), ask("b", "x", &[1]), 99),
            Err(NotCovered::NotYetValid)
        );
        assert_eq!(
            check(Some(&c), ask("b", "x", &[1]), 1000),
            Err(NotCovered::Expired)
        );
        let mut r = c.clone();
        r.revoked = Some(Revocation {
            at: 400,
            by: "a".into(),
        });
        assert_eq!(
            check(Some(&r), ask("b", "x", &[1]), 399),
            Ok(()),
            "not yet revoked then"
        );
        assert_eq!(
            check(Some(&r), ask("b", "x", &[1]), 400),
            Err(NotCovered::Revoked)
        );
    }
}
