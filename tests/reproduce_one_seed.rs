//! `tpo reproduce tabular` with one seed and one step: a summary and JSON that say there is no
//! standard error (null, not 0), and figures that are still drawn.

use std::process::Command;

#[test]
fn one_seed_one_step_reports_no_standard_error() {
    let out = std::env::temp_dir().join(format!("tpo-reproduce-one-seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_tpo"))
        .args(["reproduce", "tabular", "--seeds", "1", "--steps", "1", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{stderr}");
    assert!(stdout.contains("1 seed: no standard errors (null in the JSON)"), "{stdout}");
    assert!(stdout.contains("\n1 seed, TPO on cpu"), "{stdout}");
    assert!(!stdout.contains("1 seeds"), "{stdout}");
    for (file, steps) in [("tabular_single.json", [0]), ("tabular_multi.json", [1])] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(file)).unwrap()).unwrap();
        assert_eq!(v["steps"], serde_json::json!(steps), "{file}");
        assert!(v["statistics"].as_str().unwrap().contains("null with 1 seed"), "{file}");
        for (name, m) in v["methods"].as_object().unwrap() {
            assert!(m["error_se"].is_null() && m["misalignment_se"].is_null(), "{file} {name}: {m}");
            assert_eq!(m["error_mean"].as_array().unwrap().len(), 1, "{file} {name}");
        }
    }
    for f in ["tabular_single.png", "tabular_multi.png", "tabular_single.svg", "tabular_multi.svg"] {
        assert!(std::fs::metadata(out.join(f)).unwrap().len() > 5_000, "{f}");
    }
    let svg = std::fs::read_to_string(out.join("tabular_multi.svg")).unwrap();
    assert!(svg.contains("Lines: 1 seed. No bands: one seed has no standard error."), "legend text");
    let _ = std::fs::remove_dir_all(&out);
}
