/* The bad-input matrix: every exported entrypoint crossed with NULL pointers, unknown enum
 * values, calls in the wrong order (no host, before init, before setup, after cleanup),
 * repeated calls and out-of-range addresses or offsets. Each CELL states the outcome the
 * entrypoint's doc comment promises: its return value, and whether it logs (NOLOG, LOGGED,
 * or a substring of the message). Every cell runs under alarm() (a hang names its cell)
 * and with the /proc/self/fd count checked before and after (a cell that opens or closes
 * fds says by how much). The names of the entrypoints covered are printed on a `covered:`
 * line, which the Rust driver compares with the library's exported symbols. */
#include "postcopy-ram.h"
#include "check.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Library messages go to a capture file during the run: report failures on the real stderr. */
static int real_stderr = -1;
#undef CHECK
#define CHECK(cond, ...)                                                                                  \
    do {                                                                                                  \
        if (cond) {                                                                                       \
            check_passed++;                                                                               \
        } else {                                                                                          \
            char m_[512];                                                                                 \
            snprintf(m_, sizeof(m_), __VA_ARGS__);                                                        \
            check_failed++;                                                                               \
            dprintf(real_stderr, "FAIL %s:%d: %s: %s\n", __FILE__, __LINE__, #cond, m_);                  \
        }                                                                                                 \
    } while (0)

#define PAGE 4096UL
#define BLOCK_PAGES 16
#define BLOCK_LEN (BLOCK_PAGES * PAGE)

/* ---- log capture: the standalone host's log callback, and stderr (no host) ---- */
static FILE *err_capture;
static long err_seen; /* bytes of err_capture already looked at */
static char last_msg[2048];
static atomic_int cb_logs;
/* The fault thread logs too (asynchronously): the capture is locked. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static void capture_log(void *opaque, int level, const char *msg)
{
    (void)opaque;
    (void)level;
    pthread_mutex_lock(&log_lock);
    snprintf(last_msg, sizeof(last_msg), "%s", msg);
    atomic_fetch_add(&cb_logs, 1);
    pthread_mutex_unlock(&log_lock);
}

/* Waits (bounded) for a message the fault thread logs on its own time. */
static void wait_log(const char *needle)
{
    for (int i = 0; i < 10000; i++) {
        pthread_mutex_lock(&log_lock);
        int seen = strstr(last_msg, needle) != NULL;
        pthread_mutex_unlock(&log_lock);
        if (seen)
            return;
        usleep(500);
    }
}

/* Messages the library wrote to stderr since the last call (no host: default_log). */
static int stderr_logs(void)
{
    int n = 0;
    fflush(stderr);
    long end = lseek(fileno(err_capture), 0, SEEK_END);
    if (end > err_seen) {
        char buf[4096];
        long len = end - err_seen;
        if (len > (long)sizeof(buf) - 1) {
            err_seen = end - (long)sizeof(buf) + 1;
            len = (long)sizeof(buf) - 1;
        }
        ssize_t got = pread(fileno(err_capture), buf, (size_t)len, err_seen);
        if (got > 0) {
            buf[got] = 0;
            for (char *p = buf; (p = strstr(p, "postcopy-ram: ")); p++) {
                n++;
                char *nl = strchr(p, '\n');
                size_t l = nl ? (size_t)(nl - p) : strlen(p);
                if (l >= sizeof(last_msg))
                    l = sizeof(last_msg) - 1;
                memcpy(last_msg, p, l);
                last_msg[l] = 0;
            }
        }
        err_seen = end;
    }
    return n;
}

static int count_fds(void)
{
    int n = 0;
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    while (readdir(d))
        n++;
    closedir(d);
    return n - 3; /* ".", "..", and the directory's own fd */
}

/* ---- the cell runner ---- */
#define NOLOG ((const char *)0)
#define LOGGED ""
#define NONNULL LONG_MIN /* for pointer results */
#define ANYVAL (LONG_MIN + 1)

static const char *cur_fn, *cur_input, *cur_phase;
static int cur_line, cur_fds, cells;
static const char *covered[128];
static int ncovered;

static void on_alarm(int sig)
{
    (void)sig;
    char msg[512];
    int n = snprintf(msg, sizeof(msg), "HANG in cell %s(%s) [%s] line %d\n", cur_fn, cur_input, cur_phase,
                     cur_line);
    if (write(real_stderr, msg, (size_t)n) < 0)
        _exit(3);
    _exit(2);
}

static void cell_begin(const char *fn, const char *input, int line)
{
    int i;
    cur_fn = fn;
    cur_input = input;
    cur_line = line;
    for (i = 0; i < ncovered; i++)
        if (strcmp(covered[i], fn) == 0)
            break;
    if (i == ncovered && ncovered < 128)
        covered[ncovered++] = fn;
    stderr_logs();
    pthread_mutex_lock(&log_lock);
    atomic_store(&cb_logs, 0);
    last_msg[0] = 0;
    pthread_mutex_unlock(&log_lock);
    cur_fds = count_fds();
    alarm(10);
}

static void cell_end(long expect, const char *logexp, long got, int fd_delta)
{
    alarm(0);
    pthread_mutex_lock(&log_lock);
    int logs = atomic_load(&cb_logs) + stderr_logs();
    int fds = count_fds();
    int ok_val = expect == ANYVAL || (expect == NONNULL ? got != 0 : got == expect);
    int ok_log = logexp == NOLOG ? logs == 0 : (logs > 0 && strstr(last_msg, logexp) != NULL);
    pthread_mutex_unlock(&log_lock);
    int ok_fd = fds - cur_fds == fd_delta;
    cells++;
    if (ok_val && ok_log && ok_fd) {
        check_passed++;
        return;
    }
    check_failed++;
    dprintf(real_stderr,
            "FAIL cell line %d [%s] %s(%s): got %ld expected %ld; %d log(s), wanted %s%s%s (last: \"%s\"); "
            "fds %+d, wanted %+d\n",
            cur_line, cur_phase, cur_fn, cur_input, got, expect, logs,
            logexp == NOLOG ? "none" : "\"", logexp == NOLOG ? "" : logexp, logexp == NOLOG ? "" : "\"", last_msg,
            fds - cur_fds, fd_delta);
}

/* One cell: FN is the entrypoint, INPUT what is bad about the call, EXPR the call (as a
 * long), EXPECT its documented result, LOG the documented logging. */
#define CELLFD(FN, INPUT, EXPR, EXPECT, LOG, FD_DELTA)                                                    \
    do {                                                                                                  \
        cell_begin(FN, INPUT, __LINE__);                                                                  \
        long got_ = (long)(EXPR);                                                                         \
        cell_end((long)(EXPECT), LOG, got_, FD_DELTA);                                                    \
    } while (0)
#define CELL(FN, INPUT, EXPR, EXPECT, LOG) CELLFD(FN, INPUT, EXPR, EXPECT, LOG, 0)
/* For void entrypoints. */
#define VCELL(FN, INPUT, STMT, LOG) CELL(FN, INPUT, ((STMT), 0L), 0, LOG)
#define PTR(e) ((long)(intptr_t)(e))

/* ---- fixtures ---- */
static uint8_t *area;   /* guard page, block A, guard page, block B, guard page */
static uint8_t *blk_a, *blk_b, *late;
static PostcopyStandaloneHost *host;
static RAMBlock *rb_a, *rb_b;
static int mis_storage, other_mis_storage, ms_storage, ms2_storage, file_storage;
#define MIS ((MigrationIncomingState *)&mis_storage)
#define OTHER_MIS ((MigrationIncomingState *)&other_mis_storage)
#define MS ((MigrationState *)&ms_storage)
#define MS2 ((MigrationState *)&ms2_storage)
#define FILE_ ((QEMUFile *)&file_storage)
#define BOGUS_RB ((RAMBlock *)&ms2_storage)
static uint64_t src_page[PAGE / 8];
static uint8_t *src2; /* a readable page, then a PROT_NONE one */
static uint8_t *src3; /* three readable pages */
static atomic_int requests;

static int on_request(void *opaque, RAMBlock *rb, const char *idstr, const PostcopyPageRequest *req)
{
    (void)opaque;
    (void)rb;
    (void)idstr;
    (void)req;
    atomic_fetch_add(&requests, 1);
    return 0;
}

static int on_discard(void *opaque, MigrationState *ms, const char *name, uint16_t n, const uint64_t *starts,
                      const uint64_t *lengths)
{
    (void)opaque;
    (void)ms;
    (void)name;
    (void)n;
    (void)starts;
    (void)lengths;
    return 0;
}

static int notified;
static int count_notify(NotifierWithReturn *n, void *data, Error **errp)
{
    (void)n;
    (void)data;
    (void)errp;
    notified++;
    return 0;
}
static NotifierWithReturn notifier = {count_notify, {0, 0}};
static NotifierWithReturn null_notifier = {NULL, {0, 0}};

static atomic_int thread_ran;
static void *thread_fn(void *arg)
{
    (void)arg;
    atomic_fetch_add(&thread_ran, 1);
    return NULL;
}

static int t_foreach(void *o, PostcopyRamBlockFn fn, void *ctx) { (void)o; (void)fn; (void)ctx; return 0; }
static int t_info(void *o, RAMBlock *rb, PostcopyRamBlockInfo *i) { (void)o; (void)rb; (void)i; return -ENOENT; }
static bool t_test(void *o, RAMBlock *rb, uint64_t off) { (void)o; (void)rb; (void)off; return false; }
static void t_set(void *o, RAMBlock *rb, uint64_t off, uint64_t len) { (void)o; (void)rb; (void)off; (void)len; }

static PostcopyHostOps valid_ops(void)
{
    PostcopyHostOps ops;
    memset(&ops, 0, sizeof(ops));
    ops.size = sizeof(ops);
    ops.version = POSTCOPY_HOST_OPS_VERSION;
    ops.ram_block_foreach = t_foreach;
    ops.ram_block_info = t_info;
    ops.recv_bitmap_test = t_test;
    ops.recv_bitmap_set_range = t_set;
    return ops;
}

static PostcopyIncomingStats stats_of(MigrationIncomingState *m)
{
    PostcopyIncomingStats st;
    memset(&st, 0xff, sizeof(st));
    postcopy_incoming_get_stats(m, &st);
    return st;
}

static Error *err;
static long tmp_rc;
static long supported_errp(MigrationIncomingState *m)
{
    err = NULL;
    bool ok = postcopy_ram_supported_by_host(m, &err);
    return ok ? 1 : (err ? 2 : 0); /* 2: false with *errp set; 0: false, errp untouched */
}
static const char *err_text(void)
{
    const char *m = err ? postcopy_error_message(err) : "";
    return m ? m : "";
}

/* ---- phase 0: no host registered, nothing initialised ---- */
static void phase_no_host(void)
{
    cur_phase = "no host";
    PostcopyBlocktimeInfo bi;
    PostcopyIncomingStats st;
    uint64_t r = 0, c = 0;
    QemuThread qt;
    PostCopyFD pcfd = {-1, NULL, NULL, NULL, "matrix"};

    CELL("postcopy_host_unregister", "nothing registered", postcopy_host_unregister(), 0, NOLOG);
    CELL("postcopy_host_unregister", "repeated", postcopy_host_unregister(), 0, NOLOG);
    CELL("postcopy_ram_supported_by_host", "no host: false, message logged, errp untouched",
         supported_errp(MIS), 0, "no host ops registered");
    CELL("postcopy_ram_supported_by_host", "NULL mis, NULL errp", postcopy_ram_supported_by_host(NULL, NULL), 0,
         "mis must not be NULL");
    CELL("postcopy_ram_incoming_init", "no host", postcopy_ram_incoming_init(MIS), -ENODEV, "no host ops");
    CELL("postcopy_ram_prepare_discard", "no host", postcopy_ram_prepare_discard(MIS), -ENODEV, "no host ops");
    CELL("postcopy_ram_incoming_setup", "no host", postcopy_ram_incoming_setup(MIS), -ENODEV, "no host ops");
    CELL("postcopy_ram_incoming_cleanup", "no host, no context", postcopy_ram_incoming_cleanup(MIS), 0, NOLOG);
    CELL("postcopy_place_page", "no host, no context", postcopy_place_page(MIS, blk_a, src_page, BOGUS_RB), -ENODEV,
         "not set up");
    CELL("postcopy_place_page_zero", "no host, no context", postcopy_place_page_zero(MIS, blk_a, BOGUS_RB), -ENODEV,
         "not set up");
    VCELL("postcopy_fault_thread_notify", "no context", postcopy_fault_thread_notify(MIS), "not set up");
    CELL("postcopy_incoming_get_stats", "no context", postcopy_incoming_get_stats(MIS, &st), -ENOENT, NOLOG);
    CELL("postcopy_blocktime_query", "no context", postcopy_blocktime_query(MIS, &bi, NULL, NULL, NULL, NULL, 0),
         -ENOENT, NOLOG);
    CELL("postcopy_incoming_temp_page", "no context", PTR(postcopy_incoming_temp_page(MIS, 0)), 0, "not set up");
    CELL("postcopy_incoming_zero_page", "no context", PTR(postcopy_incoming_zero_page(MIS)), 0, "not set up");
    VCELL("postcopy_discard_send_init", "no host", postcopy_discard_send_init(MS, "pc.ram"), "no host ops");
    VCELL("postcopy_discard_send_range", "no host", postcopy_discard_send_range(MS, 0, 1), "no host ops");
    VCELL("postcopy_discard_send_finish", "no host", postcopy_discard_send_finish(MS), "no host ops");
    CELL("postcopy_discard_get_counts", "never started", postcopy_discard_get_counts(MS, &r, &c), -ENOENT, NOLOG);
    VCELL("postcopy_preempt_setup", "no host", postcopy_preempt_setup(MS), "no host ops");
    CELL("postcopy_preempt_establish_channel", "no host", postcopy_preempt_establish_channel(MS), -1,
         "no host ops");
    VCELL("postcopy_preempt_new_channel", "no host", postcopy_preempt_new_channel(MIS, FILE_), "no host ops");
    CELL("postcopy_preempt_channels_seen", "no context", postcopy_preempt_channels_seen(MIS), -ENOENT, NOLOG);
    CELL("postcopy_request_shared_page", "no context", postcopy_request_shared_page(&pcfd, BOGUS_RB, 0, 0), -ENODEV,
         "not set up");
    CELL("postcopy_wake_shared", "no host", postcopy_wake_shared(&pcfd, 0, BOGUS_RB), -ENODEV, "no host ops");
    VCELL("mark_postcopy_blocktime_begin", "no context", mark_postcopy_blocktime_begin((uintptr_t)blk_a, 7, BOGUS_RB),
          "not set up");
    CELL("postcopy_is_paused", "no host: the seed's 6", postcopy_is_paused(MIGRATION_STATUS_POSTCOPY_PAUSED), 1,
         NOLOG);
    CELL("postcopy_is_paused", "no host: the seed's 7",
         postcopy_is_paused(MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP), 1, NOLOG);
    CELL("postcopy_is_paused", "unknown value", postcopy_is_paused((MigrationStatus)UINT_MAX), 0, NOLOG);
    /* postcopy_thread_create needs no host: a pthread. */
    atomic_store(&thread_ran, 0);
    CELL("postcopy_thread_create", "no host, NULL name, joinable",
         (postcopy_thread_create(MIS, &qt, NULL, thread_fn, 0), pthread_join(qt.thread, NULL)), 0, NOLOG);
    CHECK_EQ(atomic_load(&thread_ran), 1);
}

/* ---- phase 1: host installed, no incoming context yet ---- */
static void phase_before_init(void)
{
    cur_phase = "before init";
    PostcopyHostOps ops = valid_ops(), bad;
    PostcopyIncomingStats st;
    PostcopyBlocktimeInfo bi;
    QemuThread qt;
    memset(&qt, 0, sizeof(qt));
    PostCopyFD pcfd = {-1, NULL, NULL, NULL, "matrix"};
    char longname[300];
    memset(longname, 'x', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = 0;

    /* Host-ops registration. */
    CELL("postcopy_host_register", "NULL", postcopy_host_register(NULL), -EINVAL, "ops must not be NULL");
    bad = ops;
    bad.version = 0;
    CELL("postcopy_host_register", "version 0", postcopy_host_register(&bad), -EINVAL, "version 0");
    bad.version = POSTCOPY_HOST_OPS_VERSION + 1;
    CELL("postcopy_host_register", "future version", postcopy_host_register(&bad), -EINVAL, "version");
    bad = ops;
    bad.size = 8;
    CELL("postcopy_host_register", "size too small", postcopy_host_register(&bad), -EINVAL, "size 8");
    bad = ops;
    bad.ram_block_foreach = NULL;
    CELL("postcopy_host_register", "required member NULL", postcopy_host_register(&bad), -EINVAL,
         "ram_block_foreach is required");
    bad = ops;
    bad.recv_bitmap_set_range = NULL;
    CELL("postcopy_host_register", "required member NULL", postcopy_host_register(&bad), -EINVAL,
         "recv_bitmap_set_range is required");
    CELL("postcopy_host_register", "valid", postcopy_host_register(&ops), 0, NOLOG);
    CELL("postcopy_host_register", "repeated: replaces", postcopy_host_register(&ops), 0, NOLOG);
    CELL("postcopy_host_unregister", "registered", postcopy_host_unregister(), 0, NOLOG);

    /* The standalone host. */
    PostcopyStandaloneHost *h2 = NULL;
    CELL("postcopy_standalone_host_new", "target page size 0", PTR(h2 = postcopy_standalone_host_new(0)), NONNULL,
         NOLOG);
    VCELL("postcopy_standalone_host_free", "never installed", postcopy_standalone_host_free(h2), NOLOG);
    VCELL("postcopy_standalone_host_free", "NULL", postcopy_standalone_host_free(NULL), NOLOG);
    CELL("postcopy_standalone_host_install", "NULL", postcopy_standalone_host_install(NULL), -EINVAL,
         "host must not be NULL");
    CELL("postcopy_standalone_set_log_callback", "NULL host", postcopy_standalone_set_log_callback(NULL, capture_log, NULL),
         -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_set_log_callback", "valid", postcopy_standalone_set_log_callback(host, capture_log, NULL),
         0, NOLOG);
    CELL("postcopy_standalone_host_install", "valid", postcopy_standalone_host_install(host), 0, NOLOG);
    CELL("postcopy_standalone_host_install", "repeated", postcopy_standalone_host_install(host), 0, NOLOG);

    CELL("postcopy_standalone_add_ram_block", "NULL host",
         PTR(postcopy_standalone_add_ram_block(NULL, "x", blk_a, BLOCK_LEN, PAGE, -1, 0)), 0, "host must not be NULL");
    CELL("postcopy_standalone_add_ram_block", "NULL name",
         PTR(postcopy_standalone_add_ram_block(host, NULL, blk_a, BLOCK_LEN, PAGE, -1, 0)), 0,
         "idstr must not be NULL");
    CELL("postcopy_standalone_add_ram_block", "empty name",
         PTR(postcopy_standalone_add_ram_block(host, "", blk_a, BLOCK_LEN, PAGE, -1, 0)), 0, "1 to 255 bytes");
    CELL("postcopy_standalone_add_ram_block", "name of 299 bytes",
         PTR(postcopy_standalone_add_ram_block(host, longname, blk_a, BLOCK_LEN, PAGE, -1, 0)), 0, "1 to 255 bytes");
    CELL("postcopy_standalone_add_ram_block", "NULL addr",
         PTR(postcopy_standalone_add_ram_block(host, "x", NULL, BLOCK_LEN, PAGE, -1, 0)), 0, "whole number");
    CELL("postcopy_standalone_add_ram_block", "misaligned addr",
         PTR(postcopy_standalone_add_ram_block(host, "x", blk_a + 8, BLOCK_LEN, PAGE, -1, 0)), 0, "whole number");
    CELL("postcopy_standalone_add_ram_block", "length 0",
         PTR(postcopy_standalone_add_ram_block(host, "x", blk_a, 0, PAGE, -1, 0)), 0, "whole number");
    CELL("postcopy_standalone_add_ram_block", "partial page",
         PTR(postcopy_standalone_add_ram_block(host, "x", blk_a, PAGE + 1, PAGE, -1, 0)), 0, "whole number");
    CELL("postcopy_standalone_add_ram_block", "page size 3",
         PTR(postcopy_standalone_add_ram_block(host, "x", blk_a, BLOCK_LEN, 3, -1, 0)), 0, "not a power of two");
    CELL("postcopy_standalone_add_ram_block", "page size 0",
         PTR(postcopy_standalone_add_ram_block(host, "x", blk_a, BLOCK_LEN, 0, -1, 0)), 0, "not a power of two");
    CELL("postcopy_standalone_add_ram_block", "range wraps the address space",
         PTR(postcopy_standalone_add_ram_block(host, "x", (void *)(UINTPTR_MAX & ~(PAGE - 1)), 2 * PAGE, PAGE, -1, 0)),
         0, "whole number");
    CELL("postcopy_standalone_add_ram_block", "valid A",
         PTR(rb_a = postcopy_standalone_add_ram_block(host, "blk.a", blk_a, BLOCK_LEN, PAGE, -1, 0)), NONNULL, NOLOG);
    CELL("postcopy_standalone_add_ram_block", "repeated: same name",
         PTR(postcopy_standalone_add_ram_block(host, "blk.a", blk_b, BLOCK_LEN, PAGE, -1, 0)), 0, "clashes");
    CELL("postcopy_standalone_add_ram_block", "overlapping range",
         PTR(postcopy_standalone_add_ram_block(host, "blk.x", blk_a + PAGE, PAGE, PAGE, -1, 0)), 0, "clashes");
    CELL("postcopy_standalone_add_ram_block", "valid B",
         PTR(rb_b = postcopy_standalone_add_ram_block(host, "blk.b", blk_b, BLOCK_LEN, PAGE, -1, 0)), NONNULL, NOLOG);
    CELL("postcopy_standalone_block_by_name", "valid", PTR(postcopy_standalone_block_by_name(host, "blk.b")),
         PTR(rb_b), NOLOG);
    CELL("postcopy_standalone_block_by_name", "unknown name", PTR(postcopy_standalone_block_by_name(host, "nope")), 0,
         NOLOG);
    CELL("postcopy_standalone_block_by_name", "NULL name", PTR(postcopy_standalone_block_by_name(host, NULL)), 0,
         NOLOG);
    CELL("postcopy_standalone_block_by_name", "NULL host", PTR(postcopy_standalone_block_by_name(NULL, "blk.a")), 0,
         NOLOG);
    CELL("postcopy_standalone_block_at", "index 0", PTR(postcopy_standalone_block_at(host, 0)), PTR(rb_a), NOLOG);
    CELL("postcopy_standalone_block_at", "index past the end", PTR(postcopy_standalone_block_at(host, 2)), 0, NOLOG);
    CELL("postcopy_standalone_block_at", "index UINT32_MAX", PTR(postcopy_standalone_block_at(host, UINT32_MAX)), 0,
         NOLOG);
    CELL("postcopy_standalone_block_at", "NULL host", PTR(postcopy_standalone_block_at(NULL, 0)), 0, NOLOG);

    CELL("postcopy_standalone_set_request_callback", "NULL host",
         postcopy_standalone_set_request_callback(NULL, on_request, NULL), -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_set_request_callback", "NULL cb", postcopy_standalone_set_request_callback(host, NULL, NULL),
         -EINVAL, "cb must not be NULL");
    CELL("postcopy_standalone_set_request_fd", "NULL host", postcopy_standalone_set_request_fd(NULL, 1), -EINVAL,
         "host must not be NULL");
    CELL("postcopy_standalone_set_request_fd", "negative fd", postcopy_standalone_set_request_fd(host, -1), -EINVAL,
         "request fd -1");
    CELL("postcopy_standalone_set_request_callback", "valid", postcopy_standalone_set_request_callback(host, on_request, NULL),
         0, NOLOG);
    CELL("postcopy_standalone_set_discard_callback", "NULL host",
         postcopy_standalone_set_discard_callback(NULL, on_discard, NULL), -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_set_discard_callback", "NULL cb", postcopy_standalone_set_discard_callback(host, NULL, NULL),
         -EINVAL, "cb must not be NULL");
    CELL("postcopy_standalone_set_discard_callback", "valid", postcopy_standalone_set_discard_callback(host, on_discard, NULL),
         0, NOLOG);
    CELL("postcopy_standalone_set_preempt_callbacks", "NULL host",
         postcopy_standalone_set_preempt_callbacks(NULL, NULL, NULL, NULL, NULL), -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_set_preempt_callbacks", "all hooks NULL",
         postcopy_standalone_set_preempt_callbacks(host, NULL, NULL, NULL, NULL), 0, NOLOG);
    CELL("postcopy_standalone_add_vcpu", "NULL host", postcopy_standalone_add_vcpu(NULL, 0, 1), -EINVAL,
         "host must not be NULL");
    CELL("postcopy_standalone_add_vcpu", "index UINT32_MAX (ignored by blocktime)",
         postcopy_standalone_add_vcpu(host, UINT32_MAX, 1), 0, NOLOG);
    CELL("postcopy_standalone_set_capabilities", "NULL host", postcopy_standalone_set_capabilities(NULL, true, true),
         -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_set_return_path", "NULL host", postcopy_standalone_set_return_path(NULL, MIS, true),
         -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_set_return_path", "NULL mis", postcopy_standalone_set_return_path(host, NULL, true), 0,
         NOLOG);
    CELL("postcopy_standalone_page_received", "NULL host", postcopy_standalone_page_received(NULL, rb_a, 0), -EINVAL,
         NOLOG);
    CELL("postcopy_standalone_page_received", "NULL rb", postcopy_standalone_page_received(host, NULL, 0), -EFAULT,
         NOLOG);
    CELL("postcopy_standalone_page_received", "unknown rb", postcopy_standalone_page_received(host, BOGUS_RB, 0),
         -EFAULT, NOLOG);
    CELL("postcopy_standalone_page_received", "offset past the end",
         postcopy_standalone_page_received(host, rb_a, UINT64_MAX), 0, NOLOG);
    CELL("postcopy_standalone_mark_received", "NULL host", postcopy_standalone_mark_received(NULL, rb_a, 0, PAGE),
         -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_mark_received", "unknown rb", postcopy_standalone_mark_received(host, BOGUS_RB, 0, PAGE),
         -EFAULT, "not one the host listed");
    CELL("postcopy_standalone_mark_received", "range past the end",
         postcopy_standalone_mark_received(host, rb_a, BLOCK_LEN, PAGE), -EINVAL, "past the end");
    CELL("postcopy_standalone_mark_received", "range overflows",
         postcopy_standalone_mark_received(host, rb_a, UINT64_MAX - 1, 4), -EINVAL, "past the end");
    CELL("postcopy_standalone_mark_received", "length 0", postcopy_standalone_mark_received(host, rb_a, 0, 0), 0, NOLOG);
    CELL("postcopy_standalone_page_received", "not received", postcopy_standalone_page_received(host, rb_a, 0), 0,
         NOLOG);
    CELL("postcopy_standalone_discard_range", "NULL host", postcopy_standalone_discard_range(NULL, rb_a, 0, PAGE),
         -EINVAL, "host must not be NULL");
    CELL("postcopy_standalone_discard_range", "unknown rb", postcopy_standalone_discard_range(host, BOGUS_RB, 0, PAGE),
         -EFAULT, "not one the host listed");
    CELL("postcopy_standalone_discard_range", "past the end",
         postcopy_standalone_discard_range(host, rb_a, BLOCK_LEN - PAGE, 2 * PAGE), -EINVAL, "past the end");
    CELL("postcopy_standalone_discard_range", "overflowing range",
         postcopy_standalone_discard_range(host, rb_a, UINT64_MAX - PAGE + 1, 2 * PAGE), -EINVAL, "past the end");
    CELL("postcopy_standalone_discard_range", "misaligned start",
         postcopy_standalone_discard_range(host, rb_a, 100, PAGE), -EINVAL, "aligned");

    /* Incoming entrypoints before init: nothing set up. */
    CELL("postcopy_ram_supported_by_host", "NULL mis: false, errp set", supported_errp(NULL), 2, NOLOG);
    CHECK(strstr(err_text(), "mis must not be NULL") != NULL, "errp: %s", err_text());
    postcopy_error_free(err);
    CELL("postcopy_ram_supported_by_host", "valid", supported_errp(MIS), 1, NOLOG);
    CELL("postcopy_ram_incoming_init", "NULL mis", postcopy_ram_incoming_init(NULL), -EINVAL, "mis must not be NULL");
    CELL("postcopy_ram_prepare_discard", "NULL mis", postcopy_ram_prepare_discard(NULL), -EINVAL, "mis must not be NULL");
    CELL("postcopy_ram_incoming_setup", "NULL mis", postcopy_ram_incoming_setup(NULL), -EINVAL, "mis must not be NULL");
    CELL("postcopy_ram_incoming_cleanup", "NULL mis", postcopy_ram_incoming_cleanup(NULL), -EINVAL,
         "mis must not be NULL");
    CELL("postcopy_ram_incoming_cleanup", "before init", postcopy_ram_incoming_cleanup(MIS), 0, NOLOG);
    CELL("postcopy_place_page", "NULL mis", postcopy_place_page(NULL, blk_a, src_page, rb_a), -EINVAL,
         "mis must not be NULL");
    CELL("postcopy_place_page", "NULL rb", postcopy_place_page(MIS, blk_a, src_page, NULL), -EINVAL,
         "rb must not be NULL");
    CELL("postcopy_place_page", "before setup", postcopy_place_page(MIS, blk_a, src_page, rb_a), -ENODEV, "not set up");
    CELL("postcopy_place_page_zero", "NULL mis", postcopy_place_page_zero(NULL, blk_a, rb_a), -EINVAL,
         "mis must not be NULL");
    CELL("postcopy_place_page_zero", "before setup", postcopy_place_page_zero(MIS, blk_a, rb_a), -ENODEV, "not set up");
    CELL("postcopy_place_pages", "NULL mis", postcopy_place_pages(NULL, blk_a, src2, 1, rb_a), -EINVAL,
         "mis must not be NULL");
    CELL("postcopy_place_pages", "NULL rb", postcopy_place_pages(MIS, blk_a, src2, 1, NULL), -EINVAL,
         "rb must not be NULL");
    CELL("postcopy_place_pages", "before setup", postcopy_place_pages(MIS, blk_a, src2, 1, rb_a), -ENODEV,
         "not set up");
    VCELL("postcopy_fault_thread_notify", "NULL mis", postcopy_fault_thread_notify(NULL), "mis must not be NULL");
    VCELL("postcopy_fault_thread_notify", "before setup", postcopy_fault_thread_notify(MIS), "not set up");
    CELL("postcopy_incoming_get_stats", "NULL mis", postcopy_incoming_get_stats(NULL, &st), -EINVAL, NOLOG);
    CELL("postcopy_incoming_get_stats", "NULL out", postcopy_incoming_get_stats(MIS, NULL), -EINVAL, NOLOG);
    CELL("postcopy_blocktime_query", "NULL mis", postcopy_blocktime_query(NULL, &bi, NULL, NULL, NULL, NULL, 0), -EINVAL,
         NOLOG);
    CELL("postcopy_blocktime_query", "NULL info", postcopy_blocktime_query(MIS, NULL, NULL, NULL, NULL, NULL, 0), -EINVAL,
         NOLOG);
    CELL("postcopy_incoming_temp_page", "NULL mis", PTR(postcopy_incoming_temp_page(NULL, 0)), 0, "not set up");
    CELL("postcopy_incoming_zero_page", "NULL mis", PTR(postcopy_incoming_zero_page(NULL)), 0, "not set up");
    VCELL("postcopy_thread_create", "NULL mis", postcopy_thread_create(NULL, &qt, "t", thread_fn, 1),
          "mis must not be NULL");
    VCELL("postcopy_thread_create", "NULL thread", postcopy_thread_create(MIS, NULL, "t", thread_fn, 1),
          "thread must not be NULL");
    VCELL("postcopy_thread_create", "NULL fn", postcopy_thread_create(MIS, &qt, "t", NULL, 1), "fn must not be NULL");
    CHECK(qt.thread == 0, "*thread untouched on error");
    atomic_store(&thread_ran, 0);
    VCELL("postcopy_thread_create", "detached, name longer than 15 bytes",
          postcopy_thread_create(MIS, &qt, "a-thread-name-of-many-bytes", thread_fn, 1), NOLOG);
    for (int i = 0; i < 10000 && atomic_load(&thread_ran) == 0; i++)
        usleep(100);
    CHECK_EQ(atomic_load(&thread_ran), 1);
    CHECK(qt.thread != 0, "*thread written");
    CELL("postcopy_request_shared_page", "NULL pcfd", postcopy_request_shared_page(NULL, rb_a, 0, 0), -EINVAL,
         "pcfd must not be NULL");
    CELL("postcopy_request_shared_page", "NULL rb", postcopy_request_shared_page(&pcfd, NULL, 0, 0), -EINVAL,
         "rb must not be NULL");
    CELL("postcopy_request_shared_page", "before setup", postcopy_request_shared_page(&pcfd, rb_a, 0, 0), -ENODEV,
         "not set up");
    CELL("postcopy_wake_shared", "NULL pcfd", postcopy_wake_shared(NULL, 0, rb_a), -EINVAL, "pcfd must not be NULL");
    CELL("postcopy_wake_shared", "NULL rb", postcopy_wake_shared(&pcfd, 0, NULL), -EINVAL, "rb must not be NULL");
    CELL("postcopy_wake_shared", "unknown rb", postcopy_wake_shared(&pcfd, 0, BOGUS_RB), -EFAULT,
         "not one the host listed");
    CELL("postcopy_wake_shared", "fd -1: the ioctl's errno", postcopy_wake_shared(&pcfd, (uint64_t)blk_a, rb_a),
         -EBADF, "UFFDIO_WAKE");
    VCELL("mark_postcopy_blocktime_begin", "ptid 0: ignored before any check", mark_postcopy_blocktime_begin(0, 0, NULL),
          NOLOG);
    VCELL("mark_postcopy_blocktime_begin", "NULL rb", mark_postcopy_blocktime_begin((uintptr_t)blk_a, 7, NULL),
          "rb must not be NULL");
    VCELL("mark_postcopy_blocktime_begin", "before setup", mark_postcopy_blocktime_begin((uintptr_t)blk_a, 7, rb_a),
          "not set up");
    /* prepare_discard needs no init: it creates the context. */
    postcopy_state_set(POSTCOPY_INCOMING_ADVISE);
    CELL("postcopy_ram_prepare_discard", "before init", postcopy_ram_prepare_discard(MIS), 0, NOLOG);
    CELL("postcopy_state_get", "DISCARD after prepare_discard", postcopy_state_get(), POSTCOPY_INCOMING_DISCARD, NOLOG);
    CELL("postcopy_incoming_get_stats", "context, not set up", (st = stats_of(MIS), (long)st.set_up), 0, NOLOG);
    CELL("postcopy_blocktime_query", "context, blocktime never enabled",
         postcopy_blocktime_query(MIS, &bi, NULL, NULL, NULL, NULL, 0), -ENODATA, NOLOG);
    CELL("postcopy_preempt_channels_seen", "NULL mis", postcopy_preempt_channels_seen(NULL), -ENOENT, NOLOG);
    CELL("postcopy_preempt_channels_seen", "context, none handed over", postcopy_preempt_channels_seen(MIS), 0, NOLOG);
    VCELL("postcopy_preempt_new_channel", "NULL mis", postcopy_preempt_new_channel(NULL, FILE_), "mis must not be NULL");
    VCELL("postcopy_preempt_new_channel", "NULL file", postcopy_preempt_new_channel(MIS, NULL), "file must not be NULL");
    VCELL("postcopy_preempt_new_channel", "before setup: kept for setup", postcopy_preempt_new_channel(OTHER_MIS, FILE_),
          NOLOG);
    CELL("postcopy_preempt_channels_seen", "one handed over", postcopy_preempt_channels_seen(OTHER_MIS), 1, NOLOG);
}

/* ---- the library's tables: state, notifiers, shared registry, discard, preempt source ---- */
static void phase_tables(void)
{
    cur_phase = "tables";
    Error *e = NULL;
    uint64_t r = 0, c = 0;
    int efd_storage;
    PostCopyFD pcfd = {-1, NULL, NULL, NULL, "matrix"};
    PostCopyFD pcfd_ok = {1000, &efd_storage, NULL, NULL, "matrix"};

    VCELL("postcopy_infrastructure_init", "first", postcopy_infrastructure_init(), NOLOG);
    VCELL("postcopy_infrastructure_init", "repeated", postcopy_infrastructure_init(), NOLOG);
    CELL("postcopy_state_get", "after init", postcopy_state_get(), POSTCOPY_INCOMING_NONE, NOLOG);
    CELL("postcopy_state_set", "END", postcopy_state_set(POSTCOPY_INCOMING_END), POSTCOPY_INCOMING_NONE, NOLOG);
    CELL("postcopy_state_set", "unknown 6: unchanged, current returned", postcopy_state_set((PostcopyState)6),
         POSTCOPY_INCOMING_END, "unknown PostcopyState value 6");
    CELL("postcopy_state_set", "unknown UINT_MAX", postcopy_state_set((PostcopyState)UINT_MAX), POSTCOPY_INCOMING_END,
         "unknown PostcopyState value");
    CELL("postcopy_state_get", "unchanged", postcopy_state_get(), POSTCOPY_INCOMING_END, NOLOG);
    CELL("postcopy_state_set", "repeated", postcopy_state_set(POSTCOPY_INCOMING_END), POSTCOPY_INCOMING_END, NOLOG);
    postcopy_state_set(POSTCOPY_INCOMING_NONE);

    VCELL("postcopy_add_notifier", "NULL", postcopy_add_notifier(NULL), "nn must not be NULL");
    VCELL("postcopy_add_notifier", "valid", postcopy_add_notifier(&notifier), NOLOG);
    VCELL("postcopy_add_notifier", "repeated", postcopy_add_notifier(&notifier), "already added");
    VCELL("postcopy_add_notifier", "NULL notify member: skipped", postcopy_add_notifier(&null_notifier), NOLOG);
    notified = 0;
    CELL("postcopy_notify", "PROBE", postcopy_notify(POSTCOPY_NOTIFY_PROBE, NULL), 0, NOLOG);
    CHECK_EQ(notified, 1);
    CELL("postcopy_notify", "unknown 4, errp set", (e = NULL, postcopy_notify((enum PostcopyNotifyReason)4, &e)),
         -EINVAL, NOLOG);
    CHECK(e && strstr(postcopy_error_message(e), "unknown PostcopyNotifyReason value 4"), "errp");
    CELL("postcopy_error_message", "valid", PTR(postcopy_error_message(e)), NONNULL, NOLOG);
    VCELL("postcopy_error_free", "valid", postcopy_error_free(e), NOLOG);
    CELL("postcopy_error_message", "NULL", PTR(postcopy_error_message(NULL)), 0, NOLOG);
    VCELL("postcopy_error_free", "NULL", postcopy_error_free(NULL), NOLOG);
    CELL("postcopy_notify", "unknown UINT_MAX, NULL errp: logged",
         postcopy_notify((enum PostcopyNotifyReason)UINT_MAX, NULL), -EINVAL, "unknown PostcopyNotifyReason");
    CHECK_EQ(notified, 1);
    VCELL("postcopy_remove_notifier", "NULL", postcopy_remove_notifier(NULL), "n must not be NULL");
    VCELL("postcopy_remove_notifier", "valid", postcopy_remove_notifier(&notifier), NOLOG);
    VCELL("postcopy_remove_notifier", "repeated", postcopy_remove_notifier(&notifier), "was not added");
    VCELL("postcopy_remove_notifier", "valid", postcopy_remove_notifier(&null_notifier), NOLOG);

    VCELL("postcopy_register_shared_ufd", "NULL", postcopy_register_shared_ufd(NULL), "pcfd must not be NULL");
    VCELL("postcopy_register_shared_ufd", "fd -1", postcopy_register_shared_ufd(&pcfd), "invalid fd -1");
    VCELL("postcopy_register_shared_ufd", "valid (fd not open: polled later)", postcopy_register_shared_ufd(&pcfd_ok),
          NOLOG);
    VCELL("postcopy_register_shared_ufd", "repeated", postcopy_register_shared_ufd(&pcfd_ok), "already registered");
    CELL("postcopy_shared_ufd_count", "one", postcopy_shared_ufd_count(), 1, NOLOG);
    CELL("postcopy_notify_shared_wake", "NULL rb", postcopy_notify_shared_wake(NULL, 0), -EINVAL, "rb must not be NULL");
    CELL("postcopy_notify_shared_wake", "no waker", postcopy_notify_shared_wake(rb_a, UINT64_MAX), 0, NOLOG);
    VCELL("postcopy_unregister_shared_ufd", "NULL", postcopy_unregister_shared_ufd(NULL), "pcfd must not be NULL");
    VCELL("postcopy_unregister_shared_ufd", "valid", postcopy_unregister_shared_ufd(&pcfd_ok), NOLOG);
    VCELL("postcopy_unregister_shared_ufd", "repeated", postcopy_unregister_shared_ufd(&pcfd_ok), "was not registered");
    CELL("postcopy_shared_ufd_count", "none", postcopy_shared_ufd_count(), 0, NOLOG);

    VCELL("postcopy_discard_send_init", "NULL ms", postcopy_discard_send_init(NULL, "pc.ram"), "ms must not be NULL");
    VCELL("postcopy_discard_send_init", "NULL name", postcopy_discard_send_init(MS, NULL), "name must not be NULL");
    VCELL("postcopy_discard_send_range", "before init", postcopy_discard_send_range(MS, 0, 1),
          "postcopy_discard_send_init first");
    VCELL("postcopy_discard_send_finish", "before init", postcopy_discard_send_finish(MS),
          "postcopy_discard_send_init first");
    VCELL("postcopy_discard_send_init", "valid", postcopy_discard_send_init(MS, "pc.ram"), NOLOG);
    VCELL("postcopy_discard_send_init", "repeated: abandons the open batch", postcopy_discard_send_init(MS, "pc.ram"),
          "never finished");
    VCELL("postcopy_discard_send_range", "NULL ms", postcopy_discard_send_range(NULL, 0, 1), "ms must not be NULL");
    VCELL("postcopy_discard_send_range", "length 0", postcopy_discard_send_range(MS, 0, 0), "length 0");
    VCELL("postcopy_discard_send_range", "start overflows", postcopy_discard_send_range(MS, ULONG_MAX, 1), "overflows");
    VCELL("postcopy_discard_send_range", "end overflows", postcopy_discard_send_range(MS, ULONG_MAX / PAGE, ULONG_MAX / PAGE),
          "overflows");
    VCELL("postcopy_discard_send_range", "valid", postcopy_discard_send_range(MS, 0, 1), NOLOG);
    VCELL("postcopy_discard_send_finish", "NULL ms", postcopy_discard_send_finish(NULL), "ms must not be NULL");
    VCELL("postcopy_discard_send_finish", "valid", postcopy_discard_send_finish(MS), NOLOG);
    VCELL("postcopy_discard_send_finish", "repeated", postcopy_discard_send_finish(MS), "postcopy_discard_send_init first");
    CELL("postcopy_discard_get_counts", "valid", postcopy_discard_get_counts(MS, &r, &c), 0, NOLOG);
    CHECK_EQ(r, 1);
    CHECK_EQ(c, 1);
    CELL("postcopy_discard_get_counts", "NULL outputs", postcopy_discard_get_counts(MS, NULL, NULL), 0, NOLOG);
    CELL("postcopy_discard_get_counts", "NULL ms", postcopy_discard_get_counts(NULL, &r, &c), -ENOENT, NOLOG);

    /* Preempt, source side, capability off. */
    VCELL("postcopy_preempt_setup", "NULL", postcopy_preempt_setup(NULL), "s must not be NULL");
    CELL("postcopy_preempt_establish_channel", "NULL", postcopy_preempt_establish_channel(NULL), -1,
         "s must not be NULL");
    CELL("postcopy_preempt_establish_channel", "capability off", postcopy_preempt_establish_channel(MS), 0, NOLOG);
    VCELL("postcopy_preempt_channel_result", "NULL", postcopy_preempt_channel_result(NULL, 0), "s must not be NULL");
    /* Capability on, no connect hook: the connect fails with ENOTSUP. */
    postcopy_standalone_set_capabilities(host, false, true);
    VCELL("postcopy_preempt_setup", "no connect hook", postcopy_preempt_setup(MS2), NOLOG);
    CELL("postcopy_preempt_establish_channel", "after a failed connect", postcopy_preempt_establish_channel(MS2), -1,
         "not supported");
    VCELL("postcopy_preempt_channel_result", "failure, positive value", postcopy_preempt_channel_result(MS2, EIO),
          "Input/output error");
    CELL("postcopy_preempt_establish_channel", "failed result", postcopy_preempt_establish_channel(MS2), -1,
         "Input/output error");
    VCELL("postcopy_preempt_channel_result", "success", postcopy_preempt_channel_result(MS2, 0), NOLOG);
    VCELL("postcopy_preempt_channel_result", "repeated", postcopy_preempt_channel_result(MS2, 0), NOLOG);
    CELL("postcopy_preempt_establish_channel", "connected", postcopy_preempt_establish_channel(MS2), 0, NOLOG);
    postcopy_standalone_set_capabilities(host, false, false);
    CELL("postcopy_standalone_set_capabilities", "off", postcopy_standalone_set_capabilities(host, false, false), 0,
         NOLOG);
}

/* ---- phase 2..4: init, setup, cleanup of MIS ---- */
static void phase_lifecycle(void)
{
    cur_phase = "init";
    PostcopyIncomingStats st;
    PostcopyBlocktimeInfo bi;
    PostCopyFD pcfd = {-1, NULL, NULL, NULL, "matrix"};
    PostcopyHostOps ops = valid_ops();

    CELL("postcopy_ram_incoming_init", "valid", postcopy_ram_incoming_init(MIS), 0, NOLOG);
    CELL("postcopy_ram_incoming_init", "repeated: new snapshot", postcopy_ram_incoming_init(MIS), 0, NOLOG);
    CELL("postcopy_place_page", "after init, before setup", postcopy_place_page(MIS, blk_a, src_page, rb_a), -ENODEV,
         "not set up");
    CELL("postcopy_incoming_temp_page", "before setup", PTR(postcopy_incoming_temp_page(MIS, 0)), 0, "not set up");

    cur_phase = "set up";
    CELLFD("postcopy_ram_incoming_setup", "valid: a userfaultfd and an eventfd", postcopy_ram_incoming_setup(MIS), 0,
           NOLOG, 2);
    CELL("postcopy_ram_incoming_setup", "repeated", postcopy_ram_incoming_setup(MIS), -EBUSY, "already set up");
    CELL("postcopy_ram_incoming_init", "while set up", postcopy_ram_incoming_init(MIS), -EBUSY, "already set up");
    CELL("postcopy_host_register", "while set up", postcopy_host_register(&ops), -EBUSY, "busy");
    CELL("postcopy_host_unregister", "while set up", postcopy_host_unregister(), -EBUSY, "busy");
    CELL("postcopy_standalone_host_install", "while set up", postcopy_standalone_host_install(host), -EBUSY, "busy");
    CELL("postcopy_incoming_get_stats", "set up", (st = stats_of(MIS), (long)st.set_up), 1, NOLOG);

    CELL("postcopy_place_page", "NULL host address: outside RAM", postcopy_place_page(MIS, NULL, src_page, rb_a),
         -EFAULT, "outside every RAM block");
    CELL("postcopy_place_page", "NULL from", postcopy_place_page(MIS, blk_a, NULL, rb_a), -EINVAL,
         "from must not be NULL");
    CELL("postcopy_place_page", "unknown rb", postcopy_place_page(MIS, blk_a, src_page, BOGUS_RB), -EFAULT,
         "not one the host listed");
    CELL("postcopy_place_page", "address in the guard page before the block",
         postcopy_place_page(MIS, blk_a - PAGE, src_page, rb_a), -EFAULT, "outside");
    CELL("postcopy_place_page", "address one past the block", postcopy_place_page(MIS, blk_a + BLOCK_LEN, src_page, rb_a),
         -EFAULT, "outside");
    CELL("postcopy_place_page", "address in block B, rb A", postcopy_place_page(MIS, blk_b, src_page, rb_a), -EFAULT,
         "outside");
    CELL("postcopy_place_page", "misaligned address", postcopy_place_page(MIS, blk_a + 8, src_page, rb_a), -EINVAL,
         "not aligned");
    CELL("postcopy_place_page", "unreadable from: the ioctl's errno",
         postcopy_place_page(MIS, blk_a, area /* guard */, rb_a), -EFAULT, "UFFDIO_COPY");
    CELL("postcopy_place_page", "valid", postcopy_place_page(MIS, blk_a, src_page, rb_a), 0, NOLOG);
    CELL("postcopy_place_page", "repeated: already present, woken", postcopy_place_page(MIS, blk_a, src_page, rb_a), 0,
         NOLOG);
    CELL("postcopy_incoming_get_stats", "EEXIST counted", (st = stats_of(MIS), (long)st.placed_already_present), 1,
         NOLOG);
    CELL("postcopy_standalone_page_received", "placed", postcopy_standalone_page_received(host, rb_a, 0), 1, NOLOG);
    CELL("postcopy_place_page_zero", "NULL rb", postcopy_place_page_zero(MIS, blk_a + PAGE, NULL), -EINVAL,
         "rb must not be NULL");
    CELL("postcopy_place_page_zero", "outside", postcopy_place_page_zero(MIS, blk_b + BLOCK_LEN, rb_b), -EFAULT,
         "outside");
    CELL("postcopy_place_page_zero", "misaligned", postcopy_place_page_zero(MIS, blk_b + 1, rb_b), -EINVAL,
         "not aligned");
    CELL("postcopy_place_page_zero", "valid", postcopy_place_page_zero(MIS, blk_b, rb_b), 0, NOLOG);
    CELL("postcopy_place_page_zero", "repeated", postcopy_place_page_zero(MIS, blk_b, rb_b), 0, NOLOG);
    CELL("postcopy_place_page_zero", "over a copied page", postcopy_place_page_zero(MIS, blk_a, rb_a), 0, NOLOG);
    CHECK(blk_a[1] == 0x5a, "a zero placement over a present page leaves it: %d", blk_a[1]);
    CELL("postcopy_place_pages", "NULL from", postcopy_place_pages(MIS, blk_a + 4 * PAGE, NULL, 1, rb_a), -EINVAL,
         "from must not be NULL");
    CELL("postcopy_place_pages", "npages 0: nothing placed", postcopy_place_pages(MIS, blk_a + 4 * PAGE, src2, 0, rb_a),
         0, NOLOG);
    CELL("postcopy_place_pages", "outside", postcopy_place_pages(MIS, blk_a - PAGE, src2, 1, rb_a), -EFAULT, "outside");
    CELL("postcopy_place_pages", "misaligned", postcopy_place_pages(MIS, blk_a + 4 * PAGE + 8, src2, 1, rb_a), -EINVAL,
         "not aligned");
    CELL("postcopy_place_pages", "run past the block's end",
         postcopy_place_pages(MIS, blk_a + BLOCK_LEN - PAGE, src2, 2, rb_a), -EFAULT, "runs past the end");
    CELL("postcopy_place_pages", "npages UINT64_MAX", postcopy_place_pages(MIS, blk_a + 4 * PAGE, src2, UINT64_MAX, rb_a),
         -EFAULT, "runs past the end");
    CELL("postcopy_place_pages", "second source page unreadable: the first is placed",
         postcopy_place_pages(MIS, blk_a + 4 * PAGE, src2, 2, rb_a), -EFAULT, "UFFDIO_COPY");
    CELL("postcopy_standalone_page_received", "first of the run", postcopy_standalone_page_received(host, rb_a, 4 * PAGE),
         1, NOLOG);
    CELL("postcopy_standalone_page_received", "second of the run",
         postcopy_standalone_page_received(host, rb_a, 5 * PAGE), 0, NOLOG);
    CELL("postcopy_place_pages", "valid run of 3 (one already present)",
         postcopy_place_pages(MIS, blk_a + 4 * PAGE, src_page, 1, rb_a) +
             postcopy_place_pages(MIS, blk_a + 5 * PAGE, src3, 3, rb_a),
         0, NOLOG);
    CELL("postcopy_place_pages", "repeated: already present", postcopy_place_pages(MIS, blk_a + 5 * PAGE, src3, 3, rb_a),
         0, NOLOG);

    CELL("postcopy_incoming_temp_page", "precopy channel", PTR(postcopy_incoming_temp_page(MIS, RAM_CHANNEL_PRECOPY)),
         NONNULL, NOLOG);
    CELL("postcopy_incoming_temp_page", "postcopy channel without preempt",
         PTR(postcopy_incoming_temp_page(MIS, RAM_CHANNEL_POSTCOPY)), 0, "no temp page for channel 1");
    CELL("postcopy_incoming_temp_page", "RAM_CHANNEL_MAX", PTR(postcopy_incoming_temp_page(MIS, RAM_CHANNEL_MAX)), 0,
         "no temp page for channel 2");
    CELL("postcopy_incoming_temp_page", "UINT32_MAX", PTR(postcopy_incoming_temp_page(MIS, UINT32_MAX)), 0,
         "no temp page");
    CELL("postcopy_incoming_zero_page", "set up", PTR(postcopy_incoming_zero_page(MIS)), NONNULL, NOLOG);
    VCELL("postcopy_fault_thread_notify", "set up", postcopy_fault_thread_notify(MIS), NOLOG);
    CELL("postcopy_blocktime_query", "blocktime off", postcopy_blocktime_query(MIS, &bi, NULL, NULL, NULL, NULL, 0),
         -ENODATA, NOLOG);
    VCELL("mark_postcopy_blocktime_begin", "blocktime off, valid", mark_postcopy_blocktime_begin((uintptr_t)blk_a, 7, rb_a),
          NOLOG);
    VCELL("mark_postcopy_blocktime_begin", "address outside rb",
          mark_postcopy_blocktime_begin((uintptr_t)blk_b, 7, rb_a), "outside");
    VCELL("mark_postcopy_blocktime_begin", "unknown rb", mark_postcopy_blocktime_begin((uintptr_t)blk_a, 7, BOGUS_RB),
          "not one the host listed");

    CELL("postcopy_request_shared_page", "unknown rb", postcopy_request_shared_page(&pcfd, BOGUS_RB, 0, 0), -EFAULT,
         "not one the host listed");
    CELL("postcopy_request_shared_page", "offset past the block",
         postcopy_request_shared_page(&pcfd, rb_b, 0, BLOCK_LEN), -EINVAL, "beyond the end");
    CELL("postcopy_request_shared_page", "offset UINT64_MAX", postcopy_request_shared_page(&pcfd, rb_b, 0, UINT64_MAX),
         -EINVAL, "beyond the end");
    CELL("postcopy_request_shared_page", "received page: wakes the client (fd -1: EBADF)",
         postcopy_request_shared_page(&pcfd, rb_a, 0x1000, 0), -EBADF, "UFFDIO_WAKE");
    atomic_store(&requests, 0);
    CELL("postcopy_request_shared_page", "missing page: requested", postcopy_request_shared_page(&pcfd, rb_b, 0x2000, PAGE),
         0, NOLOG);
    CELL("postcopy_request_shared_page", "repeated: not sent again",
         postcopy_request_shared_page(&pcfd, rb_b, 0x2000, PAGE + 5), 0, NOLOG);
    CHECK_EQ(atomic_load(&requests), 1);
    CELL("postcopy_incoming_get_stats", "one outstanding", (st = stats_of(MIS), (long)st.outstanding_requests), 1, NOLOG);
    CELL("postcopy_place_page", "the requested page", postcopy_place_page(MIS, blk_b + PAGE, src_page, rb_b), 0, NOLOG);
    CELL("postcopy_incoming_get_stats", "none outstanding", (st = stats_of(MIS), (long)st.outstanding_requests), 0,
         NOLOG);
    CELL("postcopy_wake_shared", "set up, fd -1", postcopy_wake_shared(&pcfd, 0x2000, rb_b), -EBADF, "UFFDIO_WAKE");

    CELL("postcopy_standalone_mark_received", "set up, valid", postcopy_standalone_mark_received(host, rb_b, 2 * PAGE, PAGE),
         0, NOLOG);
    CELL("postcopy_standalone_discard_range", "set up, valid: missing again",
         postcopy_standalone_discard_range(host, rb_b, 2 * PAGE, PAGE), 0, NOLOG);
    CELL("postcopy_standalone_page_received", "discarded", postcopy_standalone_page_received(host, rb_b, 2 * PAGE), 0,
         NOLOG);
    CELL("postcopy_standalone_add_ram_block", "while set up: not covered until the next setup",
         PTR(postcopy_standalone_add_ram_block(host, "late", late, PAGE, PAGE, -1, 0)), NONNULL, NOLOG);
    CELL("postcopy_place_page_zero", "block added after setup",
         postcopy_place_page_zero(MIS, late, postcopy_standalone_block_by_name(host, "late")), -EFAULT,
         "not one the host listed");
    CELL("postcopy_standalone_set_return_path", "down: the fault thread pauses (and says so)",
         (tmp_rc = postcopy_standalone_set_return_path(host, MIS, false), wait_log("return path down"), tmp_rc), 0,
         "fault thread paused");
    CELL("postcopy_standalone_set_return_path", "up", postcopy_standalone_set_return_path(host, MIS, true), 0, NOLOG);
    CELL("postcopy_ram_incoming_setup", "another mis over the same RAM: the registration is refused",
         postcopy_ram_incoming_setup(OTHER_MIS), -EBUSY, "UFFDIO_REGISTER");

    cur_phase = "after cleanup";
    CELLFD("postcopy_ram_incoming_cleanup", "valid: closes both fds", postcopy_ram_incoming_cleanup(MIS), 0, NOLOG, -2);
    CELL("postcopy_ram_incoming_cleanup", "repeated", postcopy_ram_incoming_cleanup(MIS), 0, NOLOG);
    CELL("postcopy_ram_incoming_cleanup", "other mis after a failed setup", postcopy_ram_incoming_cleanup(OTHER_MIS), 0,
         NOLOG);
    CELL("postcopy_place_page", "after cleanup", postcopy_place_page(MIS, blk_a + PAGE, src_page, rb_a), -ENODEV,
         "not set up");
    CELL("postcopy_place_page_zero", "after cleanup", postcopy_place_page_zero(MIS, blk_a + PAGE, rb_a), -ENODEV,
         "not set up");
    CELL("postcopy_place_pages", "after cleanup", postcopy_place_pages(MIS, blk_a + 9 * PAGE, src3, 1, rb_a), -ENODEV,
         "not set up");
    CELL("postcopy_incoming_temp_page", "after cleanup", PTR(postcopy_incoming_temp_page(MIS, 0)), 0, "not set up");
    CELL("postcopy_incoming_zero_page", "after cleanup", PTR(postcopy_incoming_zero_page(MIS)), 0, "not set up");
    VCELL("postcopy_fault_thread_notify", "after cleanup", postcopy_fault_thread_notify(MIS), "not set up");
    CELL("postcopy_incoming_get_stats", "after cleanup: readable, not set up",
         (st = stats_of(MIS), (long)(st.set_up * 100 + st.pages_placed)), 11, NOLOG);
    CELL("postcopy_request_shared_page", "after cleanup", postcopy_request_shared_page(&pcfd, rb_b, 0, 0), -ENODEV,
         "not set up");
    VCELL("mark_postcopy_blocktime_begin", "after cleanup", mark_postcopy_blocktime_begin((uintptr_t)blk_a, 7, rb_a),
          "not set up");
    CELL("postcopy_host_unregister", "after cleanup", postcopy_host_unregister(), 0, NOLOG);
    CELL("postcopy_standalone_host_install", "after cleanup", postcopy_standalone_host_install(host), 0, NOLOG);
    /* Setup works again after cleanup. */
    CELLFD("postcopy_ram_incoming_setup", "after cleanup", postcopy_ram_incoming_setup(MIS), 0, NOLOG, 2);
    CELLFD("postcopy_ram_incoming_cleanup", "again", postcopy_ram_incoming_cleanup(MIS), 0, NOLOG, -2);
    /* The page placed in the first run is still there; a new one faults again. */
    CHECK(blk_a[1] == 0x5a, "placed content survives cleanup");
}

int main(void)
{
    int fds_at_start;
    signal(SIGALRM, on_alarm);
    real_stderr = dup(2);
    err_capture = tmpfile();
    if (real_stderr < 0 || !err_capture)
        return 3;
    dup2(fileno(err_capture), 2);
    fds_at_start = count_fds();

    /* Guard page, block A, guard page, block B, guard page: the guards are PROT_NONE. */
    size_t area_len = (2 * BLOCK_PAGES + 3) * PAGE;
    area = mmap(NULL, area_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (area == MAP_FAILED)
        return 3;
    blk_a = area + PAGE;
    blk_b = blk_a + BLOCK_LEN + PAGE;
    mprotect(blk_a, BLOCK_LEN, PROT_READ | PROT_WRITE);
    mprotect(blk_b, BLOCK_LEN, PROT_READ | PROT_WRITE);
    src2 = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    src3 = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (src2 == MAP_FAILED || src3 == MAP_FAILED)
        return 3;
    memset(src2, 0x5a, PAGE);
    mprotect(src2 + PAGE, PAGE, PROT_NONE);
    memset(src3, 0x5a, 3 * PAGE);
    late = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (late == MAP_FAILED)
        return 3;
    memset(src_page, 0x5a, sizeof(src_page));
    host = postcopy_standalone_host_new(0);

    phase_no_host();
    phase_before_init();
    phase_tables();
    phase_lifecycle();

    postcopy_host_unregister();
    postcopy_standalone_host_free(host);
    munmap(area, area_len);
    munmap(late, PAGE);
    munmap(src2, 2 * PAGE);
    munmap(src3, 3 * PAGE);
    CHECK_EQ(count_fds(), fds_at_start);

    dup2(real_stderr, 2);
    close(real_stderr);
    fclose(err_capture);
    printf("covered:");
    for (int i = 0; i < ncovered; i++)
        printf(" %s", covered[i]);
    printf("\n%d cells\n", cells);
    return check_summary("bad_input_matrix");
}
