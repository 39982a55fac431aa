//! `tpo eval`'s input: a safetensors file read into a batch (`logp`, `scores`, optional
//! `logp_old`, and the group layout), validated against itself. Kept apart from the rest of
//! `tpo eval` (arguments, output file) so that the fuzz crate compiles this very reader
//! (fuzz/src/cli.rs) without the writer.

use super::tensors::{printable, FloatTensor, TensorFile};
use tpo::GroupLayout;

/// The inputs of one evaluation, validated against each other.
pub struct Inputs {
    pub logp: FloatTensor,
    pub logp_old: Option<FloatTensor>,
    pub scores: FloatTensor,
    pub layout: GroupLayout,
    /// Tensors in the file that `tpo eval` does not read, sorted by name.
    pub unused: Vec<String>,
}

/// The tensors `tpo eval` reads.
const USED: [&str; 4] = ["logp", "scores", "logp_old", "group_sizes"];

/// Reads and validates `path`. The error is one line: whatever the file holds (tensor names are
/// arbitrary strings, control characters included) is shown escaped by [`printable`].
pub fn load(path: &std::path::Path) -> Result<Inputs, String> {
    read(path).map_err(|e| printable(&e))
}

fn read(path: &std::path::Path) -> Result<Inputs, String> {
    let f = TensorFile::open(path)?;
    let need = |name: &str| -> Result<FloatTensor, String> {
        f.float(name)?
            .ok_or_else(|| format!("{} has no tensor '{name}' (it holds: {})", f.path, list(&f.names())))
    };
    let logp = need("logp")?;
    let scores = need("scores")?;
    let logp_old = f.float("logp_old")?;
    let sizes = f.sizes("group_sizes")?;
    let same_shape = |t: &FloatTensor, name: &str| -> Result<(), String> {
        if t.shape != logp.shape {
            Err(format!("'{name}' has shape {:?} but 'logp' has shape {:?}", t.shape, logp.shape))
        } else {
            Ok(())
        }
    };
    same_shape(&scores, "scores")?;
    if let Some(o) = &logp_old {
        same_shape(o, "logp_old")?;
    }
    let layout = match (logp.shape.as_slice(), sizes) {
        ([b, k], None) => GroupLayout::uniform(*b, *k).map_err(|e| format!("logp shape [{b}, {k}]: {e}"))?,
        ([_, _], Some(_)) => {
            return Err("'group_sizes' is given but 'logp' is 2-D: give [B, K] tensors, or [N] \
                        tensors with group_sizes"
                .into())
        }
        ([n], Some(sz)) => {
            if sz.shape.len() != 1 {
                return Err(format!("'group_sizes' must be 1-D [B], got shape {:?}", sz.shape));
            }
            let s = sz.data;
            // Summed in u128 (exact for any count of usize sizes that fits in memory), so sizes near
            // 2^64 cannot wrap around to a small total that happens to match.
            let total: u128 = s.iter().map(|&x| x as u128).sum();
            if total != *n as u128 {
                return Err(format!("group_sizes add up to {total}, but 'logp' has {n} elements"));
            }
            GroupLayout::from_sizes(&s).map_err(|e| format!("group_sizes: {e}"))?
        }
        ([_], None) => return Err("'logp' is 1-D, so an integer tensor 'group_sizes' [B] is required".into()),
        (s, _) => return Err(format!("'logp' must be 2-D [B, K] or 1-D [N], got shape {s:?}")),
    };
    let mut unused: Vec<String> = f.names().into_iter().filter(|n| !USED.contains(&n.as_str())).collect();
    unused.sort();
    Ok(Inputs { logp, logp_old, scores, layout, unused })
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "no tensors".into()
    } else {
        let mut n = names.to_vec();
        n.sort();
        n.join(", ")
    }
}
