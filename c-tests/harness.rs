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
    // Several tests compile the same harness at once: each writes its own file and renames
    // it into place, so none runs a binary another is still writing.
    static BUILD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BUILD.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = exe.with_extension(format!("tmp{n}"));
    cmd.arg("-o").arg(&tmp);
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
    std::fs::rename(&tmp, &exe).expect("rename the compiled harness into place");
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

// ---- Reliability (issue 8): bad-input matrix, leak checks, stress, hygiene ----

/// The library's exported C entrypoints, read from the shared library's dynamic symbols.
fn exported_entrypoints() -> std::collections::BTreeSet<String> {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(lib_dir().join("libpostcopy_ram.so"))
        .output()
        .expect("nm runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (kind, name) = (f.nth(1)?, f.next()?);
            (kind == "T" && (name.starts_with("postcopy_") || name.starts_with("mark_postcopy_")))
                .then(|| name.to_string())
        })
        .collect()
}

#[test]
fn bad_input_matrix_covers_every_entrypoint() {
    let out = compile_and_run("bad_input_matrix", &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("bad_input_matrix: ") && stdout.contains(" 0 failed"),
        "{stdout}"
    );
    let covered: std::collections::BTreeSet<String> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("covered:"))
        .expect("covered: line")
        .split_whitespace()
        .map(String::from)
        .collect();
    let exported = exported_entrypoints();
    assert!(exported.len() >= 57, "entrypoints found: {exported:?}");
    let missing: Vec<_> = exported.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "entrypoints without a matrix cell: {missing:?}"
    );
}

/// Skips (and says why, also without --nocapture) when 2 MiB huge pages cannot be reserved.
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
    assert!(
        stdout.contains("hugetlb: 8 huge pages of 2 MiB"),
        "{stdout}"
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn leak_cycles_1000_setup_cleanup_cycles_leave_fds_threads_and_maps_unchanged() {
    let out = compile_and_run("leak_cycles", &[], &["1000"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("leak_cycles: 1000 cycles: 1000 faults served"),
        "{stdout}"
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

/// `valgrind` when it is installed; tests that need it print a SKIP line otherwise.
fn valgrind() -> Option<&'static str> {
    let ok = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("SKIP: valgrind is not installed (apt-get install valgrind; .ci/setup does)");
    }
    ok.then_some("valgrind")
}

/// Runs `exe args` under valgrind with `tool_args`; returns (exit status, stdout, stderr).
fn run_valgrind(
    exe: &Path,
    tool_args: &[&str],
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let supp = manifest_dir().join("c-tests/valgrind.supp");
    let out = Command::new("valgrind")
        .args(tool_args)
        .arg(format!("--suppressions={}", supp.display()))
        .arg(exe)
        .args(args)
        .output()
        .expect("valgrind runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!(
        "--- valgrind {tool_args:?} {} {args:?}\n{stdout}",
        exe.display()
    );
    (out.status, stdout, stderr)
}

/// Compiles harness `name`, runs it with `args` under valgrind's `tool_args`, and asserts
/// that every check passed and the tool reported no error; returns the tool's output.
fn passes_clean_under_valgrind(name: &str, tool_args: &[&str], args: &[&str]) -> String {
    let exe = compile(name, Link::Static, &[]);
    let (status, stdout, stderr) = run_valgrind(&exe, tool_args, args);
    let summary: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains("lost:") || l.contains("ERROR SUMMARY") || l.contains("in use at exit")
        })
        .collect();
    println!("{name} under {tool_args:?}:\n{}", summary.join("\n"));
    assert!(
        status.success() && stdout.contains(" 0 failed"),
        "{name} under {tool_args:?}: {status:?}\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("ERROR SUMMARY: 0 errors"),
        "{name}: valgrind {tool_args:?} reports\n{stderr}"
    );
    stderr
}

#[test]
fn valgrind_memcheck_finds_no_leaks_or_errors_in_the_c_harnesses() {
    if valgrind().is_none() {
        return;
    }
    // api_basics, the bad-input matrix (real userfaultfd), and a small engine run plus 20
    // setup/cleanup cycles (its vCPUs fault through syscalls, which valgrind can wait on).
    for (name, args) in [
        ("api_basics", &[][..]),
        ("bad_input_matrix", &[][..]),
        ("leak_cycles", &["20", "valgrind"][..]),
    ] {
        let stderr = passes_clean_under_valgrind(
            name,
            &[
                "--tool=memcheck",
                "--leak-check=full",
                "--show-leak-kinds=definite,indirect",
                "--errors-for-leak-kinds=definite,indirect",
                "--error-exitcode=99",
            ],
            args,
        );
        let leak_free = stderr.contains("All heap blocks were freed")
            || (stderr.contains("definitely lost: 0 bytes in 0 blocks")
                && stderr.contains("indirectly lost: 0 bytes in 0 blocks"));
        assert!(leak_free, "{name}: definite or indirect leaks\n{stderr}");
    }
}

#[test]
fn stress_placement_notifiers_shared_ufds_and_state_race_and_add_up() {
    let out = compile_and_run("stress", &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("stress: 3 vCPUs") && stdout.contains(" 0 failed"),
        "{stdout}"
    );
}

/// Helgrind over the harnesses that run library threads under valgrind: the stress run
/// (placers, notifier and shared-ufd churn, state races, with the fault thread), a small
/// migration with 20 setup/cleanup cycles, and the bad-input matrix. The library's locks
/// announce themselves to helgrind (src/sync.rs) and its lock-free atomics are reads to it,
/// so every happens-before edge is visible: any report (a race, a lock-order inversion,
/// pthread misuse) fails the test. Only std/glibc internals are suppressed
/// (c-tests/valgrind.supp). A control program with a real race must be reported, or the
/// clean runs prove nothing.
#[test]
fn helgrind_reports_nothing_in_the_library() {
    if valgrind().is_none() {
        return;
    }
    let control = compile("helgrind_control", Link::Static, &[]);
    let (status, _, stderr) = run_valgrind(&control, &["--tool=helgrind"], &[]);
    assert!(
        status.success() && stderr.contains("Possible data race"),
        "helgrind missed the control's race: {status:?}\n{stderr}"
    );
    for (name, args) in [
        ("stress", &["small"][..]),
        ("leak_cycles", &["20", "valgrind"][..]),
        ("bad_input_matrix", &[][..]),
    ] {
        passes_clean_under_valgrind(name, &["--tool=helgrind"], args);
    }
}

#[test]
fn hygiene_cloexec_outside_ram_faults_shared_messages_and_guard_pages() {
    let out = compile_and_run("hygiene", &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in [
        "library fds close-on-exec; 20 children exec'd during the migration inherited 0 fds",
        "a fault outside guest RAM was logged and counted, never requested or placed",
        "shared messages reached their handlers unchanged",
        "guard pages untouched and unpopulated",
    ] {
        assert!(stdout.contains(line), "missing \"{line}\":\n{stdout}");
    }
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

/// postcopy_place_pages (batched placement): wakes, bookkeeping, EEXIST inside a run,
/// a partial failure, bad input.
#[test]
fn place_pages_places_runs_of_pages() {
    let out = compile_and_run("place_pages", &[], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("place_pages: runs placed"), "{stdout}");
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
