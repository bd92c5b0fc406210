//! Generates `include/postcopy-ram.h` from the `extern "C"` layer with cbindgen.
//!
//! The header is written to `OUT_DIR` on every build. Outside CI the committed copy in
//! `include/` is refreshed when it differs, so a developer only has to commit it; under CI
//! (`CI` set) it is left alone, so a stale committed header fails the freshness test.
use std::{env, fs, path::PathBuf};

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=CI");

    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is readable and valid");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let generated = out_dir.join("postcopy-ram.h");
    bindings.write_to_file(&generated);

    let committed = crate_dir.join("include").join("postcopy-ram.h");
    let fresh = fs::read(&generated).expect("generated header readable");
    let current = fs::read(&committed).unwrap_or_default();
    if fresh != current {
        if env::var_os("CI").is_some() {
            println!(
                "cargo:warning=include/postcopy-ram.h is stale: rebuild outside CI and commit it"
            );
        } else {
            fs::create_dir_all(committed.parent().unwrap()).expect("include/ can be created");
            fs::write(&committed, &fresh).expect("include/postcopy-ram.h writable");
        }
    }
}
