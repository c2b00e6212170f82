//! A whole [`ChangeSet`] as bytes: what the leading broker appends to the state log and every
//! broker applies to its own store (`cluster`). Built from the records of `codec` (the same
//! encodings sled stores), so a change replicated is exactly the change committed. Field
//! numbers are forever, as on the wire.

use prost::Message;

use super::{ChangeSet, Deadline, codec};
use crate::audit;
use crate::error::{Error, Result};
use crate::referral::DeadlineKind;

#[derive(Clone, PartialEq, Message)]
struct ChangeSetRecord {
    #[prost(bytes = "vec", repeated, tag = "1")]
    referrals: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "2")]
    seen: Vec<SeenRecord>,
    #[prost(message, repeated, tag = "3")]
    outbox_put: Vec<Keyed>,
    #[prost(uint64, repeated, tag = "4")]
    outbox_remove: Vec<u64>,
    #[prost(message, repeated, tag = "5")]
    deadlines_put: Vec<DeadlineRecord>,
    #[prost(message, repeated, tag = "6")]
    deadlines_remove: Vec<DeadlineRecord>,
    #[prost(message, repeated, tag = "7")]
    dead_letters: Vec<Keyed>,
    #[prost(message, repeated, tag = "8")]
    dead_letter_updates: Vec<Keyed>,
    #[prost(uint64, optional, tag = "9")]
    checkpoint: Option<u64>,
    #[prost(bytes = "vec", repeated, tag = "10")]
    consents: Vec<Vec<u8>>,
    #[prost(message, repeated, tag = "11")]
    audit: Vec<audit::Entry>,
    #[prost(bytes = "vec", optional, tag = "12")]
    counts: Option<Vec<u8>>,
    /// The state log's records only: a referral's empty envelope means "the one its reader
    /// already stores" (an envelope never changes once a referral exists), so that it travels
    /// once, with the referral's first record.
    #[prost(bool, tag = "13")]
    envelopes_kept: bool,
}

#[derive(Clone, PartialEq, Message)]
struct SeenRecord {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(int64, tag = "2")]
    at: i64,
    #[prost(bytes = "vec", tag = "3")]
    digest: Vec<u8>,
}

