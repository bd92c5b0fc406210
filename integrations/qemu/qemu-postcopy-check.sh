#!/usr/bin/env bash
# qemu-postcopy-check.sh - build Debian trixie's QEMU (10.0.x) and run QEMU's own
# postcopy migration tests against it.
#
# Two builds are kept apart so they can be compared:
#   native   the unmodified Debian source tree, built in $WORK/build-native
#   swapped  a copy of that tree ($WORK/src-swapped) in which migration/postcopy-ram.c
#            is replaced by the C adapter from integrations/qemu/ and the Rust library's
#            static archive is linked; built in $WORK/build-swapped
#
# Nothing from QEMU's tree is written into the repository: the source, both build
# directories, the Python venv and all logs live under $QEMU_WORK_DIR.
#
# Run as root on Debian bookworm (or newer). See --help.

set -Eeuo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

WORK_DIR=${QEMU_WORK_DIR:-/var/tmp/postcopy-qemu}
JOBS=${QEMU_BUILD_JOBS:-2}
TEST_TIMEOUT=${QEMU_TEST_TIMEOUT:-600}
DEBIAN_MIRROR=${QEMU_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SOURCE_SUITE=${QEMU_SOURCE_SUITE:-trixie}
# The adapter and the archive the swapped build links (see swap_in_library).
ADAPTER_C=${QEMU_ADAPTER_C:-$SCRIPT_DIR/postcopy-ram-adapter.c}
# Unless QEMU_POSTCOPY_LIB names an archive, swapped mode builds the library first
# (cargo build --release --lib, honouring CARGO_TARGET_DIR).
CARGO_TARGET=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
case $CARGO_TARGET in /*) ;; *) CARGO_TARGET=$REPO_ROOT/$CARGO_TARGET ;; esac
LIBRARY_A=${QEMU_POSTCOPY_LIB:-$CARGO_TARGET/release/libpostcopy_ram.a}
BUILD_LIBRARY=$([[ -n ${QEMU_POSTCOPY_LIB:-} ]] && echo 0 || echo 1)

DEFAULT_TESTS=(
    /x86_64/migration/postcopy/plain
    /x86_64/migration/postcopy/preempt/plain
    /x86_64/migration/postcopy/recovery/plain
    mem-lock-relock
)
# Not a qtest: integrations/qemu/mem-lock-check.py, a postcopy into a destination started
# with -overcommit mem-lock=on, which must have its guest memory locked again afterwards.
MEM_LOCK_CHECK=$REPO_ROOT/integrations/qemu/mem-lock-check.py
TESTS=()
MODES=()            # filled from the command line; default: swapped
SKIP_DEPS=0
CLEAN=0
BUILD_ONLY=0

# Firmware directories Debian's own qemu build uses (debian/rules FIRMWAREPATH); the
# binaries in a build tree look for them below build/qemu-bundle/.
FIRMWARE_DIRS=(/usr/share/qemu /usr/share/seabios /usr/lib/ipxe/qemu)

APT_PACKAGES=(
    build-essential pkg-config ninja-build python3 python3-venv
    libglib2.0-dev libpixman-1-dev libslirp-dev flex bison libfdt-dev
    libgnutls28-dev libzstd-dev
    seabios qemu-system-data ipxe-qemu
    dpkg-dev xz-utils ca-certificates
)
MESON_REQ='meson>=1.5'

SOURCES_FILE=/etc/apt/sources.list.d/postcopy-qemu-${SOURCE_SUITE}-src.sources

usage() {
    cat <<EOF
Usage: $(basename "$0") [options]

Builds Debian ${SOURCE_SUITE}'s QEMU (qemu-system-x86_64 and tests/qtest/migration-test)
and runs QEMU's postcopy migration tests, printing a table of results and wall times.

Modes (default: --swapped):
  --swapped       build the library (cargo build --release --lib) and QEMU with
                  migration/postcopy-ram.c replaced by ${ADAPTER_C#$REPO_ROOT/} and the
                  library's static archive (build dir: \$WORK/build-swapped); check with nm
                  that none of QEMU's postcopy-ram code is linked. Without the adapter file
                  this builds the unmodified source and says so.
  --native        build the unmodified Debian source only (build dir: \$WORK/build-native)
  --both          both builds, results side by side

Options:
  --work-dir DIR  work directory outside the repository (default: \$QEMU_WORK_DIR or
                  /var/tmp/postcopy-qemu); currently: ${WORK_DIR}
  -j, --jobs N    parallel build jobs (default: \$QEMU_BUILD_JOBS or 2)
  --test PATH     run this migration-test path instead of the defaults (repeatable; the
                  defaults are QEMU's plain, preempt and recovery postcopy tests, and
                  mem-lock-relock: integrations/qemu/mem-lock-check.py)
  --timeout SECS  per-test timeout (default: \$QEMU_TEST_TIMEOUT or 600)
  --skip-deps     do not install packages or the meson venv (they must already exist)
  --clean         delete the selected build directories first (the source is kept)
  --build-only    stop after building (no tests)
  -h, --help      this text

Environment: QEMU_WORK_DIR, QEMU_BUILD_JOBS, QEMU_TEST_TIMEOUT, QEMU_DEBIAN_MIRROR,
QEMU_SOURCE_SUITE, QEMU_ADAPTER_C (adapter C file), QEMU_POSTCOPY_LIB (a prebuilt static
archive: the library is then not built), CARGO_TARGET_DIR,
QEMU_SWAP_ALLOW_QEMU_OBJECT=1 (link tests only: accept QEMU's own postcopy-ram code in the
swapped binary, e.g. when the archive was made from QEMU's postcopy-ram.o).

Exit status: 0 when every selected test passed, or when the Debian source could not be
downloaded (a "SKIPPED" line is printed); 1 on any build or test failure.
EOF
}

# ---------------------------------------------------------------- helpers

log()  { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die()  { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

declare -A PHASE_TIME=()    # "mode:phase" -> seconds (or a word such as "reused")
PHASE_ORDER=()
record() {   # record KEY VALUE
    [[ -v PHASE_TIME[$1] ]] || PHASE_ORDER+=("$1")
    PHASE_TIME[$1]=$2
}

# run_logged LOGFILE CMD...: run, send output to LOGFILE, show its tail on failure.
run_logged() {
    local logfile=$1; shift
    if ! "$@" >"$logfile" 2>&1; then
        printf '\n---- last 40 lines of %s ----\n' "$logfile" >&2
        tail -n 40 "$logfile" >&2 || true
        return 1
    fi
}

skip_exit() {
    cat <<EOF

########################################################################
##  $*
##  The QEMU source package could not be fetched, so nothing was built
##  or tested. This is not a failure of the library.
########################################################################
SKIPPED: qemu-postcopy-check: Debian ${SOURCE_SUITE} qemu source unavailable
EOF
    exit 0
}

# ---------------------------------------------------------------- arguments

while (($#)); do
    case $1 in
        --native)   MODES=(native) ;;
        --swapped)  MODES=(swapped) ;;
        --both)     MODES=(native swapped) ;;
        --work-dir) WORK_DIR=${2:?--work-dir needs a value}; shift ;;
        -j|--jobs)  JOBS=${2:?--jobs needs a value}; shift ;;
        -j*)        JOBS=${1#-j} ;;
        --test)     TESTS+=("${2:?--test needs a value}"); shift ;;
        --timeout)  TEST_TIMEOUT=${2:?--timeout needs a value}; shift ;;
        --skip-deps) SKIP_DEPS=1 ;;
        --clean)    CLEAN=1 ;;
        --build-only) BUILD_ONLY=1 ;;
        -h|--help)  usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
((${#MODES[@]})) || MODES=(swapped)
((${#TESTS[@]})) || TESTS=("${DEFAULT_TESTS[@]}")
[[ $JOBS =~ ^[0-9]+$ && $JOBS -ge 1 ]] || die "bad job count: $JOBS"

case $WORK_DIR in
    "$REPO_ROOT"|"$REPO_ROOT"/*) die "the work directory must be outside the repository ($WORK_DIR)" ;;
esac

LOG_DIR=$WORK_DIR/logs
SRC_PARENT=$WORK_DIR/src          # apt-get source unpacks here
VENV=$WORK_DIR/venv
PY=$VENV/bin/python3

# ---------------------------------------------------------------- phase: dependencies

install_deps() {
    log "Build dependencies"
    local t0 missing=()
    t0=$(now)
    [[ $(id -u) -eq 0 ]] || die "run as root (packages are installed with apt-get)"
    local p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        note "installing: ${missing[*]}"
        run_logged "$LOG_DIR/apt-update.log" apt-get update \
            || note "apt-get update reported errors (continuing; the install decides)"
        DEBIAN_FRONTEND=noninteractive run_logged "$LOG_DIR/apt-install.log" \
            apt-get install -y --no-install-recommends "${missing[@]}" \
            || die "installing build dependencies failed"
    else
        note "all Debian packages already installed"
    fi

    record "deps" "$(elapsed "$t0")"
}

# The meson venv comes from PyPI: done after the source fetch, so that an unreachable
# Debian archive is reported as SKIPPED before anything else needs the network.
install_meson() {
    local t0
    t0=$(now)
    if [[ ! -x $PY ]]; then
        note "creating Python venv $VENV"
        run_logged "$LOG_DIR/venv.log" /usr/bin/python3 -m venv "$VENV" \
            || die "creating the venv failed (python3-venv missing?)"
    fi
    if ! "$PY" - "$MESON_REQ" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
v = tuple(int(x) for x in version("meson").split(".")[:2])
sys.exit(0 if v >= (1, 5) else 1)
EOF
    then
        note "installing $MESON_REQ from PyPI into the venv"
        run_logged "$LOG_DIR/pip.log" "$PY" -m pip install --disable-pip-version-check \
            "$MESON_REQ" || die "pip install $MESON_REQ failed"
    fi
    note "meson $("$VENV/bin/meson" --version)"
    record "deps" "$(awk -v a="${PHASE_TIME[deps]:-0}" -v b="$(elapsed "$t0")" 'BEGIN { printf "%.1f", a + b }')"
}

# ---------------------------------------------------------------- phase: source

# Prints the newest unpacked qemu tree under $SRC_PARENT, if any.
find_source_tree() {
    local d best=
    for d in "$SRC_PARENT"/qemu-*/; do
        [[ -f $d/configure && -f $d/VERSION && -d $d/debian && -f $d/.unpacked-ok ]] || continue
        best=$(printf '%s\n%s\n' "$best" "${d%/}" | sed '/^$/d' | sort -V | tail -n 1)
    done
    printf '%s' "$best"
}

