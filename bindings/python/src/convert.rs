//! Between Python and the crates: errors, JSON values, SQL values and
//! vectors.

use numpy::{PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use quiver_core::wire::ErrorCode;
use quiver_core::Value;
use quiver_store::StoreError;

use crate::{Error, NotFound, ReadOnly, SyncError, Unauthorized, Untrusted, ValidationError};

/// A store error as the Python exception of its kind, with the message the
/// CLI prints.
pub(crate) fn store_err(e: StoreError) -> PyErr {
    let m = e.to_string();
    match e {
        StoreError::Dimension { .. }
        | StoreError::NotFinite { .. }
        | StoreError::Metadata(_)
        | StoreError::InvalidValue(_)
        | StoreError::InvalidName { .. }
        | StoreError::TableRefused { .. }
        | StoreError::AlreadyExists(_)
        | StoreError::ConflictResolved { .. }
        | StoreError::NoSuchVersion { .. } => ValidationError::new_err(m),
        StoreError::NoSuchCollection(_)
        | StoreError::NoSuchTable(_)
        | StoreError::NoSuchConflict(_)
        | StoreError::Missing { .. } => NotFound::new_err(m),
        StoreError::ReadOnly { .. } => ReadOnly::new_err(m),
        _ => Error::new_err(m),
    }
}

/// A sync error as the Python exception of its kind.
pub(crate) fn sync_err(e: quiver_sync::SyncError) -> PyErr {
    use quiver_sync::SyncError as S;
    let m = e.to_string();
    match e {
        S::Store(s) => store_err(s),
        S::Refused {
            code: ErrorCode::Unauthorized | ErrorCode::Forbidden,
            ..
        }
        | S::Peer {
            code: ErrorCode::Unauthorized | ErrorCode::Forbidden,
            ..
        } => Unauthorized::new_err(m),
        S::Untrusted(_) => Untrusted::new_err(m),
        S::BadAddress { .. } | S::BadPin(_) => ValidationError::new_err(m),
        _ => SyncError::new_err(m),
    }
}

/// For the store thread's own failure (it stopped).
pub(crate) fn gone(e: quiver_sync::SyncError) -> PyErr {
    sync_err(e)
}

pub(crate) fn bad(m: impl Into<String>) -> PyErr {
    ValidationError::new_err(m.into())
}

/// A JSON value as a Python object (dicts, lists, str, int, float, bool, None).
pub(crate) fn json_to_py(py: Python<'_>, v: &serde_json::Value) -> PyResult<Py<PyAny>> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => py.None(),
        J::Bool(b) => PyBool::new(py, *b).to_owned().into_any().unbind(),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any().unbind(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any().unbind(),
            _ => n
                .as_f64()
                .unwrap_or(f64::NAN)
                .into_pyobject(py)?
                .into_any()
                .unbind(),
        },
        J::String(s) => s.into_pyobject(py)?.into_any().unbind(),
        J::Array(a) => {
            let items = a
                .iter()
                .map(|x| json_to_py(py, x))
                .collect::<PyResult<Vec<_>>>()?;
            PyList::new(py, items)?.into_any().unbind()
        }
        J::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, json_to_py(py, x)?)?;
            }
            d.into_any().unbind()
        }
    })
}

