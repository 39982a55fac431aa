//! `tpo eval` end to end: round-trips a file, and rejects bad ones with one line and no panic.

use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::Command;
use tpo::{cpu, FitConfig, GroupLayout, TargetConfig};

fn tpo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tpo")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary in `dir` through `sh`, after the shell commands `pre` (a umask, a file-size
/// limit).
fn tpo_sh(dir: &Path, pre: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{pre}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_tpo"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A path in this process's scratch folder. The folder is emptied at its first use: one left by
/// an earlier run whose process had the same id (ids wrap) would hold outputs that `tpo` refuses
/// to overwrite, failing the tests that write them.
fn tmp(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("tpo-cli-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
    .join(name)
}

enum T<'a> {
    F32(&'a [f32]),
    Bf16(&'a [f32]),
    I64(&'a [i64]),
}

fn write(path: &Path, tensors: &[(&str, Vec<usize>, T)]) {
    let bytes: Vec<(Dtype, Vec<u8>)> = tensors
        .iter()
        .map(|(_, _, t)| match t {
            T::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            T::Bf16(v) => {
                (Dtype::BF16, v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect())
            }
            T::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        })
        .collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), (d, b))| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize_to_file(views, None, path).unwrap();
}

fn read_f64(path: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), Dtype::F64);
    (
        t.shape().to_vec(),
        t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
    )
}

