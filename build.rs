//! Compiles every `kernels/*.cu` to a fatbin with nvcc when the `cuda` feature is on, and embeds it.
//!
//! * nvcc is taken from `NVCC`, else `$CUDA_HOME/bin/nvcc`, else `$CUDA_PATH/bin/nvcc`, else PATH.
//! * The fatbin holds SASS for every architecture of `TPO_CUDA_ARCH` (comma-separated, default
//!   `sm_80,sm_90`: A100 and H100 load it without a JIT, on any driver of the toolkit's major
//!   version) plus PTX for the newest of them (`compute_90`), which newer GPUs JIT-compile. It is
//!   uncompressed (`--no-compress`), so the emulated driver (emu/driver) can read the PTX inside.
//!   Extra flags can be given in `TPO_NVCC_FLAGS`.
//! * ptxas' register and spill report for every kernel and architecture goes to
//!   `$OUT_DIR/ptxas-report.txt` (a cargo warning names any kernel that spills).
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
    let archs: Vec<u32> = std::env::var("TPO_CUDA_ARCH")
        .unwrap_or_else(|_| "sm_80,sm_90".to_string())
        .split(',')
        .map(|a| {
            a.trim().trim_start_matches("sm_").trim_start_matches("compute_").parse().unwrap_or_else(|_| {
                fail(&format!(
                    "TPO_CUDA_ARCH: `{a}` is not an architecture like sm_90 (comma-separated list)"
                ))
            })
        })
        .collect();
    let newest = *archs.iter().max().expect("split yields at least one item");
    let home = nvcc.parent().and_then(Path::parent).map(Path::to_path_buf);
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .unwrap_or_else(|e| fail(&format!("cannot read kernels/: {e}")))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    kernels.sort();
    let mut embedded = String::from(
        "/// The fatbin of every kernel source, by file stem: SASS for each architecture of `ARCH`, PTX\n\
         /// for the newest.\npub const FATBIN: &[(&str, &[u8])] = &[\n",
    );
    let mut report = String::new();
    for src in &kernels {
        println!("cargo:rerun-if-changed={}", src.display());
        if src.extension().is_some_and(|x| x == "cuh") {
            continue;
        }
        let stem = src.file_stem().and_then(|s| s.to_str()).expect("kernel file names are UTF-8");
        let fatbin = out.join(format!("{stem}.fatbin"));
        let mut cmd = Command::new(&nvcc);
        // --resource-usage: ptxas' per-kernel report on stderr (without storing -v in the fatbin).
        cmd.args(["-fatbin", "--no-compress", "--resource-usage", "-O3", "-lineinfo", "-std=c++17"]);
        for a in &archs {
            cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
        }
        cmd.arg("-gencode").arg(format!("arch=compute_{newest},code=compute_{newest}"));
        if let Some(h) = &home {
            let cccl = h.join("include").join("cccl");
            if cccl.is_dir() {
                cmd.arg(format!("-I{}", cccl.display()));
            }
        }
        if let Ok(extra) = std::env::var("TPO_NVCC_FLAGS") {
            cmd.args(extra.split_whitespace());
        }
        cmd.arg("-Ikernels").arg(src).arg("-o").arg(&fatbin);
        let log = run(&mut cmd, &format!("nvcc on {}", src.display()));
        embedded.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", fatbin.display().to_string()));
        report.push_str(&ptxas_report(&log));
    }
    embedded.push_str("];\n");
    let arch_list: Vec<String> = archs.iter().map(|a| format!("sm_{a}")).collect();
    embedded.push_str(&format!(
        "/// The architectures of the embedded SASS, and of its PTX.\npub const ARCH: &str = {:?};\n",
        format!("{} + compute_{newest}", arch_list.join(","))
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

/// Summarises ptxas' resource report (nvcc --resource-usage) per kernel and architecture, one
/// line each; lines of spilling kernels start with `SPILL`.
fn ptxas_report(text: &str) -> String {
    let mut lines = Vec::new();
    let mut name = String::new();
    let mut spill = String::new();
    for l in text.lines() {
        if let Some(rest) = l.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or("");
            let arch = parts.nth(1).unwrap_or("");
            name = format!("{kernel} ({arch})");
        } else if l.contains("spill stores") {
            spill = l.trim().to_string();
        } else if l.contains("Used") && l.contains("registers") && !name.is_empty() {
            let used = l.split("Used").nth(1).unwrap_or("").trim();
            let spills = !spill.contains(" 0 bytes spill stores, 0 bytes spill loads");
            lines.push(format!("{}{name}: used {used}; {spill}", if spills { "SPILL " } else { "" }));
        }
    }
    if lines.is_empty() {
        return "# nvcc printed no ptxas resource report\n".to_string();
    }
    lines.sort();
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Runs `cmd`, failing the build with its output on error; returns its stdout and stderr.
fn run(cmd: &mut Command, what: &str) -> String {
    match cmd.output() {
        Ok(o) if o.status.success() => {
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
        }
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