/// A Python object as JSON: dicts with string keys, lists and tuples, str,
/// int, float (finite), bool and None. `what` names it in errors.
pub(crate) fn py_to_json(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<serde_json::Value> {
    use serde_json::Value as J;
    if obj.is_none() {
        return Ok(J::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(J::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(J::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(J::from(u));
        }
        return Err(bad(format!(
            "{what}: the integer {obj} does not fit in 64 bits"
        )));
    }
    if obj.is_instance_of::<PyFloat>() {
        let f: f64 = obj.extract()?;
        return serde_json::Number::from_f64(f)
            .map(J::Number)
            .ok_or_else(|| bad(format!("{what}: {f} is not a finite number")));
    }
    if obj.is_instance_of::<PyString>() {
        return Ok(J::String(obj.extract()?));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut out = serde_json::Map::new();
        for (k, v) in d.iter() {
            if !k.is_instance_of::<PyString>() {
                let shown = k.repr().map(|r| r.to_string()).unwrap_or_default();
                return Err(bad(format!("{what}: keys must be strings, got {shown}")));
            }
            let key: String = k.extract()?;
            let here = format!("{what}.{key}");
            out.insert(key, py_to_json(&v, &here)?);
        }
        return Ok(J::Object(out));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        let mut out = Vec::new();
        for (i, x) in obj.try_iter()?.enumerate() {
            out.push(py_to_json(&x?, &format!("{what}[{i}]"))?);
        }
        return Ok(J::Array(out));
    }
    // numpy scalars and other numbers
    if let Ok(f) = obj.extract::<f64>() {
        return serde_json::Number::from_f64(f)
            .map(J::Number)
            .ok_or_else(|| bad(format!("{what}: {f} is not a finite number")));
    }
    Err(bad(format!(
        "{what}: a {} cannot be stored as JSON (use dict, list, str, int, float, bool or None)",
        obj.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default()
    )))
}

/// Metadata: a dict (or None for `{}`).
pub(crate) fn metadata(obj: Option<&Bound<'_, PyAny>>) -> PyResult<serde_json::Value> {
    match obj {
        None => Ok(serde_json::json!({})),
        Some(o) if o.is_none() => Ok(serde_json::json!({})),
        Some(o) if o.is_instance_of::<PyDict>() => py_to_json(o, "metadata"),
        Some(o) => Err(bad(format!(
            "metadata must be a dict, got a {}",
            o.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        ))),
    }
}

/// A list of `n` metadata dicts (None for `{}`) as JSON object texts.
/// They go through Python's C `json` encoder in one pass (keys sorted) and
/// are split without building a tree; the store then checks each text as
/// strictly as a parse would. Where keys of mixed types cannot be sorted,
/// the dicts go through a parsed tree. Either way int, float, bool and
/// None keys become strings as `json.dumps` writes them, and two keys that
/// become the same string are refused. What the C encoder refuses (numpy scalars,
/// NaN) goes value by value, as `put` does, for the same answer and
/// message.
pub(crate) fn metadatas(list: &Bound<'_, PyAny>, n: usize) -> PyResult<Vec<String>> {
    let py = list.py();
    let items: Vec<Bound<'_, PyAny>> = list.try_iter()?.collect::<PyResult<_>>()?;
    if items.len() != n {
        return Err(bad(format!("{n} ids but {} metadatas", items.len())));
    }
    if let Some((i, x)) = items
        .iter()
        .enumerate()
        .find(|(_, x)| !x.is_none() && !x.is_instance_of::<PyDict>())
    {
        return Err(bad(format!(
            "metadatas[{i}]: metadata must be a dict, got a {}",
            x.get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default()
        )));
    }
    let dumps = |sort_keys: bool| -> PyResult<String> {
        let kwargs = PyDict::new(py);
        kwargs.set_item("allow_nan", false)?;
        kwargs.set_item("separators", (",", ":"))?;
        kwargs.set_item("sort_keys", sort_keys)?;
        kwargs.set_item("ensure_ascii", false)?;
        py.import("json")?
            .call_method("dumps", (PyList::new(py, &items)?,), Some(&kwargs))?
            .extract::<String>()
    };
    let object_text = |t: &str| match t {
        "null" => "{}".to_string(),
        t => t.to_string(),
    };
    {
        // Keys of mixed types cannot be sorted: those dicts go below.
        if let Ok(text) = dumps(true) {
            let raw: Vec<&serde_json::value::RawValue> =
                serde_json::from_str(&text).map_err(|e| bad(format!("metadatas: {e}")))?;
            return Ok(raw.into_iter().map(|v| object_text(v.get())).collect());
        }
    }
    let values: Vec<serde_json::Value> = match dumps(false) {
        Ok(text) => {
            // Keys that became the same string, at any depth.
            quiver_store::check_json_text(&text).map_err(|e| {
                bad(format!(
                    "metadatas: two keys are the same once written as strings ({e})"
                ))
            })?;
            serde_json::from_str(&text).map_err(|e| bad(format!("metadatas: {e}")))?
        }
        Err(_) => items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                if x.is_none() {
                    Ok(serde_json::Value::Null)
                } else {
                    py_to_json(x, &format!("metadatas[{i}]"))
                }
            })
            .collect::<PyResult<_>>()?,
    };
    Ok(values.iter().map(|v| object_text(&v.to_string())).collect())
}

fn dtype_of(obj: &Bound<'_, PyAny>) -> Option<String> {
    obj.getattr("dtype").ok().map(|d| d.to_string())
}

/// A vector: a 1-D, C-contiguous float32 numpy array, or a list of numbers.
pub(crate) fn vector(obj: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, f32>>() {
        return a
            .as_slice()
            .map(<[f32]>::to_vec)
            .map_err(|_| bad("the vector is not contiguous: pass np.ascontiguousarray(v)"));
    }
    if let Some(dtype) = dtype_of(obj) {
        let shape: Vec<usize> = obj.getattr("shape")?.extract().unwrap_or_default();
        if shape.len() != 1 {
            return Err(bad(format!(
                "a vector is one-dimensional, got an array of shape {shape:?}"
            )));
        }
        return Err(bad(format!(
            "vectors are float32, got {dtype}: pass v.astype(np.float32)"
        )));
    }
    obj.extract::<Vec<f32>>()
        .map_err(|_| bad("a vector is a float32 numpy array or a list of numbers"))
}

/// A matrix of `rows` vectors: a 2-D, C-contiguous float32 array, copied
/// out in one piece. Gives the values and the width.
pub(crate) fn matrix(obj: &Bound<'_, PyAny>, rows: usize) -> PyResult<(Vec<f32>, usize)> {
    let Ok(a) = obj.extract::<PyReadonlyArray2<'_, f32>>() else {
        return Err(match dtype_of(obj) {
            Some(d) if d != "float32" => bad(format!(
                "the matrix must be float32, got {d}: pass m.astype(np.float32)"
            )),
            Some(_) => bad("the matrix must be two-dimensional, one row per id"),
            None => bad("the matrix must be a 2-D float32 numpy array, one row per id"),
        });
    };
    let shape = a.shape().to_vec();
    if shape[0] != rows {
        return Err(bad(format!(
            "{} ids but the matrix has {} rows",
            rows, shape[0]
        )));
    }
    let values = a
        .as_slice()
        .map_err(|_| bad("the matrix is not C-contiguous: pass np.ascontiguousarray(m)"))?
        .to_vec();
    Ok((values, shape[1]))
}

