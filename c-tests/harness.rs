//! Builds the C harnesses in c-tests/ against the freshly built static and shared
//! libraries and runs them; a failing C check fails `cargo test`. Also checks that the
//! committed header is what cbindgen generates now, and that every prototype matches the
//! seed's (gcc -aux-info), since gcc silently accepts an enum where `unsigned` was declared.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// target/<profile>: this test binary lives in target/<profile>/deps.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Where `cargo test` leaves the static and shared libraries it built for this run
/// (target/<profile>/deps; the copies one level up are only refreshed by `cargo build`).
fn lib_dir() -> PathBuf {
    profile_dir().join("deps")
}

fn out_dir() -> PathBuf {
    let dir = profile_dir().join("c-tests");
    std::fs::create_dir_all(&dir).expect("create target/<profile>/c-tests");
    dir
}

#[derive(Clone, Copy, PartialEq)]
enum Link {
    Static,
    Shared,
}

/// Compiles `c-tests/<name>.c` (plus `extra` sources) with -Wall -Wextra -Werror.
fn compile(name: &str, link: Link, extra: &[&str]) -> PathBuf {
    let src = manifest_dir().join("c-tests");
    let suffix = if link == Link::Static {
        "static"
    } else {
        "shared"
    };
    let exe = out_dir().join(format!("{name}-{suffix}"));
    let mut cmd = Command::new("gcc");
    cmd.args([
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-O1",
        "-g",
        "-pthread",
    ])
    .arg("-I")
    .arg(manifest_dir().join("include"))
    .arg("-I")
    .arg(&src)
    .arg(src.join(format!("{name}.c")));
    for e in extra {
        cmd.arg(src.join(e));
    }
    cmd.arg("-o").arg(&exe);
    match link {
        Link::Static => {
            cmd.arg(lib_dir().join("libpostcopy_ram.a"))
                .args(["-ldl", "-lm", "-lpthread"]);
        }
        Link::Shared => {
            cmd.arg(format!("-L{}", lib_dir().display()))
                .arg(format!("-Wl,-rpath,{}", lib_dir().display()))
                .arg("-lpostcopy_ram");
        }
    }
    let out = cmd.output().expect("gcc runs");
    assert!(
        out.status.success(),
        "gcc failed for {name}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn run(exe: &Path, args: &[&str]) -> Output {
    let out = Command::new(exe)
        .args(args)
        .output()
        .expect("C harness runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("--- {} {:?}\n{stdout}{stderr}", exe.display(), args);
    assert!(
        out.status.success(),
        "{} {:?} failed with {:?}:\n{stdout}\n{stderr}",
        exe.display(),
        args,
        out.status
    );
    out
}

fn compile_and_run(name: &str, extra: &[&str], args: &[&str]) -> Output {
    let exe = compile(name, Link::Static, extra);
    run(&exe, args)
}

#[test]
fn header_is_fresh() {
    let dir = manifest_dir();
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let generated = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen");
    let mut fresh = Vec::new();
    generated.write(&mut fresh);
    let committed =
        std::fs::read(dir.join("include/postcopy-ram.h")).expect("include/postcopy-ram.h");
    assert!(
        fresh == committed,
        "include/postcopy-ram.h is stale: run `cargo build` outside CI and commit it"
    );
}

#[test]
fn header_compiles_after_qemus_declarations_static_and_shared() {
    for link in [Link::Static, Link::Shared] {
        let out = run(&compile("conformance_qemu", link, &[]), &[]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("28 seed functions linked"));
    }
}

#[test]
fn header_alone_serves_a_standalone_vmm_static_and_shared() {
    for link in [Link::Static, Link::Shared] {
        let out = run(&compile("conformance_standalone", link, &[]), &[]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("28 seed functions linked"));
    }
}

/// Prototypes of the seed's functions as gcc prints them (`-aux-info`), by name.
fn aux_prototypes(
    include_line: &str,
    include_dir: &Path,
) -> std::collections::BTreeMap<String, String> {
    let dir = out_dir();
    let src = dir.join(format!("aux-{}.c", include_line.len()));
    let aux = src.with_extension("aux");
    std::fs::write(&src, format!("#include \"{include_line}\"\n")).unwrap();
    let out = Command::new("gcc")
        .args(["-std=gnu11", "-fsyntax-only", "-aux-info"])
        .arg(&aux)
        .arg("-I")
        .arg(include_dir)
        .arg(&src)
        .output()
        .expect("gcc runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&aux).unwrap();
    let seed = std::fs::read_to_string(manifest_dir().join("c-tests/seed_functions.h")).unwrap();
    let names: Vec<&str> = seed
        .split("X(")
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .collect();
    assert_eq!(names.len(), 28, "seed_functions.h lists the 28 functions");
    let mut map = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Some(decl) = line.split("*/").nth(1).map(str::trim) else {
            continue;
        };
        for name in &names {
            if decl.contains(&format!(" {name} (")) {
                map.insert(name.to_string(), decl.to_string());
            }
        }
    }
    map
}

#[test]
fn every_prototype_matches_the_seed_exactly() {
    let seed = aux_prototypes("qemu_side.h", &manifest_dir().join("c-tests"));
    let ours = aux_prototypes("postcopy-ram.h", &manifest_dir().join("include"));
    assert_eq!(seed.len(), 28, "all seed prototypes found: {seed:#?}");
    assert_eq!(ours.len(), 28, "all our prototypes found: {ours:#?}");
    for (name, proto) in &seed {
        assert_eq!(Some(proto), ours.get(name), "prototype of {name} differs");
    }
}

#[test]
fn api_without_userfaultfd_static_and_shared() {
    for link in [Link::Static, Link::Shared] {
        let out = run(&compile("api_basics", link, &[]), &[]);
        assert!(String::from_utf8_lossy(&out.stdout).contains(" 0 failed"));
    }
}

#[test]
fn engine_migrates_256mib_with_four_vcpus() {
    let out = compile_and_run("engine", &[], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("engine: 4 vCPUs touched"));
}

#[test]
fn recovery_and_preempt() {
    compile_and_run("recovery", &[], &[]);
}

#[test]
fn shared_userfaultfd_children_served_and_woken() {
    let out = compile_and_run("shared_ufd", &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("shared_ufd: C1 "), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn hugetlbfs_block_of_2mib_pages() {
    let out = compile_and_run("hugetlb", &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = stdout.lines().find(|l| l.starts_with("SKIP:")) {
        use std::io::Write;
        // Straight to the process's stderr: libtest captures only print!/eprint!.
        let _ = writeln!(std::io::stderr(), "hugetlbfs_block_of_2mib_pages: {line}");
        return;
    }
    assert!(stdout.contains("hugetlb: 8 huge pages of 2 MiB"), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
