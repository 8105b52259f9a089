//! The supervise shim for Python (`import supervise`): numpy arrays in shim-owned memory,
//! captured at a safe point without a copy of their clean chunks and restored when the
//! program starts again; JSON values and copied buffers beside them; stop requests as a return
//! value or a `StopRequested` exception.

use std::ffi::{CString, c_void};
use std::sync::{Arc, Weak};

use numpy::ndarray;
use numpy::{Element as NpElement, PyArray, PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyRuntimeWarning, PySystemExit, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict};
use serde_json::value::RawValue;
use supervise_shim::format::{EntryKind, numpy_dtype};
use supervise_shim::{DuePoll, Element, Next, Region, Start};

pyo3::create_exception!(
    supervise,
    SuperviseError,
    PyRuntimeError,
    "A snapshot, a restore or the store failed; the message names the entry or path."
);

pyo3::create_exception!(
    supervise,
    StopRequested,
    PySystemExit,
    "Raised by `snapshot()` when the program was asked to stop (SIGTERM or Ctrl-C to \
     supervise, a batch system's time limit) and that snapshot, its final one, is durable; \
     only with `init(stop=\"raise\")`. Its exit code is 75 (`EXIT_STOPPED`), so a script that \
     lets it end the interpreter tells supervise it stopped cleanly; `finally` blocks and \
     `except StopRequested` run first. It is a `SystemExit`: `except Exception` does not catch \
     it."
);

/// A shim error as a Python exception.
fn error(e: supervise_shim::Error) -> PyErr {
    SuperviseError::new_err(e.to_string())
}

/// Keeps a region's memory alive while a numpy array over it lives (the array's base), on
/// whichever thread the array is dropped.
#[pyclass(frozen)]
struct RegionOwner {
    _region: std::sync::Mutex<Box<dyn std::any::Any + Send>>,
    /// Dropped with the array: the shim sees the array is gone (see [`Shim::arrays`]).
    _alive: Arc<()>,
}

/// The shim of this process: restore at start, snapshots at safe points.
#[pyclass(unsendable)]
struct Shim {
    inner: Option<supervise_shim::Shim>,
    /// `due()` without borrowing the shim.
    poll: Option<DuePoll>,
    /// Raise `StopRequested` instead of returning True on a stop.
    raise_on_stop: bool,
    /// The arrays from `array()` by name, to warn once when one was freed (its name bound to a
    /// new array): it is in no snapshot from then on.
    arrays: Vec<(String, Weak<()>)>,
}

impl Shim {
    fn shim(&mut self) -> PyResult<&mut supervise_shim::Shim> {
        self.inner
            .as_mut()
            .ok_or_else(|| PyRuntimeError::new_err("the shim was finished"))
    }
}

/// A numpy array of `shape` over a new region of `T` named `name`.
fn region_array<'py, T: Element + NpElement>(
    py: Python<'py>,
    shim: &mut supervise_shim::Shim,
    name: &str,
    shape: Vec<usize>,
    alive: Arc<()>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut region: Region<T> = shim.array(name, &shape).map_err(error)?;
    let ptr: *mut T = region.as_mut_ptr();
    let owner = Bound::new(
        py,
        RegionOwner {
            _region: std::sync::Mutex::new(Box::new(region)),
            _alive: alive,
        },
    )?;
    // SAFETY: `ptr` points at the region's `len` elements of T, aligned and initialised (an
    // anonymous mapping the region owns; moving the region into `owner` did not move it), and
    // that memory lives as long as `owner`, which the array holds as its base. numpy writes
    // it as the program does; the shim reads it only at the program's safe points.
    let array: Bound<'py, PyArrayDyn<T>> = unsafe {
        let view = ndarray::ArrayView::from_shape_ptr(ndarray::IxDyn(&shape), ptr as *const T);
        PyArray::borrow_from_array(&view, owner.into_any())
    };
    debug_assert_eq!(array.data() as *mut c_void, ptr as *mut c_void);
    Ok(array.into_any())
}

