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

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tpo-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
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
    assert_eq!(code, 1);
    assert_eq!(stderr.trim(), "error: --seeds must be at least 1");
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
