//! The append-only, hash-chained audit log: what happened to referrals and consents, proven.
//!
//! Each [`Entry`] carries the hash of the one before; its own hash is
//! `SHA-256(previous hash || canonical bytes of the entry without its hash)`, where the
//! canonical bytes are the entry's protobuf encoding (fields in tag order, deterministic).
//! The store keeps entries under consecutive sequence numbers from 1 and the head (last
//! sequence and hash); [`verify`] walks the chain and names the first entry that does not
//! hold. Entries are written in the same store batch as the change they record.
//!
//! No personal data: ids, agencies, states, reason codes, the legal basis's label, times.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::referral::Millis;

pub type Hash = [u8; 32];

/// A stored entry as read back: its key's sequence number and its bytes.
pub type Stored = (u64, Vec<u8>);

/// The hash before the first entry.
pub const GENESIS: Hash = [0; 32];

/// One audit entry: its stored and hashed form.
#[derive(Clone, PartialEq, Message)]
pub struct Entry {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(int64, tag = "2")]
    pub at: i64,
    /// What happened: `referral.submitted`, `referral.state`, `message.rejected`,
    /// `consent.granted`, `consent.revoked`, `purge.requested`, `purge.confirmed`,
    /// `operator.replay`, `operator.discard`.
    #[prost(string, tag = "3")]
    pub event: String,
    #[prost(string, tag = "4")]
    pub referral_id: String,
    #[prost(string, tag = "5")]
    pub consent_id: String,
    /// The agency (or `broker`, or the operator) that caused it.
    #[prost(string, tag = "6")]
    pub actor: String,
    #[prost(string, tag = "7")]
    pub from_state: String,
    #[prost(string, tag = "8")]
    pub to_state: String,
    /// A reason code name, for refusals.
    #[prost(string, tag = "9")]
    pub reason: String,
    /// The message that caused it.
    #[prost(string, tag = "10")]
    pub message_id: String,
    /// `consent:<id>` or `statute:<name>` for referral events.
    #[prost(string, tag = "11")]
    pub basis: String,
    /// Another agency concerned (the recipient of a purge request, ...).
    #[prost(string, tag = "12")]
    pub agency: String,
    #[prost(bytes = "vec", tag = "14")]
    pub prev_hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "15")]
    pub hash: Vec<u8>,
}

impl Entry {
    /// A draft: sequence and hashes are filled in by [`chain`].
    pub fn draft(event: &str, at: Millis) -> Entry {
        Entry {
            event: event.to_owned(),
            at,
            ..Default::default()
        }
    }

    pub fn referral(mut self, id: &str) -> Entry {
        self.referral_id = id.to_owned();
        self
    }

    pub fn consent(mut self, id: &str) -> Entry {
        self.consent_id = id.to_owned();
        self
    }

    pub fn actor(mut self, actor: &str) -> Entry {
        self.actor = actor.to_owned();
        self
    }

    pub fn states(mut self, from: &str, to: &str) -> Entry {
        self.from_state = from.to_owned();
        self.to_state = to.to_owned();
        self
    }

    pub fn reason(mut self, reason: &str) -> Entry {
        self.reason = reason.to_owned();
        self
    }

    pub fn message(mut self, id: &str) -> Entry {
        self.message_id = id.to_owned();
        self
    }

    pub fn basis(mut self, basis: &str) -> Entry {
        self.basis = basis.to_owned();
        self
    }

    pub fn agency(mut self, agency: &str) -> Entry {
        self.agency = agency.to_owned();
        self
    }
}

/// The hash of `e` (its `hash` field ignored) chained on `e.prev_hash`.
pub fn hash_of(e: &Entry) -> Hash {
    let mut unhashed = e.clone();
    unhashed.hash.clear();
    let mut h = Sha256::new();
    h.update(&e.prev_hash);
    h.update(unhashed.encode_to_vec());
    h.finalize().into()
}

