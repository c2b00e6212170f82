//! The audit log as operators read it from a store: whether the chain holds, and the entries
//! that concern one referral, as JSON. Shared by the HTTP API (a running broker's store) and the
//! `audit` commands (a stopped broker's store), so that neither depends on the other.

use serde_json::Value;

use crate::error::Result;
use crate::store::Store;

/// Whether the audit chain in `store` holds; the JSON the API also answers.
pub fn verify_audit(store: &dyn Store) -> Result<Value> {
    let raw = store.audit_raw()?;
    let head = store.audit_head()?;
    Ok(match crate::audit::verify(raw, head) {
        Ok(entries) => serde_json::json!({"ok": true, "entries": entries}),
        Err(b) => {
            serde_json::json!({"ok": false, "entries": head.0, "broken_at": b.seq, "why": b.why})
        }
    })
}

/// The audit entries that concern one referral, in order.
pub fn audit_entries(store: &dyn Store, referral_id: &str) -> Result<Vec<Value>> {
    use prost::Message;
    let mut out = Vec::new();
    for (seq, bytes) in store.audit_raw()? {
        let Ok(e) = crate::audit::Entry::decode(bytes.as_slice()) else {
            out.push(serde_json::json!({"seq": seq, "unreadable": true}));
            continue;
        };
        if e.referral_id == referral_id {
            out.push(serde_json::json!({
                "seq": e.seq, "at_ms": e.at, "event": e.event, "actor": e.actor, "agency": e.agency,
                "from": e.from_state, "to": e.to_state, "reason": e.reason, "message_id": e.message_id,
                "basis": e.basis, "consent_id": e.consent_id, "hash": hex::encode(&e.hash),
            }));
        }
    }
    Ok(out)
}
