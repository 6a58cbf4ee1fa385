//! Vector collections: replicated tables of a fixed shape
//! (`id TEXT PRIMARY KEY, vector BLOB, metadata TEXT, content TEXT`).

use std::io::Write;

use quiver_core::{Strategy, Value};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::catalog::{self, TableInfo, TableKind};
use crate::names::{self, quote};
use crate::sqlvalue::{from_ref, to_json};
use crate::{triggers, Result, Store, StoreError};

pub use quiver_core::Metric;

/// What defines a new collection.
#[derive(Debug, Clone)]
pub struct CollectionSpec {
    pub name: String,
    pub dim: usize,
    pub metric: Metric,
    pub strategy: Strategy,
    pub shard: String,
}

impl CollectionSpec {
    pub fn new(name: &str, dim: usize) -> Self {
        CollectionSpec {
            name: name.to_string(),
            dim,
            metric: Metric::Cosine,
            strategy: Strategy::Lww,
            shard: crate::DEFAULT_SHARD.to_string(),
        }
    }
}

/// One entry of a collection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub id: String,
    pub vector: Vec<f32>,
    #[serde(default = "empty_object")]
    pub metadata: serde_json::Value,
    #[serde(default)]
    pub content: Option<String>,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

impl Record {
    pub fn new(id: &str, vector: Vec<f32>) -> Self {
        Record {
            id: id.to_string(),
            vector,
            metadata: empty_object(),
            content: None,
        }
    }

    /// Parses one JSONL line (`{"id","vector","metadata","content"}`).
    pub fn from_json(line: &str) -> Result<Record> {
        serde_json::from_str(line).map_err(|e| StoreError::InvalidValue(e.to_string()))
    }
}

/// Rows of a collection in columns (see [`Store::put_columns`]).
#[derive(Debug, Clone, Default)]
pub struct RecordColumns {
    pub ids: Vec<String>,
    /// `ids.len()` vectors of the collection's dimension, one after the other.
    pub vectors: Vec<f32>,
    /// One JSON object text per id.
    pub metadata: Vec<String>,
    /// One per id, or empty for none.
    pub contents: Vec<Option<String>>,
}

/// One row as [`Store::write_rows`] takes it.
struct RowRef<'a> {
    id: &'a str,
    vector: &'a [f32],
    metadata: std::borrow::Cow<'a, str>,
    content: Option<&'a str>,
}

/// The largest dimension a collection may have.
pub const MAX_DIM: usize = 65_536;

pub(crate) fn vector_blob(v: &[f32]) -> Vec<u8> {
    quiver_core::vector::encode(v)
}

pub(crate) fn blob_vector(b: &[u8]) -> Vec<f32> {
    quiver_core::vector::decode(b).collect()
}

pub(crate) fn check_finite(v: &[f32]) -> Result<()> {
    if v.iter().fold(true, |ok, x| ok & x.is_finite()) {
        return Ok(());
    }
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(StoreError::NotFinite {
            index,
            value: v[index],
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_finite_blob(b: &[u8]) -> Result<()> {
    check_finite(&blob_vector(b))
}

pub(crate) fn check_metadata(text: &str) -> Result<()> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(other) => Err(StoreError::Metadata(format!("got {other}"))),
        Err(e) => Err(StoreError::Metadata(e.to_string())),
    }
}

/// Checks a record against a collection: dimension, finite numbers, object metadata.
pub fn check_record(t: &TableInfo, r: &Record) -> Result<()> {
    check_row(t, &r.id, &r.vector)?;
    if !r.metadata.is_object() {
        return Err(StoreError::Metadata(format!("got {}", r.metadata)));
    }
    Ok(())
}

/// A record's id and vector against its collection.
fn check_row(t: &TableInfo, id: &str, vector: &[f32]) -> Result<()> {
    let dim = t.dim.unwrap_or(0);
    if id.is_empty() {
        return Err(StoreError::InvalidValue("id must not be empty".into()));
    }
    if vector.len() != dim {
        return Err(StoreError::Dimension {
            collection: t.name.clone(),
            expected: dim,
            got: vector.len(),
        });
    }
    check_finite(vector)
}

/// Metadata text that must be one JSON object, checked as strictly as
/// parsing it into a value would (numbers in range, nesting depth, string
/// escapes) and without duplicate keys, without building it.
fn check_metadata_text(text: &str) -> Result<()> {
    if !text.trim_start().starts_with('{') {
        return check_metadata(text);
    }
    check_json_text(text).map_err(|e| StoreError::Metadata(e.to_string()))
}

/// Checks that `text` is one JSON value that parses into a
/// `serde_json::Value` without losing anything: numbers in range, nesting
/// within serde_json's depth limit, valid string escapes, and no object
/// with the same key twice (a parsed value would keep only the last).
pub fn check_json_text(text: &str) -> serde_json::Result<()> {
    serde_json::from_str::<CheckedJson>(text).map(drop)
}

/// Any JSON value, visited through `deserialize_any` (so with every check
/// a parsed value gets) and kept nowhere.
struct CheckedJson;

/// An object key, borrowed from the text unless it has escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(Visit)
    }
}

