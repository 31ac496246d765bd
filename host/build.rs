//! Embeds the web console (`web-ui/`, built by `scripts/console.sh` into
//! `target/console/`, or the folder `WAFER_CONSOLE_DIR` names) into the binary. Without
//! a built console the binary still builds; its `/` then says how to build one.

use std::path::{Path, PathBuf};
use std::{env, fs};

fn main() {
    println!("cargo:rerun-if-env-changed=WAFER_CONSOLE_DIR");
    let dir = env::var_os("WAFER_CONSOLE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("console")
        });
    // Watching the folder (present or not) and its files rebuilds the binary when a
    // console is built or rebuilt.
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut build = String::new();
    let mut files = Vec::new();
    if let Ok(read) = fs::read_to_string(dir.join("BUILD")) {
        build = read.trim().to_string();
        println!("cargo:rerun-if-changed={}", dir.join("BUILD").display());
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if path.is_file() && name != "BUILD" {
                    println!("cargo:rerun-if-changed={}", path.display());
                    files.push((name.to_string(), path.clone()));
                }
            }
        }
    }
    files.sort();
    let mut code = format!(
        "/// The console build's id (empty: no console).\npub const BUILD: &str = {build:?};\n"
    );
    code.push_str(
        "/// The console's files: name and bytes.\npub const FILES: &[(&str, &[u8])] = &[\n",
    );
    for (name, path) in &files {
        code.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    code.push_str("];\n");
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default()).join("console.rs");
    if let Err(e) = fs::write(&out, code) {
        panic!("writing {}: {e}", out.display());
    }
}
