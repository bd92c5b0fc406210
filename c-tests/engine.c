/* The destination engine on real userfaultfd: vCPU threads fault on missing pages of two
 * anonymous RAM blocks (256 MiB), a source thread answers requests over a socketpair, a
 * receiver places pages; afterwards every page holds the source's content. Then zero pages,
 * bad input, and 200 setup/cleanup cycles with fds, threads and mappings unchanged. */
#include "engine_common.h"

#include <sys/syscall.h>

#define NVCPU 4
#define TOUCHES 3000

static const uint64_t block_len[2] = {192UL << 20, 64UL << 20};

struct vcpu {
    int index;
    uint8_t *bases[2];
    uint8_t *touched[2]; /* per-page flags, this vCPU's own pages only */
    long distinct;
    uint32_t tid; /* written by the thread itself, read by main */
    long bad;
    pthread_t thread;
};

static atomic_int vcpus_go;

static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    uint64_t seed = 0x9e3779b97f4a7c15ULL * (v->index + 1);
    __atomic_store_n(&v->tid, (uint32_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
    while (!atomic_load(&vcpus_go))
        ;
    for (int i = 0; i < TOUCHES; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        unsigned b = (seed >> 8) % 4 == 0 ? 1 : 0;
        uint64_t npages = block_len[b] / PAGE;
        /* vCPU i touches only pages with page % NVCPU == i, so its faults are its own. */
        uint64_t page = ((seed >> 16) % (npages / NVCPU)) * NVCPU + v->index;
        volatile uint64_t *p = (volatile uint64_t *)(v->bases[b] + page * PAGE);
        unsigned w = (unsigned)(seed % (PAGE / 8));
        uint64_t val = p[w]; /* read fault */
        uint64_t want = page_is_zero(b, page) ? 0 : page_word(b, page, w);
        if (val != want)
            v->bad++;
        p[w] = val; /* write, content unchanged */
        if (!v->touched[b][page]) {
            v->touched[b][page] = 1;
            v->distinct++;
        }
    }
    return NULL;
}

static void run_migration(PostcopyStandaloneHost *host, MigrationIncomingState *mis, uint8_t *bases[2], RAMBlock *rbs[2])
{
    int req[2], data[2];
    struct source src = {0};
    struct receiver rcv = {0};
    struct vcpu v[NVCPU];

    CHECK_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, req), 0);
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, data), 0);
    CHECK_EQ(postcopy_standalone_set_request_fd(host, req[0]), 0);

    for (int i = 0; i < NVCPU; i++) {
        memset(&v[i], 0, sizeof(v[i]));
        v[i].index = i;
        for (int b = 0; b < 2; b++) {
            v[i].bases[b] = bases[b];
            v[i].touched[b] = calloc(block_len[b] / PAGE, 1);
        }
        pthread_create(&v[i].thread, NULL, vcpu_main, &v[i]);
    }
    /* The vCPU threads exist before setup so their thread ids can be registered. */
    for (int i = 0; i < NVCPU; i++) {
        while (!__atomic_load_n(&v[i].tid, __ATOMIC_ACQUIRE))
            usleep(100);
        CHECK_EQ(postcopy_standalone_add_vcpu(host, i, v[i].tid), 0);
    }
    CHECK_EQ(postcopy_standalone_set_capabilities(host, true, false), 0);

    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_prepare_discard(mis), 0);
    CHECK_EQ(postcopy_state_get(), POSTCOPY_INCOMING_DISCARD);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), -EBUSY); /* twice */
    postcopy_state_set(POSTCOPY_INCOMING_RUNNING);

    CHECK_EQ(start_source_and_receiver(req, data, &src, &rcv, mis, host, bases, 2), 0);

    atomic_store(&vcpus_go, 1);
    long distinct = 0, bad = 0;
    for (int i = 0; i < NVCPU; i++) {
        pthread_join(v[i].thread, NULL);
        distinct += v[i].distinct;
        bad += v[i].bad;
    }
    CHECK_EQ(bad, 0);

    /* UFFDIO_COPY wakes a vCPU before the placing thread finishes its bookkeeping (as in
     * QEMU), so the last placements may still be finishing: wait for them, bounded. */
    PostcopyIncomingStats st;
    for (int i = 0; i < 5000; i++) {
        CHECK_EQ(postcopy_incoming_get_stats(mis, &st), 0);
        if (st.outstanding_requests == 0)
            break;
        usleep(1000);
    }

    /* Blocktime: each vCPU's fault count is exactly the pages it faulted on (its pages are
     * its own and nothing else places pages yet), and each was blocked for some time. */
    PostcopyBlocktimeInfo bt;
    uint64_t vfaults[NVCPU], vns[NVCPU];
    uint32_t vms[NVCPU];
    CHECK_EQ(postcopy_blocktime_query(mis, &bt, vms, vns, vfaults, NULL, NVCPU), NVCPU);
    for (int i = 0; i < NVCPU; i++) {
        CHECK_EQ(vfaults[i], v[i].distinct);
        CHECK(vns[i] > 0, "vCPU %d blocktime %llu ns", i, (unsigned long long)vns[i]);
    }
    CHECK_EQ(bt.faults, distinct);
    CHECK_EQ(bt.resolved_faults, distinct);
    CHECK_EQ(bt.non_vcpu_faults, 0);
    CHECK_EQ(bt.outstanding_faults, 0);
    uint64_t hist = 0;
    for (int i = 0; i < POSTCOPY_LATENCY_BUCKETS; i++)
        hist += bt.latency_histogram[i];
    CHECK_EQ(hist, distinct);
    printf("engine: blocktime total %u ms, vCPU0 %u ms over %llu faults, average fault latency %llu us\n",
           bt.total_blocktime_ms, vms[0], (unsigned long long)vfaults[0], (unsigned long long)bt.latency_avg_ns / 1000);

    CHECK_EQ(postcopy_incoming_get_stats(mis, &st), 0);
    /* No background stream yet: every distinct page touched was requested exactly once. */
    CHECK_EQ(st.requests_sent, distinct);
    CHECK_EQ(atomic_load(&src.requests), distinct);
    CHECK_EQ(st.outstanding_requests, 0);
    CHECK_EQ(st.request_errors, 0);
    CHECK(st.faults >= (uint64_t)distinct, "faults %llu >= distinct %ld", (unsigned long long)st.faults, distinct);
    printf("engine: %d vCPUs touched %ld distinct pages: %llu faults read, %llu requests, %llu duplicates\n", NVCPU,
           distinct, (unsigned long long)st.faults, (unsigned long long)st.requests_sent,
           (unsigned long long)st.duplicate_faults);

    /* Background stream: the source sends every page not yet received. */
    long streamed = 0;
    for (unsigned b = 0; b < 2; b++)
        for (uint64_t off = 0; off < block_len[b]; off += PAGE)
            if (postcopy_standalone_page_received(host, rbs[b], off) == 0) {
                send_page(data[0], b, off);
                streamed++;
            }
    long total = (long)((block_len[0] + block_len[1]) / PAGE);
    while (atomic_load(&rcv.placed) + atomic_load(&rcv.errors) < total)
        usleep(1000);
    CHECK_EQ(atomic_load(&rcv.errors), 0);
    CHECK_EQ(streamed + distinct, total);

    /* Every page of every block holds the source's content. */
    long mismatches = 0;
    for (unsigned b = 0; b < 2; b++)
        for (uint64_t pg = 0; pg < block_len[b] / PAGE; pg++)
            mismatches += !page_matches((uint64_t *)(bases[b] + pg * PAGE), b, pg);
    CHECK_EQ(mismatches, 0);

    /* A second zero placement of a placed page succeeds without blocking anyone. */
    CHECK_EQ(postcopy_place_page_zero(mis, bases[0] + 3 * PAGE, rbs[0]), 0);
    CHECK_EQ(postcopy_incoming_get_stats(mis, &st), 0);
    CHECK(st.placed_already_present >= 1, "EEXIST counted");
    CHECK(page_matches((uint64_t *)(bases[0] + 3 * PAGE), 0, 3), "zero page still zero");

    /* Bad input while set up. */
    uint64_t buf[PAGE / 8] = {0};
    CHECK_EQ(postcopy_place_page(mis, bases[0] + block_len[0], buf, rbs[0]), -EFAULT); /* outside */
    CHECK_EQ(postcopy_place_page(mis, bases[0] + 100, buf, rbs[0]), -EINVAL);          /* misaligned */
    CHECK_EQ(postcopy_place_page(mis, bases[0], NULL, rbs[0]), -EINVAL);               /* NULL from */
    CHECK_EQ(postcopy_place_page(mis, bases[0], buf, (RAMBlock *)buf), -EFAULT);       /* unknown block */
    CHECK(postcopy_incoming_temp_page(mis, RAM_CHANNEL_PRECOPY) != NULL, "temp page");
    CHECK(postcopy_incoming_temp_page(mis, RAM_CHANNEL_POSTCOPY) == NULL, "no preempt channel");
    CHECK(postcopy_incoming_zero_page(mis) != NULL, "zero page");

    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0); /* twice */
    /* Blocktime stays readable after cleanup. */
    CHECK_EQ(postcopy_blocktime_query(mis, &bt, NULL, NULL, NULL, NULL, 0), NVCPU);
    CHECK_EQ(bt.faults, distinct);
    CHECK_EQ(postcopy_place_page(mis, bases[0], buf, rbs[0]), -ENODEV); /* after cleanup */

    stop_source_and_receiver(req, data, &src, &rcv);
    for (int i = 0; i < NVCPU; i++)
        for (int b = 0; b < 2; b++)
            free(v[i].touched[b]);
}

