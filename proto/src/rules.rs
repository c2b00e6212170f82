//! Protocol rules that both the sender's adapter and the broker check, each written once
//! (docs/PROTOCOL.md): the id syntax, how far ahead a receipt deadline may be, and which data
//! categories a referral's client fields imply. The broker refuses what breaks them; the adapter
//! refuses it before sending, with the same words.

use std::time::Duration;

use crate::v1;

/// How often a client (the broker, every adapter) pings its NATS server when the server has
/// said nothing. A server cut off by a network partition is silent, not closed: its TCP
/// connections stay open and nothing arrives. The client gives the connection up after three
/// silent intervals (async-nats allows two unanswered PINGs) and moves to another server of
/// its list, so a partition costs a client about 6 s; the client library's default, 60 s,
/// made it about three minutes (`tests/it/partition.rs`). A busy connection never pings: any
/// message from the server counts.
pub const CLIENT_PING_INTERVAL: Duration = Duration::from_secs(2);

/// Longest referral, consent or message id.
pub const MAX_ID_LEN: usize = 128;

/// The id syntax, as error messages state it.
pub const ID_SYNTAX: &str = "1-128 characters of A-Z a-z 0-9 - _";

/// Whether `id` is a valid referral, consent or message id: [`ID_SYNTAX`].
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Furthest ahead of now a referral's `receive_by_ms` may be set (90 days).
pub const MAX_RECEIVE_BY_AHEAD_MS: i64 = 90 * 24 * 3600 * 1000;

/// Whether an explicit `receive_by_ms` (not 0, which means "the default for the urgency") is in
/// the future and at most [`MAX_RECEIVE_BY_AHEAD_MS`] ahead of `now_ms`.
pub fn receive_by_in_range(receive_by_ms: i64, now_ms: i64) -> bool {
    receive_by_ms > now_ms && receive_by_ms <= now_ms.saturating_add(MAX_RECEIVE_BY_AHEAD_MS)
}

/// The first data category that `client`'s filled-in fields imply and `declared` lacks, with the
/// fields that imply it: what the client block carries must be declared, so that consent is
/// checked against what is actually sent.
pub fn undeclared_category(
    client: &v1::Client,
    declared: &[i32],
) -> Option<(v1::DataCategory, &'static str)> {
    let implied = [
        (
            !client.name.is_empty() || !client.birth_date.is_empty(),
            v1::DataCategory::Identity,
            "client.name or client.birth_date",
        ),
        (
            !client.phone.is_empty() || !client.address.is_empty(),
            v1::DataCategory::Contact,
            "client.phone or client.address",
        ),
        (
            !client.household.is_empty(),
            v1::DataCategory::Household,
            "client.household",
        ),
    ];
    implied
        .into_iter()
        .find(|(present, category, _)| *present && !declared.contains(&(*category as i32)))
        .map(|(_, category, fields)| (category, fields))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("0190f0e4-0000-7000-8000-000000000001"));
        assert!(is_valid_id("consent_A-1"));
        assert!(is_valid_id(&"x".repeat(MAX_ID_LEN)));
        for bad in ["", "a b", "a.b", "a/b", "한빛", "a\n"] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
        assert!(!is_valid_id(&"x".repeat(MAX_ID_LEN + 1)));
    }

    #[test]
    fn receive_by() {
        assert!(receive_by_in_range(1001, 1000));
        assert!(receive_by_in_range(1000 + MAX_RECEIVE_BY_AHEAD_MS, 1000));
        assert!(!receive_by_in_range(1000, 1000));
        assert!(!receive_by_in_range(1001 + MAX_RECEIVE_BY_AHEAD_MS, 1000));
    }

    #[test]
    fn implied_categories() {
        let id = v1::DataCategory::Identity as i32;
        let contact = v1::DataCategory::Contact as i32;
        let household = v1::DataCategory::Household as i32;
        let client = |f: fn(&mut v1::Client)| {
            let mut c = v1::Client::default();
            f(&mut c);
            c
        };
        assert_eq!(undeclared_category(&v1::Client::default(), &[]), None);
        let named = client(|c| c.name = "x".into());
        assert_eq!(
            undeclared_category(&named, &[contact]).map(|(c, _)| c),
            Some(v1::DataCategory::Identity)
        );
        assert_eq!(undeclared_category(&named, &[id]), None);
        let reachable = client(|c| c.address = "x".into());
        assert_eq!(
            undeclared_category(&reachable, &[id, household]).map(|(c, _)| c),
            Some(v1::DataCategory::Contact)
        );
        let family = client(|c| c.household = "x".into());
        assert_eq!(
            undeclared_category(&family, &[id, contact]),
            Some((v1::DataCategory::Household, "client.household"))
        );
    }
}
