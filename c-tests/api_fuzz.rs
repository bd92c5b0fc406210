//! API-sequence fuzzer: random sequences of C entrypoint calls, with random arguments from
//! small pools of valid and invalid pointers, against the standalone host and a real
//! userfaultfd. A model of what each call may return is checked after every step, with the
//! fd count, the shared-ufd count, the postcopy state and the set-up flag; at the end of
//! each sequence every context is cleaned up, every thread that touched guest RAM is joined,
//! and the counters of each setup are checked against what the sequence did.
//!
//! `cargo test` runs a few cases; `POSTCOPY_FUZZ_CASES=N` runs N (a long run), and
//! `POSTCOPY_FUZZ_OPS=N` bounds the sequence length (default 48), `POSTCOPY_FUZZ_SECONDS=S`
//! repeats rounds of N cases until S seconds have passed (a timed run). `cargo test` uses one
//! fixed seed so its result is reproducible; long and timed runs draw a new seed per round and
//! print it, and `POSTCOPY_FUZZ_SEED=N` (or `random`) picks one. Failing seeds are also kept in
//! c-tests/proptest-regressions/api_fuzz.txt and replayed first on every run.
//!
//! The entrypoints are the library's `extern "C"` functions, called through their Rust
//! names (the same symbols a C caller links).
use postcopy_ram::ffi::blocktime::{
    mark_postcopy_blocktime_begin, postcopy_blocktime_query, PostcopyBlocktimeInfo,
};
use postcopy_ram::ffi::discard::{
    postcopy_discard_get_counts, postcopy_discard_send_finish, postcopy_discard_send_init,
    postcopy_discard_send_range,
};
use postcopy_ram::ffi::host_ops::postcopy_host_unregister;
use postcopy_ram::ffi::incoming::{
    postcopy_fault_thread_notify, postcopy_incoming_get_stats, postcopy_incoming_temp_page,
    postcopy_incoming_zero_page, postcopy_ram_incoming_cleanup, postcopy_ram_incoming_init,
    postcopy_ram_incoming_setup, postcopy_ram_prepare_discard, postcopy_ram_supported_by_host,
    postcopy_thread_create, PostcopyIncomingStats,
};
use postcopy_ram::ffi::notifiers::{
    postcopy_add_notifier, postcopy_notify, postcopy_remove_notifier,
};
use postcopy_ram::ffi::placement::{
    postcopy_place_page, postcopy_place_page_zero, postcopy_place_pages,
};
use postcopy_ram::ffi::preempt::{
    postcopy_preempt_channel_result, postcopy_preempt_channels_seen,
    postcopy_preempt_establish_channel, postcopy_preempt_new_channel, postcopy_preempt_setup,
};
use postcopy_ram::ffi::shared_ufds::{
    postcopy_notify_shared_wake, postcopy_register_shared_ufd, postcopy_request_shared_page,
    postcopy_shared_ufd_count, postcopy_unregister_shared_ufd, postcopy_wake_shared,
};
use postcopy_ram::ffi::standalone::{
    postcopy_error_free, postcopy_standalone_add_ram_block, postcopy_standalone_discard_range,
    postcopy_standalone_host_free, postcopy_standalone_host_install, postcopy_standalone_host_new,
    postcopy_standalone_mark_received, postcopy_standalone_page_received,
    postcopy_standalone_set_capabilities, postcopy_standalone_set_discard_callback,
    postcopy_standalone_set_log_callback, postcopy_standalone_set_request_callback,
    postcopy_standalone_set_return_path, PostcopyStandaloneHost,
};
use postcopy_ram::ffi::state::{
    postcopy_infrastructure_init, postcopy_is_paused, postcopy_state_get, postcopy_state_set,
};
use postcopy_ram::ffi::types::{
    Error as CError, MigrationIncomingState, MigrationState, MigrationStatusArg,
    NotifierWithReturn, NotifierWithReturnNode, PostCopyFD, PostcopyNotifyReasonArg,
    PostcopyStateArg, QEMUFile, QemuThread, RAMBlock,
};
use postcopy_ram::standalone::PostcopyPageRequest;
use proptest::prelude::*;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestRng, TestRunner,
};
use std::collections::{BTreeSet, VecDeque};
use std::ffi::{c_char, c_int, c_void};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const BLOCK_PAGES: [u64; 2] = [32, 8];
/// Sequences longer than this are cut (POSTCOPY_FUZZ_OPS overrides).
const DEFAULT_OPS: usize = 48;
/// Cases in a plain `cargo test` (POSTCOPY_FUZZ_CASES overrides).
const DEFAULT_CASES: u32 = 256;
/// The seed `cargo test` replays (see `random_api_sequences_keep_the_documented_contract`).
const DEFAULT_SEED: u64 = 20261128;

/// A fresh seed for an exploring run: the clock and the pid, mixed.
fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}
/// Touching threads alive at once (each may block on a missing page).
const MAX_TOUCHERS: usize = 12;
/// A step that takes longer than this is a hang: the watchdog aborts the process.
const HANG: Duration = Duration::from_secs(60);
/// The waker of shared entry 1 fails with this, so placements report it.
const WAKER_ERR: c_int = -libc::EXDEV;

// ---------------------------------------------------------------------------------------
// Pointer pools and callbacks.

static MIS_STORAGE: [u64; 2] = [0, 0];
static MS_STORAGE: [u64; 2] = [0, 0];
static FILE_STORAGE: u64 = 0;
static BOGUS_STORAGE: u64 = 0;
static SRC_PAGE: [u8; PAGE as usize] = [0x5a; PAGE as usize];
/// The source of postcopy_place_pages runs (at most 3 pages).
static SRC_RUN: [u8; 3 * PAGE as usize] = [0x5b; 3 * PAGE as usize];

fn mis_ptr(i: usize) -> *mut MigrationIncomingState {
    match i {
        0 | 1 => &MIS_STORAGE[i] as *const u64 as *mut MigrationIncomingState,
        _ => null_mut(),
    }
}
fn ms_ptr(i: usize) -> *mut MigrationState {
    match i {
        0 => &MS_STORAGE[0] as *const u64 as *mut MigrationState,
        _ => null_mut(),
    }
}
fn bogus_rb() -> *mut RAMBlock {
    &BOGUS_STORAGE as *const u64 as *mut RAMBlock
}

/// Messages with "internal error" (a caught panic) and the total count.
static INTERNAL_ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOGS: AtomicU64 = AtomicU64::new(0);
/// The library's last messages, shown with a failure or a hang.
static RECENT_LOGS: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

fn recent_logs() -> String {
    RECENT_LOGS
        .lock()
        .map(|r| r.iter().map(|m| format!("\n  log: {m}")).collect())
        .unwrap_or_default()
}

unsafe extern "C" fn on_log(_opaque: *mut c_void, _level: c_int, msg: *const c_char) {
    LOGS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the library passes a NUL-terminated message valid for the call.
    let msg = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
    if let Ok(mut ring) = RECENT_LOGS.lock() {
        if ring.len() == 16 {
            ring.pop_front();
        }
        ring.push_back(msg.clone().into_owned());
    }
    if msg.contains("internal error") {
        if let Ok(mut v) = INTERNAL_ERRORS.lock() {
            v.push(msg.into_owned());
        }
    }
}

/// Where page requests go: served at once (auto) or queued for a Serve step.
static AUTO_SERVE: AtomicBool = AtomicBool::new(false);
static SERVE_MIS: AtomicUsize = AtomicUsize::new(0);
static QUEUE: Mutex<VecDeque<(usize, u64)>> = Mutex::new(VecDeque::new());
/// Per setup epoch: callback invocations, and pages the callback placed.
static CB_CALLS: AtomicU64 = AtomicU64::new(0);
static CB_PLACED: AtomicU64 = AtomicU64::new(0);
static CB_BAD: AtomicI64 = AtomicI64::new(0);
/// Per setup epoch: shared requests the reentrant notifier made that the library counted.
static NOTIFIER_SHARED: AtomicU64 = AtomicU64::new(0);
static BLOCK_BASES: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

unsafe extern "C" fn on_request(
    _opaque: *mut c_void,
    rb: *mut RAMBlock,
    _idstr: *const c_char,
    req: *const PostcopyPageRequest,
) -> c_int {
    CB_CALLS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the library passes a record valid for the call.
    let req = unsafe { *req };
    let b = req.block_index as usize;
    if AUTO_SERVE.load(Ordering::Acquire) {
        let host = BLOCK_BASES[b].load(Ordering::Acquire) as u64 + req.offset;
        let mis = SERVE_MIS.load(Ordering::Acquire) as *mut MigrationIncomingState;
        let rc = postcopy_place_page(
            mis,
            host as *mut c_void,
            SRC_PAGE.as_ptr() as *mut c_void,
            rb,
        );
        if rc == 0 || rc == WAKER_ERR {
            CB_PLACED.fetch_add(1, Ordering::Relaxed);
        } else {
            CB_BAD.store(rc as i64, Ordering::Relaxed);
        }
    } else if let Ok(mut q) = QUEUE.lock() {
        q.push_back((b, req.offset));
    }
    0
}