#[test]
fn uniform_file_round_trips_against_the_reference() {
    let (inp, out) = (tmp("u.safetensors"), tmp("u.out.safetensors"));
    let logp = [-3.0f32, -2.0, -5.0, -1.0, -40.0, -41.5, -39.0, -45.0];
    let old = [-3.1f32, -2.2, -4.0, -1.5, -40.0, -41.0, -39.5, -44.0];
    let s = [1.0f32, 0.0, 0.0, 1.0, 0.3, 0.9, 0.1, 0.5];
    write(
        &inp,
        &[
            ("logp", vec![2, 4], T::F32(&logp)),
            ("logp_old", vec![2, 4], T::F32(&old)),
            ("scores", vec![2, 4], T::F32(&s)),
        ],
    );
    let (code, stdout, stderr) =
        tpo(&["eval", inp.to_str().unwrap(), "--eta", "0.5", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 groups (uniform, K = 4)"), "{stdout}");
    let layout = GroupLayout::uniform(2, 4).unwrap();
    let want = cpu::target_and_fit(
        &logp,
        Some(&old),
        &s,
        &layout,
        &TargetConfig::with_eta(0.5),
        &FitConfig::default(),
    )
    .unwrap();
    assert_eq!(read_f64(&out, "loss"), (vec![], vec![want.fit.loss]));
    assert_eq!(read_f64(&out, "group_loss"), (vec![2], want.fit.group_loss.clone()));
    assert_eq!(read_f64(&out, "target"), (vec![2, 4], want.target.clone()));
    assert_eq!(read_f64(&out, "grad"), (vec![2, 4], want.fit.grad.clone()));
}

#[test]
fn ragged_on_policy_bf16_file() {
    let (inp, out) = (tmp("r.safetensors"), tmp("r.out.safetensors"));
    let logp = [-3.0f32, -2.0, -5.0, -1.0, -40.0, -41.5];
    let s = [1.0f32, 0.0, 0.0, 1.0, 0.3, 0.9];
    write(
        &inp,
        &[
            ("logp", vec![6], T::Bf16(&logp)),
            ("scores", vec![6], T::F32(&s)),
            ("group_sizes", vec![3], T::I64(&[3, 1, 2])),
        ],
    );
    let (code, stdout, stderr) = tpo(&["eval", inp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ragged") && stdout.contains("on-policy"), "{stdout}");
    let layout = GroupLayout::from_sizes(&[3, 1, 2]).unwrap();
    let l16: Vec<half::bf16> = logp.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let want = cpu::target_and_fit(&l16, None, &s, &layout, &TargetConfig::default(), &FitConfig::default())
        .unwrap();
    assert_eq!(read_f64(&out, "grad").1, want.fit.grad);
    assert_eq!(read_f64(&out, "group_loss").1.len(), 3);
}

#[test]
fn shipped_example_runs() {
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/rollout.safetensors");
    let (code, stdout, stderr) = tpo(&["eval", ex.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("8 groups (uniform, K = 16)"));
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let f = |name: &str, t: &[(&str, Vec<usize>, T)]| {
        let p = tmp(name);
        write(&p, t);
        p
    };
    let x4 = [0.0f32, -1.0, -2.0, -3.0];
    let nan = [0.0f32, f32::NAN, -2.0, -3.0];
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (f("m.st", &[("logp", vec![2, 2], T::F32(&x4))]), vec![], "has no tensor 'scores' (it holds: logp)"),
        (
            f("s.st", &[("logp", vec![2, 2], T::F32(&x4)), ("scores", vec![4], T::F32(&x4))]),
            vec![],
            "'scores' has shape [4] but 'logp' has shape [2, 2]",
        ),
        (
            f("n.st", &[("logp", vec![2, 2], T::F32(&nan)), ("scores", vec![2, 2], T::F32(&x4))]),
            vec![],
            "logp[1] is NaN",
        ),
        (
            f("e.st", &[("logp", vec![2, 2], T::F32(&x4)), ("scores", vec![2, 2], T::F32(&x4))]),
            vec!["--eta", "0"],
            "eta must be finite and > 0, got 0",
        ),
        (
            f("g.st", &[("logp", vec![4], T::F32(&x4)), ("scores", vec![4], T::F32(&x4))]),
            vec![],
            "'group_sizes' [B] is required",
        ),
        (
            f(
                "h.st",
                &[
                    ("logp", vec![4], T::F32(&x4)),
                    ("scores", vec![4], T::F32(&x4)),
                    ("group_sizes", vec![2], T::I64(&[1, 2])),
                ],
            ),
            vec![],
            "group_sizes add up to 3, but 'logp' has 4 elements",
        ),
        (
            f(
                "z.st",
                &[
                    ("logp", vec![4], T::F32(&x4)),
                    ("scores", vec![4], T::F32(&x4)),
                    ("group_sizes", vec![2], T::I64(&[4, 0])),
                ],
            ),
            vec![],
            "group 1 is empty",
        ),
        (
            f(
                "k.st",
                &[
                    ("logp", vec![4], T::F32(&x4)),
                    ("scores", vec![4], T::F32(&x4)),
                    ("group_sizes", vec![2], T::I64(&[5, -1])),
                ],
            ),
            vec![],
            "group_sizes[1] is -1",
        ),
        (
            f(
                "d.st",
                &[
                    ("logp", vec![2, 2], T::F32(&x4)),
                    ("scores", vec![2, 2], T::F32(&x4)),
                    ("group_sizes", vec![1], T::I64(&[4])),
                ],
            ),
            vec![],
            "'group_sizes' is given but 'logp' is 2-D",
        ),
        (
            f("3.st", &[("logp", vec![1, 2, 2], T::F32(&x4)), ("scores", vec![1, 2, 2], T::F32(&x4))]),
            vec![],
            "must be 2-D [B, K] or 1-D [N]",
        ),
        (
            f("i.st", &[("logp", vec![2, 2], T::F32(&x4)), ("scores", vec![2, 2], T::I64(&[1, 2, 3, 4]))]),
            vec![],
            "tensor 'scores' has dtype I64",
        ),
    ];
    for (p, extra, want) in cases {
        let mut args = vec!["eval", p.to_str().unwrap()];
        args.extend(extra);
        let (code, _, stderr) = tpo(&args);
        assert_eq!(code, 1, "{p:?}: {stderr}");
        assert!(stderr.contains(want), "{p:?}: expected '{want}' in '{stderr}'");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(!stderr.contains("panicked"));
    }
    let junk = tmp("junk.st");
    std::fs::write(&junk, b"definitely not a tensor file").unwrap();
    let (code, _, stderr) = tpo(&["eval", junk.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("is not a valid safetensors file"), "{stderr}");
    let (code, _, stderr) = tpo(&["eval", "/nonexistent/file.safetensors"]);
    assert_eq!(code, 1);
    assert!(stderr.starts_with("error: cannot read"), "{stderr}");
}

#[test]
fn reproduce_writes_json_and_figures() {
    let out = tmp("repro");
    let (code, stdout, stderr) =
        tpo(&["reproduce", "tabular", "--seeds", "3", "--steps", "12", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("error < 1% at") && stdout.contains("TPO"), "{stdout}");
    for (file, methods, first_step) in [
        ("tabular_single.json", vec!["PG", "DG", "GRPO", "TPO"], 0),
        ("tabular_multi.json", vec!["PG", "DG", "GRPO", "TPO", "CE"], 1),
    ] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(file)).unwrap()).unwrap();
        assert_eq!(v["config"]["seeds"], 3);
        let steps = v["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 12);
        assert_eq!(steps[0], first_step);
        let m = v["methods"].as_object().unwrap();
        assert_eq!(m.len(), methods.len());
        for name in methods {
            for key in ["error_mean", "error_se", "misalignment_mean", "misalignment_se"] {
                let a = m[name][key].as_array().unwrap();
                assert_eq!(a.len(), 12, "{file} {name} {key}");
                assert!(a.iter().all(|x| x.as_f64().unwrap().is_finite()));
            }
        }
    }
    for f in ["tabular_single.png", "tabular_single.svg", "tabular_multi.png", "tabular_multi.svg"] {
        let len = std::fs::metadata(out.join(f)).unwrap().len();
        assert!(len > 10_000, "{f} is only {len} bytes");
    }
    let png = std::fs::read(out.join("tabular_single.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Bad arguments are one-line errors.
    let (code, _, stderr) = tpo(&["reproduce", "tabular", "--seeds", "0"]);
    assert_eq!(code, 2);
    assert_eq!(
        stderr.trim(),
        "error: invalid value '0' for '--seeds <SEEDS>': must be at least 1 (see 'tpo reproduce --help')"
    );
}

// ---------------------------------------------------------------------------------------------
// Data never lost: what `--out` may write (src/cli/output.rs).

/// A fresh, empty folder holding a copy of the shipped example as `in.st`.
fn workdir(name: &str) -> PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/rollout.safetensors");
    std::fs::copy(ex, d.join("in.st")).unwrap();
    d
}

/// Runs the binary in `dir`.
fn tpo_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    tpo_sh(dir, "true", args)
}

/// The error of a run that must have been refused: exit code 1, one line, no panic, naming
/// `path`, and no temporary name in it.
fn refused(run: (i32, String, String), path: &str, want: &str) -> String {
    let (code, stdout, stderr) = run;
    assert_eq!(code, 1, "expected a refusal naming {path}; stdout: {stdout}; stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        !stderr.trim_end().contains(|c: char| c.is_control() || c == '\u{2028}' || c == '\u{2029}'),
        "{stderr:?}"
    );
    assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(path), "expected '{path}' in: {stderr}");
    assert!(stderr.contains(want), "expected '{want}' in: {stderr}");
    assert!(!stderr.contains(".tmp") && !stderr.contains(".tpo-"), "names a temporary file: {stderr}");
    stderr
}

/// No temporary file or scratch folder anywhere under `dir`.
fn no_temp_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tpo-") && !name.ends_with(".tmp"), "left behind: {:?}", e.path());
        if e.file_type().unwrap().is_dir() {
            no_temp_files(&e.path());
        }
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn is_char_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device())
}

fn is_fifo(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_fifo())
}