fetch_source() {
    log "QEMU source (Debian ${SOURCE_SUITE})"
    local t0 tree
    t0=$(now)
    mkdir -p "$SRC_PARENT"
    tree=$(find_source_tree)
    if [[ -n $tree ]]; then
        note "reusing unpacked tree $tree"
        record "fetch" "reused"
    else
        if [[ $SKIP_DEPS -eq 0 ]]; then
            note "adding deb-src entry $SOURCES_FILE"
            cat >"$SOURCES_FILE" <<EOF
# Added by postcopy-ram's integrations/qemu/qemu-postcopy-check.sh: source packages only.
Types: deb-src
URIs: ${DEBIAN_MIRROR}
Suites: ${SOURCE_SUITE}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
            if ! run_logged "$LOG_DIR/apt-update-src.log" apt-get update; then
                # A broken entry would make every later apt-get update on this machine fail.
                rm -f "$SOURCES_FILE"
                skip_exit "apt-get update failed with the ${SOURCE_SUITE} deb-src entry (entry removed again)"
            fi
        fi
        note "apt-get source qemu/${SOURCE_SUITE} (unpacks and applies Debian's patches)"
        # Leftovers of an interrupted unpack would confuse dpkg-source.
        rm -rf "$SRC_PARENT"/qemu-*/
        if ! (cd "$SRC_PARENT" && run_logged "$LOG_DIR/apt-source.log" \
                apt-get -o APT::Sandbox::User=root source "qemu/${SOURCE_SUITE}"); then
            skip_exit "apt-get source qemu/${SOURCE_SUITE} failed (see $LOG_DIR/apt-source.log)"
        fi
        local d
        for d in "$SRC_PARENT"/qemu-*/; do
            [[ -f $d/configure && -d $d/debian ]] && touch "$d/.unpacked-ok"
        done
        tree=$(find_source_tree)
        [[ -n $tree ]] || skip_exit "apt-get source produced no usable tree in $SRC_PARENT"
        record "fetch" "$(elapsed "$t0")"
    fi
    SRC_NATIVE=$tree
    QEMU_VERSION=$(cat "$tree/VERSION")
    note "QEMU $QEMU_VERSION ($(basename "$tree"))"
}

