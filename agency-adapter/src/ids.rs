//! Message and referral ids, and the clock used to stamp envelopes.
//!
//! Fresh ids are UUIDv7 in canonical lowercase text. Ids that must come out the same after a
//! crash (an adapter's receipt for a delivery, its purge confirmation for a withdrawal) are
//! derived as UUIDv5 in the protocol's namespace (PROTOCOL.md, "Ids, ordering, retries,
//! deduplication").

use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

/// The namespace of every derived Yeongye id.
pub const NAMESPACE: Uuid = Uuid::from_u128(0x6f1c3a52_7e0b_4d8e_9a43_2b5d7c1e9f10);

/// A fresh message or referral id: a UUIDv7 in canonical text.
pub fn new_id() -> String {
    Uuid::now_v7().to_string()
}

/// The message id of the `RECEIVED` status update an adapter sends for a delivery:
/// `UUIDv5(NAMESPACE, "<delivery message id>/received")`. The same delivery always yields the
/// same receipt id, so a receipt sent again after a crash is recognised as a repeat.
pub fn receipt_message_id(delivery_message_id: &str) -> String {
    Uuid::new_v5(
        &NAMESPACE,
        format!("{delivery_message_id}/received").as_bytes(),
    )
    .to_string()
}

/// The message id of the `DECLINED` status update an adapter sends itself for a delivery it
/// could not take in (a seal that did not open, undeclared categories):
/// `UUIDv5(NAMESPACE, "<delivery message id>/declined")`.
pub fn decline_message_id(delivery_message_id: &str) -> String {
    Uuid::new_v5(
        &NAMESPACE,
        format!("{delivery_message_id}/declined").as_bytes(),
    )
    .to_string()
}

/// The message id of the `PurgeConfirmation` an adapter sends for a withdrawal:
/// `UUIDv5(NAMESPACE, "<withdrawal message id>/purged")`. The same withdrawal always yields the
/// same confirmation id, so a confirmation sent again after a crash is recognised as a repeat.
pub fn purge_message_id(withdrawal_message_id: &str) -> String {
    Uuid::new_v5(
        &NAMESPACE,
        format!("{withdrawal_message_id}/purged").as_bytes(),
    )
    .to_string()
}

/// Derives a stable, file-name-safe token from any string (used for ids that are not safe as
/// file names as they are).
pub(crate) fn derived_token(input: &str) -> String {
    Uuid::new_v5(&NAMESPACE, input.as_bytes()).to_string()
}

/// Milliseconds since the Unix epoch, for `sent_at_ms` and the dedup record. A clock before
/// 1970 reads as 0.
pub fn now_ms() -> i64 {
    // The adapter's one read of the wall clock (clippy.toml).
    #[allow(clippy::disallowed_methods)]
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// An id (referral, consent) as logs may show it: well-formed by the protocol's rule for ids
/// (`yeongye_proto::rules`), else a placeholder.
pub(crate) fn shown_id(id: &str) -> &str {
    if yeongye_proto::rules::is_valid_id(id) {
        id
    } else {
        "(not well-formed)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_the_protocols() {
        assert_eq!(
            NAMESPACE.to_string(),
            "6f1c3a52-7e0b-4d8e-9a43-2b5d7c1e9f10"
        );
    }

    #[test]
    fn receipt_id_is_deterministic() {
        let d = "0190f5a4-1c2b-7def-8123-456789abcdef";
        let a = receipt_message_id(d);
        assert_eq!(a, receipt_message_id(d));
        assert_ne!(
            a,
            receipt_message_id("0190f5a4-1c2b-7def-8123-456789abcdee")
        );
        let u = Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 5);
        assert_eq!(
            u,
            Uuid::new_v5(&NAMESPACE, format!("{d}/received").as_bytes())
        );
        // Pinned (computed independently with Python's uuid.uuid5), so that a change of
        // derivation cannot slip through: adapters in other languages derive the same id.
        assert_eq!(a, "8e9af9e4-8155-5cad-851b-79bedd16512c");
        assert_eq!(a.len(), 36);
        assert_eq!(a, a.to_lowercase());
    }

    #[test]
    fn purge_id_is_deterministic() {
        let w = "0190f5a4-1c2b-7def-8123-456789abcdef";
        let a = purge_message_id(w);
        assert_eq!(a, purge_message_id(w));
        assert_ne!(a, receipt_message_id(w));
        // Pinned like the receipt id (Python: uuid.uuid5(ns, w + "/purged")).
        assert_eq!(a, "beda6b7e-f8b6-56fa-b9e9-3bb8c0bcb654");
    }

    #[test]
    fn fresh_ids_are_v7() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert_eq!(Uuid::parse_str(&a).unwrap().get_version_num(), 7);
    }
}