unsafe extern "C" fn on_discard(
    _opaque: *mut c_void,
    _ms: *mut MigrationState,
    _name: *const c_char,
    _n: u16,
    _starts: *const u64,
    _lengths: *const u64,
) -> c_int {
    0
}

/// Notifiers: 0 succeeds; 1 fails INBOUND_ADVISE with -1; 2 calls back into the library.
static NOTIFIED: AtomicU64 = AtomicU64::new(0);
unsafe extern "C" fn notify_ok(
    _n: *mut NotifierWithReturn,
    _d: *mut c_void,
    _e: *mut *mut CError,
) -> c_int {
    NOTIFIED.fetch_add(1, Ordering::Relaxed);
    0
}
unsafe extern "C" fn notify_fail_advise(
    _n: *mut NotifierWithReturn,
    d: *mut c_void,
    _e: *mut *mut CError,
) -> c_int {
    // SAFETY: data is the library's PostcopyNotifyData, whose first member is the reason.
    let reason = unsafe { *(d as *const u32) };
    if reason == 1 {
        -1
    } else {
        0
    }
}
unsafe extern "C" fn notify_reentrant(
    _n: *mut NotifierWithReturn,
    _d: *mut c_void,
    _e: *mut *mut CError,
) -> c_int {
    let mut st = PostcopyIncomingStats::default();
    let _ = postcopy_incoming_get_stats(mis_ptr(0), &mut st);
    let _ = postcopy_state_get();
    let _ = postcopy_shared_ufd_count();
    let _ = postcopy_incoming_temp_page(mis_ptr(0), 0);
    let pcfd = shared_entry(2);
    let rb = fixture_rb(0);
    let _ = postcopy_wake_shared(pcfd, 0x1000, rb);
    let rc = postcopy_request_shared_page(pcfd, rb, 0x10000, 0);
    if rc == 0 || rc == -libc::EBADF {
        // Validated and counted (EBADF: the page was received, the wake of fd 987 failed).
        NOTIFIER_SHARED.fetch_add(1, Ordering::Relaxed);
    }
    mark_postcopy_blocktime_begin(BLOCK_BASES[0].load(Ordering::Acquire), 1, rb);
    0
}

struct Notifiers([NotifierWithReturn; 3]);
// SAFETY: the notifiers are plain data the library only reads (their `notify` member).
unsafe impl Sync for Notifiers {}
static NOTIFIER_POOL: Notifiers = Notifiers([
    NotifierWithReturn {
        notify: Some(notify_ok),
        node: NotifierWithReturnNode {
            le_next: null_mut(),
            le_prev: null_mut(),
        },
    },
    NotifierWithReturn {
        notify: Some(notify_fail_advise),
        node: NotifierWithReturnNode {
            le_next: null_mut(),
            le_prev: null_mut(),
        },
    },
    NotifierWithReturn {
        notify: Some(notify_reentrant),
        node: NotifierWithReturnNode {
            le_next: null_mut(),
            le_prev: null_mut(),
        },
    },
]);
fn notifier(i: usize) -> *mut NotifierWithReturn {
    &NOTIFIER_POOL.0[i] as *const NotifierWithReturn as *mut NotifierWithReturn
}

/// Shared userfaultfds: 0 a real userfaultfd of ours (no range, so never a message); 1 an
/// eventfd (pollable, its waker fails); 2 an fd number that is not open; 3 fd -1.
static HANDLED: AtomicU64 = AtomicU64::new(0);
unsafe extern "C" fn shared_handler(_p: *mut PostCopyFD, _msg: *mut c_void) -> c_int {
    HANDLED.fetch_add(1, Ordering::Relaxed);
    0
}
unsafe extern "C" fn waker_ok(_p: *mut PostCopyFD, _rb: *mut RAMBlock, _o: u64) -> c_int {
    0
}
unsafe extern "C" fn waker_fail(_p: *mut PostCopyFD, _rb: *mut RAMBlock, _o: u64) -> c_int {
    WAKER_ERR
}

struct SharedPool {
    entries: Vec<PostCopyFD>,
    efd: c_int,
}
// SAFETY: plain data; the library copies each entry and only calls its C functions.
unsafe impl Send for SharedPool {}
// SAFETY: as above; the pool is never written after creation.
unsafe impl Sync for SharedPool {}
static SHARED: OnceLock<SharedPool> = OnceLock::new();
const CLOSED_FD: c_int = 987;

fn shared_pool() -> &'static SharedPool {
    SHARED.get_or_init(|| {
        // SAFETY: plain syscalls; results are checked.
        let uffd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_long,
            )
        } as c_int;
        assert!(
            uffd >= 0,
            "userfaultfd: {}",
            std::io::Error::last_os_error()
        );
        let mut api = userfaultfd_sys::uffdio_api {
            api: userfaultfd_sys::UFFD_API,
            features: 0,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes the live struct.
        let rc = unsafe { libc::ioctl(uffd, userfaultfd_sys::UFFDIO_API as _, &mut api) };
        assert_eq!(rc, 0, "UFFDIO_API");
        // SAFETY: eventfd has no memory preconditions.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(efd >= 0);
        let name = c"fuzz".as_ptr();
        let e = |fd, waker| PostCopyFD {
            fd,
            data: null_mut(),
            handler: Some(shared_handler),
            waker,
            idstr: name,
        };
        SharedPool {
            entries: vec![
                e(uffd, Some(waker_ok)),
                e(efd, Some(waker_fail)),
                e(CLOSED_FD, None),
                e(-1, Some(waker_ok)),
            ],
            efd,
        }
    })
}
fn shared_entry(i: usize) -> *mut PostCopyFD {
    match shared_pool().entries.get(i) {
        Some(e) => e as *const PostCopyFD as *mut PostCopyFD,
        None => null_mut(),
    }
}
/// What UFFDIO_WAKE returns on entry `i`'s fd.
fn wake_rc(i: usize) -> c_int {
    match i {
        0 => 0,
        1 => -libc::ENOTTY,
        _ => -libc::EBADF,
    }
}

static FIXTURE_RBS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
fn fixture_rb(i: usize) -> *mut RAMBlock {
    FIXTURE_RBS[i].load(Ordering::Acquire) as *mut RAMBlock
}

static THREAD_RAN: AtomicU64 = AtomicU64::new(0);
unsafe extern "C" fn thread_body(_arg: *mut c_void) -> *mut c_void {
    THREAD_RAN.fetch_add(1, Ordering::Relaxed);
    null_mut()
}

// ---------------------------------------------------------------------------------------
// Operations and their arguments.

#[derive(Clone, Copy, Debug)]
enum Blk {
    B(usize),
    Bogus,
    Null,
}
#[derive(Clone, Copy, Debug)]
enum Addr {
    Page(u64),
    Misaligned(u64),
    GuardBefore,
    PastEnd,
    OtherBlock,
    Null,
}
#[derive(Clone, Copy, Debug)]
enum Off {
    Page(u64),
    Unaligned(u64),
    PastEnd,
    Huge,
}
#[derive(Clone, Copy, Debug)]
enum From {
    Valid,
    Null,
    Unreadable,
}

#[derive(Clone, Debug)]
enum Op {
    Init(usize),
    PrepareDiscard(usize),
    Setup(usize),
    Cleanup(usize),
    Place {
        mis: usize,
        blk: Blk,
        addr: Addr,
        from: From,
    },
    PlaceZero {
        mis: usize,
        blk: Blk,
        addr: Addr,
    },
    PlacePages {
        mis: usize,
        blk: Blk,
        addr: Addr,
        npages: u64,
        from: From,
    },
    Touch {
        blk: usize,
        page: u64,
    },
    Serve,
    Notify(u32),
    AddNotifier(usize),
    RemoveNotifier(usize),
    RegisterShared(usize),
    UnregisterShared(usize),
    KickShared,
    NotifySharedWake(Blk, u64),
    WakeShared {
        pcfd: usize,
        blk: Blk,
        addr: Addr,
    },
    RequestShared {
        pcfd: usize,
        blk: Blk,
        off: Off,
    },
    StateSet(u32),
    IsPaused(u32),
    DiscardRange {
        blk: Blk,
        start: Off,
        len: Off,
    },
    MarkReceived {
        blk: Blk,
        start: Off,
        len: Off,
    },
    PageReceived(Blk, Off),
    SetReturnPath(bool),
    FaultThreadNotify(usize),
    Stats(usize),
    TempPage(usize, u32),
    ZeroPage(usize),
    BlocktimeBegin {
        addr: Addr,
        blk: Blk,
        tid: u32,
    },
    BlocktimeQuery(usize),
    SetCaps {
        blocktime: bool,
        preempt: bool,
    },
    PreemptNewChannel(usize),
    ChannelsSeen(usize),
    PreemptSetup(usize),
    PreemptEstablish(usize),
    ChannelResult(usize, i32),
    DiscardSendInit(usize, bool),
    DiscardSendRange(usize, u64, u64),
    DiscardSendFinish(usize),
    HostUnregister,
    HostReinstall,
    SupportedByHost(usize),
    InfraInit,
    ThreadCreate,
    AutoServe(bool),
}

