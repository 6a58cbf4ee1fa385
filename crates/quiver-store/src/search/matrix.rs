//! One collection held in memory for search: its vectors as one contiguous
//! row-major `f32` matrix, with ids, SQLite rowids, norms and flattened
//! metadata side by side, and the maps that let single rows be refreshed.
//!
//! Rows are dense: a removed row's slot is filled by the last row, so slot
//! order is arbitrary (search breaks distance ties by id, never by slot).
//!
//! Memory per row (64-bit): `4 × dim` for the vector, 4 for the norm
//! (cosine), 8 for the rowid, 16 for the id pointer plus the id text with
//! its 16-byte `Arc` header, about 50 in the two lookup maps, and the
//! metadata (see `fields`). Measured as the growth of the process's RSS
//! when loading 200,000 rows of dim 384 with 32-character ids: 1,758 bytes
//! a row with empty metadata, 2,013 with a 5-key ~100-byte object; so per
//! million vectors at dim 384, 1.76 to 2.0 GB, of which 1.536 GB is the
//! matrix.

use std::collections::{HashMap, HashSet};
use std::mem::size_of;
use std::sync::Arc;

use rusqlite::types::ValueRef;
use rusqlite::Connection;

use super::distance;
use super::fields::{Keys, Meta};
use crate::catalog::TableInfo;
use crate::names::quote;
use crate::{Metric, Result};

/// The cached rows of one collection.
pub(crate) struct Matrix {
    /// `quiver_tables.id` of the collection this was loaded from.
    pub table_id: i64,
    pub dim: usize,
    pub metric: Metric,
    /// `PRAGMA data_version` when loaded: a different value means another
    /// connection committed since, and the matrix is reloaded.
    pub data_version: i64,
    /// Loaded inside an open transaction, whose writes could still roll
    /// back: reloaded at the first search outside a transaction.
    pub provisional: bool,
    vectors: Vec<f32>,
    /// Euclidean norms, kept for cosine only (empty otherwise).
    norms: Vec<f32>,
    ids: Vec<Arc<str>>,
    rowids: Vec<i64>,
    meta: Vec<Meta>,
    keys: Keys,
    by_rowid: HashMap<i64, u32>,
    by_id: HashMap<Arc<str>, u32>,
}

/// A decoded row, before it gets a slot.
struct Row {
    rowid: i64,
    id: Arc<str>,
    vector: Vec<f32>,
    meta: Meta,
}

impl Matrix {
    /// Reads every row of the collection.
    pub fn load(
        conn: &Connection,
        t: &TableInfo,
        dim: usize,
        metric: Metric,
        data_version: i64,
    ) -> Result<Matrix> {
        let n: i64 = conn.query_row(
            &format!("SELECT count(*) FROM {}", quote(&t.name)),
            [],
            |r| r.get(0),
        )?;
        let n = n.max(0) as usize;
        let mut m = Matrix {
            table_id: t.id,
            dim,
            metric,
            data_version,
            provisional: !conn.is_autocommit(),
            vectors: Vec::with_capacity(n * dim),
            norms: Vec::with_capacity(if metric == Metric::Cosine { n } else { 0 }),
            ids: Vec::with_capacity(n),
            rowids: Vec::with_capacity(n),
            meta: Vec::with_capacity(n),
            keys: Keys::default(),
            by_rowid: HashMap::with_capacity(n),
            by_id: HashMap::with_capacity(n),
        };
        let mut stmt = conn.prepare(&format!(
            "SELECT rowid, id, vector, metadata FROM {}",
            quote(&t.name)
        ))?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let rowid: i64 = r.get(0)?;
            let Some(id) = text(r.get_ref(1)?) else {
                continue;
            };
            let Some(vector) = m.decode(r.get_ref(2)?) else {
                continue;
            };
            if m.by_id.contains_key(id) {
                continue;
            }
            let meta = match r.get_ref(3)? {
                ValueRef::Text(t) => Meta::from_text(&String::from_utf8_lossy(t), &mut m.keys),
                _ => Meta::default(),
            };
            m.push(Row {
                rowid,
                id: id.into(),
                vector,
                meta,
            });
        }
        Ok(m)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The vector of slot `i`.
    #[inline(always)]
    pub fn vector(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    /// The norm of slot `i` (cosine collections only).
    #[inline(always)]
    pub fn norm(&self, i: usize) -> f32 {
        self.norms[i]
    }

    #[inline(always)]
    pub fn id(&self, i: usize) -> &str {
        &self.ids[i]
    }

    #[inline(always)]
    pub fn rowid(&self, i: usize) -> i64 {
        self.rowids[i]
    }

    #[inline(always)]
    pub fn meta(&self, i: usize) -> &Meta {
        &self.meta[i]
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Bytes of the vector matrix alone.
    pub fn matrix_bytes(&self) -> usize {
        self.vectors.capacity() * size_of::<f32>()
    }

    /// Bytes of everything held, counted from the actual allocations
    /// (hash maps by capacity, allocator rounding not included).
    pub fn total_bytes(&self) -> usize {
        let map_entry = |entry: usize| entry + 1; // one control byte per bucket
        self.matrix_bytes()
            + self.norms.capacity() * size_of::<f32>()
            + self.rowids.capacity() * size_of::<i64>()
            + self.ids.capacity() * size_of::<Arc<str>>()
            + self
                .ids
                .iter()
                .map(|id| id.len() + 2 * size_of::<usize>())
                .sum::<usize>()
            + self.meta.iter().map(Meta::bytes).sum::<usize>()
            + (self.meta.capacity() - self.meta.len()) * size_of::<Meta>()
            + self.keys.bytes()
            + self.by_rowid.capacity() * map_entry(size_of::<(i64, u32)>())
            + self.by_id.capacity() * map_entry(size_of::<(Arc<str>, u32)>())
    }

    /// Re-reads the given rows from the table, the source of truth: a row
    /// that is gone (or no longer valid) leaves the matrix, any other is
    /// inserted or overwritten. Returns the rowids whose slots changed,
    /// including rows displaced by a row of the same id under a new rowid
    /// (`INSERT OR REPLACE` removes the old row without telling the hook).
    pub fn refresh(
        &mut self,
        conn: &Connection,
        table: &str,
        rowids: &HashSet<i64>,
    ) -> Result<Vec<i64>> {
        let mut touched = Vec::with_capacity(rowids.len());
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT id, vector, metadata FROM {} WHERE rowid = ?1",
            quote(table)
        ))?;
        for &rowid in rowids {
            touched.push(rowid);
            let mut rows = stmt.query([rowid])?;
            let row = match rows.next()? {
                Some(r) => {
                    let id = text(r.get_ref(0)?).map(Arc::<str>::from);
                    let vector = self.decode(r.get_ref(1)?);
                    let meta = match r.get_ref(2)? {
                        ValueRef::Text(t) => {
                            Meta::from_text(&String::from_utf8_lossy(t), &mut self.keys)
                        }
                        _ => Meta::default(),
                    };
                    id.zip(vector).map(|(id, vector)| Row {
                        rowid,
                        id,
                        vector,
                        meta,
                    })
                }
                None => None,
            };
            match row {
                Some(row) => self.upsert(row, &mut touched),
                None => {
                    if let Some(&slot) = self.by_rowid.get(&rowid) {
                        self.remove(slot as usize);
                    }
                }
            }
        }
        Ok(touched)
    }

