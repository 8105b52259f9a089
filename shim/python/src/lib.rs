//! The supervise shim for Python (`import supervise`): numpy arrays in shim-owned memory,
//! captured at a safe point without a copy of their clean chunks and restored when the
//! program starts again; JSON values beside them; stop requests as a return value.

use std::ffi::c_void;

use numpy::ndarray;
use numpy::{Element as NpElement, PyArray, PyArrayDyn, PyArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::value::RawValue;
use supervise_shim::{Element, Next, Region, Start};

pyo3::create_exception!(
    supervise,
    SuperviseError,
    PyRuntimeError,
    "A snapshot, a restore or the store failed; the message names the entry or path."
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
}

/// The shim of this process: restore at start, snapshots at safe points.
#[pyclass(unsendable)]
struct Shim {
    inner: Option<supervise_shim::Shim>,
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
) -> PyResult<Bound<'py, PyAny>> {
    let len = shape
        .iter()
        .try_fold(1usize, |n, d| n.checked_mul(*d))
        .ok_or_else(|| {
            PyValueError::new_err(format!("array {name:?}: shape {shape:?} is too large"))
        })?;
    let mut region: Region<T> = shim.region(name, len).map_err(error)?;
    let ptr: *mut T = region.as_mut_ptr();
    let owner = Bound::new(
        py,
        RegionOwner {
            _region: std::sync::Mutex::new(Box::new(region)),
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
        let shim = self.shim()?;
        match kind.as_str() {
            "float64" => region_array::<f64>(py, shim, name, shape),
            "float32" => region_array::<f32>(py, shim, name, shape),
            "int64" => region_array::<i64>(py, shim, name, shape),
            "int32" => region_array::<i32>(py, shim, name, shape),
            "int16" => region_array::<i16>(py, shim, name, shape),
            "int8" => region_array::<i8>(py, shim, name, shape),
            "uint64" => region_array::<u64>(py, shim, name, shape),
            "uint32" => region_array::<u32>(py, shim, name, shape),
            "uint16" => region_array::<u16>(py, shim, name, shape),
            "uint8" => region_array::<u8>(py, shim, name, shape),
            other => Err(PyValueError::new_err(format!(
                "array {name:?}: dtype {other} is not one the shim stores (float64, float32, \
                 int8-64, uint8-64)"
            ))),
        }
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

    /// Whether a snapshot is due: call it once per step (an atomic load when none is).
    fn due(&mut self) -> PyResult<bool> {
        Ok(self.shim()?.due())
    }

    /// Takes a snapshot now, at this safe point: every array from `array()` (only the chunks
    /// written since the last one are copied), each of `values` (JSON-able; numbers are kept
    /// as written, so a `numpy.random.Generator`'s `bit_generator.state` round-trips) and each
    /// of `arrays` (any object with the buffer protocol, copied). Other Python threads run
    /// meanwhile (the GIL is released). Returns True when the program was asked to stop and
    /// this was its final snapshot: it should clean up and exit with `shim.stopped()`.
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
            let text: String = json
                .call_method1("dumps", (v,))
                .map_err(|e| {
                    PyValueError::new_err(format!("value {name:?} is not JSON-able: {e}"))
                })?
                .extract()?;
            let value = RawValue::from_string(text)
                .map_err(|e| PyValueError::new_err(format!("value {name:?}: {e}")))?;
            named_values.push((name, value));
        }
        let mut buffers = Vec::new();
        for (k, v) in arrays.into_iter().flat_map(|d| d.iter()) {
            let name: String = k.extract()?;
            let bytes: Vec<u8> = py
                .import("builtins")?
                .getattr("memoryview")?
                .call1((v,))?
                .call_method0("tobytes")?
                .extract()?;
            buffers.push((name, bytes));
        }
        let shim = self.shim()?;
        // Without the GIL: other Python threads run while the shim captures (and, for a
        // final snapshot, waits for it to be durable).
        let next = py
            .detach(|| {
                shim.snapshot(tag, |s| {
                    for (name, value) in &named_values {
                        s.value(name, value)?;
                    }
                    for (name, bytes) in &buffers {
                        s.raw(name, bytes)?;
                    }
                    Ok(())
                })
            })
            .map_err(error)?;
        Ok(matches!(next, Next::Stop))
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

/// Starts the shim: under `supervise`, restores the newest complete snapshot (the arrays and
/// values it holds come back through `array()` and `load()`); alone, snapshots go to
/// `$SUPERVISE_STORE` if set. `name` is the job's name when run alone (default: the script's
/// file name).
#[pyfunction]
#[pyo3(signature = (name=None))]
fn init(py: Python<'_>, name: Option<&str>) -> PyResult<Shim> {
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
    Ok(Shim { inner: Some(shim) })
}

/// Snapshots of numpy simulations, taken at a safe point without stopping them and restored
/// when they start again under `supervise`.
#[pymodule]
fn supervise(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(init, m)?)?;
    m.add_class::<Shim>()?;
    m.add("SuperviseError", m.py().get_type::<SuperviseError>())?;
    m.add("EXIT_STOPPED", supervise_shim::EXIT_STOPPED)?;
    Ok(())
}
