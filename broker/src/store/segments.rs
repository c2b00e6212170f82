//! Records appended in order and packed many to a sled key: `<prefix><segment number BE>` holds
//! up to `capacity` length-delimited records, the last (the *tail*) grows until it is full.
//!
//! Why: sled 0.34 keeps an in-memory page-table entry for every tree node, and a leaf holds at
//! most 16 keys, so what a store costs in memory follows its number of keys, not its bytes.
//! The audit log (several entries per referral) and the applied-ids time index (one per
//! inbound message) are only ever appended and read in order, so they need no key each.
//!
//! The tail is kept in memory and rewritten whole by each commit that appends to it: a
//! record costs its share of a segment key, plus up to `capacity` records' bytes rewritten
//! per commit while the load is light (under load, a commit fills whole segments).

use std::sync::Mutex;

use prost::encoding::{decode_varint, encode_varint};

use crate::error::{Error, Result};

pub(super) struct Segments {
    prefix: &'static [u8],
    capacity: usize,
    tail: Mutex<Tail>,
}

/// The last segment: its number, how many records it holds, and its bytes.
#[derive(Debug, Clone, Default)]
pub(super) struct Tail {
    number: u64,
    count: usize,
    bytes: Vec<u8>,
}

/// What [`Segments::stage`] put in a batch: to [`Segments::install`] once the batch is applied.
#[must_use]
pub(super) struct Staged(Option<Tail>);

impl Staged {
    /// The bytes of the tail it wrote (beyond the records themselves, what appending to a
    /// segment costs: the segment rewritten whole).
    pub(super) fn rewritten(&self) -> usize {
        self.0.as_ref().map_or(0, |t| t.bytes.len())
    }
}

impl Segments {
    /// The segments under `prefix` in `db`, with the last one read back as the tail.
    pub(super) fn open(db: &sled::Db, prefix: &'static [u8], capacity: usize) -> Result<Segments> {
        let tail = match db.scan_prefix(prefix).next_back() {
            None => Tail::default(),
            Some(kv) => {
                let (k, v) = kv?;
                let number = segment_number(prefix, &k)?;
                let count = split(&v).count();
                Tail {
                    number,
                    count,
                    bytes: v.to_vec(),
                }
            }
        };
        Ok(Segments {
            prefix,
            capacity,
            tail: Mutex::new(tail),
        })
    }

    fn key(&self, number: u64) -> Vec<u8> {
        let mut k = self.prefix.to_vec();
        k.extend_from_slice(&number.to_be_bytes());
        k
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        // A panic while holding the lock left no half-written tail: install replaces it whole.
        self.tail.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `records` to the segments in `batch`: the tail rewritten with the first of
    /// them, then new segments. Nothing changes here until [`Segments::install`].
    pub(super) fn stage<'r>(
        &self,
        batch: &mut sled::Batch,
        records: impl IntoIterator<Item = &'r [u8]>,
    ) -> Staged {
        let mut tail = self.lock().clone();
        let mut dirty = false;
        for record in records {
            if tail.count == self.capacity || tail.number == 0 {
                if dirty {
                    batch.insert(self.key(tail.number), std::mem::take(&mut tail.bytes));
                }
                tail = Tail {
                    number: tail.number + 1,
                    count: 0,
                    bytes: Vec::new(),
                };
            }
            encode_varint(record.len() as u64, &mut tail.bytes);
            tail.bytes.extend_from_slice(record);
            tail.count += 1;
            dirty = true;
        }
        if !dirty {
            return Staged(None);
        }
        batch.insert(self.key(tail.number), tail.bytes.clone());
        Staged(Some(tail))
    }

    /// Makes what `staged` wrote the tail: call once its batch is applied.
    pub(super) fn install(&self, staged: Staged) {
        if let Some(tail) = staged.0 {
            *self.lock() = tail;
        }
    }

    /// Every segment in order as `(number, records)`; an unreadable rest of a segment comes
    /// as one last record of its bytes, so that readers see exactly what is stored.
    #[cfg(test)]
    pub(super) fn read(&self, db: &sled::Db) -> Result<Vec<(u64, Vec<Vec<u8>>)>> {
        let mut out = Vec::new();
        self.for_each(db, &mut |_, _| Ok(()), &mut |n, records| {
            out.push((n, records));
            Ok(())
        })?;
        Ok(out)
    }

    /// Every segment in order as `(number, records)`, one at a time (memory: one segment); an
    /// unreadable rest of a segment comes as one last record of its bytes, so that readers see
    /// exactly what is stored. `read` is told each segment's key and size as it is read.
    pub(super) fn for_each(
        &self,
        db: &sled::Db,
        read: &mut dyn FnMut(&[u8], usize) -> Result<()>,
        f: &mut dyn FnMut(u64, Vec<Vec<u8>>) -> Result<()>,
    ) -> Result<()> {
        for kv in db.scan_prefix(self.prefix) {
            let (k, v) = kv?;
            read(&k, v.len())?;
            f(
                segment_number(self.prefix, &k)?,
                split(&v).map(|r| r.to_vec()).collect(),
            )?;
        }
        Ok(())
    }

    /// Removes whole segments (at most `max` of them) from the oldest on while `all_old` says
    /// every record of one may go; `each` sees every removed record. Returns how many records.
    /// A removed tail is never appended to again: the next record starts a new segment.
    pub(super) fn drain_front(
        &self,
        db: &sled::Db,
        batch: &mut sled::Batch,
        mut all_old: impl FnMut(&[u8]) -> bool,
        mut each: impl FnMut(&mut sled::Batch, &[u8]),
        max: usize,
    ) -> Result<usize> {
        let mut tail = self.lock();
        let mut removed = 0;
        for kv in db.scan_prefix(self.prefix).take(max) {
            let (k, v) = kv?;
            if !split(&v).all(&mut all_old) {
                break;
            }
            for record in split(&v) {
                each(batch, record);
                removed += 1;
            }
            batch.remove(k.as_ref());
            if segment_number(self.prefix, &k)? == tail.number {
                tail.count = self.capacity;
                tail.bytes.clear();
            }
        }
        Ok(removed)
    }
}