#[pymethods]
impl Shim {
    /// A numpy array of `shape` and `dtype` in memory the shim owns, named `name` in the
    /// snapshots: restored from the snapshot this run resumed from (if it has the entry),
    /// else zeros. Change it in place (`u[...] = ...`, `u += 1`, `np.copyto(u, ...)`): a name
    /// bound to a new array (`u = u + 1`) is no longer the snapshotted one.
    #[pyo3(signature = (name, shape, dtype))]
    fn array<'py>(
        &mut self,
        py: Python<'py>,
        name: &str,
        shape: &Bound<'py, PyAny>,
        dtype: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shape: Vec<usize> = match shape.extract::<usize>() {
            Ok(n) => vec![n],
            Err(_) => shape.extract()?,
        };
        let numpy = py.import("numpy")?;
        let kind: String = numpy
            .call_method1("dtype", (dtype,))?
            .getattr("name")?
            .extract()?;
        // Caught here even when the shim is inactive (no store), so a script that passes alone
        // does not fail once supervised.
        if self
            .arrays
            .iter()
            .any(|(n, a)| n == name && a.strong_count() > 0)
        {
            return Err(PyValueError::new_err(format!(
                "array {name:?} exists already: array() was called twice with this name"
            )));
        }
        let alive = Arc::new(());
        let marker = Arc::downgrade(&alive);
        let shim = self.shim()?;
        let array = match kind.as_str() {
            "float64" => region_array::<f64>(py, shim, name, shape, alive),
            "float32" => region_array::<f32>(py, shim, name, shape, alive),
            "int64" => region_array::<i64>(py, shim, name, shape, alive),
            "int32" => region_array::<i32>(py, shim, name, shape, alive),
            "int16" => region_array::<i16>(py, shim, name, shape, alive),
            "int8" => region_array::<i8>(py, shim, name, shape, alive),
            "uint64" => region_array::<u64>(py, shim, name, shape, alive),
            "uint32" => region_array::<u32>(py, shim, name, shape, alive),
            "uint16" => region_array::<u16>(py, shim, name, shape, alive),
            "uint8" => region_array::<u8>(py, shim, name, shape, alive),
            other => Err(PyValueError::new_err(format!(
                "array {name:?}: dtype {other} is not one the shim keeps in its own memory \
                 (float64, float32, int8-64, uint8-64): for complex128, a float64 array with a \
                 last dimension of 2 viewed as complex (`.view(np.complex128)[..., 0]`); other \
                 arrays go to snapshot(arrays=...)"
            ))),
        }?;
        // A freed array of the same name is replaced (others stay, for `warn_freed`).
        self.arrays
            .retain(|(n, a)| n != name || a.strong_count() > 0);
        self.arrays.push((name.to_owned(), marker));
        Ok(array)
    }

    /// The array named `name` in the snapshot this run resumed from, as `snapshot(arrays=...)`
    /// took it (its dtype and shape), in new memory of its own; or `default` when there is
    /// none. Arrays from `array()` come back through `array()` itself. A snapshot taken before
    /// shapes were recorded (manifest version 2 and older) gives the stored elements flat (its
    /// `arrays=` entries as uint8 bytes).
    #[pyo3(signature = (name, default=None))]
    fn load_array<'py>(
        &mut self,
        py: Python<'py>,
        name: &str,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let shim = self.shim()?;
        let found = shim.resumed_manifest().and_then(|m| {
            let entry = m.entry(name)?;
            Some((entry.kind.clone(), entry.len, m.array_shape(name).cloned()))
        });
        let Some((kind, len, shape)) = found else {
            return Ok(default.unwrap_or_else(|| py.None().into_bound(py)));
        };
        let EntryKind::Slice { elem, elem_size } = kind else {
            return Err(PyValueError::new_err(format!(
                "{name:?} is a value, not an array: load it with load()"
            )));
        };
        let (dtype, shape) = match shape {
            Some(a) => (
                a.dtype.or_else(|| numpy_dtype(&elem).map(str::to_owned)),
                a.shape,
            ),
            None => (
                numpy_dtype(&elem).map(str::to_owned),
                vec![len / u64::from(elem_size.max(1))],
            ),
        };
        let dtype =
            dtype.ok_or_else(|| SuperviseError::new_err(format!("array {name:?}: no dtype")))?;
        let len = usize::try_from(len)
            .map_err(|_| SuperviseError::new_err(format!("array {name:?} is too large")))?;
        let mut failed = None;
        let bytes = PyByteArray::new_with(py, len, |buf| {
            // Without the GIL while the entry is read, decompressed and verified: nothing else
            // sees this new bytearray yet.
            if let Err(e) = py.detach(|| shim.load_raw_into(name, &elem, buf)) {
                failed = Some(e);
            }
            Ok(())
        })?;
        if let Some(e) = failed {
            return Err(error(e));
        }
        let numpy = py.import("numpy")?;
        let flat = numpy.call_method1("frombuffer", (bytes, dtype))?;
        flat.call_method1("reshape", (shape,))
    }

    /// The value named `name` in the snapshot this run resumed from (any JSON value), or
    /// `default` when there is none.
    #[pyo3(signature = (name, default=None))]
    fn load<'py>(
        &mut self,
        py: Python<'py>,
        name: &str,
        default: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let value: Option<Box<RawValue>> = self.shim()?.load(name).map_err(error)?;
        match value {
            Some(v) => py.import("json")?.call_method1("loads", (v.get(),)),
            None => Ok(default.unwrap_or_else(|| py.None().into_bound(py))),
        }
    }

    /// Whether a snapshot is due: call it once per step (an atomic load and no allocation
    /// when none is). False once the shim is finished.
    fn due(&self) -> bool {
        self.poll.as_ref().is_some_and(DuePoll::due)
    }

    /// Takes a snapshot now, at this safe point: every array from `array()` (only the chunks
    /// written since the last one are copied), each of `values` (JSON-able; numbers are kept
    /// as written, so a `numpy.random.Generator`'s `bit_generator.state` round-trips) and each
    /// of `arrays` (any object with the buffer protocol: numpy arrays, memoryviews,
    /// array.array, bytes; copied, with its dtype and shape; back with `load_array()`). Other
    /// Python threads run meanwhile (the GIL is released). Returns True when the program was
    /// asked to stop and this was its final snapshot: it should clean up and exit with
    /// `shim.stopped()` (with `init(stop="raise")` it raises `StopRequested` instead). Warns
    /// (RuntimeWarning) once for an array from `array()` that was freed: its name was bound
    /// to a new array (`u = u + 1`), which no snapshot holds.
    #[pyo3(signature = (tag=None, values=None, arrays=None))]
    fn snapshot(
        &mut self,
        py: Python<'_>,
        tag: Option<&str>,
        values: Option<&Bound<'_, PyDict>>,
        arrays: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<bool> {
        let json = py.import("json")?;
        let mut named_values = Vec::new();
        for (k, v) in values.into_iter().flat_map(|d| d.iter()) {
            let name: String = k.extract()?;
            let kwargs = PyDict::new(py);
            kwargs.set_item("allow_nan", false)?;
            let text: String = json
                .call_method("dumps", (v,), Some(&kwargs))
                .map_err(|e| {
                    let hint = if e.is_instance_of::<PyValueError>(py) {
                        " (NaN and infinity are not JSON: keep such numbers in an array, \
                         arrays={...}, or as strings)"
                    } else {
                        ""
                    };
                    PyValueError::new_err(format!("value {name:?} is not JSON-able: {e}{hint}"))
                })?
                .extract()?;
            let value = RawValue::from_string(text)
                .map_err(|e| PyValueError::new_err(format!("value {name:?}: {e}")))?;
            named_values.push((name, value));
        }
        let mut buffers = Vec::new();
        for (k, v) in arrays.into_iter().flat_map(|d| d.iter()) {
            let name: String = k.extract()?;
            buffers.push(buffer_of(py, &name, &v)?);
        }
        self.warn_freed(py)?;
        let shim = self.shim()?;
        // Without the GIL: other Python threads run while the shim captures (and, for a
        // final snapshot, waits for it to be durable).
        let next = py
            .detach(|| {
                shim.snapshot(tag, |s| {
                    for (name, value) in &named_values {
                        s.value(name, value)?;
                    }
                    for b in &buffers {
                        s.array_bytes(&b.name, &b.bytes, &b.shape, &b.dtype)?;
                    }
                    Ok(())
                })
            })
            .map_err(error)?;
        let stop = matches!(next, Next::Stop);
        if stop && self.raise_on_stop {
            return Err(StopRequested::new_err(supervise_shim::EXIT_STOPPED));
        }
        Ok(stop)
    }

    /// The snapshot this run resumed from (its number), or None for a fresh start.
    #[getter]
    fn resumed_from(&mut self) -> PyResult<Option<u64>> {
        Ok(match self.shim()?.start() {
            Start::Resumed { seq, .. } => Some(*seq),
            Start::Fresh => None,
        })
    }

    /// Waits for the last snapshot to be durable and tells the supervisor the program
    /// finished; call it once at the end.
    fn finish(&mut self, py: Python<'_>) -> PyResult<()> {
        self.poll = None;
        match self.inner.take() {
            // Without the GIL while it waits for the writer.
            Some(shim) => py.detach(|| shim.finish()).map_err(error),
            None => Ok(()),
        }
    }

    /// The exit code of a program that stopped on request after its final snapshot (75):
    /// `sys.exit(shim.stopped())`.
    #[staticmethod]
    fn stopped() -> i32 {
        supervise_shim::EXIT_STOPPED
    }
}

