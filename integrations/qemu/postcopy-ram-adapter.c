/*
 * postcopy-ram-adapter.c: QEMU 10.0's side of the postcopy-ram Rust library.
 *
 * Built in place of migration/postcopy-ram.c (see qemu-postcopy-check.sh). The library
 * exports every function of migration/postcopy-ram.h and makes every postcopy decision;
 * this file only translates between the library's host-ops table (PostcopyHostOps in the
 * library's include/postcopy-ram.h) and QEMU's internals, and defines the few functions
 * postcopy-ram.c exports outside that header:
 *   fill_destination_postcopy_migration_info()   (migration.h)
 *   postcopy_temp_page_reset()                   (migration.h)
 * QEMU 10.0 never calls postcopy_preempt_thread() (ram.h) from outside postcopy-ram.c, so
 * it is not defined here: the library runs its own preempt thread and calls preempt_load.
 *
 * Written for this project from the facts in integrations/qemu/NOTES.md.
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/atomic.h"
#include "qemu/error-report.h"
#include "qemu/lockable.h"
#include "qemu/rcu.h"
#include "qapi/error.h"
#include "qapi/qapi-types-migration.h"
#include "exec/ramblock.h"
#include "exec/target_page.h"
#include "hw/boards.h"
#include "hw/core/cpu.h"
#include "system/system.h"
#include "io/channel-tls.h"
#include "migration.h"
#include "ram.h"
#include "options.h"
#include "savevm.h"
#include "qemu-file.h"
#include "socket.h"
#include "tls.h"
#include "yank_functions.h"
#include "postcopy-ram.h"
#include "qapi/util.h"
/*
 * The library's header (same file name as QEMU's; reached through -I<repo root>). It
 * repeats every prototype of QEMU's header with the identical signature (a mismatch would
 * be a compile error here), which QEMU's -Wredundant-decls would otherwise report.
 */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wredundant-decls"
#include "include/postcopy-ram.h"
#pragma GCC diagnostic pop

/* ------------------------------------------------------------------ RAM blocks */

struct adapter_foreach {
    PostcopyRamBlockFn func;
    void *ctx;
};

static int adapter_foreach_one(RAMBlock *rb, void *opaque)
{
    struct adapter_foreach *f = opaque;

    return f->func(rb, f->ctx);
}

static int adapter_ram_block_foreach(void *opaque, PostcopyRamBlockFn func, void *ctx)
{
    struct adapter_foreach f = { .func = func, .ctx = ctx };

    return foreach_not_ignored_block(adapter_foreach_one, &f);
}

static int adapter_ram_block_info(void *opaque, RAMBlock *rb, PostcopyRamBlockInfo *info)
{
    info->idstr = qemu_ram_get_idstr(rb);
    info->host = qemu_ram_get_host_addr(rb);
    info->offset = qemu_ram_get_offset(rb);
    /* What postcopy covers: set at incoming init, updated by ram.c on resizes. */
    info->used_length = rb->postcopy_length;
    info->page_size = qemu_ram_pagesize(rb);
    info->fd = qemu_ram_get_fd(rb);
    info->fd_offset = rb->fd_offset;
    return 0;
}

static void adapter_ram_block_incoming_init(void *opaque, RAMBlock *rb)
{
    rb->postcopy_length = qemu_ram_get_used_length(rb);
}

static void adapter_ram_block_set_uf_zeroable(void *opaque, RAMBlock *rb, bool zeroable)
{
    /* QEMU's flag can only be set; a block starts without it. */
    if (zeroable) {
        qemu_ram_set_uf_zeroable(rb);
    }
}

static int adapter_ram_discard_range(void *opaque, RAMBlock *rb, uint64_t start,
                                     uint64_t length)
{
    return ram_discard_range(qemu_ram_get_idstr(rb), start, length);
}

/* ------------------------------------------------- received bitmap and requests */

static bool adapter_recv_bitmap_test(void *opaque, RAMBlock *rb, uint64_t offset)
{
    return ramblock_recv_bitmap_test_byte_offset(rb, offset);
}

static void adapter_recv_bitmap_set_range(void *opaque, RAMBlock *rb, uint64_t offset,
                                          uint64_t length)
{
    uint8_t *host = qemu_ram_get_host_addr(rb);

    ramblock_recv_bitmap_set_range(rb, host + offset, length / qemu_target_page_size());
}

static int adapter_request_page(void *opaque, RAMBlock *rb, const char *idstr,
                                uint64_t offset, uint64_t length, uint64_t haddr,
                                uint32_t tid)
{
    MigrationIncomingState *mis = migration_incoming_get_current();

    if (ramblock_page_is_discarded(rb, offset)) {
        return 1;   /* the library places a zero page */
    }
    /* Inserts into mis->page_requested (which the resume re-sync walks) and sends. */
    return migrate_send_rp_req_pages(mis, rb, offset, haddr);
}

