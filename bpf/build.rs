//! Compiles the datapath's C programs (one object per attach point) with clang for the BPF
//! target. The objects are embedded by `src/lib.rs`.
//!
//! Finds clang in `BPF_CLANG`, then `clang`, `clang-19`, `clang-16`, `clang-14`; needs libbpf's
//! headers (`bpf/bpf_helpers.h`) and the kernel UAPI headers. On Debian:
//! `apt-get install clang libbpf-dev linux-libc-dev` (tests/run.sh does it).

use std::path::PathBuf;
use std::process::Command;

const OBJECTS: [&str; 5] = [
    "sock_connect",
    "sock_getpeername",
    "sockops",
    "tc_to_endpoint",
    "tc_from_endpoint",
];

fn clang() -> anyhow::Result<String> {
    let candidates: Vec<String> = std::env::var("BPF_CLANG")
        .into_iter()
        .chain(["clang", "clang-19", "clang-16", "clang-14"].map(String::from))
        .collect();
    for c in &candidates {
        if Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(c.clone());
        }
    }
    anyhow::bail!(
        "no clang found (tried {}): install it with `apt-get install clang libbpf-dev linux-libc-dev`, \
         or set BPF_CLANG",
        candidates.join(", ")
    )
}

fn main() -> anyhow::Result<()> {
    use anyhow::Context as _;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let clang = clang()?;
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    println!("cargo:rerun-if-changed=lib");
    let arch_include = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    for name in OBJECTS {
        let src = format!("{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let output = Command::new(&clang)
            .args([
                "-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-c", &src, "-o",
            ])
            .arg(&obj)
            .arg("-I")
            .arg(&arch_include)
            .output()
            .with_context(|| format!("running {clang}"))?;
        if !output.status.success() {
            anyhow::bail!(
                "clang failed on bpf/{src}:\n{}\n(is libbpf-dev installed? apt-get install libbpf-dev linux-libc-dev)",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    Ok(())
}