fn segment_number(prefix: &[u8], key: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = key
        .get(prefix.len()..)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::CorruptRecord {
            key: String::from_utf8_lossy(key).into_owned(),
            message: "segment key is not prefix + 8 bytes".into(),
        })?;
    Ok(u64::from_be_bytes(arr))
}

/// The records of a segment's bytes; an unreadable rest comes whole as the last record.
fn split(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if bytes.is_empty() {
            return None;
        }
        let mut cursor = bytes;
        let record = decode_varint(&mut cursor)
            .ok()
            .and_then(|len| usize::try_from(len).ok())
            .and_then(|len| cursor.get(..len).map(|r| (r, &cursor[len..])));
        match record {
            Some((r, rest)) => {
                bytes = rest;
                Some(r)
            }
            None => Some(std::mem::take(&mut bytes)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("record {i}").into_bytes()).collect()
    }

    fn all(s: &Segments, db: &sled::Db) -> Vec<Vec<u8>> {
        s.read(db)
            .unwrap()
            .into_iter()
            .flat_map(|(_, r)| r)
            .collect()
    }

    fn append(s: &Segments, db: &sled::Db, rs: &[Vec<u8>]) {
        let mut b = sled::Batch::default();
        let staged = s.stage(&mut b, rs.iter().map(Vec::as_slice));
        db.apply_batch(b).unwrap();
        s.install(staged);
    }

    #[test]
    fn appends_fill_segments_in_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let rs = records(23);
        {
            let db = crate::store::reopen(|| sled::open(dir.path()));
            let s = Segments::open(&db, b"A/", 4).unwrap();
            // One at a time (a light load), then a batch spanning several segments.
            for r in &rs[..6] {
                append(&s, &db, std::slice::from_ref(r));
            }
            append(&s, &db, &rs[6..17]);
            db.flush().unwrap();
        }
        let db = crate::store::reopen(|| sled::open(dir.path()));
        let s = Segments::open(&db, b"A/", 4).unwrap();
        append(&s, &db, &rs[17..]);
        assert_eq!(all(&s, &db), rs);
        let segs = s.read(&db).unwrap();
        assert_eq!(
            segs.iter().map(|(n, r)| (*n, r.len())).collect::<Vec<_>>(),
            [(1, 4), (2, 4), (3, 4), (4, 4), (5, 4), (6, 3)]
        );
    }

    #[test]
    fn an_unapplied_stage_changes_nothing() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let s = Segments::open(&db, b"A/", 4).unwrap();
        append(&s, &db, &records(2));
        let mut b = sled::Batch::default();
        let _dropped = s.stage(&mut b, [b"lost".as_slice()]);
        append(&s, &db, &[b"kept".to_vec()]);
        let got = all(&s, &db);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], b"kept");
    }

    #[test]
    fn drain_front_removes_whole_old_segments_from_the_oldest_on() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let s = Segments::open(&db, b"d/", 2).unwrap();
        // Records are their own "age"; segments [0,1] [2,9] [3,4] [5,6] [7].
        for r in [[0u8], [1], [2], [9], [3], [4], [5], [6], [7]] {
            append(&s, &db, &[r.to_vec()]);
        }
        let mut b = sled::Batch::default();
        let mut seen = Vec::new();
        let n = s
            .drain_front(&db, &mut b, |r| r[0] < 8, |_, r| seen.push(r[0]), 10)
            .unwrap();
        db.apply_batch(b).unwrap();
        // Stops at the first segment holding a young record, even if later ones are old.
        assert_eq!((n, seen), (2, vec![0, 1]));
        assert_eq!(all(&s, &db).len(), 7);
        let mut b = sled::Batch::default();
        let n = s
            .drain_front(&db, &mut b, |r| r[0] < 9, |_, _| (), 10)
            .unwrap();
        db.apply_batch(b).unwrap();
        assert_eq!(n, 0, "[2, 9] holds a young record");
        let mut b = sled::Batch::default();
        let n = s.drain_front(&db, &mut b, |_| true, |_, _| (), 2).unwrap();
        db.apply_batch(b).unwrap();
        assert_eq!(n, 4, "at most two segments at a time");
        let mut b = sled::Batch::default();
        let n = s.drain_front(&db, &mut b, |_| true, |_, _| (), 10).unwrap();
        db.apply_batch(b).unwrap();
        assert_eq!(n, 3, "the rest, the tail too");
        assert!(all(&s, &db).is_empty());
        // Appending after the tail went starts a new segment: nothing removed comes back.
        append(&s, &db, &[vec![8u8], vec![10u8], vec![11u8]]);
        assert_eq!(all(&s, &db), vec![vec![8u8], vec![10], vec![11]]);
        let numbers: Vec<u64> = s.read(&db).unwrap().iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [6, 7]);
    }

    #[test]
    fn an_unreadable_rest_is_one_last_record() {
        let mut bytes = Vec::new();
        encode_varint(3, &mut bytes);
        bytes.extend_from_slice(b"abc");
        encode_varint(50, &mut bytes);
        bytes.extend_from_slice(b"short");
        let got: Vec<&[u8]> = split(&bytes).collect();
        assert_eq!(got[0], b"abc");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].len(), 6);
    }
}