static void adapter_page_placed(void *opaque, RAMBlock *rb, uint64_t offset,
                                uint64_t length)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    uint8_t *host = (uint8_t *)qemu_ram_get_host_addr(rb) + offset;
    uint64_t ps = qemu_ram_pagesize(rb);
    uint64_t done;

    /* The library set the received bits before calling: a concurrent
     * migrate_send_rp_req_pages either sees them or inserted before this removal. */
    WITH_QEMU_LOCK_GUARD(&mis->page_request_mutex) {
        for (done = 0; done < length; done += ps) {
            if (g_tree_remove(mis->page_requested, host + done)) {
                if (qatomic_dec_fetch(&mis->page_requested_count) == 0) {
                    qemu_cond_broadcast(&mis->page_request_cond);
                }
            }
        }
    }
}

/* ------------------------------------------------------ return path and recovery */

static bool adapter_return_path_ok(void *opaque)
{
    return qatomic_read(&migration_incoming_get_current()->to_src_file) != NULL;
}

static int adapter_wait_for_recovery(void *opaque, MigrationIncomingState *mis)
{
    /* Posted once by loadvm_postcopy_handle_resume, after it re-sent the tree. */
    qemu_sem_wait(&mis->postcopy_pause_sem_fault);
    return 0;
}

/* ----------------------------------------------------------------- source side */

static int adapter_send_discard(void *opaque, MigrationState *ms, const char *name,
                                uint16_t n, const uint64_t *starts,
                                const uint64_t *lengths)
{
    /* QEMU's prototype takes non-const arrays; it only reads them. */
    qemu_savevm_send_postcopy_ram_discard(ms->to_dst_file, name, n,
                                          (uint64_t *)starts, (uint64_t *)lengths);
    return 0;
}

static void adapter_preempt_channel_done(MigrationState *s, QIOChannel *ioc,
                                         Error *err)
{
    if (err) {
        migrate_set_error(s, err);
        error_free(err);
        postcopy_preempt_channel_result(s, -ECONNREFUSED);
        return;
    }
    migration_ioc_register_yank(ioc);
    s->postcopy_qemufile_src = qemu_file_new_output(ioc);
    postcopy_preempt_channel_result(s, 0);
}

static void adapter_preempt_tls_done(QIOTask *task, gpointer opaque)
{
    QIOChannel *ioc = QIO_CHANNEL(qio_task_get_source(task));
    Error *err = NULL;

    qio_task_propagate_error(task, &err);
    adapter_preempt_channel_done(opaque, ioc, err);
    object_unref(OBJECT(ioc));
}

static void adapter_preempt_connected(QIOTask *task, gpointer opaque)
{
    MigrationState *s = opaque;
    QIOChannel *ioc = QIO_CHANNEL(qio_task_get_source(task));
    Error *err = NULL;

    if (!qio_task_propagate_error(task, &err) && migrate_channel_requires_tls_upgrade(ioc)) {
        QIOChannelTLS *tioc = migration_tls_client_create(ioc, s->hostname, &err);

        if (tioc) {
            qio_channel_set_name(QIO_CHANNEL(tioc), "migration-tls-preempt");
            /* The handshake completion reports the result. */
            qio_channel_tls_handshake(tioc, adapter_preempt_tls_done, s, NULL, NULL);
            object_unref(OBJECT(ioc));
            return;
        }
    }
    adapter_preempt_channel_done(s, ioc, err);
    object_unref(OBJECT(ioc));
}

static int adapter_preempt_connect(void *opaque, MigrationState *ms)
{
    /* Completes in the main loop through postcopy_preempt_channel_result. */
    socket_send_channel_create(adapter_preempt_connected, ms);
    return 1;
}

/* ------------------------------------------------- destination preempt channel */

/* Set at setup, raised by preempt_shutdown (cleanup): the loader must end, not pause. */
static bool preempt_quit;
static bool preempt_paused;

static void adapter_preempt_channel_arrived(void *opaque, MigrationIncomingState *mis,
                                            QEMUFile *file)
{
    qemu_file_set_blocking(file, true);
    mis->postcopy_qemufile_dst = file;
    qemu_sem_post(&mis->postcopy_qemufile_dst_done);
}

