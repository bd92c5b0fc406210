/* The C surface that needs no userfaultfd: state, notifiers, discard batching, the
 * shared-userfaultfd registry, host-ops registration, and bad input on each. */
#include "postcopy-ram.h"
#include "check.h"

#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>

/* ---- log capture ---- */
static char last_log[1024];
static int log_count;
static void capture_log(void *opaque, int level, const char *msg)
{
    (void)opaque;
    (void)level;
    snprintf(last_log, sizeof(last_log), "%s", msg);
    log_count++;
}
static int logged(const char *needle)
{
    return strstr(last_log, needle) != NULL;
}

/* ---- notifiers ---- */
struct rec_notifier {
    NotifierWithReturn n;
    int id;
    int rc;
};
static int order[16], norder;
static Error **seen_errp;
static int last_reason;
static struct rec_notifier *to_remove, *to_add;

static int rec_notify(NotifierWithReturn *n, void *data, Error **errp)
{
    struct rec_notifier *r = (struct rec_notifier *)n;
    struct PostcopyNotifyData *pnd = data;
    order[norder++] = r->id;
    seen_errp = errp;
    last_reason = pnd->reason;
    if (to_remove) {
        postcopy_remove_notifier(&to_remove->n);
        to_remove = NULL;
    }
    if (to_add) {
        postcopy_add_notifier(&to_add->n);
        to_add = NULL;
    }
    return r->rc;
}

static void test_state(void)
{
    postcopy_infrastructure_init();
    CHECK_EQ(postcopy_state_get(), POSTCOPY_INCOMING_NONE);
    CHECK_EQ(postcopy_state_set(POSTCOPY_INCOMING_ADVISE), POSTCOPY_INCOMING_NONE);
    CHECK_EQ(postcopy_state_set(POSTCOPY_INCOMING_LISTENING), POSTCOPY_INCOMING_ADVISE);
    CHECK_EQ(postcopy_state_get(), POSTCOPY_INCOMING_LISTENING);
    /* An unknown value changes nothing, is logged, and returns the current state. */
    log_count = 0;
    CHECK_EQ(postcopy_state_set((PostcopyState)1234), POSTCOPY_INCOMING_LISTENING);
    CHECK_EQ(postcopy_state_get(), POSTCOPY_INCOMING_LISTENING);
    CHECK(log_count == 1 && logged("unknown PostcopyState value 1234"), "log: %s", last_log);
    postcopy_infrastructure_init();
    CHECK_EQ(postcopy_state_get(), POSTCOPY_INCOMING_NONE);
}

static void test_is_paused_defaults(void)
{
    CHECK(postcopy_is_paused(MIGRATION_STATUS_POSTCOPY_PAUSED), "6 is paused");
    CHECK(postcopy_is_paused(MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP), "7 is paused");
    CHECK(!postcopy_is_paused(MIGRATION_STATUS_POSTCOPY_ACTIVE), "5 is not");
    CHECK(!postcopy_is_paused(MIGRATION_STATUS_POSTCOPY_RECOVER), "8 is not");
    CHECK(!postcopy_is_paused((MigrationStatus)999), "unknown is not");
}