# ---------------------------------------------------------------- phase: the library

# Builds the Rust library's static archive (position independent: a Rust staticlib is
# PIC on x86_64 Linux, and QEMU links a PIE). Skipped when QEMU_POSTCOPY_LIB names one.
build_library() {
    ((BUILD_LIBRARY)) || { note "using QEMU_POSTCOPY_LIB=$LIBRARY_A"; return 0; }
    log "postcopy-ram library (cargo build --release --lib)"
    command -v cargo >/dev/null || die "cargo not found (a Rust toolchain is needed for --swapped)"
    local t0
    t0=$(now)
    (cd "$REPO_ROOT" && run_logged "$LOG_DIR/cargo-build.log" \
        cargo build --release --lib -j "$JOBS") \
        || die "cargo build of the library failed (log: $LOG_DIR/cargo-build.log)"
    [[ -f $LIBRARY_A ]] || die "cargo built no $LIBRARY_A"
    record "swapped:library" "$(elapsed "$t0")"
    note "library: ${PHASE_TIME[swapped:library]} s -> $LIBRARY_A"
}

# ---------------------------------------------------------------- swapped-build hook

# swap_in_library TREE
#
# Turns TREE (a private copy of the Debian tree) into the "swapped" variant:
#  1. copies the adapter C file from integrations/qemu/ into TREE/migration/ as
#     postcopy-ram-adapter.c;
#  2. in TREE/migration/meson.build, replaces the 'postcopy-ram.c' entry of the big
#     system_ss.add(files(...)) list with 'postcopy-ram-adapter.c', and appends
#         postcopy_ram_lib = declare_dependency(link_args: ['<abs path to libpostcopy_ram.a>'],
#                                               compile_args: ['-I<repo root>'])
#         system_ss.add(postcopy_ram_lib)
#     system_ss is compiled into libcommon.a, whose objects (the adapter's among them)
#     each emulator links directly; the dependencies of system_ss travel with them, so
#     meson puts the archive on the final qemu-system-x86_64 link line after those
#     objects and inside the same --start-group/--end-group as libqemuutil.a, GLib, libm
#     and pthread. QEMU's references into the archive, and the archive's references into
#     QEMU's static libraries, both resolve. The archive has to be position independent
#     (QEMU links a PIE; Rust's staticlib output is PIC on x86_64 Linux).
#     A link_args entry is not a ninja input, so build_one removes the binary whenever the
#     archive is newer than it, forcing the relink.
#     compile_args lets the adapter include the library's header as
#     "include/postcopy-ram.h" (a bare "postcopy-ram.h" from migration/ resolves to QEMU's
#     header of the same name); it reaches every libcommon source, which is harmless
#     because no QEMU file includes a path that exists below the repository root.
#  3. leaves everything else byte-identical to the Debian tree, so the build differs
#     from the native one only in that one object and the archive.
# The file edits are idempotent: meson.build is regenerated from the pristine copy each
# run and files are replaced only when their content changes, so ninja rebuilds only
# what is affected.
#
# Returns 1 (and changes nothing) when the adapter file or the archive is absent: the
# swapped build then compiles the unmodified source.
swap_in_library() {
    local tree=$1
    if [[ ! -f $ADAPTER_C || ! -f $LIBRARY_A ]]; then
        return 1
    fi
    local mb=$tree/migration/meson.build tmp
    tmp=$(mktemp)
    grep -q "^  'postcopy-ram.c',$" "$SRC_NATIVE/migration/meson.build" \
        || die "migration/meson.build no longer lists 'postcopy-ram.c' the way this script expects"
    {
        sed "s|^  'postcopy-ram.c',\$|  'postcopy-ram-adapter.c',|" "$SRC_NATIVE/migration/meson.build"
        printf '\n# postcopy-ram: the Rust library replaces postcopy-ram.c (added by qemu-postcopy-check.sh)\n'
        # compile_args: the adapter includes the library's header as "include/postcopy-ram.h".
        printf "postcopy_ram_lib = declare_dependency(link_args: ['%s'],\n" "$LIBRARY_A"
        printf "                                      compile_args: ['-I%s'])\n" "$REPO_ROOT"
        printf 'system_ss.add(postcopy_ram_lib)\n'
    } >"$tmp"
    replace_if_changed "$tmp" "$mb"
    cp "$ADAPTER_C" "$tmp"
    replace_if_changed "$tmp" "$tree/migration/postcopy-ram-adapter.c"
    rm -f "$tmp"
    return 0
}