static int adapter_preempt_load(void *opaque, MigrationIncomingState *mis, QEMUFile *file)
{
    int ret;

    /* Consumes the post of the channel the library handed over; a reconnect's post is
     * consumed by loadvm_postcopy_handle_resume. */
    qemu_sem_wait(&mis->postcopy_qemufile_dst_done);
    qemu_mutex_lock(&mis->postcopy_prio_thread_mutex);
    for (;;) {
        /* After a recovery the file is the new one savevm.c installed, not `file`. */
        ret = ram_load_postcopy(mis->postcopy_qemufile_dst, RAM_CHANNEL_POSTCOPY);
        if (ret == 0 || qatomic_read(&preempt_quit)) {
            break;
        }
        /* Channel broken: let postcopy_pause_incoming close it, wait for the resume. */
        qatomic_set(&preempt_paused, true);
        qemu_mutex_unlock(&mis->postcopy_prio_thread_mutex);
        qemu_sem_wait(&mis->postcopy_pause_sem_fast_load);
        qemu_mutex_lock(&mis->postcopy_prio_thread_mutex);
        qatomic_set(&preempt_paused, false);
    }
    qemu_mutex_unlock(&mis->postcopy_prio_thread_mutex);
    return ret;
}

static void adapter_preempt_shutdown(void *opaque, MigrationIncomingState *mis,
                                     QEMUFile *file)
{
    QEMUFile *f = qatomic_read(&mis->postcopy_qemufile_dst);

    qatomic_set(&preempt_quit, true);
    smp_mb();
    if (f) {
        qemu_file_shutdown(f);
    }
    if (qatomic_read(&preempt_paused)) {
        qemu_sem_post(&mis->postcopy_pause_sem_fast_load);
    }
}

static void adapter_publish_temp_pages(void *opaque, MigrationIncomingState *mis,
                                       uint32_t channels, void *const *tmp_pages,
                                       void *zero_page)
{
    uint32_t i;

    g_free(mis->postcopy_tmp_pages);
    mis->postcopy_tmp_pages = NULL;
    mis->postcopy_channels = channels;
    mis->postcopy_tmp_zero_page = zero_page;
    if (channels) {
        mis->postcopy_tmp_pages = g_new0(PostcopyTmpPage, channels);
        for (i = 0; i < channels; i++) {
            mis->postcopy_tmp_pages[i].tmp_huge_page = tmp_pages[i];
            postcopy_temp_page_reset(&mis->postcopy_tmp_pages[i]);
        }
        /* A new setup: the preempt loader starts after this. */
        qatomic_set(&preempt_quit, false);
        qatomic_set(&preempt_paused, false);
    }
}

/* ------------------------------------------------------------------- threads */

static void adapter_thread_create(void *opaque, MigrationIncomingState *mis,
                                  QemuThread *thread, const char *name,
                                  void *(*func)(void *), int joinable)
{
    /* `joinable` is QEMU's thread mode, passed through from postcopy_thread_create. The
     * new thread posts mis->thread_sync_sem itself (savevm.c's listen thread does). */
    qemu_sem_init(&mis->thread_sync_sem, 0);
    qemu_thread_create(thread, name, func, mis, joinable);
    qemu_sem_wait(&mis->thread_sync_sem);
    qemu_sem_destroy(&mis->thread_sync_sem);
}

static void adapter_thread_enter(void *opaque, const char *name)
{
    rcu_register_thread();
}

static void adapter_thread_exit(void *opaque)
{
    rcu_unregister_thread();
}

/* ------------------------------------------------------- vCPUs and capabilities */

static size_t adapter_vcpus(void *opaque, PostcopyVcpu *out, size_t capacity)
{
    CPUState *cpu;
    size_t n = 0;

    WITH_RCU_READ_LOCK_GUARD() {
        CPU_FOREACH(cpu) {
            if (n < capacity) {
                out[n].index = cpu->cpu_index;
                out[n].tid = cpu->thread_id;
            }
            n++;
        }
    }
    return n;
}

static bool adapter_blocktime_enabled(void *opaque)
{
    return migrate_postcopy_blocktime();
}

static bool adapter_preempt_enabled(void *opaque)
{
    return migrate_postcopy_preempt();
}

/* ------------------------------------------------------------ errors and logs */

static void adapter_set_error(void *opaque, Error **errp, const char *msg)
{
    error_setg(errp, "%s", msg);
}

static void adapter_log(void *opaque, int level, const char *msg)
{
    switch (level) {
    case POSTCOPY_LOG_WARNING:
        warn_report("%s", msg);
        break;
    case POSTCOPY_LOG_INFO:
        info_report("%s", msg);
        break;
    default:
        error_report("%s", msg);
        break;
    }
}

/*
 * End of postcopy_ram_incoming_cleanup, once no block is registered any more: QEMU's
 * re-lock for -overcommit mem-lock (supported_by_host ran munlockall). os_mlock reports
 * its own failure too; the library logs ours and cleanup still succeeds, as in QEMU.
 */