static void test_notifiers(void)
{
    struct rec_notifier a = {{rec_notify, {0, 0}}, 1, 0};
    struct rec_notifier b = {{rec_notify, {0, 0}}, 2, -22};
    struct rec_notifier c = {{rec_notify, {0, 0}}, 3, 0};
    struct rec_notifier d = {{rec_notify, {0, 0}}, 4, 0};
    Error *err = NULL;

    postcopy_infrastructure_init();
    postcopy_add_notifier(&a.n);
    postcopy_add_notifier(&b.n);
    postcopy_add_notifier(&c.n);
    postcopy_add_notifier(&c.n); /* duplicate: ignored */

    norder = 0;
    CHECK_EQ(postcopy_notify(POSTCOPY_NOTIFY_INBOUND_ADVISE, &err), -22);
    CHECK_EQ(norder, 2); /* newest first, stops at b */
    CHECK_EQ(order[0], 3);
    CHECK_EQ(order[1], 2);
    CHECK(seen_errp == &err, "errp passed through");
    CHECK_EQ(last_reason, POSTCOPY_NOTIFY_INBOUND_ADVISE);

    /* A callback removes a later notifier and adds a new one: no deadlock; the removed one
     * is skipped, the added one runs next time. */
    postcopy_remove_notifier(&b.n);
    to_remove = &a;
    to_add = &d;
    norder = 0;
    CHECK_EQ(postcopy_notify(POSTCOPY_NOTIFY_INBOUND_END, NULL), 0);
    CHECK_EQ(norder, 1);
    CHECK_EQ(order[0], 3);
    norder = 0;
    CHECK_EQ(postcopy_notify(POSTCOPY_NOTIFY_PROBE, NULL), 0);
    CHECK_EQ(norder, 2);
    CHECK_EQ(order[0], 4);
    CHECK_EQ(order[1], 3);

    /* Unknown reason: -EINVAL, errp message, nobody called. */
    norder = 0;
    err = NULL;
    CHECK_EQ(postcopy_notify((enum PostcopyNotifyReason)99, &err), -EINVAL);
    CHECK_EQ(norder, 0);
    CHECK(err && strstr(postcopy_error_message(err), "unknown PostcopyNotifyReason value 99"), "errp: %s",
          err ? postcopy_error_message(err) : "(null)");
    postcopy_error_free(err);

    /* Bad input: logged, harmless. */
    log_count = 0;
    postcopy_add_notifier(NULL);
    postcopy_remove_notifier(NULL);
    postcopy_remove_notifier(&b.n); /* never (or no longer) added */
    CHECK_EQ(log_count, 3);
    postcopy_infrastructure_init();
    norder = 0;
    CHECK_EQ(postcopy_notify(POSTCOPY_NOTIFY_PROBE, NULL), 0);
    CHECK_EQ(norder, 0);
}

/* ---- discard ---- */
struct discard_cmd {
    char name[64];
    int n;
    uint64_t starts[12], lengths[12];
};
static struct discard_cmd cmds[16];
static int ncmds;
static int discard_fail;

static int record_discard(void *opaque, MigrationState *ms, const char *name, uint16_t n,
                          const uint64_t *starts, const uint64_t *lengths)
{
    (void)opaque;
    (void)ms;
    if (discard_fail)
        return -EPIPE;
    struct discard_cmd *c = &cmds[ncmds++];
    snprintf(c->name, sizeof(c->name), "%s", name);
    c->n = n;
    memcpy(c->starts, starts, n * sizeof(uint64_t));
    memcpy(c->lengths, lengths, n * sizeof(uint64_t));
    return 0;
}