impl Shim {
    /// Warns once for each array from `array()` that was freed since the last snapshot.
    fn warn_freed(&mut self, py: Python<'_>) -> PyResult<()> {
        let (gone, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.arrays)
            .into_iter()
            .partition(|(_, a)| a.strong_count() == 0);
        self.arrays = live;
        for (name, _) in gone {
            let message = CString::new(format!(
                "supervise: array {name:?} from shim.array() was freed, so snapshots no longer \
                 hold it and a resumed run gets zeros: was its name bound to a new array (as \
                 `{name} = {name} + 1` does)? Change it in place: `{name} += 1`, \
                 `{name}[...] = ...`, `np.add({name}, 1, out={name})`"
            ))
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
            // Level 1 is the Python line that called snapshot().
            PyErr::warn(py, &py.get_type::<PyRuntimeWarning>(), &message, 1)?;
        }
        Ok(())
    }
}

/// A buffer of `snapshot(arrays=...)`, copied: its bytes in C order, shape and numpy type.
struct Buffer {
    name: String,
    bytes: Vec<u8>,
    shape: Vec<usize>,
    dtype: String,
}

/// Copies `value` (anything with the buffer protocol) with its shape and numpy type.
fn buffer_of(py: Python<'_>, name: &str, value: &Bound<'_, PyAny>) -> PyResult<Buffer> {
    let numpy = py.import("numpy")?;
    // A numpy array as it is (datetime64 arrays have no buffer to export); anything else
    // through its buffer.
    let array = if value.is_instance(&numpy.getattr("ndarray")?)? {
        value.clone()
    } else {
        let view = py
            .import("builtins")?
            .getattr("memoryview")?
            .call1((value,))
            .map_err(|e| {
                PyValueError::new_err(format!(
                    "arrays entry {name:?} has no buffer (numpy arrays, memoryviews, \
                     array.array and bytes have one): {e}"
                ))
            })?;
        numpy.call_method1("asarray", (view,))?
    };
    let dtype = array.getattr("dtype")?;
    if !dtype.getattr("fields")?.is_none() || dtype.getattr("hasobject")?.extract::<bool>()? {
        return Err(PyValueError::new_err(format!(
            "arrays entry {name:?}: dtype {} has fields or objects, which the shim does not \
             store; pass each field as an array of its own",
            dtype.str()?
        )));
    }
    let shape: Vec<usize> = array.getattr("shape")?.extract()?;
    let flat = numpy
        .call_method1("ascontiguousarray", (array,))?
        .call_method1("reshape", (-1,))?
        .call_method1("view", (numpy.getattr("uint8")?,))?;
    let flat = flat.cast_into::<numpy::PyArray1<u8>>()?;
    let bytes = flat.readonly().as_slice()?.to_vec();
    Ok(Buffer {
        name: name.to_owned(),
        bytes,
        shape,
        dtype: dtype.getattr("str")?.extract()?,
    })
}