fn mis_s() -> impl Strategy<Value = usize> {
    prop_oneof![6 => Just(0usize), 3 => Just(1usize), 1 => Just(2usize)]
}
fn blk_s() -> impl Strategy<Value = Blk> {
    prop_oneof![8 => (0usize..2).prop_map(Blk::B), 1 => Just(Blk::Bogus), 1 => Just(Blk::Null)]
}
fn addr_s() -> impl Strategy<Value = Addr> {
    prop_oneof![
        10 => (0u64..32).prop_map(Addr::Page),
        1 => (0u64..32).prop_map(Addr::Misaligned),
        1 => Just(Addr::GuardBefore),
        1 => Just(Addr::PastEnd),
        1 => Just(Addr::OtherBlock),
        1 => Just(Addr::Null),
    ]
}
fn off_s() -> impl Strategy<Value = Off> {
    prop_oneof![
        8 => (0u64..33).prop_map(Off::Page),
        1 => (0u64..32).prop_map(Off::Unaligned),
        1 => Just(Off::PastEnd),
        1 => Just(Off::Huge),
    ]
}
fn from_s() -> impl Strategy<Value = From> {
    prop_oneof![8 => Just(From::Valid), 1 => Just(From::Null), 1 => Just(From::Unreadable)]
}
fn raw_enum(valid: u32) -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0..valid, 1 => valid..valid + 3, 1 => Just(u32::MAX)]
}

fn op_s() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => mis_s().prop_map(Op::Init),
        1 => mis_s().prop_map(Op::PrepareDiscard),
        4 => mis_s().prop_map(Op::Setup),
        3 => mis_s().prop_map(Op::Cleanup),
        8 => (mis_s(), blk_s(), addr_s(), from_s())
            .prop_map(|(mis, blk, addr, from)| Op::Place { mis, blk, addr, from }),
        4 => (mis_s(), blk_s(), addr_s()).prop_map(|(mis, blk, addr)| Op::PlaceZero { mis, blk, addr }),
        3 => (
            mis_s(),
            blk_s(),
            addr_s(),
            prop_oneof![0u64..4, Just(u64::MAX)],
            from_s()
        )
            .prop_map(|(mis, blk, addr, npages, from)| Op::PlacePages {
                mis,
                blk,
                addr,
                npages,
                from
            }),
        6 => (0usize..2, 0u64..32).prop_map(|(blk, page)| Op::Touch { blk, page }),
        3 => Just(Op::Serve),
        2 => raw_enum(4).prop_map(Op::Notify),
        2 => (0usize..3).prop_map(Op::AddNotifier),
        1 => (0usize..3).prop_map(Op::RemoveNotifier),
        2 => (0usize..5).prop_map(Op::RegisterShared),
        1 => (0usize..5).prop_map(Op::UnregisterShared),
        1 => Just(Op::KickShared),
        1 => (blk_s(), 0u64..40 * PAGE).prop_map(|(b, o)| Op::NotifySharedWake(b, o)),
        1 => (0usize..5, blk_s(), addr_s()).prop_map(|(pcfd, blk, addr)| Op::WakeShared { pcfd, blk, addr }),
        2 => (0usize..5, blk_s(), off_s()).prop_map(|(pcfd, blk, off)| Op::RequestShared { pcfd, blk, off }),
        2 => raw_enum(6).prop_map(Op::StateSet),
        1 => raw_enum(15).prop_map(Op::IsPaused),
        2 => (blk_s(), off_s(), off_s()).prop_map(|(blk, start, len)| Op::DiscardRange { blk, start, len }),
        1 => (blk_s(), off_s(), off_s()).prop_map(|(blk, start, len)| Op::MarkReceived { blk, start, len }),
        1 => (blk_s(), off_s()).prop_map(|(b, o)| Op::PageReceived(b, o)),
        1 => any::<bool>().prop_map(Op::SetReturnPath),
        1 => mis_s().prop_map(Op::FaultThreadNotify),
        2 => mis_s().prop_map(Op::Stats),
        1 => (mis_s(), raw_enum(2)).prop_map(|(m, c)| Op::TempPage(m, c)),
        1 => mis_s().prop_map(Op::ZeroPage),
        1 => (addr_s(), blk_s(), prop_oneof![Just(0u32), Just(1u32), Just(4242u32)])
            .prop_map(|(addr, blk, tid)| Op::BlocktimeBegin { addr, blk, tid }),
        1 => mis_s().prop_map(Op::BlocktimeQuery),
        2 => (any::<bool>(), any::<bool>()).prop_map(|(blocktime, preempt)| Op::SetCaps { blocktime, preempt }),
        1 => mis_s().prop_map(Op::PreemptNewChannel),
        1 => mis_s().prop_map(Op::ChannelsSeen),
        1 => (0usize..2).prop_map(Op::PreemptSetup),
        1 => (0usize..2).prop_map(Op::PreemptEstablish),
        1 => ((0usize..2), prop_oneof![Just(0i32), Just(-5i32), Just(7i32)]).prop_map(|(m, r)| Op::ChannelResult(m, r)),
        1 => ((0usize..2), any::<bool>()).prop_map(|(m, n)| Op::DiscardSendInit(m, n)),
        2 => ((0usize..2), prop_oneof![0u64..100, Just(u64::MAX)], prop_oneof![0u64..20, Just(u64::MAX / 2)])
            .prop_map(|(m, s, l)| Op::DiscardSendRange(m, s, l)),
        1 => (0usize..2).prop_map(Op::DiscardSendFinish),
        1 => Just(Op::HostUnregister),
        2 => Just(Op::HostReinstall),
        1 => mis_s().prop_map(Op::SupportedByHost),
        1 => Just(Op::InfraInit),
        1 => Just(Op::ThreadCreate),
        1 => any::<bool>().prop_map(Op::AutoServe),
    ]
}

// ---------------------------------------------------------------------------------------
// The fixture: guard page, block 0, guard page, block 1, guard page; a fresh host per case.

struct Fixture {
    host: *mut PostcopyStandaloneHost,
    area: *mut u8,
    area_len: usize,
    bases: [u64; 2],
    rbs: [*mut RAMBlock; 2],
    /// Four PROT_NONE pages: an unreadable source for runs.
    unreadable: *mut u8,
}