static void test_discard(PostcopyStandaloneHost *host)
{
    MigrationState *ms = (MigrationState *)&cmds; /* any unique address */
    uint64_t ranges = 0, commands = 0;

    CHECK_EQ(postcopy_standalone_set_discard_callback(host, record_discard, NULL), 0);
    postcopy_discard_send_init(ms, "pc.ram");
    for (unsigned long i = 0; i < 30; i++)
        postcopy_discard_send_range(ms, i * 10, i + 1);
    CHECK_EQ(ncmds, 2);
    postcopy_discard_send_finish(ms);
    CHECK_EQ(ncmds, 3);
    CHECK_EQ(cmds[0].n, 12);
    CHECK_EQ(cmds[1].n, 12);
    CHECK_EQ(cmds[2].n, 6);
    CHECK(strcmp(cmds[2].name, "pc.ram") == 0, "name %s", cmds[2].name);
    CHECK_EQ(cmds[0].starts[1], 10 * 4096);
    CHECK_EQ(cmds[0].lengths[1], 2 * 4096);
    CHECK_EQ(cmds[2].starts[5], 290 * 4096);
    CHECK_EQ(cmds[2].lengths[5], 30 * 4096);
    CHECK_EQ(postcopy_discard_get_counts(ms, &ranges, &commands), 0);
    CHECK_EQ(ranges, 30);
    CHECK_EQ(commands, 3);

    /* After finish, a range without init: nothing sent, logged. */
    log_count = 0;
    postcopy_discard_send_range(ms, 1, 1);
    postcopy_discard_send_finish(ms);
    CHECK_EQ(ncmds, 3);
    CHECK(log_count == 2 && logged("postcopy_discard_send_init first"), "log: %s", last_log);

    /* A second block continues the totals. */
    postcopy_discard_send_init(ms, "vga.ram");
    postcopy_discard_send_range(ms, 0, 1);
    postcopy_discard_send_finish(ms);
    CHECK_EQ(ncmds, 4);
    CHECK(strcmp(cmds[3].name, "vga.ram") == 0, "name %s", cmds[3].name);
    CHECK_EQ(postcopy_discard_get_counts(ms, &ranges, &commands), 0);
    CHECK_EQ(ranges, 31);
    CHECK_EQ(commands, 4);

    /* Overflowing and empty ranges are refused, a failing send is reported. */
    postcopy_discard_send_init(ms, "pc.ram");
    log_count = 0;
    postcopy_discard_send_range(ms, (unsigned long)-1 / 2, 1);
    postcopy_discard_send_range(ms, 5, 0);
    CHECK_EQ(log_count, 2);
    discard_fail = 1;
    postcopy_discard_send_range(ms, 7, 1);
    log_count = 0;
    postcopy_discard_send_finish(ms);
    CHECK(log_count == 1 && logged("Broken pipe"), "log: %s", last_log);
    discard_fail = 0;
    CHECK_EQ(ncmds, 4);

    /* NULL and unknown MigrationState. */
    log_count = 0;
    postcopy_discard_send_init(NULL, "x");
    postcopy_discard_send_init(ms, NULL);
    postcopy_discard_send_range(NULL, 0, 1);
    postcopy_discard_send_finish(NULL);
    CHECK_EQ(log_count, 4);
    CHECK_EQ(postcopy_discard_get_counts((MigrationState *)&ranges, NULL, NULL), -ENOENT);
}

/* ---- shared ufd registry ---- */
static int wakes[4];
static int waker(struct PostCopyFD *pcfd, RAMBlock *rb, uint64_t offset)
{
    (void)rb;
    (void)offset;
    wakes[pcfd->fd - 100]++;
    return *(int *)pcfd->data;
}

static void test_shared_registry(void)
{
    int ok = 0, bad = -5, worse = -7;
    struct PostCopyFD a = {100, &ok, NULL, waker, "a"};
    struct PostCopyFD b = {101, &bad, NULL, waker, "b"};
    struct PostCopyFD c = {102, &worse, NULL, waker, "c"};
    struct PostCopyFD dup = {100, &worse, NULL, waker, "dup"};
    RAMBlock *rb = (RAMBlock *)&a;

    postcopy_register_shared_ufd(&a);
    postcopy_register_shared_ufd(&b);
    postcopy_register_shared_ufd(&c);
    log_count = 0;
    postcopy_register_shared_ufd(&dup);
    CHECK(log_count == 1 && logged("already registered"), "log: %s", last_log);
    CHECK_EQ(postcopy_shared_ufd_count(), 3);
    /* The copy is kept: changing the caller's struct changes nothing. */
    b.data = &ok;
    CHECK_EQ(postcopy_notify_shared_wake(rb, 0), -5);
    CHECK_EQ(wakes[0], 1);
    CHECK_EQ(wakes[1], 1);
    CHECK_EQ(wakes[2], 1); /* every waker runs */
    postcopy_unregister_shared_ufd(&b);
    CHECK_EQ(postcopy_notify_shared_wake(rb, 0), -7);
    log_count = 0;
    struct PostCopyFD never = {555, NULL, NULL, NULL, "never"};
    postcopy_unregister_shared_ufd(&never);
    postcopy_unregister_shared_ufd(NULL);
    postcopy_register_shared_ufd(NULL);
    CHECK_EQ(log_count, 3);
    CHECK_EQ(postcopy_notify_shared_wake(NULL, 0), -EINVAL);
    postcopy_unregister_shared_ufd(&a);
    postcopy_unregister_shared_ufd(&c);
    CHECK_EQ(postcopy_shared_ufd_count(), 0);
    CHECK_EQ(postcopy_notify_shared_wake(rb, 0), 0);
}