/// A SQL value from Python: None, int, float, str, bytes or bool.
pub(crate) fn sql_value(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Integer(b.is_true() as i64));
    }
    if obj.is_instance_of::<PyInt>() {
        return Ok(Value::Integer(obj.extract()?));
    }
    if obj.is_instance_of::<PyFloat>() {
        return Ok(Value::Real(obj.extract()?));
    }
    if obj.is_instance_of::<PyString>() {
        return Ok(Value::Text(obj.extract()?));
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Value::Blob(b.as_bytes().to_vec()));
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, f32>>() {
        let v = a
            .as_slice()
            .map_err(|_| bad("a parameter array must be contiguous"))?;
        return Ok(Value::Blob(quiver_core::vector::encode(v)));
    }
    Err(bad(format!(
        "a SQL parameter is None, int, float, str, bytes or a float32 array; got {}",
        obj.get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default()
    )))
}

/// A SQL value as a Python object (blobs as bytes).
pub(crate) fn sql_to_py(py: Python<'_>, v: &Value) -> PyResult<Py<PyAny>> {
    Ok(match v {
        Value::Null => py.None(),
        Value::Integer(i) => i.into_pyobject(py)?.into_any().unbind(),
        Value::Real(f) => f.into_pyobject(py)?.into_any().unbind(),
        Value::Text(t) => t.into_pyobject(py)?.into_any().unbind(),
        Value::Blob(b) => PyBytes::new(py, b).into_any().unbind(),
    })
}

/// For failures that should not happen (a task that panicked).
pub(crate) fn internal(m: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!("quiverdb internal error: {m}"))
}
