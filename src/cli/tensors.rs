//! Reading and writing the named tensors of a safetensors file.

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// `text` with every character that could break a one-line message shown as an escape: control
/// characters (a newline as a backslash and `n`, likewise `r` and `t`; others as `\u{hex}`) and the
/// Unicode line and paragraph separators (U+2028, U+2029). A file's tensor names, and paths, may
/// hold any of them; they reach error messages and the summary through this. Backslashes are left
/// as they are, so applying it twice changes nothing.
pub fn printable(text: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A float tensor widened to f64, with its original dtype and shape.
pub struct FloatTensor {
    pub data: Vec<f64>,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

/// A non-negative integer tensor, with its shape.
pub struct IntTensor {
    pub data: Vec<usize>,
    pub shape: Vec<usize>,
}

/// An opened safetensors file.
pub struct TensorFile {
    bytes: Vec<u8>,
    pub path: String,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let tf = Self { bytes, path: path.display().to_string() };
        tf.parsed()?;
        Ok(tf)
    }

    fn parsed(&self) -> Result<SafeTensors<'_>, String> {
        SafeTensors::deserialize(&self.bytes)
            .map_err(|e| format!("{} is not a valid safetensors file: {e}", self.path))
    }

    pub fn names(&self) -> Vec<String> {
        self.parsed().map(|s| s.names().into_iter().map(String::from).collect()).unwrap_or_default()
    }

    /// The float tensor `name`, or `None` when absent.
    pub fn float(&self, name: &str) -> Result<Option<FloatTensor>, String> {
        let st = self.parsed()?;
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let raw = view.data();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F64 => raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F32 => {
                raw.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
            }
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64())
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes(c.try_into().unwrap()).to_f64())
                .collect(),
            other => {
                return Err(format!(
                    "tensor '{name}' has dtype {other:?}; expected a float tensor (F64, F32, BF16 or F16)"
                ))
            }
        };
        Ok(Some(FloatTensor { data, shape: view.shape().to_vec(), dtype: view.dtype() }))
    }

    /// The integer tensor `name` as non-negative sizes, or `None` when absent.
    pub fn sizes(&self, name: &str) -> Result<Option<IntTensor>, String> {
        let st = self.parsed()?;
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        };
        let raw = view.data();
        let vals: Vec<i128> = match view.dtype() {
            Dtype::I64 => {
                raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()).into()).collect()
            }
            Dtype::U64 => {
                raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap()).into()).collect()
            }
            Dtype::I32 => {
                raw.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()).into()).collect()
            }
            Dtype::U32 => {
                raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()).into()).collect()
            }
            Dtype::I16 => {
                raw.chunks_exact(2).map(|c| i16::from_le_bytes(c.try_into().unwrap()).into()).collect()
            }
            Dtype::U16 => {
                raw.chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap()).into()).collect()
            }
            Dtype::I8 => raw.iter().map(|&b| i128::from(b as i8)).collect(),
            Dtype::U8 => raw.iter().map(|&b| i128::from(b)).collect(),
            other => return Err(format!("tensor '{name}' has dtype {other:?}; expected an integer tensor")),
        };
        let mut out = Vec::with_capacity(vals.len());
        for (i, v) in vals.into_iter().enumerate() {
            let s = usize::try_from(v).map_err(|_| format!("{name}[{i}] is {v}; sizes must be >= 0"))?;
            out.push(s);
        }
        Ok(Some(IntTensor { data: out, shape: view.shape().to_vec() }))
    }
}

/// The bytes of a safetensors file holding f64 tensors (name, shape, data).
pub fn serialize_f64(tensors: &[(&str, Vec<usize>, &[f64])]) -> Result<Vec<u8>, String> {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, d)| d.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let v = TensorView::new(Dtype::F64, shape.clone(), b).map_err(|e| format!("tensor '{name}': {e}"))?;
        views.push((name.to_string(), v));
    }
    let meta: HashMap<String, String> =
        [("producer".to_string(), "tpo eval (f64 CPU reference)".to_string())].into();
    safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| format!("cannot serialize the results: {e}"))
}