    /// A vector blob as numbers, or `None` if it is not `dim` finite `f32`
    /// (written by some other client that bypassed the checks): such a row
    /// is not searchable.
    fn decode(&self, v: ValueRef<'_>) -> Option<Vec<f32>> {
        let ValueRef::Blob(b) = v else { return None };
        if b.len() != self.dim * 4 {
            return None;
        }
        let out: Vec<f32> = quiver_core::vector::decode(b).collect();
        out.iter().all(|x| x.is_finite()).then_some(out)
    }

    fn upsert(&mut self, row: Row, touched: &mut Vec<i64>) {
        // The same id under another rowid is a row that was replaced.
        if let Some(&slot) = self.by_id.get(&row.id) {
            if self.rowids[slot as usize] != row.rowid {
                touched.push(self.rowids[slot as usize]);
                self.remove(slot as usize);
            }
        }
        let Some(&slot) = self.by_rowid.get(&row.rowid) else {
            self.push(row);
            return;
        };
        let i = slot as usize;
        if self.ids[i] != row.id {
            // An UPDATE changed the key of this row.
            self.by_id.remove(&self.ids[i]);
            self.by_id.insert(row.id.clone(), slot);
            self.ids[i] = row.id;
        }
        let dim = self.dim;
        self.vectors[i * dim..(i + 1) * dim].copy_from_slice(&row.vector);
        if self.metric == Metric::Cosine {
            self.norms[i] = distance::norm(&row.vector);
        }
        self.meta[i] = row.meta;
    }

    fn push(&mut self, row: Row) {
        // Slots are u32: four billion rows would need 6 TB at dim 384.
        let slot = self.ids.len() as u32;
        self.vectors.extend_from_slice(&row.vector);
        if self.metric == Metric::Cosine {
            self.norms.push(distance::norm(&row.vector));
        }
        self.by_rowid.insert(row.rowid, slot);
        self.by_id.insert(row.id.clone(), slot);
        self.ids.push(row.id);
        self.rowids.push(row.rowid);
        self.meta.push(row.meta);
    }

    /// Removes slot `i`, moving the last row into it.
    fn remove(&mut self, i: usize) {
        let last = self.ids.len() - 1;
        let dim = self.dim;
        self.by_rowid.remove(&self.rowids[i]);
        self.by_id.remove(&self.ids[i]);
        if i != last {
            self.vectors
                .copy_within(last * dim..(last + 1) * dim, i * dim);
        }
        self.vectors.truncate(last * dim);
        if self.metric == Metric::Cosine {
            self.norms.swap_remove(i);
        }
        self.ids.swap_remove(i);
        self.rowids.swap_remove(i);
        self.meta.swap_remove(i);
        if i != last {
            self.by_rowid.insert(self.rowids[i], i as u32);
            self.by_id.insert(self.ids[i].clone(), i as u32);
        }
    }
}

fn text(v: ValueRef<'_>) -> Option<&str> {
    match v {
        ValueRef::Text(t) => std::str::from_utf8(t).ok(),
        _ => None,
    }
}