fn is_symlink(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// Makes a FIFO at `p` (false where `mkfifo` is missing).
fn mkfifo(p: &Path) -> bool {
    Command::new("mkfifo").arg(p).status().is_ok_and(|s| s.success())
}

/// Makes a character device like /dev/null (1, 3) at `p` (false without the privilege).
fn mknod_null(p: &Path) -> bool {
    Command::new("mknod")
        .arg(p)
        .args(["c", "1", "3"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn valid_output(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| SafeTensors::deserialize(&b).is_ok_and(|s| s.tensor("grad").is_ok()))
}

#[test]
fn eval_never_writes_over_its_input() {
    let d = workdir("in-is-out");
    let before = std::fs::read(d.join("in.st")).unwrap();
    std::fs::hard_link(d.join("in.st"), d.join("hard.st")).unwrap();
    std::os::unix::fs::symlink("in.st", d.join("soft.st")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    let abs = d.join("in.st");
    let abs = abs.to_str().unwrap();
    for force in [false, true] {
        for (input, out) in [
            ("in.st", "in.st"),
            ("in.st", "./in.st"),
            ("./in.st", "in.st"),
            ("in.st", abs),
            ("in.st", "sub/../in.st"),
            ("in.st", "hard.st"),
            ("hard.st", "in.st"),
            ("in.st", "soft.st"),
            ("soft.st", "in.st"),
        ] {
            let mut args = vec!["eval", input, "--out", out];
            if force {
                args.push("--force");
            }
            refused(tpo_in(&d, &args), out, "is the input file");
            assert_eq!(std::fs::read(d.join("in.st")).unwrap(), before, "{args:?} changed the input");
        }
    }
    assert!(is_symlink(&d.join("soft.st")));
    no_temp_files(&d);
}

#[test]
fn eval_never_writes_to_a_device_fifo_or_directory() {
    let d = workdir("devices");
    // A FIFO and a private device node first, so that a build that replaces them fails here,
    // before it gets to touch /dev/null.
    let fifo = d.join("fifo");
    let node = d.join("null");
    let mut cases: Vec<(String, &str)> = Vec::new();
    if mkfifo(&fifo) {
        cases.push(("fifo".into(), "is a FIFO, not a regular file"));
    }
    if mknod_null(&node) {
        cases.push(("null".into(), "is a character device, not a regular file"));
    }
    std::fs::create_dir(d.join("folder")).unwrap();
    cases.push(("folder".into(), "is a directory"));
    cases.push((d.join("folder").to_str().unwrap().to_string() + "/", "does not name a file"));
    cases.push(("/dev/null".into(), "is a character device, not a regular file"));
    cases.push(("/dev/full".into(), "is a character device, not a regular file"));
    // A link to a device is refused like the device.
    std::os::unix::fs::symlink("/dev/null", d.join("to-null")).unwrap();
    cases.push(("to-null".into(), "is a character device, not a regular file"));
    for (out, want) in &cases {
        for force in [false, true] {
            let mut args = vec!["eval", "in.st", "--out", out];
            if force {
                args.push("--force");
            }
            refused(tpo_in(&d, &args), out, want);
        }
    }
    if fifo.exists() {
        assert!(is_fifo(&fifo), "the FIFO was replaced");
    }
    if node.exists() {
        assert!(is_char_device(&node), "the device node was replaced");
    }
    assert!(is_char_device(Path::new("/dev/null")), "/dev/null is no longer a device");
    assert!(is_char_device(Path::new("/dev/full")), "/dev/full is no longer a device");
    assert!(is_symlink(&d.join("to-null")));
    assert_eq!(std::fs::read_dir(d.join("folder")).unwrap().count(), 0);
    no_temp_files(&d);
}

#[test]
fn eval_follows_links_to_files_and_refuses_dangling_ones() {
    let d = workdir("links");
    std::fs::create_dir(d.join("real")).unwrap();
    std::fs::write(d.join("real/old.st"), b"old").unwrap();
    std::os::unix::fs::symlink("real/old.st", d.join("link.st")).unwrap();
    // An existing file behind a link needs --force, like any existing file.
    refused(tpo_in(&d, &["eval", "in.st", "--out", "link.st"]), "link.st", "already exists (pass --force");
    assert_eq!(std::fs::read(d.join("real/old.st")).unwrap(), b"old");
    // With --force the file the link points to is replaced; the link stays a link.
    let (code, stdout, stderr) = tpo_in(&d, &["eval", "in.st", "--out", "link.st", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote link.st"), "{stdout}");
    assert!(is_symlink(&d.join("link.st")), "the link was replaced by a file");
    assert_eq!(std::fs::read_link(d.join("link.st")).unwrap(), Path::new("real/old.st"));
    assert!(valid_output(&d.join("real/old.st")));
    // A dangling link is refused: nothing is created behind it, and it stays a link.
    std::os::unix::fs::symlink("real/missing.st", d.join("dangling.st")).unwrap();
    for force in [false, true] {
        let mut args = vec!["eval", "in.st", "--out", "dangling.st"];
        if force {
            args.push("--force");
        }
        refused(tpo_in(&d, &args), "dangling.st", "which does not exist; not writing through it");
        assert!(is_symlink(&d.join("dangling.st")));
        assert!(!d.join("real/missing.st").exists(), "a file was created through a dangling link");
    }
    no_temp_files(&d);
}

#[test]
fn eval_overwrites_only_with_force_and_never_a_read_only_file() {
    use std::os::unix::fs::PermissionsExt;
    let d = workdir("force");
    let out = d.join("out.st");
    std::fs::write(&out, b"precious").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    refused(
        tpo_in(&d, &["eval", "in.st", "--out", "out.st"]),
        "out.st",
        "out.st already exists (pass --force",
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let (code, _, stderr) = tpo_in(&d, &["eval", "in.st", "--out", "out.st", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(valid_output(&out));
    assert_eq!(mode(&out), 0o640, "a replaced file keeps its permissions");
    // Read-only: refused even with --force (and even for root, who could rename over it).
    std::fs::write(&out, b"protected").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o444)).unwrap();
    for force in [false, true] {
        let mut args = vec!["eval", "in.st", "--out", "out.st"];
        if force {
            args.push("--force");
        }
        let msg = refused(tpo_in(&d, &args), "out.st", "out.st");
        if force {
            assert!(msg.contains("is read-only; not overwriting it, even with --force"), "{msg}");
        }
        assert_eq!(std::fs::read(&out).unwrap(), b"protected");
        assert_eq!(mode(&out), 0o444);
    }
    no_temp_files(&d);
}

#[test]
fn eval_creates_missing_parent_folders() {
    let d = workdir("parents");
    // The README's own example writes into target/, which a fresh clone does not have.
    let (code, stdout, stderr) = tpo_in(&d, &["eval", "in.st", "--out", "target/rollout.out.safetensors"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("wrote target/rollout.out.safetensors"), "{stdout}");
    assert!(valid_output(&d.join("target/rollout.out.safetensors")));
    let deep = d.join("a/b/c/out.st");
    let (code, _, stderr) = tpo_in(&d, &["eval", "in.st", "--out", deep.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(valid_output(&deep));
    // A parent that is a file is a one-line error naming the path.
    refused(tpo_in(&d, &["eval", "in.st", "--out", "in.st/x.st"]), "in.st/x.st", "in.st/x.st");
    no_temp_files(&d);
}

#[test]
fn eval_output_gets_the_usual_umask_permissions() {
    let d = workdir("umask");
    for (umask, want) in [("022", 0o644), ("002", 0o664), ("077", 0o600)] {
        let name = format!("out-{umask}.st");
        let (code, _, stderr) = tpo_sh(&d, &format!("umask {umask}"), &["eval", "in.st", "--out", &name]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(mode(&d.join(&name)), want, "umask {umask}");
    }
    no_temp_files(&d);
}

#[test]
fn eval_write_errors_name_the_users_path_and_leave_nothing_behind() {
    // A file-size limit of one block makes the write itself fail, after the temporary file was
    // made (SIGXFSZ ignored, so the write returns EFBIG instead of killing the process).
    let d = workdir("efbig");
    let limit = "trap '' XFSZ; ulimit -f 1";
    refused(tpo_sh(&d, limit, &["eval", "in.st", "--out", "new/out.st"]), "new/out.st", "File too large");
    assert!(!d.join("new/out.st").exists());
    std::fs::write(d.join("old.st"), b"keep me").unwrap();
    refused(tpo_sh(&d, limit, &["eval", "in.st", "--out", "old.st", "--force"]), "old.st", "File too large");
    assert_eq!(std::fs::read(d.join("old.st")).unwrap(), b"keep me");
    no_temp_files(&d);
}

/// The files `tpo reproduce tabular` writes.
const RESULTS: [&str; 6] = [
    "tabular_single.json",
    "tabular_single.png",
    "tabular_single.svg",
    "tabular_multi.json",
    "tabular_multi.png",
    "tabular_multi.svg",
];

/// A tiny `reproduce` run in `dir` (through `sh`, after `pre`).
fn reproduce(dir: &Path, pre: &str, out: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["reproduce", "tabular", "--seeds", "2", "--steps", "3", "--out", out];
    args.extend(extra);
    tpo_sh(dir, pre, &args)
}

#[test]
fn reproduce_overwrites_only_with_force_and_never_a_read_only_file() {
    use std::os::unix::fs::PermissionsExt;
    let d = workdir("repro-force");
    // Missing parents are created; files get 0666 less the umask.
    let (code, _, stderr) = reproduce(&d, "umask 022", "x/y/res", &[]);
    assert_eq!(code, 0, "{stderr}");
    let res = d.join("x/y/res");
    for f in RESULTS {
        assert_eq!(mode(&res.join(f)), 0o644, "{f}");
    }
    no_temp_files(&d);
    // Again without --force: refused before the run, naming the first existing file, nothing
    // touched.
    std::fs::write(res.join("tabular_multi.svg"), b"mine").unwrap();
    let before: Vec<Vec<u8>> = RESULTS.iter().map(|f| std::fs::read(res.join(f)).unwrap()).collect();
    refused(
        reproduce(&d, "true", "x/y/res", &[]),
        "x/y/res/tabular_single.json",
        "already exists (pass --force to overwrite it)",
    );
    std::fs::remove_file(res.join("tabular_single.json")).unwrap();
    refused(reproduce(&d, "true", "x/y/res", &[]), "x/y/res/tabular_single.png", "already exists");
    assert!(!res.join("tabular_single.json").exists(), "a run started although it was refused");
    std::fs::write(res.join("tabular_single.json"), &before[0]).unwrap();
    // A read-only result: refused even with --force, before anything is written.
    std::fs::set_permissions(res.join("tabular_multi.png"), std::fs::Permissions::from_mode(0o444)).unwrap();
    refused(reproduce(&d, "true", "x/y/res", &["--force"]), "x/y/res/tabular_multi.png", "is read-only");
    for (f, b) in RESULTS.iter().zip(&before) {
        assert_eq!(&std::fs::read(res.join(f)).unwrap(), b, "{f} changed");
    }
    // With --force (and the file writable again) every result is replaced.
    std::fs::set_permissions(res.join("tabular_multi.png"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, stderr) = reproduce(&d, "true", "x/y/res", &["--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::read_to_string(res.join("tabular_multi.svg")).unwrap().contains("<svg"));
    no_temp_files(&d);
}

#[test]
fn reproduce_never_writes_to_a_device_fifo_directory_or_dangling_link() {
    let d = workdir("repro-special");
    let res = d.join("res");
    std::fs::create_dir(&res).unwrap();
    let mut cases: Vec<(&str, &str)> = Vec::new();
    if !mknod_null(&res.join("tabular_single.json")) {
        // Without the privilege to make a device node: a link to /dev/null is refused the same.
        std::os::unix::fs::symlink("/dev/null", res.join("tabular_single.json")).unwrap();
    }
    cases.push(("tabular_single.json", "is a character device"));
    std::fs::create_dir(res.join("tabular_single.png")).unwrap();
    cases.push(("tabular_single.png", "is a directory"));
    std::os::unix::fs::symlink("gone.svg", res.join("tabular_single.svg")).unwrap();
    cases.push(("tabular_single.svg", "which does not exist"));
    // The FIFO is held open for reading and writing, so that a build which writes into it
    // (instead of refusing it) fails this test rather than blocking on it.
    let _fifo = mkfifo(&res.join("tabular_multi.json")).then(|| {
        cases.push(("tabular_multi.json", "is a FIFO"));
        std::fs::OpenOptions::new().read(true).write(true).open(res.join("tabular_multi.json")).unwrap()
    });
    // Each case is refused in turn (the first refusal names it), with and without --force.
    for (i, (name, want)) in cases.iter().enumerate() {
        for force in [&[][..], &["--force"][..]] {
            refused(reproduce(&d, "true", "res", force), &format!("res/{name}"), want);
        }
        // Out of the way, so that the next case is the first one met.
        if i + 1 < cases.len() {
            std::fs::rename(res.join(name), d.join(format!("moved-{name}"))).unwrap();
        }
    }
    let moved = |n: &str| d.join(format!("moved-{n}"));
    let single_json = moved("tabular_single.json");
    assert!(is_char_device(&single_json) || is_symlink(&single_json));
    assert!(moved("tabular_single.png").is_dir());
    assert!(is_symlink(&moved("tabular_single.svg")) && !res.join("gone.svg").exists());
    if cases.len() == 4 {
        assert!(is_fifo(&res.join("tabular_multi.json")));
    }
    // --out that is a file, not a folder.
    refused(reproduce(&d, "true", "in.st", &["--force"]), "in.st", "is not a folder");
    no_temp_files(&d);
}

#[test]
fn reproduce_follows_links_to_files() {
    let d = workdir("repro-links");
    std::fs::create_dir_all(d.join("res")).unwrap();
    std::fs::write(d.join("kept.json"), b"old").unwrap();
    std::os::unix::fs::symlink("../kept.json", d.join("res/tabular_multi.json")).unwrap();
    refused(reproduce(&d, "true", "res", &[]), "res/tabular_multi.json", "already exists");
    assert_eq!(std::fs::read(d.join("kept.json")).unwrap(), b"old");
    let (code, _, stderr) = reproduce(&d, "true", "res", &["--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(is_symlink(&d.join("res/tabular_multi.json")), "the link was replaced by a file");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("kept.json")).unwrap()).unwrap();
    assert_eq!(v["config"]["seeds"], 2);
    no_temp_files(&d);
}

#[test]
fn reproduce_write_errors_name_the_users_path_and_leave_nothing_behind() {
    let d = workdir("repro-efbig");
    refused(
        reproduce(&d, "trap '' XFSZ; ulimit -f 1", "res", &[]),
        "res/tabular_single.json",
        "File too large",
    );
    assert_eq!(std::fs::read_dir(d.join("res")).unwrap().count(), 0, "a partial result was left");
    no_temp_files(&d);
}

// ---------------------------------------------------------------------------------------------
// Inputs a user types.

#[test]
fn negative_numbers_reach_the_library_checks() {
    let d = workdir("negative");
    for (args, want) in [
        (vec!["--eta", "-1"], "error: eta must be finite and > 0, got -1"),
        (vec!["--eta", "-1e-3"], "error: eta must be finite and > 0, got -0.001"),
        (vec!["--eta", "-inf"], "error: eta must be finite and > 0, got -inf"),
        (vec!["--zero-std-threshold", "-1"], "error: zero_std_threshold must be finite and >= 0, got -1"),
    ] {
        let mut a = vec!["eval", "in.st"];
        a.extend(&args);
        let (code, _, stderr) = tpo_in(&d, &a);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), want, "{args:?}");
    }
}

#[test]
fn counts_must_be_at_least_one() {
    let d = workdir("counts");
    for (flag, value, want) in [
        ("--threads", "0", "error: invalid value '0' for '--threads <THREADS>': must be at least 1"),
        ("--steps", "0", "error: invalid value '0' for '--steps <STEPS>': must be at least 1"),
        (
            "--seeds",
            "-1",
            "error: invalid value '-1' for '--seeds <SEEDS>': expected a whole number, at least 1",
        ),
        ("--threads", "two", "error: invalid value 'two' for '--threads <THREADS>': expected a whole number"),
    ] {
        // The other counts tiny, so that a build that accepts the value finishes fast.
        let mut args = vec!["reproduce", "tabular", "--out", "res", flag, value];
        for (f, v) in [("--seeds", "2"), ("--steps", "3")] {
            if f != flag {
                args.extend([f, v]);
            }
        }
        let (code, _, stderr) = tpo_in(&d, &args);
        assert_eq!(code, 2, "{flag} {value}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with(want), "{flag} {value}: {stderr}");
        assert!(!d.join("res").exists(), "{flag} {value} ran");
    }
}

#[test]
fn usage_errors_are_one_line() {
    let d = workdir("usage");
    for (args, want) in [
        (
            vec!["eval", "in.st", "--eta", "x"],
            "error: invalid value 'x' for '--eta <ETA>': expected a number",
        ),
        (vec!["eval", "in.st", "--eta"], "error: a value is required for '--eta <ETA>'"),
        (vec!["eval"], "error: the following required arguments were not provided: <INPUT>"),
        (vec!["eval", "in.st", "--forse"], "tip: a similar argument exists: '--force'"),
        (vec!["eval", "in.st", "--backend", "gpu"], "possible values: cpu, cuda"),
        (
            vec!["reproduce", "bandit"],
            "error: invalid value 'bandit' for '<EXPERIMENT>'; possible values: tabular",
        ),
        (vec!["evl"], "error: unrecognized subcommand 'evl'"),
        (vec!["eval", "in.st", "--bogus"], "error: unexpected argument '--bogus' found"),
    ] {
        let (code, _, stderr) = tpo_in(&d, &args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: expected '{want}' in {stderr}");
        assert!(stderr.contains("--help'"), "{stderr}");
    }
    // Arguments that are not UTF-8 in a usage error (std::env::args would panic on them).
    for args in [vec![&b"\xff"[..]], vec![b"eval", b"in.st", b"--\xff"]] {
        use std::os::unix::ffi::OsStrExt;
        let args: Vec<&std::ffi::OsStr> = args.into_iter().map(std::ffi::OsStr::from_bytes).collect();
        let out = Command::new(env!("CARGO_BIN_EXE_tpo")).current_dir(&d).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: ") && !stderr.contains("panicked"), "{stderr}");
    }
    // Help is still the full text.
    let (code, stdout, _) = tpo_in(&d, &["eval", "--help"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("--force") && stdout.contains("--zero-std-threshold"), "{stdout}");
}

#[test]
fn summary_names_unused_tensors() {
    let d = workdir("summary");
    let x4 = [0.0f32, -1.0, -2.0, -3.0];
    write(
        &d.join("extra.st"),
        &[
            ("logp", vec![2, 2], T::F32(&x4)),
            ("scores", vec![2, 2], T::F32(&x4)),
            ("ref_logp", vec![2, 2], T::F32(&x4)),
            ("mask", vec![2, 2], T::I64(&[1, 1, 1, 0])),
        ],
    );
    let (code, stdout, stderr) = tpo_in(&d, &["eval", "extra.st"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 tensors in the file not used: 'mask', 'ref_logp'"), "{stdout}");
    let (_, stdout, _) = tpo_in(&d, &["eval", "in.st"]);
    assert!(!stdout.contains("not used"), "{stdout}");
}

/// Tensor names are arbitrary strings: a newline, a carriage return or a line separator in one
/// (or in a path) is shown escaped, so the error and the summary stay one line each.
#[test]
fn control_characters_in_names_and_paths_are_escaped() {
    let d = workdir("escaped-names");
    let x4 = [0.0f32, -1.0, -2.0, -3.0];
    // A missing tensor: the error lists the names the file holds.
    write(
        &d.join("names.st"),
        &[("lo\ngp", vec![2, 2], T::F32(&x4)), ("s\r\u{2028}\u{1b}", vec![4], T::F32(&x4))],
    );
    let e = refused(tpo_in(&d, &["eval", "names.st"]), "names.st", "has no tensor 'logp'");
    assert!(e.contains(r"it holds: lo\ngp, s\r\u{2028}\u{1b})"), "{e}");
    // An unused tensor: named escaped in the summary.
    write(
        &d.join("unused.st"),
        &[
            ("logp", vec![2, 2], T::F32(&x4)),
            ("scores", vec![2, 2], T::F32(&x4)),
            ("a\nb", vec![4], T::F32(&x4)),
        ],
    );
    let (code, stdout, stderr) = tpo_in(&d, &["eval", "unused.st"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(r"1 tensor in the file not used: 'a\nb'"), "{stdout}");
    // A file the safetensors reader refuses, quoting a name with '\r' and '\n' in its message
    // (the fuzzer's find, fuzz/regressions/eval_input/newline-in-tensor-name).
    let found =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/eval_input/newline-in-tensor-name");
    std::fs::copy(found, d.join("found.st")).unwrap();
    let e = refused(tpo_in(&d, &["eval", "found.st"]), "found.st", "is not a valid safetensors file");
    assert!(e.contains(r"\r") && e.contains(r"\n"), "{e}");
    // A path with a newline.
    refused(tpo_in(&d, &["eval", "no\nsuch.st"]), r"no\nsuch.st", "cannot read");
    // An --out path with a newline that exists (refused without --force, by the writer, not the
    // reader).
    std::fs::write(d.join("ex\nists.st"), b"kept").unwrap();
    refused(tpo_in(&d, &["eval", "unused.st", "--out", "ex\nists.st"]), r"ex\nists.st", "--force");
    assert_eq!(std::fs::read(d.join("ex\nists.st")).unwrap(), b"kept");
    // A written --out path with a newline: the summary's "wrote" line shows it escaped.
    let (code, stdout, stderr) = tpo_in(&d, &["eval", "unused.st", "--out", "w\nrote.st"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(r"wrote w\nrote.st (loss"), "{stdout}");
    assert!(valid_output(&d.join("w\nrote.st")));
    // A command-line value with a newline, quoted back by the argument parser.
    let (code, _, stderr) = tpo_in(&d, &["eval", "unused.st", "--eta", "1\n2"]);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains(r"invalid value '1\n2' for '--eta"), "{stderr}");
    for (arg, want) in [
        (&["--eta", "1\u{1}2"][..], r"invalid value '1\u{1}2' for '--eta"),
        (&["--eta", "1\u{1b}[2"][..], r"invalid value '1\u{1b}[2' for '--eta"),
        (&["--fo\no=1"][..], r"unexpected argument '--fo\no' found"),
        (&["-\nx"][..], r"unexpected argument '-\n' found"),
    ] {
        let (code, _, stderr) = tpo_in(&d, &[&["eval", "unused.st"][..], arg].concat());
        assert_eq!(code, 2, "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(!stderr.trim_end().contains(|c: char| c.is_control()), "{stderr:?}");
        assert!(stderr.contains(want), "{arg:?}: {stderr}");
    }
    // `tpo reproduce` into a folder with a newline: its last line names the folder escaped.
    let (code, stdout, stderr) = reproduce(&d, "true", "re\nsults", &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(r"wrote re\nsults/tabular_"), "{stdout}");
}

/// A reader that went away (`tpo eval f | head -1`: a pipe with its read end closed) ends the
/// report, not the run: no panic, exit 0, the --out file written. A stdout that fails otherwise
/// (a full disk) is an error: exit 1, one line, the file still written.
#[test]
fn a_closed_stdout_ends_the_report_not_the_run() {
    let d = workdir("closed-stdout");
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/rollout.safetensors");
    let run = |out: &str, stdout: std::process::Stdio| {
        let o = Command::new(env!("CARGO_BIN_EXE_tpo"))
            .arg("eval")
            .arg(&input)
            .arg("--out")
            .arg(d.join(out))
            .stdout(stdout)
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let (code, stderr) = run("piped.st", writer.into());
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert!(valid_output(&d.join("piped.st")));
    if let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") {
        let (code, stderr) = run("full.st", full.into());
        assert_eq!(code, Some(1), "{stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("error: cannot write the report to stdout"), "{stderr}");
        assert!(valid_output(&d.join("full.st")));
    }
}

#[test]
fn summary_calls_equal_group_sizes_uniform() {
    let d = workdir("summary-uniform");
    let x4 = [0.0f32, -1.0, -2.0, -3.0];
    write(
        &d.join("equal.st"),
        &[
            ("logp", vec![4], T::F32(&x4)),
            ("scores", vec![4], T::F32(&x4)),
            ("group_sizes", vec![2], T::I64(&[2, 2])),
        ],
    );
    let (code, stdout, stderr) = tpo_in(&d, &["eval", "equal.st"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("2 groups (uniform, K = 2)"), "{stdout}");
    write(
        &d.join("ragged.st"),
        &[
            ("logp", vec![4], T::F32(&x4)),
            ("scores", vec![4], T::F32(&x4)),
            ("group_sizes", vec![2], T::I64(&[1, 3])),
        ],
    );
    let (_, stdout, _) = tpo_in(&d, &["eval", "ragged.st"]);
    assert!(stdout.contains("2 groups (ragged, K from 1 to 3)"), "{stdout}");
}

#[test]
fn small_eta_is_evaluated_not_blamed_on_the_input() {
    // Issue 11: at eta = 1e-14 the reference built a target summing to 1.0019 (2 at 1e-20), and
    // `tpo eval` then rejected its own target: "group 0 sums to ... pass the output of target()".
    let inp = tmp("small_eta.safetensors");
    let old = [-1.0f32, -2.0, -3.0, -3.0];
    let logp = [-1.5f32, -2.0, -2.5, -2.0];
    let s = [1.0f32, 0.0, 0.0, 1.0];
    write(
        &inp,
        &[
            ("logp", vec![1, 4], T::F32(&logp)),
            ("logp_old", vec![1, 4], T::F32(&old)),
            ("scores", vec![1, 4], T::F32(&s)),
        ],
    );
    // The eta -> 0 limit: p_old on the best-scored members 0 and 3, e^-1 : e^-3.
    let (q0, q3) = (1.0 / (1.0 + (-2f64).exp()), (-2f64).exp() / (1.0 + (-2f64).exp()));
    for eta in ["1e-14", "1e-20"] {
        let out = tmp(&format!("small_eta_{eta}.out.safetensors"));
        let _ = std::fs::remove_file(&out);
        let (code, stdout, stderr) =
            tpo(&["eval", inp.to_str().unwrap(), "--eta", eta, "--out", out.to_str().unwrap()]);
        assert_eq!(code, 0, "eta {eta}: {stderr}");
        assert!(stdout.contains("loss (mean cross-entropy)"), "{stdout}");
        assert!(stdout.contains(&format!("eta = {eta},")), "eta printed in long form: {stdout}");
        let (_, q) = read_f64(&out, "target");
        assert!(
            (q[0] - q0).abs() <= 1e-15 && q[1] == 0.0 && q[2] == 0.0 && (q[3] - q3).abs() <= 1e-15,
            "{q:?}"
        );
        // The loss is the cross-entropy of that target against softmax(logp).
        let lse = logp.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        let ce = -(q0 * (f64::from(logp[0]) - lse) + q3 * (f64::from(logp[3]) - lse));
        let (_, loss) = read_f64(&out, "loss");
        assert!((loss[0] - ce).abs() <= 1e-14 * ce, "eta {eta}: loss {} vs {ce}", loss[0]);
    }
}

#[test]
fn group_sizes_near_2_pow_64_are_summed_without_wrapping() {
    // Issue 11: [2^63 - 1, 2^63 - 1, 4] was reported as "add up to 2" (the sum wrapped).
    let x4 = [0.0f32, -1.0, -2.0, -3.0];
    let p = tmp("wrap.st");
    write(
        &p,
        &[
            ("logp", vec![4], T::F32(&x4)),
            ("scores", vec![4], T::F32(&x4)),
            ("group_sizes", vec![3], T::I64(&[i64::MAX, i64::MAX, 4])),
        ],
    );
    let (code, _, stderr) = tpo(&["eval", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "error: group_sizes add up to 18446744073709551618, but 'logp' has 4 elements"
    );
    // A wrapped sum equal to the length is no way around it either: the layout refuses it.
    let x2 = [0.0f32, -1.0];
    write(
        &p,
        &[
            ("logp", vec![2], T::F32(&x2)),
            ("scores", vec![2], T::F32(&x2)),
            ("group_sizes", vec![3], T::I64(&[i64::MAX, i64::MAX, 4])),
        ],
    );
    let (code, _, stderr) = tpo(&["eval", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        "error: group_sizes add up to 18446744073709551618, but 'logp' has 2 elements"
    );
}
