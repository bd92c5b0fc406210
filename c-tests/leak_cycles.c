/* Leak checks. A small destination run: two vCPU threads read guest RAM through write(2)
 * to a pipe, so every missing page is faulted by the kernel on the thread's behalf (a
 * kernel-mode fault, which the library's userfaultfd receives; it also lets the run work
 * under valgrind, where a thread blocked in a plain page fault would stall the whole
 * process); a source answers requests over a socketpair and a receiver places the pages.
 * Then N cycles (default 1000) of init, setup, one fault served, cleanup, with the fd
 * count, thread count and /proc/self/maps line count unchanged.
 *
 * Usage: leak_cycles [cycles] [valgrind]
 * ("valgrind": the maps count is not compared; valgrind maps memory of its own as it runs,
 * shadow memory and translations, in the same /proc/self/maps.) */
#include "engine_common.h"

#include <signal.h>
#include <stdlib.h>

#define NVCPU 2
#define TOUCHES 150

static const uint64_t block_len[2] = {2UL << 20, 512UL << 10};
static uint8_t *bases[2];
static RAMBlock *rbs[2];
static MigrationIncomingState *mis;
static PostcopyStandaloneHost *host;

/* Reads 8 bytes of guest RAM at `p` through the kernel: write(2) copies them from our
 * memory into a pipe, faulting the page in on the way; read(2) takes them back. */
static int kernel_read(int pipefd[2], const void *p, uint64_t *out)
{
    if (write(pipefd[1], p, 8) != 8)
        return -1;
    return read(pipefd[0], out, 8) == 8 ? 0 : -1;
}

struct vcpu {
    int index;
    long distinct, bad;
    uint8_t *touched[2];
    pthread_t thread;
};

static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    int p[2];
    uint64_t seed = 0x2545f4914f6cdd1dULL * (v->index + 3);
    if (pipe(p))
        return NULL;
    for (int i = 0; i < TOUCHES; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        unsigned b = (seed >> 9) % 3 == 0;
        uint64_t npages = block_len[b] / PAGE;
        uint64_t page = ((seed >> 16) % (npages / NVCPU)) * NVCPU + v->index;
        unsigned w = (unsigned)(seed % (PAGE / 8));
        uint64_t val = 0;
        if (kernel_read(p, bases[b] + page * PAGE + w * 8, &val) ||
            val != (page_is_zero(b, page) ? 0 : page_word(b, page, w)))
            v->bad++;
        if (!v->touched[b][page]) {
            v->touched[b][page] = 1;
            v->distinct++;
        }
    }
    close(p[0]);
    close(p[1]);
    return NULL;
}

static PostcopyIncomingStats stats(void)
{
    PostcopyIncomingStats st;
    memset(&st, 0, sizeof(st));
    postcopy_incoming_get_stats(mis, &st);
    return st;
}

/* Waits until the receiver has placed (bookkeeping included) every page the source sent:
 * a vCPU is woken by UFFDIO_COPY before the placing thread updates the requested set. */
static int wait_placed(struct source *src, struct receiver *rcv)
{
    for (int i = 0; i < 60000; i++) {
        if (atomic_load(&rcv->placed) + atomic_load(&rcv->errors) >= atomic_load(&src->requests))
            return 1;
        usleep(1000);
    }
    return 0;
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "leak_cycles: watchdog expired (hang)\n";
    if (write(2, msg, sizeof(msg) - 1) < 0)
        _exit(3);
    _exit(2);
}