/// A record stored under a number (outbox key, dead letter's stream sequence).
#[derive(Clone, PartialEq, Message)]
struct Keyed {
    #[prost(uint64, tag = "1")]
    key: u64,
    #[prost(bytes = "vec", tag = "2")]
    record: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct DeadlineRecord {
    #[prost(int64, tag = "1")]
    at: i64,
    /// 0 receipt, 1 acceptance.
    #[prost(uint32, tag = "2")]
    kind: u32,
    #[prost(string, tag = "3")]
    referral_id: String,
}

fn deadline_record(d: &Deadline) -> DeadlineRecord {
    DeadlineRecord {
        at: d.at,
        kind: match d.kind {
            DeadlineKind::Receipt => 0,
            DeadlineKind::Acceptance => 1,
        },
        referral_id: d.referral_id.clone(),
    }
}

fn deadline(r: DeadlineRecord) -> Result<Deadline> {
    let kind = match r.kind {
        0 => DeadlineKind::Receipt,
        1 => DeadlineKind::Acceptance,
        n => return Err(corrupt(format!("deadline kind {n}"))),
    };
    Ok(Deadline {
        at: r.at,
        kind,
        referral_id: r.referral_id,
    })
}

fn corrupt(message: impl Into<String>) -> Error {
    Error::CorruptRecord {
        key: "state log change set".into(),
        message: message.into(),
    }
}

/// `c` as the bytes of one record (a snapshot's: every referral whole).
pub fn encode_change_set(c: &ChangeSet) -> Vec<u8> {
    encode_with(c, &|_| false)
}

/// `c` as a state-log record: the envelope of each referral `stored` says its reader already
/// holds is left out (see [`decode_log_change`]).
pub fn encode_log_change(c: &ChangeSet, stored: &dyn Fn(&str) -> bool) -> Vec<u8> {
    encode_with(c, stored)
}

fn encode_with(c: &ChangeSet, stored: &dyn Fn(&str) -> bool) -> Vec<u8> {
    let mut kept = false;
    let referrals = c
        .referrals
        .iter()
        .map(|r| {
            let leave_out = !r.envelope.is_empty() && stored(&r.id);
            kept |= leave_out;
            codec::encode_referral_with(r, !leave_out)
        })
        .collect();
    ChangeSetRecord {
        envelopes_kept: kept,
        referrals,
        seen: c
            .seen
            .iter()
            .map(|(key, at, digest)| SeenRecord {
                key: key.clone(),
                at: *at,
                digest: digest.to_vec(),
            })
            .collect(),
        outbox_put: c
            .outbox_put
            .iter()
            .map(|e| Keyed {
                key: e.key,
                record: codec::encode_outbox(e),
            })
            .collect(),
        outbox_remove: c.outbox_remove.clone(),
        deadlines_put: c.deadlines_put.iter().map(deadline_record).collect(),
        deadlines_remove: c.deadlines_remove.iter().map(deadline_record).collect(),
        dead_letters: c.dead_letters.iter().map(keyed_dead_letter).collect(),
        dead_letter_updates: c
            .dead_letter_updates
            .iter()
            .map(keyed_dead_letter)
            .collect(),
        checkpoint: c.checkpoint,
        consents: c.consents.iter().map(codec::encode_consent).collect(),
        audit: c.audit.clone(),
        counts: c.counts.as_ref().map(codec::encode_counts),
    }
    .encode_to_vec()
}

fn keyed_dead_letter(d: &super::DeadLetter) -> Keyed {
    Keyed {
        key: d.stream_seq,
        record: codec::encode_dead_letter(d),
    }
}

/// The change set a snapshot's record holds. A record that does not decode, or holds a record
/// that does not, is an error naming what was wrong; nothing of it is applied.
pub fn decode_change_set(bytes: &[u8]) -> Result<ChangeSet> {
    let (c, kept) = decode_log_change(bytes)?;
    if kept {
        return Err(corrupt(
            "a state-log record where a whole change set belongs",
        ));
    }
    Ok(c)
}

/// The change set a state-log record holds, and whether its referrals' empty envelopes mean
/// "the stored one" (the reader must fill them in from its store before it commits).
pub fn decode_log_change(bytes: &[u8]) -> Result<(ChangeSet, bool)> {
    let r = ChangeSetRecord::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let kept = r.envelopes_kept;
    Ok((decode_record(r)?, kept))
}

fn decode_record(r: ChangeSetRecord) -> Result<ChangeSet> {
    let dead = |list: Vec<Keyed>| -> Result<Vec<super::DeadLetter>> {
        list.into_iter()
            .map(|k| codec::decode_dead_letter(k.key, &k.record))
            .collect()
    };
    Ok(ChangeSet {
        referrals: r
            .referrals
            .iter()
            .map(|b| codec::decode_referral("state log referral", b))
            .collect::<Result<_>>()?,
        seen: r
            .seen
            .into_iter()
            .map(|s| {
                let digest: [u8; 32] = s
                    .digest
                    .as_slice()
                    .try_into()
                    .map_err(|_| corrupt(format!("digest of {} is not 32 bytes", s.key)))?;
                Ok((s.key, s.at, digest))
            })
            .collect::<Result<_>>()?,
        outbox_put: r
            .outbox_put
            .into_iter()
            .map(|k| codec::decode_outbox(k.key, &k.record))
            .collect::<Result<_>>()?,
        outbox_remove: r.outbox_remove,
        deadlines_put: r
            .deadlines_put
            .into_iter()
            .map(deadline)
            .collect::<Result<_>>()?,
        deadlines_remove: r
            .deadlines_remove
            .into_iter()
            .map(deadline)
            .collect::<Result<_>>()?,
        dead_letters: dead(r.dead_letters)?,
        dead_letter_updates: dead(r.dead_letter_updates)?,
        checkpoint: r.checkpoint,
        consents: r
            .consents
            .iter()
            .map(|b| codec::decode_consent("state log consent", b))
            .collect::<Result<_>>()?,
        audit: r.audit,
        counts: r.counts.map(|b| codec::decode_counts(&b)).transpose()?,
        state_seq: None,
    })
}