static int adapter_restore_mlock(void *opaque)
{
    (void)opaque;
    if (!should_mlock(mlock_state)) {
        return 0;
    }
    errno = 0;
    if (os_mlock(is_mlock_on_fault(mlock_state)) < 0) {
        return errno ? -errno : -EINVAL;
    }
    return 0;
}

/* ---------------------------------------------------------------- registration */

static void adapter_register(uint64_t target_page_size)
{
    PostcopyHostOps ops = {
        .size = sizeof(PostcopyHostOps),
        .version = POSTCOPY_HOST_OPS_VERSION,
        .ram_block_foreach = adapter_ram_block_foreach,
        .ram_block_info = adapter_ram_block_info,
        .ram_block_set_uf_zeroable = adapter_ram_block_set_uf_zeroable,
        .ram_discard_range = adapter_ram_discard_range,
        .recv_bitmap_test = adapter_recv_bitmap_test,
        .recv_bitmap_set_range = adapter_recv_bitmap_set_range,
        .request_page = adapter_request_page,
        .page_placed = adapter_page_placed,
        .return_path_ok = adapter_return_path_ok,
        .send_discard = adapter_send_discard,
        .target_page_size = target_page_size,
        .vcpus = adapter_vcpus,
        .blocktime_enabled = adapter_blocktime_enabled,
        .preempt_enabled = adapter_preempt_enabled,
        .thread_create = adapter_thread_create,
        .thread_enter = adapter_thread_enter,
        .thread_exit = adapter_thread_exit,
        .set_error = adapter_set_error,
        .log = adapter_log,
        .status_postcopy_paused = MIGRATION_STATUS_POSTCOPY_PAUSED,
        .status_postcopy_recover_setup = MIGRATION_STATUS_POSTCOPY_RECOVER_SETUP,
        .preempt_connect = adapter_preempt_connect,
        .preempt_load = adapter_preempt_load,
        .preempt_shutdown = adapter_preempt_shutdown,
        .ram_block_incoming_init = adapter_ram_block_incoming_init,
        .wait_for_recovery = adapter_wait_for_recovery,
        .publish_temp_pages = adapter_publish_temp_pages,
        .preempt_channel_arrived = adapter_preempt_channel_arrived,
        .restore_mlock = adapter_restore_mlock,
    };
    int rc = postcopy_host_register(&ops);

    if (rc) {
        fprintf(stderr, "postcopy-ram adapter: postcopy_host_register failed: %s\n",
                strerror(-rc));
        abort();
    }
}

/* The target page size is decided with the machine; register it again then. */
static void adapter_machine_ready(Notifier *n, void *data)
{
    adapter_register(qemu_target_page_size());
}

static Notifier adapter_machine_ready_notifier = { .notify = adapter_machine_ready };

/* Before main(): postcopy_infrastructure_init (the library's) runs from
 * qemu_init_subsystems; the host must be registered by then. No QEMU function that
 * allocates or locks is called here. 0 = the host page size, which is the target page
 * size until the machine says otherwise. */
static void __attribute__((constructor)) adapter_init(void)
{
    adapter_register(0);
    qemu_add_machine_init_done_notifier(&adapter_machine_ready_notifier);
}

/* ------------------------------------- exported by postcopy-ram.c outside its header */

void postcopy_temp_page_reset(PostcopyTmpPage *tmp_page)
{
    tmp_page->target_pages = 0;
    tmp_page->host_addr = NULL;
    tmp_page->all_zero = true;
}

void fill_destination_postcopy_migration_info(MigrationInfo *info)
{
    MigrationIncomingState *mis = migration_incoming_get_current();
    MachineState *machine = MACHINE(qdev_get_machine());
    unsigned int ncpus = machine->smp.cpus;
    g_autofree uint32_t *vcpu_ms = g_new0(uint32_t, ncpus ? ncpus : 1);
    PostcopyBlocktimeInfo bt;
    uint32List *list = NULL;
    int i;

    /* Negative: no context, or blocktime was off: leave the info alone. */
    if (postcopy_blocktime_query(mis, &bt, vcpu_ms, NULL, NULL, NULL, ncpus) < 0) {
        return;
    }
    for (i = (int)ncpus - 1; i >= 0; i--) {
        QAPI_LIST_PREPEND(list, vcpu_ms[i]);
    }
    info->has_postcopy_blocktime = true;
    info->postcopy_blocktime = bt.total_blocktime_ms;
    info->has_postcopy_vcpu_blocktime = true;
    info->postcopy_vcpu_blocktime = list;
}