replace_if_changed() {   # replace_if_changed NEW DEST: copy only when the content differs
    if ! cmp -s "$1" "$2"; then
        cp "$1" "$2"
    fi
}

# Sets TREE_FOR[MODE] (the source tree to build) and SWAP_APPLIED[MODE], preparing the
# private swapped copy when needed.
prepare_tree() {
    local mode=$1
    case $mode in
        native) SWAP_APPLIED[native]=no; TREE_FOR[native]=$SRC_NATIVE ;;
        swapped)
            local dst=$WORK_DIR/src-swapped stamp
            stamp="$(basename "$SRC_NATIVE")"
            if [[ ! -f $dst/.copied-from || $(cat "$dst/.copied-from") != "$stamp" ]]; then
                note "copying $SRC_NATIVE -> $dst"
                rm -rf "$dst"
                cp -a "$SRC_NATIVE" "$dst"
                printf '%s\n' "$stamp" >"$dst/.copied-from"
            fi
            if swap_in_library "$dst"; then
                SWAP_APPLIED[swapped]=yes
                note "library swapped in: $(basename "$ADAPTER_C") + ${LIBRARY_A}"
            else
                # Undo what an earlier swapped run may have changed.
                replace_if_changed "$SRC_NATIVE/migration/meson.build" "$dst/migration/meson.build"
                rm -f "$dst/migration/postcopy-ram-adapter.c"
                SWAP_APPLIED[swapped]=no
                cat <<EOF

    !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
    !!  swapped mode: adapter or library missing, building the UNMODIFIED source
    !!    adapter: $ADAPTER_C $( [[ -f $ADAPTER_C ]] && echo "(found)" || echo "(missing)")
    !!    library: $LIBRARY_A $( [[ -f $LIBRARY_A ]] && echo "(found)" || echo "(missing)")
    !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