impl<'de> Deserialize<'de> for CheckedJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = CheckedJson;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_unit<E>(self) -> std::result::Result<CheckedJson, E> {
                Ok(CheckedJson)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<CheckedJson, A::Error> {
                while seq.next_element::<CheckedJson>()?.is_some() {}
                Ok(CheckedJson)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<CheckedJson, A::Error> {
                let mut keys: Vec<Key<'de>> = Vec::new();
                while let Some((k, CheckedJson)) = map.next_entry::<Key<'de>, CheckedJson>()? {
                    if keys.iter().any(|seen| seen.0 == k.0) {
                        return Err(serde::de::Error::custom(format!(
                            "the key {:?} appears twice in one object",
                            k.0
                        )));
                    }
                    keys.push(k);
                }
                Ok(CheckedJson)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// Names the record an error is about.
fn in_record(id: &str, e: StoreError) -> StoreError {
    match e {
        StoreError::InvalidValue(m) => StoreError::InvalidValue(format!("record {id:?}: {m}")),
        other => other,
    }
}

impl Store {
    /// Creates a collection: its table, its registration and its triggers.
    pub fn create_collection(&mut self, spec: &CollectionSpec) -> Result<TableInfo> {
        names::check(&spec.name)?;
        names::check_shard(&spec.shard)?;
        if spec.dim == 0 || spec.dim > MAX_DIM {
            return Err(StoreError::InvalidValue(format!(
                "dimension must be between 1 and {MAX_DIM}, got {}",
                spec.dim
            )));
        }
        let exists: bool = self.conn.query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = ?1",
            [&spec.name],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if exists {
            return Err(StoreError::AlreadyExists(spec.name.clone()));
        }
        let ddl = format!(
            "CREATE TABLE {q}(
               id TEXT PRIMARY KEY NOT NULL,
               vector BLOB NOT NULL CHECK (length(vector) = {bytes}),
               metadata TEXT NOT NULL DEFAULT '{{}}' CHECK (json_type(metadata) = 'object'),
               content TEXT
             )",
            q = quote(&spec.name),
            bytes = spec.dim * 4
        );
        self.local_write(|tx| {
            tx.execute_batch(&ddl)?;
            catalog::register(
                tx,
                &spec.name,
                &spec.shard,
                spec.strategy,
                TableKind::Collection,
                Some(spec.dim),
                Some(spec.metric),
                &catalog::TableOptions::default(),
            )
        })
    }

    /// Every collection.
    pub fn collections(&self) -> Result<Vec<TableInfo>> {
        Ok(self
            .tables()?
            .into_iter()
            .filter(|t| t.kind == TableKind::Collection)
            .collect())
    }

    /// One collection.
    pub fn collection(&self, name: &str) -> Result<TableInfo> {
        match catalog::load(&self.conn, name)? {
            Some(t) if t.kind == TableKind::Collection => Ok(t),
            _ => Err(StoreError::NoSuchCollection(name.to_string())),
        }
    }

    /// Drops a collection and its replication state on this replica only.
    pub fn drop_collection(&mut self, name: &str) -> Result<()> {
        let t = self.collection(name)?;
        self.local_write(|tx| {
            crate::evolve::unregister(tx, t.id)?;
            tx.execute_batch(&format!("DROP TABLE {}", quote(&t.name)))?;
            Ok(())
        })
    }

    /// Inserts or replaces one record.
    pub fn put(&mut self, collection: &str, record: &Record) -> Result<()> {
        self.put_many(collection, std::slice::from_ref(record))
            .map(|_| ())
    }

    /// Inserts or replaces many records in one transaction: all or nothing.
    /// Gives how many rows it wrote: a record equal to the row already held
    /// is left alone (no write, no new version), so loading the same data
    /// twice changes nothing the second time.
    pub fn put_many(&mut self, collection: &str, records: &[Record]) -> Result<usize> {
        let t = self.collection(collection)?;
        for r in records {
            check_record(&t, r).map_err(|e| in_record(&r.id, e))?;
        }
        self.write_rows(&t, records.len(), |i| {
            let r = &records[i];
            RowRef {
                id: &r.id,
                vector: &r.vector,
                metadata: std::borrow::Cow::Owned(r.metadata.to_string()),
                content: r.content.as_deref(),
            }
        })
    }

    /// Like [`Store::put_many`] for rows held in columns: one matrix of
    /// vectors and metadata already written as JSON text (stored as given;
    /// checked as strictly as a parse would, without building a tree), so
    /// a caller holding a matrix (numpy) builds no record per row. The same
    /// checks apply, and the batch is one transaction.
    pub fn put_columns(&mut self, collection: &str, rows: &RecordColumns) -> Result<usize> {
        let t = self.collection(collection)?;
        let dim = t.dim.unwrap_or(0);
        let n = rows.ids.len();
        if rows.vectors.len() != n * dim {
            return Err(StoreError::InvalidValue(format!(
                "{n} ids need {} vector values (dimension {dim}), got {}",
                n * dim,
                rows.vectors.len()
            )));
        }
        if rows.metadata.len() != n || !(rows.contents.is_empty() || rows.contents.len() == n) {
            return Err(StoreError::InvalidValue(format!(
                "{n} ids but {} metadata and {} contents",
                rows.metadata.len(),
                rows.contents.len()
            )));
        }
        let vector = |i: usize| &rows.vectors[i * dim..(i + 1) * dim];
        for (i, id) in rows.ids.iter().enumerate() {
            check_row(&t, id, vector(i))
                .and_then(|()| check_metadata_text(&rows.metadata[i]))
                .map_err(|e| in_record(id, e))?;
        }
        self.write_rows(&t, n, |i| RowRef {
            id: &rows.ids[i],
            vector: vector(i),
            metadata: std::borrow::Cow::Borrowed(&rows.metadata[i]),
            content: rows.contents.get(i).and_then(|c| c.as_deref()),
        })
    }

    /// Writes `n` checked rows in one local write.
    fn write_rows<'a>(
        &mut self,
        t: &TableInfo,
        n: usize,
        row: impl Fn(usize) -> RowRef<'a>,
    ) -> Result<usize> {
        let insert = format!(
            "INSERT INTO {}(id, vector, metadata, content) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO NOTHING",
            quote(&t.name)
        );
        let upsert = format!(
            "INSERT INTO {}(id, vector, metadata, content) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET vector = excluded.vector,
               metadata = excluded.metadata, content = excluded.content
             WHERE vector IS NOT excluded.vector OR metadata IS NOT excluded.metadata
               OR content IS NOT excluded.content",
            quote(&t.name)
        );
        let write = |stmt: &mut rusqlite::CachedStatement<'_>, r: &RowRef<'_>| -> Result<usize> {
            Ok(stmt.execute(params![
                r.id,
                vector_blob(r.vector),
                r.metadata.as_ref(),
                r.content
            ])?)
        };
        self.local_write(|tx| {
            // New rows log their own insert. From the first id that
            // exists (or repeats within the batch) on, rows go in order
            // through the upsert and its update trigger, which records the
            // columns that changed; keeping the order keeps batches valid
            // under the user's own unique indexes.
            let mut next = 0;
            let mut written = 0;
            if let Some(mut log) = triggers::DirectLog::begin(tx, t)? {
                {
                    let mut stmt = tx.prepare_cached(&insert)?;
                    while next < n {
                        let r = row(next);
                        if write(&mut stmt, &r)? == 0 {
                            break;
                        }
                        log.log(t.id, r.id)?;
                        written += 1;
                        next += 1;
                    }
                }
                log.finish()?;
            }
            let mut stmt = tx.prepare_cached(&upsert)?;
            for i in next..n {
                written += write(&mut stmt, &row(i))?;
            }
            Ok(written)
        })
    }