/* ---- host ops table ---- */
static int t_foreach(void *o, PostcopyRamBlockFn fn, void *ctx) { (void)o; (void)fn; (void)ctx; return 0; }
static int t_info(void *o, RAMBlock *rb, PostcopyRamBlockInfo *i) { (void)o; (void)rb; (void)i; return -ENOENT; }
static bool t_test(void *o, RAMBlock *rb, uint64_t off) { (void)o; (void)rb; (void)off; return false; }
static void t_set(void *o, RAMBlock *rb, uint64_t off, uint64_t len) { (void)o; (void)rb; (void)off; (void)len; }
static int mlock_calls, mlock_rc;
static int t_restore_mlock(void *o) { (void)o; mlock_calls++; return mlock_rc; }

static void test_host_ops_registration(void)
{
    PostcopyHostOps ops;
    memset(&ops, 0, sizeof(ops));
    ops.size = sizeof(ops);
    ops.version = POSTCOPY_HOST_OPS_VERSION;
    ops.ram_block_foreach = t_foreach;
    ops.ram_block_info = t_info;
    ops.recv_bitmap_test = t_test;
    ops.recv_bitmap_set_range = t_set;
    ops.status_postcopy_paused = 7;
    ops.status_postcopy_recover_setup = 8;

    CHECK_EQ(postcopy_host_register(NULL), -EINVAL);
    PostcopyHostOps bad = ops;
    bad.version = 99;
    CHECK_EQ(postcopy_host_register(&bad), -EINVAL);
    bad = ops;
    bad.size = 8;
    CHECK_EQ(postcopy_host_register(&bad), -EINVAL);
    bad = ops;
    bad.recv_bitmap_test = NULL;
    CHECK_EQ(postcopy_host_register(&bad), -EINVAL);
    CHECK_EQ(postcopy_host_register(&ops), 0);
    /* The host's MigrationStatus numbering (QEMU 10.2 shifts by one). */
    CHECK(postcopy_is_paused((MigrationStatus)7), "7 paused");
    CHECK(postcopy_is_paused((MigrationStatus)8), "8 recover-setup");
    CHECK(!postcopy_is_paused((MigrationStatus)6), "6 not paused with this host");
    /* A host with no blocks: init works, setup of nothing works, cleanup works. */
    int mis_storage;
    MigrationIncomingState *mis = (MigrationIncomingState *)&mis_storage;
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(postcopy_host_unregister(), 0);
    CHECK_EQ(postcopy_ram_incoming_init(mis), -ENODEV); /* no host */

    /* restore_mlock: asked at the end of each cleanup; a failure is logged, not returned. */
    ops.restore_mlock = t_restore_mlock;
    ops.log = capture_log;
    CHECK_EQ(postcopy_host_register(&ops), 0);
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(mlock_calls, 1);
    mlock_rc = -ENOMEM;
    last_log[0] = 0;
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(mlock_calls, 2);
    CHECK(logged("mlock of guest memory after postcopy failed: Cannot allocate memory"), "logged: %s",
          last_log);
    CHECK_EQ(postcopy_host_unregister(), 0);
    /* A table from the header before restore_mlock existed (shorter size) still registers,
     * and whatever lies past its end is not read as restore_mlock. */
    PostcopyHostOps old = ops;
    old.size = offsetof(PostcopyHostOps, restore_mlock);
    CHECK_EQ(postcopy_host_register(&old), 0);
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(mlock_calls, 2);
    CHECK_EQ(postcopy_host_unregister(), 0);
    old.size = offsetof(PostcopyHostOps, restore_mlock) - 1;
    CHECK_EQ(postcopy_host_register(&old), -EINVAL);
}