int main(int argc, char **argv)
{
    int cycles = argc > 1 ? atoi(argv[1]) : 1000;
    int under_valgrind = argc > 2 && strcmp(argv[2], "valgrind") == 0;
    int req[2], data[2], mis_storage;
    struct source src;
    struct receiver rcv;
    struct vcpu v[NVCPU];
    const char *names[2] = {"pc.ram", "vga.ram"};

    signal(SIGALRM, on_alarm);
    alarm(600);
    memset(&src, 0, sizeof(src));
    memset(&rcv, 0, sizeof(rcv));
    mis = (MigrationIncomingState *)&mis_storage;
    postcopy_infrastructure_init();
    host = postcopy_standalone_host_new(0);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    for (int b = 0; b < 2; b++) {
        bases[b] = mmap(NULL, block_len[b], PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        CHECK(bases[b] != MAP_FAILED, "mmap");
        rbs[b] = postcopy_standalone_add_ram_block(host, names[b], bases[b], block_len[b], PAGE, -1, 0);
        CHECK(rbs[b] != NULL, "block %d", b);
    }
    CHECK_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, req), 0);
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, data), 0);
    CHECK_EQ(postcopy_standalone_set_request_fd(host, req[0]), 0);
    CHECK_EQ(start_source_and_receiver(req, data, &src, &rcv, mis, host, bases, 2), 0);

    /* The small run. */
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_prepare_discard(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    long distinct = 0, bad = 0;
    for (int i = 0; i < NVCPU; i++) {
        memset(&v[i], 0, sizeof(v[i]));
        v[i].index = i;
        for (int b = 0; b < 2; b++)
            v[i].touched[b] = calloc(block_len[b] / PAGE, 1);
        pthread_create(&v[i].thread, NULL, vcpu_main, &v[i]);
    }
    for (int i = 0; i < NVCPU; i++) {
        pthread_join(v[i].thread, NULL);
        distinct += v[i].distinct;
        bad += v[i].bad;
        for (int b = 0; b < 2; b++)
            free(v[i].touched[b]);
    }
    CHECK_EQ(bad, 0);
    CHECK(wait_placed(&src, &rcv), "every request placed");
    PostcopyIncomingStats st = stats();
    CHECK_EQ(st.requests_sent, distinct);
    CHECK_EQ(atomic_load(&src.requests), distinct);
    CHECK_EQ(atomic_load(&rcv.errors), 0);
    CHECK_EQ(st.outstanding_requests, 0);
    CHECK(st.faults >= (uint64_t)distinct, "faults %llu", (unsigned long long)st.faults);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    printf("leak_cycles: small run: %d vCPUs, %ld distinct pages faulted through the kernel and placed\n", NVCPU,
           distinct);

    /* The cycles: init, setup, one kernel fault served, cleanup. Warm up once first. */
    int p[2];
    CHECK_EQ(pipe(p), 0);
    int fds = -1, threads = -1, maps = -1, failures = 0;
    long served = 0;
    for (int i = -1; i < cycles; i++) {
        if (i == 0) {
            fds = count_dir("/proc/self/fd");
            threads = count_dir("/proc/self/task");
            maps = count_lines("/proc/self/maps");
        }
        failures += postcopy_ram_incoming_init(mis) != 0;
        failures += postcopy_ram_incoming_setup(mis) != 0;
        uint64_t page = (uint64_t)(i + 1) % (block_len[0] / PAGE), val = 0;
        if (kernel_read(p, bases[0] + page * PAGE, &val) || val != (page_is_zero(0, page) ? 0 : page_word(0, page, 0)))
            failures++;
        else if (i >= 0)
            served++;
        failures += !wait_placed(&src, &rcv);
        failures += postcopy_ram_incoming_cleanup(mis) != 0;
    }
    int fds_after = count_dir("/proc/self/fd"), threads_after = count_dir("/proc/self/task"),
        maps_after = count_lines("/proc/self/maps");
    /* A joined thread can still be listed for a moment while the kernel reaps it. */
    for (int i = 0; i < 2000 && threads_after != threads; i++) {
        usleep(1000);
        threads_after = count_dir("/proc/self/task");
    }
    CHECK_EQ(failures, 0);
    CHECK_EQ(fds_after, fds);
    CHECK_EQ(threads_after, threads);
    if (!under_valgrind)
        CHECK_EQ(maps_after, maps);
    printf("leak_cycles: %d cycles: %ld faults served; fds %d -> %d, threads %d -> %d, maps lines %d -> %d\n", cycles,
           served, fds, fds_after, threads, threads_after, maps, maps_after);
    close(p[0]);
    close(p[1]);

    stop_source_and_receiver(req, data, &src, &rcv);
    CHECK_EQ(postcopy_host_unregister(), 0);
    postcopy_standalone_host_free(host);
    for (int b = 0; b < 2; b++)
        munmap(bases[b], block_len[b]);
    return check_summary("leak_cycles");
}