static void setup_cleanup_cycles(MigrationIncomingState *mis)
{
    /* Warm up once so lazily created runtime state is not counted as a leak. */
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    int fds = count_dir("/proc/self/fd"), threads = count_dir("/proc/self/task"), maps = count_lines("/proc/self/maps");
    int failures = 0;
    for (int i = 0; i < 200; i++) {
        failures += postcopy_ram_incoming_setup(mis) != 0;
        failures += postcopy_ram_incoming_cleanup(mis) != 0;
    }
    CHECK_EQ(failures, 0);
    CHECK_EQ(count_dir("/proc/self/fd"), fds);
    CHECK_EQ(count_dir("/proc/self/task"), threads);
    CHECK_EQ(count_lines("/proc/self/maps"), maps);
}

int main(void)
{
    PostcopyStandaloneHost *host = postcopy_standalone_host_new(0);
    int mis_storage;
    MigrationIncomingState *mis = (MigrationIncomingState *)&mis_storage;
    uint8_t *bases[2];
    RAMBlock *rbs[2];
    const char *names[2] = {"pc.ram", "extra.ram"};
    Error *err = NULL;

    postcopy_infrastructure_init();
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    for (int b = 0; b < 2; b++) {
        bases[b] = mmap(NULL, block_len[b], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(bases[b] != MAP_FAILED, "mmap");
        memset(bases[b], 0xee, block_len[b]); /* precopy garbage that init must discard */
        rbs[b] = postcopy_standalone_add_ram_block(host, names[b], bases[b], block_len[b], PAGE, -1, 0);
        CHECK(rbs[b] != NULL, "add block %d", b);
    }
    CHECK(postcopy_ram_supported_by_host(mis, &err), "supported: %s", err ? postcopy_error_message(err) : "");
    CHECK_EQ(postcopy_host_register(NULL), -EINVAL);

    run_migration(host, mis, bases, rbs);
    setup_cleanup_cycles(mis);

    CHECK_EQ(postcopy_host_unregister(), 0);
    postcopy_standalone_host_free(host);
    for (int b = 0; b < 2; b++)
        munmap(bases[b], block_len[b]);
    return check_summary("engine");
}