/// Starts the shim: under `supervise`, restores the newest complete snapshot (the arrays and
/// values it holds come back through `array()`, `load()` and `load_array()`); alone,
/// snapshots go to `$SUPERVISE_STORE` if set. `name` is the job's name when run alone
/// (default: the script's file name). `stop` says how a requested stop (SIGTERM or Ctrl-C to
/// supervise, a batch system's time limit) reaches the script once its final snapshot is
/// durable: `"return"` (default), `snapshot()` returns True; `"raise"`, it raises
/// `StopRequested` (exit code 75 if nothing catches it).
#[pyfunction]
#[pyo3(signature = (name=None, *, stop="return"))]
fn init(py: Python<'_>, name: Option<&str>, stop: &str) -> PyResult<Shim> {
    let raise_on_stop = match stop {
        "return" => false,
        "raise" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "stop={other:?}: say \"return\" (snapshot() returns True) or \"raise\" \
                 (it raises StopRequested)"
            )));
        }
    };
    let default = match name {
        Some(n) => n.to_owned(),
        None => {
            let argv0: String = py.import("sys")?.getattr("argv")?.get_item(0)?.extract()?;
            std::path::Path::new(&argv0)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "python".to_owned())
        }
    };
    let shim = supervise_shim::Shim::init(&default).map_err(error)?;
    Ok(Shim {
        poll: Some(shim.due_poll()),
        inner: Some(shim),
        raise_on_stop,
        arrays: Vec::new(),
    })
}

/// Snapshots of numpy simulations, taken at a safe point without stopping them and restored
/// when they start again under `supervise`.
#[pymodule]
fn supervise(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_class::<Shim>()?;
    m.add("SuperviseError", m.py().get_type::<SuperviseError>())?;
    m.add("StopRequested", m.py().get_type::<StopRequested>())?;
    m.add("EXIT_STOPPED", supervise_shim::EXIT_STOPPED)?;
    Ok(())
}