impl Fixture {
    fn new() -> Self {
        let area_len = ((BLOCK_PAGES[0] + BLOCK_PAGES[1] + 3) * PAGE) as usize;
        // SAFETY: a fresh anonymous mapping; checked below.
        let area = unsafe {
            libc::mmap(
                null_mut(),
                area_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(area, libc::MAP_FAILED);
        let area = area as *mut u8;
        let b0 = area as u64 + PAGE;
        let b1 = b0 + BLOCK_PAGES[0] * PAGE + PAGE;
        for (b, pages) in [(b0, BLOCK_PAGES[0]), (b1, BLOCK_PAGES[1])] {
            // SAFETY: the range lies inside the mapping just made.
            let rc = unsafe {
                libc::mprotect(
                    b as *mut c_void,
                    (pages * PAGE) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            assert_eq!(rc, 0);
        }
        let host = postcopy_standalone_host_new(0);
        assert!(!host.is_null());
        assert_eq!(
            postcopy_standalone_set_log_callback(host, Some(on_log), null_mut()),
            0
        );
        assert_eq!(
            postcopy_standalone_set_request_callback(host, Some(on_request), null_mut()),
            0
        );
        assert_eq!(
            postcopy_standalone_set_discard_callback(host, Some(on_discard), null_mut()),
            0
        );
        let mut rbs = [null_mut(); 2];
        for (i, (b, pages)) in [(b0, BLOCK_PAGES[0]), (b1, BLOCK_PAGES[1])]
            .into_iter()
            .enumerate()
        {
            let name = [c"fuzz.b0", c"fuzz.b1"][i];
            rbs[i] = postcopy_standalone_add_ram_block(
                host,
                name.as_ptr(),
                b as *mut c_void,
                pages * PAGE,
                PAGE,
                -1,
                0,
            );
            assert!(!rbs[i].is_null());
            BLOCK_BASES[i].store(b as usize, Ordering::Release);
            FIXTURE_RBS[i].store(rbs[i] as usize, Ordering::Release);
        }
        assert_eq!(postcopy_standalone_host_install(host), 0);
        // SAFETY: a fresh anonymous mapping; checked below.
        let unreadable = unsafe {
            libc::mmap(
                null_mut(),
                (4 * PAGE) as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(unreadable, libc::MAP_FAILED);
        Fixture {
            host,
            area,
            area_len,
            bases: [b0, b1],
            rbs,
            unreadable: unreadable as *mut u8,
        }
    }

    fn rb(&self, b: Blk) -> *mut RAMBlock {
        match b {
            Blk::B(i) => self.rbs[i],
            Blk::Bogus => bogus_rb(),
            Blk::Null => null_mut(),
        }
    }

    fn addr(&self, b: Blk, a: Addr) -> u64 {
        let i = match b {
            Blk::B(i) => i,
            _ => 0,
        };
        let pages = BLOCK_PAGES[i];
        match a {
            Addr::Page(p) => self.bases[i] + (p % pages) * PAGE,
            Addr::Misaligned(p) => self.bases[i] + (p % pages) * PAGE + 8,
            Addr::GuardBefore => self.bases[i] - PAGE,
            Addr::PastEnd => self.bases[i] + pages * PAGE,
            Addr::OtherBlock => self.bases[1 - i],
            Addr::Null => 0,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = postcopy_host_unregister();
        postcopy_standalone_host_free(self.host);
        // SAFETY: the mappings this fixture made; no context is set up over them any more.
        unsafe {
            libc::munmap(self.area as *mut c_void, self.area_len);
            libc::munmap(self.unreadable as *mut c_void, (4 * PAGE) as usize);
        }
    }
}

fn off_bytes(b: Blk, o: Off) -> u64 {
    let pages = match b {
        Blk::B(i) => BLOCK_PAGES[i],
        _ => BLOCK_PAGES[0],
    };
    match o {
        Off::Page(p) => (p % (pages + 1)) * PAGE,
        Off::Unaligned(p) => (p % pages) * PAGE + 100,
        Off::PastEnd => (pages + 1) * PAGE,
        Off::Huge => u64::MAX - PAGE + 1,
    }
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

/// The process's userfaultfds and eventfds (the kinds of fd the library opens), counted,
/// and every fd listed for a failure message. Other kinds are left out of the count: glibc
/// opens files for a moment on other threads (malloc reads /sys/devices/system/cpu/online
/// when a thread first needs an arena), which made a plain fd count flaky.
fn library_kind_fds() -> (usize, String) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return (0, String::new());
    };
    let mut count = 0;
    let list = dir
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            if target == "anon_inode:[userfaultfd]" || target == "anon_inode:[eventfd]" {
                count += 1;
            }
            format!("{}->{target}", e.file_name().to_string_lossy())
        })
        .collect::<Vec<_>>()
        .join(" ");
    (count, list)
}

// ---------------------------------------------------------------------------------------
// The model.

#[derive(Default, Clone)]
struct Epoch {
    placed: u64,
    /// A run failed part-way: how many of its pages were placed is not known.
    placed_inexact: bool,
    zero_placed: u64,
    shared_requests: u64,
    return_path_went_down: bool,
}

struct Model {
    host_installed: bool,
    set_up: Option<usize>,
    /// Per mis: a context exists (from an earlier case too).
    ctx: [bool; 2],
    /// Per mis: its context was (re)made with this case's host.
    fresh: [bool; 2],
    last_setup: Option<usize>,
    /// Per mis: blocktime figures exist (None: unknown, from an earlier case).
    bt: [Option<bool>; 2],
    /// Per mis: counters of the last setup in this case.
    epoch: [Option<Epoch>; 2],
    caps: (bool, bool),
    preempt_active: bool,
    return_path: bool,
    received: [Vec<bool>; 2],
    present: [Vec<bool>; 2],
    notifiers: BTreeSet<usize>,
    shared: BTreeSet<usize>,
    state: u32,
    /// MigrationState 0: (open batch's pending count, ranges, commands) beyond the
    /// case-start baseline.
    discard: (Option<u64>, u64, u64),
    discard_base: (u64, u64),
    auto_serve: bool,
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), TestCaseError> {
    if cond {
        Ok(())
    } else {
        Err(TestCaseError::fail(what()))
    }
}

fn is_set_up(m: &Model, mis: usize) -> bool {
    mis < 2 && m.set_up == Some(mis)
}

fn stats(mis: usize) -> (c_int, PostcopyIncomingStats) {
    let mut st = PostcopyIncomingStats::default();
    let rc = postcopy_incoming_get_stats(mis_ptr(mis), &mut st);
    (rc, st)
}

fn discard_counts(ms: usize) -> (u64, u64) {
    let (mut r, mut c) = (0u64, 0u64);
    if postcopy_discard_get_counts(ms_ptr(ms), &mut r, &mut c) != 0 {
        return (0, 0);
    }
    (r, c)
}

struct Runner<'a> {
    fx: &'a Fixture,
    m: Model,
    touchers: Vec<std::thread::JoinHandle<()>>,
    fds: usize,
    executed: u64,
}

/// What postcopy_place_page and postcopy_place_pages refuse before looking at the range,
/// in the order the library checks: NULL mis or block, unknown context, NULL source, not
/// set up, a block the host never listed, a misaligned address.
fn placement_refusal(m: &Model, mis: usize, blk: Blk, addr: Addr, from: From) -> Option<c_int> {
    if mis == 2 || matches!(blk, Blk::Null) {
        Some(-libc::EINVAL)
    } else if !m.ctx[mis] {
        Some(-libc::ENODEV)
    } else if matches!(from, From::Null) {
        Some(-libc::EINVAL)
    } else if !is_set_up(m, mis) {
        Some(-libc::ENODEV)
    } else if matches!(blk, Blk::Bogus) {
        Some(-libc::EFAULT)
    } else if matches!(addr, Addr::Misaligned(_)) {
        Some(-libc::EINVAL)
    } else {
        None
    }
}

impl Runner<'_> {
    fn pages_of(&self, b: Blk, start: u64, len: u64) -> Option<(usize, std::ops::Range<usize>)> {
        let Blk::B(i) = b else { return None };
        let first = (start / PAGE) as usize;
        let end = start.checked_add(len)?.div_ceil(PAGE) as usize;
        Some((i, first..end.min(BLOCK_PAGES[i] as usize)))
    }

    fn set_up_epoch(&mut self) -> Option<&mut Epoch> {
        let s = self.m.set_up?;
        self.m.epoch[s].as_mut()
    }

    /// An entrypoint that creates the context of `mis` ran: an old context (an earlier
    /// case's host) is replaced by a fresh one.
    fn ctx_after_incoming_for(&mut self, mis: usize) {
        if mis < 2 && self.m.host_installed && !self.m.fresh[mis] {
            self.m.ctx[mis] = true;
            self.m.fresh[mis] = true;
            self.m.bt[mis] = Some(false);
        }
    }

    fn reap_touchers(&mut self) {
        let (done, running): (Vec<_>, Vec<_>) =
            self.touchers.drain(..).partition(|t| t.is_finished());
        self.touchers = running;
        for t in done {
            let _ = t.join();
        }
    }

    fn place(
        &mut self,
        mis: usize,
        blk: Blk,
        addr: Addr,
        from: From,
        zero: bool,
    ) -> Result<(), TestCaseError> {
        let fx = self.fx;
        let host = fx.addr(blk, addr);
        let rb = fx.rb(blk);
        let src = match from {
            From::Valid => SRC_PAGE.as_ptr() as *mut c_void,
            From::Null => null_mut(),
            From::Unreadable => (fx.bases[0] - PAGE) as *mut c_void,
        };
        let rc = if zero {
            postcopy_place_page_zero(mis_ptr(mis), host as *mut c_void, rb)
        } else {
            postcopy_place_page(mis_ptr(mis), host as *mut c_void, src, rb)
        };
        let m = &self.m;
        let ok = if m.shared.contains(&1) { WAKER_ERR } else { 0 };
        let inside = matches!(addr, Addr::Page(_));
        let set_up = is_set_up(m, mis);
        let want: Vec<c_int> = if let Some(rc) = placement_refusal(m, mis, blk, addr, from) {
            vec![rc]
        } else if !inside {
            vec![-libc::EFAULT]
        } else if matches!(from, From::Unreadable) {
            // EEXIST wins over the unreadable source when the page is present.
            vec![-libc::EFAULT, ok]
        } else {
            vec![ok]
        };
        expect(want.contains(&rc), || {
            format!("place rc {rc}, want one of {want:?}")
        })?;
        if rc == ok && inside && set_up {
            let Blk::B(i) = blk else {
                unreachable!("inside a block")
            };
            let p = ((host - fx.bases[i]) / PAGE) as usize;
            self.m.received[i][p] = true;
            self.m.present[i][p] = true;
            let e = self.set_up_epoch().expect("set up");
            if zero {
                e.zero_placed += 1;
            } else {
                e.placed += 1;
            }
        }
        Ok(())
    }

    fn place_pages(
        &mut self,
        mis: usize,
        blk: Blk,
        addr: Addr,
        npages: u64,
        from: From,
    ) -> Result<(), TestCaseError> {
        let fx = self.fx;
        let host = fx.addr(blk, addr);
        let src = match from {
            From::Valid => SRC_RUN.as_ptr() as *mut c_void,
            From::Null => null_mut(),
            From::Unreadable => fx.unreadable as *mut c_void,
        };
        let rc = postcopy_place_pages(mis_ptr(mis), host as *mut c_void, src, npages, fx.rb(blk));
        let m = &self.m;
        let ok = if m.shared.contains(&1) { WAKER_ERR } else { 0 };
        let set_up = is_set_up(m, mis);
        let fits = match (blk, addr) {
            (Blk::B(i), Addr::Page(_)) => npages
                .checked_mul(PAGE)
                .is_some_and(|l| l <= fx.bases[i] + BLOCK_PAGES[i] * PAGE - host),
            _ => false,
        };
        let want: Vec<c_int> = if let Some(rc) = placement_refusal(m, mis, blk, addr, from) {
            vec![rc]
        } else if !matches!(addr, Addr::Page(_)) || !fits {
            vec![-libc::EFAULT]
        } else if npages == 0 {
            vec![0]
        } else if matches!(from, From::Unreadable) {
            // Present pages are skipped (EEXIST) before the unreadable source is read.
            vec![-libc::EFAULT, ok]
        } else {
            vec![ok]
        };
        expect(want.contains(&rc), || {
            format!("place_pages({npages}) rc {rc}, want one of {want:?}")
        })?;
        if set_up && fits && npages > 0 {
            let Blk::B(i) = blk else {
                unreachable!("fits only in a block")
            };
            let first = ((host - fx.bases[i]) / PAGE) as usize;
            let e = self.m.epoch[mis].as_mut().expect("set up");
            if rc == ok {
                e.placed += npages;
                for p in first..first + npages as usize {
                    self.m.received[i][p] = true;
                    self.m.present[i][p] = true;
                }
            } else {
                e.placed_inexact = true;
            }
        }
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let fx = self.fx;
        self.reap_touchers();
        match *op {
            Op::Init(mis) => {
                let rc = postcopy_ram_incoming_init(mis_ptr(mis));
                let m = &self.m;
                let want = if mis == 2 {
                    -libc::EINVAL
                } else if !m.host_installed {
                    -libc::ENODEV
                } else if is_set_up(m, mis) {
                    -libc::EBUSY
                } else {
                    0
                };
                expect(rc == want, || format!("init rc {rc}, want {want}"))?;
                if rc == 0 {
                    for i in 0..2 {
                        self.m.received[i].fill(false);
                        self.m.present[i].fill(false);
                    }
                }
                self.ctx_after_incoming_for(mis);
            }
            Op::PrepareDiscard(mis) => {
                let rc = postcopy_ram_prepare_discard(mis_ptr(mis));
                let want = if mis == 2 {
                    -libc::EINVAL
                } else if !self.m.host_installed {
                    -libc::ENODEV
                } else {
                    0
                };
                expect(rc == want, || {
                    format!("prepare_discard rc {rc}, want {want}")
                })?;
                if rc == 0 {
                    self.m.state = 2;
                }
                self.ctx_after_incoming_for(mis);
            }
            Op::Setup(mis) => {
                let free = self.m.set_up.is_none();
                if free && mis < 2 && self.m.host_installed {
                    // No fault thread runs now: the callback's figures start afresh, and a
                    // toucher released by the last cleanup may fault into this setup.
                    CB_CALLS.store(0, Ordering::Relaxed);
                    CB_PLACED.store(0, Ordering::Relaxed);
                    NOTIFIER_SHARED.store(0, Ordering::Relaxed);
                    SERVE_MIS.store(mis_ptr(mis) as usize, Ordering::Release);
                    // Requests must be answered for a preempt cleanup to finish.
                    AUTO_SERVE.store(self.m.auto_serve || self.m.caps.1, Ordering::Release);
                }
                let rc = postcopy_ram_incoming_setup(mis_ptr(mis));
                let want = if mis == 2 {
                    -libc::EINVAL
                } else if !self.m.host_installed {
                    -libc::ENODEV
                } else if !free {
                    -libc::EBUSY
                } else {
                    0
                };
                expect(rc == want, || format!("setup rc {rc}, want {want}"))?;
                self.ctx_after_incoming_for(mis);
                if rc == 0 {
                    let m = &mut self.m;
                    m.set_up = Some(mis);
                    m.last_setup = Some(mis);
                    m.epoch[mis] = Some(Epoch {
                        return_path_went_down: !m.return_path,
                        ..Epoch::default()
                    });
                    m.bt[mis] = Some(m.caps.0);
                    m.preempt_active = m.caps.1;
                }
            }
            Op::Cleanup(mis) => {
                let rc = postcopy_ram_incoming_cleanup(mis_ptr(mis));
                let want = if mis == 2 { -libc::EINVAL } else { 0 };
                expect(rc == want, || format!("cleanup rc {rc}, want {want}"))?;
                if is_set_up(&self.m, mis) {
                    // Blocked touchers are released (the blocks are unregistered).
                    self.m.set_up = None;
                    self.m.preempt_active = false;
                    AUTO_SERVE.store(self.m.auto_serve, Ordering::Release);
                }
            }
            Op::Place {
                mis,
                blk,
                addr,
                from,
            } => self.place(mis, blk, addr, from, false)?,
            Op::PlaceZero { mis, blk, addr } => self.place(mis, blk, addr, From::Valid, true)?,
            Op::PlacePages {
                mis,
                blk,
                addr,
                npages,
                from,
            } => self.place_pages(mis, blk, addr, npages, from)?,
            Op::Touch { blk, page } => {
                let page = (page % BLOCK_PAGES[blk]) as usize;
                let addr = fx.bases[blk] + page as u64 * PAGE;
                if self.m.set_up.is_none() {
                    // Nothing registered: a plain read maps the page at once.
                    // SAFETY: addr is inside a readable block of the fixture.
                    unsafe { std::ptr::read_volatile(addr as *const u8) };
                    self.m.present[blk][page] = true;
                } else if (self.m.present[blk][page] || !self.m.received[blk][page])
                    && self.touchers.len() < MAX_TOUCHERS
                {
                    // (A page marked received but missing would fault until cleanup.)
                    self.touchers.push(std::thread::spawn(move || {
                        // SAFETY: addr is inside a block of the fixture, which outlives
                        // every toucher (all are joined before the fixture is dropped).
                        unsafe { std::ptr::read_volatile(addr as *const u8) };
                    }));
                }
            }
            Op::Serve => {
                let queued: Vec<(usize, u64)> = QUEUE.lock().unwrap().drain(..).collect();
                for (b, off) in queued {
                    let Some(s) = self.m.set_up else { continue };
                    let rc = postcopy_place_page(
                        mis_ptr(s),
                        (fx.bases[b] + off) as *mut c_void,
                        SRC_PAGE.as_ptr() as *mut c_void,
                        fx.rbs[b],
                    );
                    let ok = if self.m.shared.contains(&1) {
                        WAKER_ERR
                    } else {
                        0
                    };
                    expect(rc == ok, || {
                        format!("serving a request: rc {rc}, want {ok}")
                    })?;
                    let p = (off / PAGE) as usize;
                    self.m.received[b][p] = true;
                    self.m.present[b][p] = true;
                    self.set_up_epoch().expect("set up").placed += 1;
                }
            }
            Op::Notify(reason) => {
                let rc = postcopy_notify(PostcopyNotifyReasonArg(reason), null_mut());
                let want = if reason > 3 {
                    -libc::EINVAL
                } else if reason == 1 && self.m.notifiers.contains(&1) {
                    -1
                } else {
                    0
                };
                expect(rc == want, || {
                    format!("notify({reason}) rc {rc}, want {want}")
                })?;
            }
            Op::AddNotifier(i) => {
                postcopy_add_notifier(notifier(i));
                self.m.notifiers.insert(i);
            }
            Op::RemoveNotifier(i) => {
                postcopy_remove_notifier(notifier(i));
                self.m.notifiers.remove(&i);
            }
            Op::RegisterShared(i) => {
                postcopy_register_shared_ufd(shared_entry(i));
                if i < 3 {
                    self.m.shared.insert(i);
                }
            }
            Op::UnregisterShared(i) => {
                postcopy_unregister_shared_ufd(shared_entry(i));
                self.m.shared.remove(&i);
            }
            Op::KickShared => {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a live u64 to our eventfd.
                unsafe { libc::write(shared_pool().efd, (&one as *const u64).cast(), 8) };
            }
            Op::NotifySharedWake(blk, off) => {
                let rc = postcopy_notify_shared_wake(fx.rb(blk), off);
                let want = if matches!(blk, Blk::Null) {
                    -libc::EINVAL
                } else if self.m.shared.contains(&1) {
                    WAKER_ERR
                } else {
                    0
                };
                expect(rc == want, || {
                    format!("notify_shared_wake rc {rc}, want {want}")
                })?;
            }
            Op::WakeShared { pcfd, blk, addr } => {
                let rc = postcopy_wake_shared(shared_entry(pcfd), fx.addr(blk, addr), fx.rb(blk));
                let documented = [
                    0,
                    -libc::EINVAL,
                    -libc::EBADF,
                    -libc::ENOTTY,
                    -libc::EFAULT,
                    -libc::ENODEV,
                ];
                expect(documented.contains(&rc), || format!("wake_shared rc {rc}"))?;
                if pcfd == 4 || matches!(blk, Blk::Null) {
                    expect(rc == -libc::EINVAL, || {
                        format!("wake_shared with NULL: rc {rc}")
                    })?;
                }
            }
            Op::RequestShared { pcfd, blk, off } => {
                let offset = off_bytes(blk, off);
                let rc =
                    postcopy_request_shared_page(shared_entry(pcfd), fx.rb(blk), 0x10000, offset);
                let in_range = match blk {
                    Blk::B(i) => offset < BLOCK_PAGES[i] * PAGE,
                    _ => false,
                };
                let valid = pcfd != 4 && matches!(blk, Blk::B(_));
                let want: Vec<c_int> = if pcfd == 4 || matches!(blk, Blk::Null) {
                    vec![-libc::EINVAL]
                } else if self.m.set_up.is_none() {
                    vec![-libc::ENODEV]
                } else if matches!(blk, Blk::Bogus) {
                    // An unknown block is looked up in the most recently used context.
                    vec![-libc::EFAULT, -libc::ENODEV]
                } else if !in_range {
                    vec![-libc::EINVAL]
                } else {
                    vec![0, wake_rc(pcfd)]
                };
                expect(want.contains(&rc), || {
                    format!("request_shared_page rc {rc}, want one of {want:?}")
                })?;
                if self.m.set_up.is_some() && in_range && valid {
                    self.set_up_epoch().expect("set up").shared_requests += 1;
                }
            }
            Op::StateSet(raw) => {
                let old = postcopy_state_set(PostcopyStateArg(raw));
                expect(old.0 == self.m.state, || {
                    format!("state_set returned {}, model {}", old.0, self.m.state)
                })?;
                if raw <= 5 {
                    self.m.state = raw;
                }
            }
            Op::IsPaused(raw) => {
                let p = postcopy_is_paused(MigrationStatusArg(raw));
                expect(p == (raw == 6 || raw == 7), || {
                    format!("is_paused({raw}) = {p}")
                })?;
            }
            Op::DiscardRange { blk, start, len } => {
                let (s, l) = (off_bytes(blk, start), off_bytes(blk, len));
                let rc = postcopy_standalone_discard_range(fx.host, fx.rb(blk), s, l);
                let want = match blk {
                    Blk::Null | Blk::Bogus => -libc::EFAULT,
                    Blk::B(i) => {
                        let fits = s.checked_add(l).is_some_and(|e| e <= BLOCK_PAGES[i] * PAGE);
                        if !fits || s % PAGE != 0 || l % PAGE != 0 {
                            -libc::EINVAL
                        } else {
                            0
                        }
                    }
                };
                expect(rc == want, || {
                    format!("discard_range({s:#x}, {l:#x}) rc {rc}, want {want}")
                })?;
                if rc == 0 {
                    let (i, r) = self.pages_of(blk, s, l).expect("valid block");
                    for p in r {
                        self.m.received[i][p] = false;
                        self.m.present[i][p] = false;
                    }
                }
            }
            Op::MarkReceived { blk, start, len } => {
                let (s, l) = (off_bytes(blk, start), off_bytes(blk, len));
                let rc = postcopy_standalone_mark_received(fx.host, fx.rb(blk), s, l);
                let want = match blk {
                    Blk::Null | Blk::Bogus => -libc::EFAULT,
                    Blk::B(i) => {
                        if s.checked_add(l).is_some_and(|e| e <= BLOCK_PAGES[i] * PAGE) {
                            0
                        } else {
                            -libc::EINVAL
                        }
                    }
                };
                expect(rc == want, || {
                    format!("mark_received({s:#x}, {l:#x}) rc {rc}, want {want}")
                })?;
                if rc == 0 {
                    let (i, r) = self.pages_of(blk, s, l).expect("valid block");
                    for p in r {
                        self.m.received[i][p] = true;
                    }
                }
            }
            Op::PageReceived(blk, off) => {
                let o = off_bytes(blk, off);
                let rc = postcopy_standalone_page_received(fx.host, fx.rb(blk), o);
                match blk {
                    Blk::Null | Blk::Bogus => {
                        expect(rc == -libc::EFAULT, || format!("page_received rc {rc}"))?
                    }
                    Blk::B(i) => {
                        let p = (o / PAGE) as usize;
                        let past = o >= BLOCK_PAGES[i] * PAGE;
                        let known = !past && self.m.received[i][p];
                        expect(
                            if past {
                                rc == 0
                            } else if known {
                                rc == 1
                            } else {
                                rc == 0 || rc == 1
                            },
                            || format!("page_received({i}, {o:#x}) = {rc}, model received {known}"),
                        )?;
                    }
                }
            }
            Op::SetReturnPath(ok) => {
                let rc = postcopy_standalone_set_return_path(
                    fx.host,
                    mis_ptr(self.m.set_up.unwrap_or(0)),
                    ok,
                );
                expect(rc == 0, || format!("set_return_path rc {rc}"))?;
                self.m.return_path = ok;
                if !ok {
                    if let Some(e) = self.set_up_epoch() {
                        e.return_path_went_down = true;
                    }
                }
            }
            Op::FaultThreadNotify(mis) => postcopy_fault_thread_notify(mis_ptr(mis)),
            Op::Stats(mis) => {
                let (rc, st) = stats(mis);
                let want = if mis == 2 {
                    -libc::EINVAL
                } else if !self.m.ctx[mis] {
                    -libc::ENOENT
                } else {
                    0
                };
                expect(rc == want, || format!("get_stats rc {rc}, want {want}"))?;
                if rc == 0 {
                    let pages = BLOCK_PAGES[0] + BLOCK_PAGES[1];
                    expect(st.outstanding_requests <= pages, || {
                        format!("{} outstanding", st.outstanding_requests)
                    })?;
                    expect(st.faults_outside_ram == 0 && st.request_errors == 0, || {
                        format!("{st:?}")
                    })?;
                }
            }
            Op::TempPage(mis, ch) => {
                let p = postcopy_incoming_temp_page(mis_ptr(mis), ch);
                let want =
                    is_set_up(&self.m, mis) && (ch == 0 || (ch == 1 && self.m.preempt_active));
                expect(p.is_null() != want, || {
                    format!("temp_page({mis}, {ch}) = {p:?}, want non-NULL {want}")
                })?;
            }
            Op::ZeroPage(mis) => {
                let p = postcopy_incoming_zero_page(mis_ptr(mis));
                expect(p.is_null() != is_set_up(&self.m, mis), || {
                    format!("zero_page({mis}) = {p:?}")
                })?;
            }
            Op::BlocktimeBegin { addr, blk, tid } => {
                mark_postcopy_blocktime_begin(fx.addr(blk, addr) as usize, tid, fx.rb(blk));
            }
            Op::BlocktimeQuery(mis) => {
                let mut info = std::mem::MaybeUninit::<PostcopyBlocktimeInfo>::zeroed();
                let mut ms = [0u32; 4];
                let rc = postcopy_blocktime_query(
                    mis_ptr(mis),
                    info.as_mut_ptr(),
                    ms.as_mut_ptr(),
                    null_mut(),
                    null_mut(),
                    null_mut(),
                    ms.len(),
                );
                let ok = if mis == 2 {
                    rc == -libc::EINVAL
                } else if !self.m.ctx[mis] {
                    rc == -libc::ENOENT
                } else {
                    match self.m.bt[mis] {
                        Some(true) => rc >= 0,
                        Some(false) => rc == -libc::ENODATA,
                        None => rc >= 0 || rc == -libc::ENODATA,
                    }
                };
                expect(ok, || {
                    format!(
                        "blocktime_query({mis}) rc {rc}, model {:?}",
                        self.m.bt.get(mis)
                    )
                })?;
                if rc >= 0 {
                    // SAFETY: the library filled the struct (rc >= 0).
                    let info = unsafe { info.assume_init() };
                    expect(
                        info.resolved_faults <= info.faults
                            && info.outstanding_faults == info.faults - info.resolved_faults,
                        || format!("blocktime figures: {info:?}"),
                    )?;
                }
            }
            Op::SetCaps { blocktime, preempt } => {
                let rc = postcopy_standalone_set_capabilities(fx.host, blocktime, preempt);
                expect(rc == 0, || format!("set_capabilities rc {rc}"))?;
                self.m.caps = (blocktime, preempt);
            }
            Op::PreemptNewChannel(mis) => {
                postcopy_preempt_new_channel(
                    mis_ptr(mis),
                    &FILE_STORAGE as *const u64 as *mut QEMUFile,
                );
                self.ctx_after_incoming_for(mis);
            }
            Op::ChannelsSeen(mis) => {
                let n = postcopy_preempt_channels_seen(mis_ptr(mis));
                let ok = if mis < 2 && self.m.ctx[mis] {
                    n >= 0
                } else {
                    n == -libc::ENOENT as i64
                };
                expect(ok, || format!("channels_seen({mis}) = {n}"))?;
            }
            Op::PreemptSetup(ms) => postcopy_preempt_setup(ms_ptr(ms)),
            Op::PreemptEstablish(ms) => {
                let rc = postcopy_preempt_establish_channel(ms_ptr(ms));
                let ok = if ms == 1 || !self.m.host_installed {
                    rc == -1
                } else if !self.m.caps.1 {
                    rc == 0
                } else {
                    rc == 0 || rc == -1
                };
                expect(ok, || format!("establish_channel rc {rc}"))?;
            }
            Op::ChannelResult(ms, r) => postcopy_preempt_channel_result(ms_ptr(ms), r),
            Op::DiscardSendInit(ms, null_name) => {
                let name = if null_name {
                    null()
                } else {
                    c"fuzz.b0".as_ptr()
                };
                postcopy_discard_send_init(ms_ptr(ms), name);
                if ms == 0 && !null_name && self.m.host_installed {
                    self.m.discard.0 = Some(0);
                }
            }
            Op::DiscardSendRange(ms, start, len) => {
                postcopy_discard_send_range(ms_ptr(ms), start as _, len as _);
                let valid = len != 0
                    && start.checked_mul(PAGE).is_some()
                    && len
                        .checked_mul(PAGE)
                        .and_then(|l| l.checked_add(start * PAGE))
                        .is_some();
                let d = &mut self.m.discard;
                if ms == 0 && self.m.host_installed && valid {
                    if let Some(pending) = d.0.as_mut() {
                        *pending += 1;
                        d.1 += 1;
                        if *pending == 12 {
                            *pending = 0;
                            d.2 += 1;
                        }
                    }
                }
            }
            Op::DiscardSendFinish(ms) => {
                postcopy_discard_send_finish(ms_ptr(ms));
                if ms == 0 && self.m.host_installed {
                    if let Some(pending) = self.m.discard.0.take() {
                        if pending > 0 {
                            self.m.discard.2 += 1;
                        }
                    }
                }
            }
            Op::HostUnregister => {
                let rc = postcopy_host_unregister();
                let want = if self.m.set_up.is_some() {
                    -libc::EBUSY
                } else {
                    0
                };
                expect(rc == want, || {
                    format!("host_unregister rc {rc}, want {want}")
                })?;
                if rc == 0 {
                    self.m.host_installed = false;
                }
            }
            Op::HostReinstall => {
                let rc = postcopy_standalone_host_install(fx.host);
                let want = if self.m.set_up.is_some() {
                    -libc::EBUSY
                } else {
                    0
                };
                expect(rc == want, || format!("host_install rc {rc}, want {want}"))?;
                if rc == 0 {
                    self.m.host_installed = true;
                }
            }
            Op::SupportedByHost(mis) => {
                let mut err: *mut CError = null_mut();
                let ok = postcopy_ram_supported_by_host(mis_ptr(mis), &mut err);
                let want = mis < 2 && self.m.host_installed;
                expect(ok == want, || format!("supported_by_host({mis}) = {ok}"))?;
                if !err.is_null() {
                    postcopy_error_free(err);
                }
            }
            Op::InfraInit => {
                postcopy_infrastructure_init();
                self.m.notifiers.clear();
                self.m.shared.clear();
                self.m.state = 0;
            }
            Op::ThreadCreate => {
                let mut t = QemuThread { thread: 0 };
                let before = THREAD_RAN.load(Ordering::Relaxed);
                postcopy_thread_create(
                    mis_ptr(0),
                    &mut t,
                    c"fuzz/thread".as_ptr(),
                    Some(thread_body),
                    0, // QEMU_THREAD_JOINABLE
                );
                // SAFETY: t.thread is the joinable thread just created.
                let rc = unsafe { libc::pthread_join(t.thread, null_mut()) };
                expect(
                    rc == 0 && THREAD_RAN.load(Ordering::Relaxed) == before + 1,
                    || "thread_create".into(),
                )?;
            }
            Op::AutoServe(on) => {
                self.m.auto_serve = on;
                AUTO_SERVE.store(on || self.m.preempt_active, Ordering::Release);
            }
        }
        self.executed += 1;
        self.check_always(op)
    }

    /// Checked after every step.
    fn check_always(&self, op: &Op) -> Result<(), TestCaseError> {
        let m = &self.m;
        if let Some(e) = INTERNAL_ERRORS.lock().unwrap().first() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        let bad = CB_BAD.swap(0, Ordering::Relaxed);
        expect(bad == 0, || {
            format!("after {op:?}: the request callback's placement failed: {bad}")
        })?;
        let (fds, open) = library_kind_fds();
        let want = self.fds + if m.set_up.is_some() { 2 } else { 0 };
        expect(fds == want, || {
            format!("after {op:?}: {fds} userfaultfds/eventfds open, want {want}: {open}")
        })?;
        let n = postcopy_shared_ufd_count();
        expect(n as usize == m.shared.len(), || {
            format!("after {op:?}: {n} shared ufds, model {:?}", m.shared)
        })?;
        let s = postcopy_state_get();
        expect(s.0 == m.state, || {
            format!("after {op:?}: state {}, model {}", s.0, m.state)
        })?;
        for mis in 0..2 {
            if m.ctx[mis] {
                let (rc, st) = stats(mis);
                expect(
                    rc == 0 && st.set_up == (m.set_up == Some(mis)) as u32,
                    || format!("after {op:?}: mis {mis} stats rc {rc} set_up {}", st.set_up),
                )?;
            }
        }
        let (r, c) = discard_counts(0);
        let (b, d) = (m.discard_base, m.discard);
        expect((r, c) == (b.0 + d.1, b.1 + d.2), || {
            format!(
                "after {op:?}: discard counts ({r}, {c}), model ({}, {})",
                b.0 + d.1,
                b.1 + d.2
            )
        })?;
        Ok(())
    }

    /// End of a sequence: clean every context up, join every toucher, check the counters.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        let last = self.m.last_setup;
        for mis in 0..2 {
            let rc = postcopy_ram_incoming_cleanup(mis_ptr(mis));
            expect(rc == 0, || format!("final cleanup of {mis}: {rc}"))?;
        }
        self.m.set_up = None;
        for t in self.touchers.drain(..) {
            t.join()
                .map_err(|_| TestCaseError::fail("a toucher panicked"))?;
        }
        QUEUE.lock().unwrap().clear();
        let calls = CB_CALLS.load(Ordering::Relaxed);
        let cb_placed = CB_PLACED.load(Ordering::Relaxed);
        for mis in 0..2 {
            let Some(e) = self.m.epoch[mis].clone() else {
                continue;
            };
            let (rc, st) = stats(mis);
            expect(rc == 0, || format!("stats of {mis} after cleanup: {rc}"))?;
            let ctx = format!(
                "mis {mis} epoch {:?}",
                (e.placed, e.zero_placed, e.shared_requests)
            );
            expect(
                st.set_up == 0 && st.outstanding_requests == 0 && st.paused == 0,
                || {
                    format!(
                        "{ctx}: after cleanup set_up {} outstanding {} paused {}",
                        st.set_up, st.outstanding_requests, st.paused
                    )
                },
            )?;
            expect(st.faults_outside_ram == 0 && st.request_errors == 0, || {
                format!("{ctx}: {st:?}")
            })?;
            expect(
                st.shared_faults == 0 && st.shared_handler_errors == 0,
                || format!("{ctx}: {st:?}"),
            )?;
            let by_notifier = if Some(mis) == last {
                NOTIFIER_SHARED.load(Ordering::Relaxed)
            } else {
                0
            };
            let shared_ok = if Some(mis) == last {
                st.shared_requests == e.shared_requests + by_notifier
            } else {
                st.shared_requests >= e.shared_requests
            };
            expect(shared_ok, || {
                format!("{ctx}: shared_requests (+{by_notifier} by a notifier) {st:?}")
            })?;
            expect(
                st.placed_already_present <= st.pages_placed + st.zero_pages_placed,
                || format!("{ctx}: {st:?}"),
            )?;
            if Some(mis) == last {
                // The callback's figures belong to the last setup.
                expect(st.requests_sent == calls, || {
                    format!(
                        "{ctx}: requests_sent {} != callbacks {calls}",
                        st.requests_sent
                    )
                })?;
                let placed_ok = if e.placed_inexact {
                    st.pages_placed >= e.placed + cb_placed
                } else {
                    st.pages_placed == e.placed + cb_placed
                };
                expect(placed_ok, || {
                    format!(
                        "{ctx}: pages_placed {} != {} + {cb_placed} by the callback",
                        st.pages_placed, e.placed
                    )
                })?;
            } else {
                expect(st.pages_placed >= e.placed, || {
                    format!("{ctx}: pages_placed {st:?}")
                })?;
            }
            expect(st.zero_pages_placed == e.zero_placed, || {
                format!("{ctx}: zero_pages_placed {st:?}")
            })?;
            if !e.return_path_went_down {
                // Every fault (and shared request) ended as exactly one of these.
                let lhs = st.faults + st.shared_requests;
                let rhs = st.faults_already_received
                    + st.duplicate_faults
                    + st.requests_sent
                    + st.request_errors;
                expect(
                    lhs == rhs && st.resent_after_resume == 0 && st.pauses == 0,
                    || {
                        format!("{ctx}: faults + shared_requests {lhs} != received + duplicate + sent {rhs}: {st:?}")
                    },
                )?;
            }
        }
        Ok(())
    }
}

/// What the watchdog watches: when the current step began, and what it is.
static PROGRESS: Mutex<Option<(Instant, String)>> = Mutex::new(None);

fn start_watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        std::thread::Builder::new()
            .name("fuzz-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_millis(500));
                if let Some((t, what)) = PROGRESS.lock().unwrap().as_ref() {
                    if t.elapsed() > HANG {
                        eprintln!(
                            "api_fuzz: HANG: {what} has not returned after {HANG:?}{}",
                            recent_logs()
                        );
                        // Every thread's stack, when gdb is at hand, to show where it hangs.
                        if let Ok(out) = std::process::Command::new("gdb")
                            .args(["-q", "-batch", "-p", &std::process::id().to_string()])
                            .args(["-ex", "thread apply all bt 30"])
                            .output()
                        {
                            eprintln!("{}", String::from_utf8_lossy(&out.stdout));
                        }
                        std::process::abort();
                    }
                }
            })
            .expect("watchdog thread");
    });
}

