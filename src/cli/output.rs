//! Writing the files `tpo` produces without ever losing a file the user owns.
//!
//! Every file written by `tpo eval --out` and `tpo reproduce --out` goes through [`write`], which
//! applies these rules:
//!
//! - **Only regular files are written.** A destination that is a directory, a device, a FIFO or
//!   a socket is refused, with or without `--force`.
//! - **Symbolic links are followed, never replaced.** A link to a regular file is treated as that
//!   file: the rules below apply to the file it points to, and with `--force` the new contents
//!   replace that file while the link stays as it is. A dangling link is refused (writing would
//!   create a file somewhere the user did not name). Links in the parent folders are followed as
//!   usual.
//! - **Inputs are never written over**, with or without `--force`: a destination that is the
//!   same file as an input (same device and inode, which catches hard links, `./x` against `x`
//!   and links to the input, or the same canonical path) is refused.
//! - **An existing file is replaced only with `--force`**, and a read-only one (no write
//!   permission bit set) never: it is refused with an error saying so, so that a file the user
//!   protected stays protected even for `root`.
//! - **Missing parent folders are created.**
//! - **Writes are atomic**: the bytes go to a temporary file in the destination's folder, which
//!   is then linked (new files: the link fails rather than clobber a file that appeared in the
//!   meantime) or renamed (`--force`) onto the destination, so an interrupted run never leaves a
//!   half-written file. A new file gets the usual permissions (`0666` less the umask: `0644`
//!   under umask `022`); a replaced file keeps its permissions.
//! - **Errors** are one line and name the user's path, never the temporary file, which is
//!   removed on every error path. Only a process killed outright (`SIGKILL`, power loss) can
//!   leave a temporary `.NAME.tpo-PID-N.tmp` file (or a `.tpo-scratch-PID-N.tmp` folder of
//!   figures) behind; the destination is then untouched.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// What a command allows its outputs to do.
pub struct Policy {
    /// Replace existing regular files (`--force`).
    pub force: bool,
    inputs: Vec<Input>,
}

/// An input file, identified so that no output can be written over it.
struct Input {
    path: PathBuf,
    canonical: Option<PathBuf>,
    #[cfg(unix)]
    id: Option<(u64, u64)>,
}

impl Policy {
    /// A policy that protects the files `inputs` (which should exist; one that does not cannot be
    /// overwritten anyway, since it is compared again when an output is checked).
    pub fn new(force: bool, inputs: &[&Path]) -> Self {
        let inputs = inputs
            .iter()
            .map(|p| Input {
                path: p.to_path_buf(),
                canonical: fs::canonicalize(p).ok(),
                #[cfg(unix)]
                id: fs::metadata(p).ok().map(|m| file_id(&m)),
            })
            .collect();
        Self { force, inputs }
    }

    /// The input that `dest` (an existing regular file, `meta` its metadata after following
    /// links, `canonical` its canonical path) is, if any.
    fn input_matching(&self, meta: &Metadata, canonical: Option<&Path>) -> Option<&Input> {
        #[cfg(not(unix))]
        let _ = meta;
        self.inputs.iter().find(|i| {
            #[cfg(unix)]
            if i.id == Some(file_id(meta)) {
                return true;
            }
            matches!((&i.canonical, canonical), (Some(a), Some(b)) if a == b)
        })
    }
}

#[cfg(unix)]
fn file_id(m: &Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Where an output will go, once checked.
#[derive(Debug)]
struct Target {
    /// The file actually written: the path given, or the file a symbolic link points to.
    dest: PathBuf,
    /// The metadata of the existing regular file being replaced (only with `--force`).
    existing: Option<Metadata>,
}

/// Checks that `path` may be written under `policy`, without writing anything: the error
/// [`write`] would give before touching the disk, so a long computation can fail early.
pub fn check(path: &Path, policy: &Policy) -> Result<(), String> {
    target(path, policy).map(|_| ())
}

/// Writes `bytes` to `path` under the rules of the module documentation.
pub fn write(path: &Path, policy: &Policy, bytes: &[u8]) -> Result<(), String> {
    let user = path.display();
    let t = target(path, policy)?;
    let dir = match t.dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if t.existing.is_none() {
        fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create the folder {} for {user}: {}", dir.display(), io(&e)))?;
    }
    let name = t.dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (tmp, file) = create_temp(&dir, &name).map_err(|e| format!("cannot write {user}: {}", io(&e)))?;
    let guard = TempFile(tmp);
    fill(file, bytes, t.existing.as_ref()).map_err(|e| format!("cannot write {user}: {}", io(&e)))?;
    // The destination is checked again right before it is replaced, in case it changed while the
    // bytes were written.
    let again = target(path, policy)?;
    if again.dest != t.dest || again.existing.is_some() != t.existing.is_some() {
        return Err(format!("{user} changed while it was being written; not replacing it"));
    }
    match &t.existing {
        None => match fs::hard_link(&guard.0, &t.dest) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(format!("{user} appeared while it was being written; not replacing it"))
            }
            // A file system without hard links: the destination was absent a moment ago.
            Err(_) => {
                fs::rename(&guard.0, &t.dest).map_err(|e| format!("cannot write {user}: {}", io(&e)))?
            }
        },
        Some(_) => fs::rename(&guard.0, &t.dest).map_err(|e| format!("cannot write {user}: {}", io(&e)))?,
    }
    drop(guard);
    Ok(())
}

