//! Compiles every `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on, and embeds it.
//!
//! * nvcc is taken from `NVCC`, else `$CUDA_HOME/bin/nvcc`, else `$CUDA_PATH/bin/nvcc`, else PATH.
//! * The target is `TPO_CUDA_ARCH` (default `sm_90`, PTX that the H100's driver JIT-compiles);
//!   extra flags can be given in `TPO_NVCC_FLAGS`.
//! * ptxas' register and spill report for every kernel goes to `$OUT_DIR/ptxas-report.txt`
//!   (a cargo warning names any kernel that spills).
//!
//! Without the feature nothing CUDA is needed. On docs.rs (`DOCS_RS` set), which has no nvcc,
//! no PTX is embedded: the documentation needs the Rust items only.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "TPO_CUDA_ARCH", "TPO_NVCC_FLAGS", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=DOCS_RS");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    if std::env::var_os("DOCS_RS").is_some() {
        let stub = "/// PTX of every kernel source, by file stem (none: built for docs.rs).\n\
                    pub const PTX: &[(&str, &str)] = &[];\n\
                    /// The architecture the PTX was built for (none: built for docs.rs).\n\
                    pub const ARCH: &str = \"none\";\n";
        std::fs::write(out.join("kernels.rs"), stub).expect("write kernels.rs");
        std::fs::write(out.join("ptxas-report.txt"), "# docs.rs build: no kernels compiled\n")
            .expect("write ptxas-report.txt");
        return;
    }
    let nvcc = find_nvcc().unwrap_or_else(|| {
        fail(
            "the `cuda` feature needs nvcc, and none was found in NVCC, CUDA_HOME, CUDA_PATH or PATH.\n\
             Install a CUDA 13.0 toolkit, or run `eval \"$(scripts/install-nvcc.sh)\"` (a pinned nvcc from \
             PyPI, no GPU needed), or build without `--features cuda`.",
        )
    });
    let arch = std::env::var("TPO_CUDA_ARCH").unwrap_or_else(|_| "sm_90".to_string());
    let home = nvcc.parent().and_then(Path::parent).map(Path::to_path_buf);
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .unwrap_or_else(|e| fail(&format!("cannot read kernels/: {e}")))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    kernels.sort();
    let mut embedded =
        String::from("/// PTX of every kernel source, by file stem.\npub const PTX: &[(&str, &str)] = &[\n");
    let mut report = String::new();
    for src in &kernels {
        println!("cargo:rerun-if-changed={}", src.display());
        if src.extension().is_some_and(|x| x == "cuh") {
            continue;
        }
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("kernel file names are UTF-8");
        let ptx = out.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--ptx", "-O3", "-lineinfo", "-std=c++17"]).arg(format!("-arch={arch}"));
        if let Some(h) = &home {
            let cccl = h.join("include").join("cccl");
            if cccl.is_dir() {
                cmd.arg(format!("-I{}", cccl.display()));
            }
        }
        if let Ok(extra) = std::env::var("TPO_NVCC_FLAGS") {
            cmd.args(extra.split_whitespace());
        }
        cmd.arg("-Ikernels").arg(src).arg("-o").arg(&ptx);
        run(&mut cmd, &format!("nvcc on {}", src.display()));
        embedded.push_str(&format!("    ({stem:?}, include_str!({:?})),\n", ptx.display().to_string()));
        report.push_str(&ptxas_report(home.as_deref(), &ptx, &arch));
    }
    embedded.push_str("];\n");
    embedded.push_str(&format!(
        "/// The architecture the PTX was built for.\npub const ARCH: &str = {arch:?};\n"
    ));
    std::fs::write(out.join("kernels.rs"), embedded).expect("write kernels.rs");
    std::fs::write(out.join("ptxas-report.txt"), &report).expect("write ptxas-report.txt");
    let spilling: Vec<&str> = report.lines().filter(|l| l.starts_with("SPILL")).collect();
    for l in &spilling {
        println!("cargo:warning=ptxas: {l}");
    }
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            let p = Path::new(&h).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file())
}

/// Runs ptxas -v on `ptx` (when ptxas sits next to nvcc) and summarises registers and spills per
/// kernel, one line each; lines of spilling kernels start with `SPILL`.
fn ptxas_report(home: Option<&Path>, ptx: &Path, arch: &str) -> String {
    let Some(ptxas) = home.map(|h| h.join("bin").join("ptxas")).filter(|p| p.is_file()) else {
        return format!("# no ptxas next to nvcc: no report for {}\n", ptx.display());
    };
    // ptxas needs a real architecture.
    let sm = arch.replace("compute_", "sm_");
    let out =
        Command::new(ptxas).arg(format!("-arch={sm}")).arg("-v").arg(ptx).arg("-o").arg("/dev/null").output();
    let Ok(out) = out else { return format!("# ptxas failed to start for {}\n", ptx.display()) };
    let text = String::from_utf8_lossy(&out.stderr);
    let mut lines = Vec::new();
    let mut name = String::new();
    let mut spill = String::new();
    for l in text.lines() {
        if let Some(rest) = l.split("Compiling entry function '").nth(1) {
            name = rest.split('\'').next().unwrap_or("").to_string();
        } else if l.contains("spill stores") {
            spill = l.trim().to_string();
        } else if l.contains("Used") && l.contains("registers") {
            let used = l.split("Used").nth(1).unwrap_or("").trim();
            let spills = !spill.contains(" 0 bytes spill stores, 0 bytes spill loads");
            lines.push(format!("{}{name}: used {used}; {spill}", if spills { "SPILL " } else { "" }));
        }
    }
    lines.sort();
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

fn run(cmd: &mut Command, what: &str) {
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!(
            "{what} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => fail(&format!("cannot run {what}: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("{msg}");
}