fn run_sequence(ops: &[Op], executed: &AtomicU64) -> Result<(), TestCaseError> {
    postcopy_infrastructure_init();
    let _ = shared_pool();
    INTERNAL_ERRORS.lock().unwrap().clear();
    QUEUE.lock().unwrap().clear();
    AUTO_SERVE.store(false, Ordering::Release);
    let threads = count_dir("/proc/self/task");
    let fds_before = library_kind_fds().0;
    let fx = Fixture::new();
    let mut ctx = [false; 2];
    for (mis, c) in ctx.iter_mut().enumerate() {
        *c = stats(mis).0 == 0;
    }
    // A batch an earlier sequence left open is closed first (its totals are the baseline).
    postcopy_discard_send_finish(ms_ptr(0));
    let base = discard_counts(0);
    let mut r = Runner {
        fx: &fx,
        m: Model {
            host_installed: true,
            set_up: None,
            ctx,
            fresh: [false; 2],
            last_setup: None,
            bt: [None, None],
            epoch: [None, None],
            caps: (false, false),
            preempt_active: false,
            return_path: true,
            received: [
                vec![false; BLOCK_PAGES[0] as usize],
                vec![false; BLOCK_PAGES[1] as usize],
            ],
            present: [
                vec![false; BLOCK_PAGES[0] as usize],
                vec![false; BLOCK_PAGES[1] as usize],
            ],
            notifiers: BTreeSet::new(),
            shared: BTreeSet::new(),
            state: 0,
            discard: (None, 0, 0),
            discard_base: base,
            auto_serve: false,
        },
        touchers: Vec::new(),
        fds: library_kind_fds().0,
        executed: 0,
    };
    let mut result = Ok(());
    for (i, op) in ops.iter().enumerate() {
        *PROGRESS.lock().unwrap() = Some((
            Instant::now(),
            format!("step {i}: {op:?} of {:?}", &ops[..=i]),
        ));
        if let Err(e) = r.step(op) {
            result = Err(TestCaseError::fail(format!(
                "step {i} {op:?}: {e}{}",
                recent_logs()
            )));
            break;
        }
    }
    *PROGRESS.lock().unwrap() = Some((Instant::now(), format!("final cleanup of {ops:?}")));
    let fin = r.finish();
    executed.fetch_add(r.executed, Ordering::Relaxed);
    // Leave no registration behind for the next sequence.
    postcopy_infrastructure_init();
    let _ = postcopy_standalone_set_return_path(fx.host, null_mut(), true);
    drop(r);
    drop(fx);
    *PROGRESS.lock().unwrap() = None;
    result?;
    fin?;
    // A joined thread can still be listed for a moment while the kernel reaps it. Fewer
    // threads than before is no leak: a thread from outside the sequence (the previous
    // test's) was still exiting when the baseline was counted.
    let mut t = count_dir("/proc/self/task");
    for _ in 0..2000 {
        if t <= threads {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
        t = count_dir("/proc/self/task");
    }
    let (fds, open) = library_kind_fds();
    expect(fds == fds_before, || {
        format!("{fds} userfaultfds/eventfds after the sequence, {fds_before} before: {open}")
    })?;
    expect(t <= threads, || {
        format!("{t} threads after the sequence, {threads} before")
    })?;
    Ok(())
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The two tests share the library's global tables: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// What the fuzzer found, replayed as fixed sequences (the hangs it found abort the process
/// before proptest can save a seed, and seeds change meaning when the strategy changes).
#[test]
fn sequences_the_fuzzer_found() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    start_watchdog();
    let a = |page| Addr::Page(page);
    let cases: Vec<(&str, Vec<Op>)> = vec![
        (
            // CI failure: the fuzzer passed 1 (QEMU_THREAD_DETACHED) and then joined the thread.
            "postcopy_thread_create with QEMU_THREAD_JOINABLE, then joined",
            vec![
                Op::ThreadCreate,
                Op::Setup(0),
                Op::ThreadCreate,
                Op::Cleanup(0),
            ],
        ),
        (
            // Deadlocked: INBOUND_END ran under the lifecycle lock, and a notifier's
            // postcopy_wake_shared took it again (Incoming::blocks).
            "a notifier calling back into the library at cleanup's INBOUND_END",
            vec![Op::Setup(0), Op::AddNotifier(2), Op::Cleanup(0)],
        ),
        (
            "the same after init, without setup",
            vec![
                Op::Init(0),
                Op::AddNotifier(2),
                Op::Cleanup(0),
                Op::Cleanup(0),
            ],
        ),
        (
            // Placement during setup failed with -ENODEV (and a preempt cleanup then waited
            // for ever): the fault thread ran before the context was published as set up.
            "a page request answered at once while setup is still returning",
            vec![
                Op::Setup(1),
                Op::Touch { blk: 0, page: 8 },
                Op::Touch { blk: 1, page: 3 },
                Op::Cleanup(1),
                Op::SetCaps {
                    blocktime: false,
                    preempt: true,
                },
                Op::AutoServe(true),
                Op::Setup(0),
                Op::Touch { blk: 0, page: 9 },
            ],
        ),
        (
            // Cleared received bits of pages the refused discard left in place.
            "a misaligned discard and mark_received",
            vec![
                Op::Setup(0),
                Op::Place {
                    mis: 0,
                    blk: Blk::B(0),
                    addr: a(3),
                    from: From::Valid,
                },
                Op::DiscardRange {
                    blk: Blk::B(0),
                    start: Off::Unaligned(3),
                    len: Off::Page(1),
                },
                Op::PageReceived(Blk::B(0), Off::Page(3)),
                Op::MarkReceived {
                    blk: Blk::B(0),
                    start: Off::Unaligned(30),
                    len: Off::Page(2),
                },
                Op::MarkReceived {
                    blk: Blk::B(1),
                    start: Off::Huge,
                    len: Off::Page(4),
                },
            ],
        ),
        (
            "a run of u64::MAX pages and a run past the block's end",
            vec![
                Op::Setup(0),
                Op::PlacePages {
                    mis: 0,
                    blk: Blk::B(0),
                    addr: a(2),
                    npages: u64::MAX,
                    from: From::Valid,
                },
                Op::PlacePages {
                    mis: 0,
                    blk: Blk::B(1),
                    addr: a(7),
                    npages: 2,
                    from: From::Valid,
                },
                Op::PlacePages {
                    mis: 0,
                    blk: Blk::B(1),
                    addr: a(5),
                    npages: 3,
                    from: From::Unreadable,
                },
            ],
        ),
    ];
    let executed = AtomicU64::new(0);
    for (what, ops) in &cases {
        if let Err(e) = run_sequence(ops, &executed) {
            panic!("{what}: {e}");
        }
    }
}

#[test]
fn random_api_sequences_keep_the_documented_contract() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    start_watchdog();
    let cases = env_num("POSTCOPY_FUZZ_CASES", DEFAULT_CASES as u64) as u32;
    let max_ops = env_num("POSTCOPY_FUZZ_OPS", DEFAULT_OPS as u64) as usize;
    let config = || {
        let mut config = Config::with_cases(cases);
        config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(
            "c-tests/proptest-regressions/api_fuzz.txt",
        )));
        config.max_shrink_iters = 2000;
        config
    };
    let executed = AtomicU64::new(0);
    let sequences = AtomicU64::new(0);
    let started = Instant::now();
    let budget = std::env::var("POSTCOPY_FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs);
    let strategy = proptest::collection::vec(op_s(), 1..=max_ops);
    // `cargo test` replays one fixed seed, so a CI result is reproducible; a long or timed run
    // (or POSTCOPY_FUZZ_SEED=random) explores new seeds, each printed so a failure replays.
    let explore = std::env::var_os("POSTCOPY_FUZZ_CASES").is_some() || budget.is_some();
    let mut seed = match std::env::var("POSTCOPY_FUZZ_SEED").ok().as_deref() {
        Some("random") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .expect("POSTCOPY_FUZZ_SEED: a number or `random`"),
        ),
        None if explore => None,
        None => Some(DEFAULT_SEED),
    };
    // A timed run goes in rounds, each a new runner (a new seed), until the time is up.
    let result = loop {
        let round_seed = seed.take().unwrap_or_else(random_seed);
        println!("api_fuzz: seed {round_seed} (POSTCOPY_FUZZ_SEED={round_seed} replays it)");
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&round_seed.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let r = TestRunner::new_with_rng(config(), rng).run(&strategy, |ops| {
            sequences.fetch_add(1, Ordering::Relaxed);
            run_sequence(&ops, &executed)
        });
        if r.is_err() || budget.is_none_or(|b| started.elapsed() >= b) {
            break r;
        }
    };
    println!(
        "api_fuzz: {} sequences (rounds of {cases} cases), {} calls executed in {:.1?}; {} library messages",
        sequences.load(Ordering::Relaxed),
        executed.load(Ordering::Relaxed),
        started.elapsed(),
        LOGS.load(Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
