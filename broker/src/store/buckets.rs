//! The sled store's applied message ids, packed into buckets by a keyed hash of the dedup key
//! (`h/<bucket u32 BE>`), and the sweep that forgets those past retention.
//!
//! Why buckets: sled 0.34 keeps a page-table entry for every tree node and splits a leaf at 16
//! keys, so its memory follows the number of keys; one key per applied id was half the keys of
//! a store whose referrals are open (two ids each). And a prune in time order removed keys
//! scattered over the whole key range, one leaf copied per removal. With [`BUCKETS`] buckets a
//! million-referral store keeps ~8 ids a bucket, and a prune sweeps the buckets in key order,
//! a few hundred a step, touching each leaf once.
//!
//! The hash is keyed with a random secret the store keeps (`m/bucket-key`, its own to each
//! store: buckets are a layout, never replicated). Every insert rewrites its bucket, so an
//! agency able to choose message ids that fall into one bucket could make each insert cost more
//! than the last; without the secret it cannot tell which ids do.
//!
//! A bucket's value: its records one after another, each
//! `u16 BE key length, key, i64 BE applied-at, u8 digest length, digest`.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::referral::Millis;

/// Key prefix of a bucket.
pub(super) const PREFIX: &[u8] = b"h/";
/// Where the store keeps its hash secret.
pub(super) const SECRET_KEY: &[u8] = b"m/bucket-key";
/// Bits of the hash that pick a bucket.
const BITS: u32 = 18;
/// How many buckets there are at most.
#[cfg(test)]
const BUCKETS: u32 = 1 << BITS;

/// One applied id: its dedup key, when it was applied, its digest (empty if recorded without).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Applied {
    pub key: String,
    pub at: Millis,
    pub digest: Vec<u8>,
}

/// A new random secret for a store's hash.
pub(super) fn new_secret() -> Result<[u8; 16]> {
    let mut secret = [0; 16];
    getrandom::getrandom(&mut secret)
        .map_err(|e| Error::Io(std::io::Error::other(format!("no randomness: {e}"))))?;
    Ok(secret)
}

/// The key of the bucket `dedup_key` falls into, under `secret`.
pub(super) fn bucket_key(secret: &[u8; 16], dedup_key: &str) -> [u8; 6] {
    let hash = Sha256::new()
        .chain_update(secret)
        .chain_update(dedup_key.as_bytes())
        .finalize();
    let n = u32::from_be_bytes([hash[0], hash[1], hash[2], hash[3]]) >> (32 - BITS);
    let mut k = [0; 6];
    k[..2].copy_from_slice(PREFIX);
    k[2..].copy_from_slice(&n.to_be_bytes());
    k
}

/// The records of a bucket's value.
pub(super) fn decode(key: &[u8], mut bytes: &[u8]) -> Result<Vec<Applied>> {
    let corrupt = |message: &str| Error::CorruptRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        message: format!("applied-ids bucket: {message}"),
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes
            .split_first_chunk::<2>()
            .ok_or_else(|| corrupt("cut in a key's length"))?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len + 9 {
            return Err(corrupt("cut in a record"));
        }
        let (k, rest) = rest.split_at(len);
        let key = std::str::from_utf8(k).map_err(|_| corrupt("a key that is not UTF-8"))?;
        let (at, rest) = rest
            .split_first_chunk::<8>()
            .ok_or_else(|| corrupt("cut in a time"))?;
        let (&dlen, rest) = rest
            .split_first()
            .ok_or_else(|| corrupt("cut in a digest's length"))?;
        let dlen = usize::from(dlen);
        if rest.len() < dlen {
            return Err(corrupt("cut in a digest"));
        }
        let (digest, rest) = rest.split_at(dlen);
        out.push(Applied {
            key: key.to_owned(),
            at: Millis::from_be_bytes(*at),
            digest: digest.to_vec(),
        });
        bytes = rest;
    }
    Ok(out)
}