/// A temporary file, removed when dropped (after a rename it is gone already, and removing the
/// name fails harmlessly; after a hard link, removing it leaves the destination).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Creates a new, unique hidden file next to the destination (`.NAME.tpo-PID-N.tmp`), with the
/// default permissions `0666` less the umask.
fn create_temp(dir: &Path, name: &str) -> std::io::Result<(PathBuf, File)> {
    let pid = std::process::id();
    let mut n = 0u32;
    loop {
        let p = dir.join(format!(".{name}.tpo-{pid}-{n}.tmp"));
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

/// A private scratch folder, removed with its contents when dropped: for writers that can only
/// write to a path of their own (the figure backends), whose files are then passed to [`write`].
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates a new hidden folder `.tpo-scratch-PID-N.tmp` inside `dir` (which must exist).
    pub fn new_in(dir: &Path) -> std::io::Result<Self> {
        let pid = std::process::id();
        let mut n = 0u32;
        loop {
            let p = dir.join(format!(".tpo-scratch-{pid}-{n}.tmp"));
            match fs::create_dir(&p) {
                Ok(()) => return Ok(Self(p)),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The folder's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes the bytes, gives the file the permissions of the one it replaces, and flushes it to
/// the disk.
fn fill(mut f: File, bytes: &[u8], existing: Option<&Metadata>) -> std::io::Result<()> {
    f.write_all(bytes)?;
    if let Some(m) = existing {
        f.set_permissions(m.permissions())?;
    }
    f.sync_all()
}

/// An I/O error as text, without the path that some errors carry (the caller names the user's).
fn io(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::PermissionDenied => "permission denied".into(),
        _ => {
            let s = e.to_string();
            // `io::Error`s from `std::fs` carry no path; strip the "(os error N)" noise only.
            s.split(" (os error").next().unwrap_or(&s).to_string()
        }
    }
}

/// Resolves and checks the destination of `path`.
fn target(path: &Path, policy: &Policy) -> Result<Target, String> {
    let user = path.display();
    if path.as_os_str().is_empty() {
        return Err("the output path is empty".into());
    }
    if path.file_name().is_none() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(format!("{user} does not name a file"));
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Ok(Target { dest: path.to_path_buf(), existing: None });
        }
        Err(e) => return Err(format!("cannot write {user}: {}", io(&e))),
    };
    let (dest, meta) = if meta.file_type().is_symlink() {
        let to = fs::read_link(path).map(|p| p.display().to_string()).unwrap_or_else(|_| "?".into());
        match fs::metadata(path) {
            Ok(m) => {
                let c = fs::canonicalize(path)
                    .map_err(|e| format!("cannot follow the link {user}: {}", io(&e)))?;
                (c, m)
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(format!(
                    "{user} is a symbolic link to {to}, which does not exist; not writing through it"
                ))
            }
            Err(e) => return Err(format!("cannot follow the link {user}: {}", io(&e))),
        }
    } else {
        (path.to_path_buf(), meta)
    };
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(format!("{user} is a directory; give a file name"));
    }
    if !ft.is_file() {
        return Err(format!("{user} is {}, not a regular file; not writing to it", kind(&meta)));
    }
    let canonical = fs::canonicalize(&dest).ok();
    if let Some(i) = policy.input_matching(&meta, canonical.as_deref()) {
        return Err(if i.path == path {
            format!("{user} is the input file; choose another output path")
        } else {
            format!(
                "{user} is the input file {} (the same file); choose another output path",
                i.path.display()
            )
        });
    }
    if !policy.force {
        return Err(format!("{user} already exists (pass --force to overwrite it)"));
    }
    if meta.permissions().readonly() {
        return Err(format!("{user} is read-only; not overwriting it, even with --force"));
    }
    Ok(Target { dest, existing: Some(meta) })
}

/// What kind of non-regular file `m` describes, for an error message.
fn kind(m: &Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let ft = m.file_type();
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    #[cfg(not(unix))]
    let _ = m;
    "a special file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_lose_the_os_error_suffix() {
        let e = std::io::Error::from_raw_os_error(27);
        assert_eq!(io(&e), "File too large");
    }
}