    /// One record, if present.
    pub fn get(&self, collection: &str, id: &str) -> Result<Option<Record>> {
        let t = self.collection(collection)?;
        let sql = format!(
            "SELECT id, vector, metadata, content FROM {} WHERE id = ?1",
            quote(&t.name)
        );
        let row = self
            .conn
            .prepare_cached(&sql)?
            .query_row([id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get(3)?,
                ))
            })
            .optional()?;
        row.map(|(id, v, m, content)| {
            Ok(Record {
                id,
                vector: blob_vector(&v),
                metadata: serde_json::from_str(&m)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                content,
            })
        })
        .transpose()
    }

    /// Deletes a record; returns whether it existed.
    pub fn delete(&mut self, collection: &str, id: &str) -> Result<bool> {
        let t = self.collection(collection)?;
        let sql = format!("DELETE FROM {} WHERE id = ?1", quote(&t.name));
        self.local_write(|tx| Ok(tx.execute(&sql, [id])? > 0))
    }

    /// Number of rows of a replicated table or collection.
    pub fn count(&self, table: &str) -> Result<u64> {
        let t = self.table(table)?;
        let n: i64 = self.conn.query_row(
            &format!("SELECT count(*) FROM {}", quote(&t.name)),
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Visits every record of a collection in id order, one at a time.
    pub fn scan(&self, collection: &str, mut f: impl FnMut(Record) -> Result<()>) -> Result<()> {
        let t = self.collection(collection)?;
        let sql = format!(
            "SELECT id, vector, metadata, content FROM {} ORDER BY id",
            quote(&t.name)
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let m: String = r.get(2)?;
            f(Record {
                id: r.get(0)?,
                vector: blob_vector(&r.get::<_, Vec<u8>>(1)?),
                metadata: serde_json::from_str(&m)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                content: r.get(3)?,
            })?;
        }
        Ok(())
    }

    /// Writes the visible rows of a collection or table as JSON lines sorted
    /// by key: the canonical form in which replicas are compared.
    pub fn export(&self, table: &str, out: &mut dyn Write) -> Result<u64> {
        let t = self.table(table)?;
        let io = |e: std::io::Error| StoreError::InvalidValue(format!("writing export: {e}"));
        let mut n = 0;
        if t.kind == TableKind::Collection {
            self.scan(table, |r| {
                serde_json::to_writer(&mut *out, &r)
                    .map_err(|e| StoreError::InvalidValue(e.to_string()))?;
                out.write_all(b"\n").map_err(io)?;
                n += 1;
                Ok(())
            })?;
            return Ok(n);
        }
        let cols: Vec<&str> =
            t.pk.iter()
                .chain(t.columns.iter())
                .map(|c| c.name.as_str())
                .collect();
        let order =
            t.pk.iter()
                .map(|c| quote(&c.name))
                .collect::<Vec<_>>()
                .join(", ");
        let sql = format!(
            "SELECT {} FROM {} ORDER BY {order}",
            cols.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", "),
            quote(&t.name)
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let mut obj = serde_json::Map::new();
            for (i, c) in cols.iter().enumerate() {
                let v: Value = from_ref(r.get_ref(i)?);
                obj.insert(c.to_string(), to_json(&v));
            }
            serde_json::to_writer(&mut *out, &obj)
                .map_err(|e| StoreError::InvalidValue(e.to_string()))?;
            out.write_all(b"\n").map_err(io)?;
            n += 1;
        }
        Ok(n)
    }
}