EOF
            fi
            TREE_FOR[swapped]=$dst
            ;;
    esac
}

# ---------------------------------------------------------------- phase: configure + build

configure_args() {
    local IFS=:
    CONFIGURE_ARGS=(
        --target-list=x86_64-softmmu
        --without-default-features
        --enable-kvm --enable-tcg
        --enable-gnutls --enable-zstd
        --disable-docs --disable-werror --disable-download
        # The +ds tarball has no firmware blobs; Debian's packages provide them.
        --disable-install-blobs
        --python="$PY"
        --firmwarepath="${FIRMWARE_DIRS[*]}"
    )
}

build_one() {
    local mode=$1 tree=${TREE_FOR[$1]} bdir=$WORK_DIR/build-$1 t0
    log "[$mode] configure + build ($tree -> $bdir)"
    configure_args
    local want stamp=$bdir/.postcopy-check-configure
    want=$(printf '%s\n' "$tree" "${CONFIGURE_ARGS[@]}")
    if [[ $CLEAN -eq 1 ]]; then
        rm -rf "$bdir"
    fi
    if [[ -f $bdir/build.ninja && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        note "reusing configured build dir (meson re-runs itself if meson.build changed)"
        record "$mode:configure" "reused"
    else
        rm -rf "$bdir"
        mkdir -p "$bdir"
        t0=$(now)
        (cd "$bdir" && run_logged "$LOG_DIR/$mode-configure.log" \
            "$tree/configure" "${CONFIGURE_ARGS[@]}") \
            || die "[$mode] configure failed (log: $LOG_DIR/$mode-configure.log)"
        printf '%s\n' "$want" >"$stamp"
        record "$mode:configure" "$(elapsed "$t0")"
        note "configure: ${PHASE_TIME[$mode:configure]} s"
    fi

    if [[ ${SWAP_APPLIED[$mode]} == yes && -f $bdir/qemu-system-x86_64 \
          && $LIBRARY_A -nt $bdir/qemu-system-x86_64 ]]; then
        note "library archive is newer than the binary: relinking"
        rm -f "$bdir/qemu-system-x86_64"
    fi
    t0=$(now)
    run_logged "$LOG_DIR/$mode-build.log" \
        ninja -C "$bdir" -j "$JOBS" qemu-system-x86_64 tests/qtest/migration-test \
        || die "[$mode] build failed (log: $LOG_DIR/$mode-build.log)"
    record "$mode:build" "$(elapsed "$t0")"
    note "build: ${PHASE_TIME[$mode:build]} s ($(grep -c '^\[' "$LOG_DIR/$mode-build.log" || true) ninja steps)"

    link_firmware "$bdir"
    check_swap "$mode" "$bdir"
}

# A binary started from a build tree resolves its configured firmware directories
# below <build>/qemu-bundle/ (get_relocated_path); point those at Debian's packages.
link_firmware() {
    local bdir=$1 d
    for d in "${FIRMWARE_DIRS[@]}"; do
        [[ -d $d ]] || die "firmware directory $d missing (seabios/qemu-system-data/ipxe-qemu)"
        mkdir -p "$bdir/qemu-bundle$(dirname "$d")"
        ln -sfn "$d" "$bdir/qemu-bundle$d"
    done
}

# Static functions of QEMU 10.0's postcopy-ram.c that survive inlining in a -O2 build
# (checked with nm on the native binary). None of them may appear in a swapped binary.
QEMU_POSTCOPY_STATICS=(
    postcopy_ram_fault_thread postcopy_request_page qemu_ufd_copy_ioctl
    ram_block_enable_notify ufd_check_and_apply postcopy_preempt_send_channel_new
)

# The global functions QEMU 10.0's migration/postcopy-ram.c defines (nm -g --defined-only
# on the native build's libcommon.a.p/migration_postcopy-ram.c.o). check_swap reads them
# from that object when a native build exists and uses this list otherwise.
QEMU_POSTCOPY_GLOBALS=(
    fill_destination_postcopy_migration_info postcopy_add_notifier
    postcopy_discard_send_finish postcopy_discard_send_init postcopy_discard_send_range
    postcopy_fault_thread_notify postcopy_infrastructure_init postcopy_is_paused
    postcopy_notify postcopy_notify_shared_wake postcopy_place_page postcopy_place_page_zero
    postcopy_preempt_establish_channel postcopy_preempt_new_channel postcopy_preempt_setup
    postcopy_preempt_thread postcopy_ram_incoming_cleanup postcopy_ram_incoming_init
    postcopy_ram_incoming_setup postcopy_ram_prepare_discard postcopy_ram_supported_by_host
    postcopy_register_shared_ufd postcopy_remove_notifier postcopy_request_shared_page
    postcopy_state_get postcopy_state_set postcopy_temp_page_reset postcopy_thread_create
    postcopy_unregister_shared_ufd postcopy_wake_shared
)

# In a swapped build QEMU's own postcopy-ram.c must not have been compiled or linked:
# every global function QEMU's postcopy-ram.o defines must come from the library archive
# or (the two migration.h ones) from the adapter, or be absent; none of its static
# functions may be present. The per-symbol evidence goes to $LOG_DIR/swapped-nm.txt.
check_swap() {
    local mode=$1 bdir=$2 found bin=$2/qemu-system-x86_64
    [[ $mode == swapped && ${SWAP_APPLIED[swapped]} == yes ]] || return 0
    if find "$bdir" -name 'postcopy-ram.c.o' -print -quit | grep -q .; then
        die "[swapped] QEMU's postcopy-ram.c was still compiled"
    fi
    local native_o=$WORK_DIR/build-native/libcommon.a.p/migration_postcopy-ram.c.o globals=()
    if [[ -f $native_o ]]; then
        mapfile -t globals < <(nm -g --defined-only "$native_o" | awk 'NF == 3 { print $3 }' | sort -u)
    else
        globals=("${QEMU_POSTCOPY_GLOBALS[@]}")
    fi
    local adapter_o evidence=$LOG_DIR/swapped-nm.txt
    adapter_o=$(find "$bdir" -name '*postcopy-ram-adapter.c.o' -print -quit)
    [[ -n $adapter_o ]] || die "[swapped] the adapter object was not built"
    declare -A in_bin=() in_lib=() in_adapter=()
    local sym
    while read -r sym; do in_bin[$sym]=1; done < <(nm --defined-only "$bin" | awk '$2 ~ /^[TtWw]$/ { print $3 }')
    while read -r sym; do in_lib[$sym]=1; done < <(nm -g --defined-only "$LIBRARY_A" 2>/dev/null | awk 'NF == 3 && $2 ~ /^[TW]$/ { print $3 }')
    while read -r sym; do in_adapter[$sym]=1; done < <(nm -g --defined-only "$adapter_o" | awk 'NF == 3 { print $3 }')
    local n_lib=0 n_adapter=0 n_absent=0 bad=() absent=() from_adapter=() line
    {
        printf '# %s: where each global function of QEMU %s postcopy-ram.o comes from
' "$bin" "$QEMU_VERSION"
        printf '# (nm %s | nm -g --defined-only %s | nm %s)
' "$(basename "$bin")" "$LIBRARY_A" "$(basename "$adapter_o")"
    } >"$evidence"
    for sym in "${globals[@]}"; do
        if [[ -v in_lib[$sym] ]]; then
            line="library archive"; n_lib=$((n_lib + 1))
            [[ -v in_bin[$sym] ]] || bad+=("$sym(library symbol not linked)")
        elif [[ -v in_adapter[$sym] ]]; then
            line="adapter"; n_adapter=$((n_adapter + 1)); from_adapter+=("$sym")
            [[ -v in_bin[$sym] ]] || bad+=("$sym(adapter symbol not linked)")
        elif [[ -v in_bin[$sym] ]]; then
            line="QEMU'S OWN CODE"; bad+=("$sym")
        else
            line="absent (nothing in QEMU 10.0 outside postcopy-ram.c uses it)"
            n_absent=$((n_absent + 1)); absent+=("$sym")
        fi
        printf '%-45s %s %s\n' "$sym" "$(nm "$bin" | awk -v s="$sym" '$3 == s { print $1, $2; exit }')" "$line" >>"$evidence"
    done
    found=$(nm -a "$bin" | awk '{ print $NF }' \
        | grep -Fx "${QEMU_POSTCOPY_STATICS[@]/#/-e}" | sort -u | tr '\n' ' ' || true)
    printf 'static functions of QEMU postcopy-ram.c present: %s\n' "${found:-none}" >>"$evidence"
    note "nm: ${#globals[@]} global functions of QEMU's postcopy-ram.o: $n_lib from libpostcopy_ram.a," \
        "$n_adapter from the adapter (${from_adapter[*]:-}), $n_absent absent (${absent[*]:-})"
    note "nm: per-symbol evidence in $evidence"
    if [[ -n $found ]]; then
        # Only a link test that packs QEMU's own object into the archive may set this.
        if [[ ${QEMU_SWAP_ALLOW_QEMU_OBJECT:-0} == 1 ]]; then
            note "swapped build: QEMU's postcopy-ram code present ($found), allowed by QEMU_SWAP_ALLOW_QEMU_OBJECT=1"
            return 0
        fi
        die "[swapped] qemu-system-x86_64 still contains QEMU's postcopy-ram code: $found"
    fi
    ((${#bad[@]} == 0)) || die "[swapped] symbols not provided by the library or adapter: ${bad[*]}"
    [[ -v in_bin[postcopy_host_register] ]] \
        || die "[swapped] the binary lacks the library's postcopy_host_register"
    note "swapped build: no postcopy-ram.c.o, and nm shows none of QEMU's postcopy-ram code"
}

# ---------------------------------------------------------------- phase: tests

declare -A RESULT=() TEST_TIME=()
run_tests() {
    local mode=$1 bdir=$WORK_DIR/build-$1 t rc t0 logf safe
    log "[$mode] migration tests (timeout ${TEST_TIMEOUT}s each)"
    for t in "${TESTS[@]}"; do
        safe=${t//\//_}
        logf=$LOG_DIR/$mode-test${safe}.log
        t0=$(now)
        set +e
        if [[ $t == mem-lock-relock ]]; then
            (cd "$bdir" && timeout --kill-after=30 "$TEST_TIMEOUT" \
                "$PY" "$MEM_LOCK_CHECK" ./qemu-system-x86_64) >"$logf" 2>&1
            rc=$?
            # Reported in the qtest's own terms below.
            [[ $rc -eq 0 ]] && echo "ok 1 $t" >>"$logf"
        else
            (cd "$bdir" && QTEST_QEMU_BINARY=./qemu-system-x86_64 \
                timeout --kill-after=30 "$TEST_TIMEOUT" \
                ./tests/qtest/migration-test --tap -k -p "$t") >"$logf" 2>&1
            rc=$?
        fi
        set -e
        TEST_TIME[$mode$t]=$(elapsed "$t0")
        if [[ $rc -eq 0 ]] && grep -Eq "^ok [0-9]+ $t( |\$)" "$logf" \
                && ! grep -Eq "^ok [0-9]+ $t .*# SKIP" "$logf"; then
            RESULT[$mode$t]=PASS
        elif [[ $rc -eq 0 ]] && grep -Eq "^ok [0-9]+ $t .*# SKIP" "$logf"; then
            RESULT[$mode$t]=SKIP
        elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
            RESULT[$mode$t]=TIMEOUT
        elif [[ $rc -eq 0 ]]; then
            RESULT[$mode$t]=NOT-RUN     # the path is not registered in this build
        else
            RESULT[$mode$t]="FAIL($rc)"
        fi
        printf '    %-45s %-9s %7s s   (%s)\n' "$t" "${RESULT[$mode$t]}" "${TEST_TIME[$mode$t]}" "$logf"
        if [[ ${RESULT[$mode$t]} != PASS ]]; then
            tail -n 25 "$logf" | sed 's/^/      | /'
        fi
    done
}

# ---------------------------------------------------------------- report

print_report() {
    local m t line
    printf '\n==================== qemu-postcopy-check results ====================\n'
    printf 'QEMU %s (Debian %s), host %s, %s build jobs, kernel %s\n' \
        "$QEMU_VERSION" "$SOURCE_SUITE" "$(hostname)" "$JOBS" "$(uname -r)"
    for m in "${MODES[@]}"; do
        [[ $m == swapped ]] && printf 'swapped build: library swapped in = %s\n' "${SWAP_APPLIED[swapped]}"
    done
    printf '\n%-45s' "phase / test"
    for m in "${MODES[@]}"; do printf ' | %-20s' "$m"; done
    printf '\n%s\n' "$(printf '%.0s-' {1..45})$(for m in "${MODES[@]}"; do printf '%.0s-' {1..23}; done)"
    for phase in deps fetch; do
        printf '%-45s' "$phase (s, shared)"
        for m in "${MODES[@]}"; do printf ' | %-20s' "${PHASE_TIME[$phase]:--}"; done
        printf '\n'
    done
    for phase in library configure build; do
        printf '%-45s' "$phase (s)"
        for m in "${MODES[@]}"; do printf ' | %-20s' "${PHASE_TIME[$m:$phase]:--}"; done
        printf '\n'
    done
    ((BUILD_ONLY)) && TESTS=()
    for t in "${TESTS[@]}"; do
        printf '%-45s' "$t"
        for m in "${MODES[@]}"; do
            line="${RESULT[$m$t]:-?} ${TEST_TIME[$m$t]:-} s"
            printf ' | %-20s' "$line"
        done
        printf '\n'
    done
    printf '======================================================================\n'
}

# ---------------------------------------------------------------- main

main() {
    mkdir -p "$WORK_DIR" "$LOG_DIR"
    log "qemu-postcopy-check: modes: ${MODES[*]}; work dir: $WORK_DIR; -j$JOBS"
    [[ -e /dev/kvm ]] || note "no /dev/kvm: the tests will run under TCG (slower)"

    if [[ $SKIP_DEPS -eq 0 ]]; then
        install_deps
        fetch_source
        install_meson
    else
        [[ -x $PY ]] || die "--skip-deps given but $PY does not exist"
        fetch_source
    fi

    declare -gA TREE_FOR=() SWAP_APPLIED=()
    local m
    for m in "${MODES[@]}"; do
        [[ $m == swapped && -f $ADAPTER_C ]] && build_library
        prepare_tree "$m"
        build_one "$m"
    done
    if ((BUILD_ONLY)); then
        print_report
        printf 'BUILT: mode(s) %s (tests not run: --build-only)\n' "${MODES[*]}"
        return 0
    fi
    for m in "${MODES[@]}"; do
        run_tests "$m"
    done
    print_report

    local failed=0 t
    for m in "${MODES[@]}"; do
        for t in "${TESTS[@]}"; do
            [[ ${RESULT[$m$t]} == PASS ]] || failed=1
        done
    done
    if ((failed)); then
        printf 'FAILED: not every test passed (logs in %s)\n' "$LOG_DIR"
        exit 1
    fi
    printf 'PASSED: all %d test(s) in mode(s): %s\n' "${#TESTS[@]}" "${MODES[*]}"
}

main