static void test_wrong_order_and_null(PostcopyStandaloneHost *host)
{
    int mis_storage, page[1024];
    MigrationIncomingState *mis = (MigrationIncomingState *)&mis_storage;
    RAMBlock *rb = (RAMBlock *)page;
    Error *err = NULL;

    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    CHECK(!postcopy_ram_supported_by_host(NULL, &err), "NULL mis");
    CHECK(err && strstr(postcopy_error_message(err), "mis must not be NULL"), "errp: %s",
          err ? postcopy_error_message(err) : "(null)");
    postcopy_error_free(err);

    CHECK_EQ(postcopy_place_page(mis, page, page, rb), -ENODEV); /* before setup */
    CHECK_EQ(postcopy_place_page_zero(mis, page, rb), -ENODEV);
    CHECK_EQ(postcopy_place_page(NULL, page, page, rb), -EINVAL);
    CHECK_EQ(postcopy_place_page(mis, page, page, NULL), -EINVAL);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0); /* without setup */
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0); /* twice */
    CHECK_EQ(postcopy_ram_incoming_cleanup(NULL), -EINVAL);
    CHECK_EQ(postcopy_ram_incoming_init(NULL), -EINVAL);
    CHECK_EQ(postcopy_ram_incoming_setup(NULL), -EINVAL);
    CHECK_EQ(postcopy_ram_prepare_discard(NULL), -EINVAL);
    log_count = 0;
    postcopy_fault_thread_notify(mis);
    CHECK(log_count == 1 && logged("not set up"), "log: %s", last_log);
    postcopy_fault_thread_notify(NULL);
    postcopy_thread_create(NULL, NULL, "x", NULL, 1);
    mark_postcopy_blocktime_begin(0x1000, 5, NULL);
    mark_postcopy_blocktime_begin(0x1000, 5, rb);
    CHECK_EQ(log_count, 5);
    CHECK_EQ(postcopy_wake_shared(NULL, 0, rb), -EINVAL);
    CHECK_EQ(postcopy_request_shared_page(NULL, rb, 0, 0), -EINVAL);
    CHECK_EQ(postcopy_preempt_establish_channel(NULL), -1);
    postcopy_preempt_setup(NULL);
    postcopy_preempt_new_channel(NULL, NULL);
    /* Without the preempt capability establish succeeds at once. */
    CHECK_EQ(postcopy_preempt_establish_channel((MigrationState *)page), 0);
    PostcopyIncomingStats st;
    CHECK_EQ(postcopy_incoming_get_stats(NULL, &st), -EINVAL);
    CHECK_EQ(postcopy_incoming_get_stats((MigrationIncomingState *)&st, &st), -ENOENT);
    CHECK(postcopy_incoming_temp_page(mis, 0) == NULL, "no temp page before setup");
    CHECK(postcopy_standalone_add_ram_block(host, "bad", (void *)0x1001, 4096, 4096, -1, 0) == NULL, "misaligned");
    CHECK(postcopy_standalone_add_ram_block(NULL, "x", page, 4096, 4096, -1, 0) == NULL, "NULL host");
    CHECK(postcopy_standalone_add_ram_block(host, NULL, page, 4096, 4096, -1, 0) == NULL, "NULL name");
}

static char thread_name[16];

static void *thread_body(void *arg)
{
    prctl(PR_GET_NAME, thread_name);
    *(int *)arg = 42;
    return arg;
}

static void test_thread_create(void)
{
    int flag = 0;
    QemuThread t;
    void *ret = NULL;
    postcopy_thread_create((MigrationIncomingState *)&flag, &t, "test/thread", thread_body, 0 /* QEMU_THREAD_JOINABLE */);
    CHECK_EQ(pthread_join(t.thread, &ret), 0);
    CHECK(ret == &flag, "thread got mis as its argument");
    CHECK_EQ(flag, 42);
    CHECK(strcmp(thread_name, "test/thread") == 0, "the thread runs under its name");
    flag = 0;
    postcopy_thread_create((MigrationIncomingState *)&flag, &t, "postcopy/a-long-thread-name", thread_body, 0);
    CHECK_EQ(pthread_join(t.thread, &ret), 0);
    CHECK(strcmp(thread_name, "postcopy/a-long") == 0, "a long name is cut to Linux's 15 bytes");
}

int main(void)
{
    PostcopyStandaloneHost *host = postcopy_standalone_host_new(4096);
    CHECK(host != NULL, "host");
    CHECK_EQ(postcopy_standalone_set_log_callback(host, capture_log, NULL), 0);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);

    test_state();
    test_is_paused_defaults();
    test_notifiers();
    test_discard(host);
    test_shared_registry();
    test_thread_create();
    test_host_ops_registration();
    test_wrong_order_and_null(host);

    postcopy_host_unregister();
    postcopy_standalone_host_free(host);
    return check_summary("api_basics");
}