/// A bucket's value holding `records`. A key longer than a u16 or a digest longer than a u8
/// is refused (the broker's dedup keys and SHA-256 digests are far below both).
pub(super) fn encode(records: &[Applied]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(records.iter().map(|r| r.key.len() + 43).sum());
    for r in records {
        let len = u16::try_from(r.key.len()).map_err(|_| too_long(&r.key, "key"))?;
        let dlen = u8::try_from(r.digest.len()).map_err(|_| too_long(&r.key, "digest"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(r.key.as_bytes());
        out.extend_from_slice(&r.at.to_be_bytes());
        out.push(dlen);
        out.extend_from_slice(&r.digest);
    }
    Ok(out)
}

fn too_long(key: &str, what: &str) -> Error {
    Error::CorruptRecord {
        key: key.chars().take(64).collect(),
        message: format!("an applied id's {what} too long for its bucket"),
    }
}

/// Puts `new` into `records`: an id already there is replaced (applied again), any other added.
pub(super) fn put(records: &mut Vec<Applied>, new: Applied) {
    match records.iter_mut().find(|r| r.key == new.key) {
        Some(r) => *r = new,
        None => records.push(new),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(key: &str, at: Millis, digest: &[u8]) -> Applied {
        Applied {
            key: key.into(),
            at,
            digest: digest.to_vec(),
        }
    }

    #[test]
    fn a_bucket_reads_back_what_was_written() {
        let records = vec![
            applied("centre/m1", 5, &[7; 32]),
            applied("", -3, &[]),
            applied("희망/m2", i64::MAX, &[1]),
        ];
        let bytes = encode(&records).unwrap();
        assert_eq!(decode(b"h/x", &bytes).unwrap(), records);
        assert_eq!(decode(b"h/x", &[]).unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_bucket_is_an_error_that_names_its_key() {
        let bytes = encode(&[applied("centre/m1", 5, &[7; 32])]).unwrap();
        for cut in 1..bytes.len() {
            let e = decode(b"h/bucket", &bytes[..cut]).unwrap_err().to_string();
            assert!(e.contains("h/bucket") && e.contains("cut"), "{cut}: {e}");
        }
        let mut bad = bytes.clone();
        bad[2] = 0xff;
        assert!(
            decode(b"h/b", &bad)
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
        let long = "x".repeat(70_000);
        assert!(encode(&[applied(&long, 1, &[])]).is_err());
        assert!(encode(&[applied("k", 1, &[0; 300])]).is_err());
    }

    #[test]
    fn an_id_applied_again_replaces_its_record() {
        let mut records = vec![applied("a", 1, &[1]), applied("b", 2, &[2])];
        put(&mut records, applied("a", 9, &[9]));
        put(&mut records, applied("c", 3, &[3]));
        assert_eq!(
            records,
            vec![
                applied("a", 9, &[9]),
                applied("b", 2, &[2]),
                applied("c", 3, &[3])
            ]
        );
    }

    #[test]
    fn buckets_depend_on_the_secret_and_spread_ids() {
        let (s1, s2) = ([1; 16], [2; 16]);
        let ids: Vec<String> = (0..4096).map(|i| format!("centre/m{i}")).collect();
        let mut seen = std::collections::HashSet::new();
        let mut same = 0;
        for id in &ids {
            let k = bucket_key(&s1, id);
            assert_eq!(&k[..2], PREFIX);
            assert!(u32::from_be_bytes([k[2], k[3], k[4], k[5]]) < BUCKETS);
            assert_eq!(k, bucket_key(&s1, id), "stable");
            same += usize::from(k == bucket_key(&s2, id));
            seen.insert(k);
        }
        // 4096 ids into 262144 buckets: almost all apart, and another secret moves them.
        assert!(seen.len() > 4000, "{}", seen.len());
        assert!(same < 10, "{same}");
    }
}