/// Numbers and links `drafts` after the head `(seq, hash)`; returns the entries and the new
/// head.
pub fn chain(head: (u64, Hash), drafts: Vec<Entry>) -> (Vec<Entry>, (u64, Hash)) {
    let (mut seq, mut prev) = head;
    let mut out = Vec::with_capacity(drafts.len());
    for mut e in drafts {
        seq += 1;
        e.seq = seq;
        e.prev_hash = prev.to_vec();
        prev = hash_of(&e);
        e.hash = prev.to_vec();
        out.push(e);
    }
    (out, (seq, prev))
}

/// Where and why the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit entry {seq}: {why}")]
pub struct Broken {
    pub seq: u64,
    pub why: String,
}

/// Walks stored entries `(key sequence, bytes)` in key order and checks sequence numbers,
/// links and hashes, and that the chain ends at `head`. Returns the number of entries.
pub fn verify(entries: impl IntoIterator<Item = Stored>, head: (u64, Hash)) -> Result<u64, Broken> {
    let mut expected = 1u64;
    let mut prev = GENESIS;
    for (key, bytes) in entries {
        if key != expected {
            return Err(Broken {
                seq: expected,
                why: format!("missing: the next stored entry is {key}"),
            });
        }
        let e = Entry::decode(bytes.as_slice()).map_err(|err| Broken {
            seq: key,
            why: format!("unreadable: {err}"),
        })?;
        if e.seq != key {
            return Err(Broken {
                seq: key,
                why: format!("stored under {key} but says it is {}", e.seq),
            });
        }
        if e.prev_hash != prev {
            return Err(Broken {
                seq: key,
                why: "does not link to the entry before it".into(),
            });
        }
        if e.hash != hash_of(&e) {
            return Err(Broken {
                seq: key,
                why: "its contents do not match its hash (altered)".into(),
            });
        }
        prev = hash_of(&e);
        expected += 1;
    }
    let last = expected - 1;
    if (last, prev) != head {
        return Err(Broken {
            seq: last + 1,
            why: format!(
                "the log ends at {last} but its head says {}: entries were removed from the end",
                head.0
            ),
        });
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(n: usize) -> (Vec<Stored>, (u64, Hash)) {
        let drafts = (0..n)
            .map(|i| Entry::draft("referral.state", i as i64).referral(&format!("r{i}")))
            .collect();
        let (entries, head) = chain((0, GENESIS), drafts);
        (
            entries
                .into_iter()
                .map(|e| (e.seq, e.encode_to_vec()))
                .collect(),
            head,
        )
    }

    #[test]
    fn an_intact_chain_verifies_and_continues() {
        let (entries, head) = stored(5);
        assert_eq!(verify(entries.clone(), head), Ok(5));
        let (more, head2) = chain(head, vec![Entry::draft("consent.granted", 9)]);
        let mut all = entries;
        all.push((6, more[0].encode_to_vec()));
        assert_eq!(verify(all, head2), Ok(6));
    }

    #[test]
    fn alteration_deletion_and_reordering_name_the_entry() {
        let (entries, head) = stored(5);

        let mut altered = entries.clone();
        let mut e = Entry::decode(altered[2].1.as_slice()).unwrap();
        e.to_state = "COMPLETED".into();
        altered[2].1 = e.encode_to_vec();
        assert_eq!(verify(altered, head).unwrap_err().seq, 3);

        let mut deleted = entries.clone();
        deleted.remove(1);
        assert_eq!(verify(deleted, head).unwrap_err().seq, 2);

        let mut swapped = entries.clone();
        let (a, b) = (swapped[1].1.clone(), swapped[3].1.clone());
        swapped[1].1 = b;
        swapped[3].1 = a;
        assert_eq!(verify(swapped, head).unwrap_err().seq, 2);

        let mut truncated = entries.clone();
        truncated.pop();
        assert_eq!(verify(truncated, head).unwrap_err().seq, 5);

        let mut garbage = entries;
        garbage[0].1 = vec![0xff, 0xff];
        assert_eq!(verify(garbage, head).unwrap_err().seq, 1);
    }
}
