/* Concurrency stress, bounded by iteration counts (never by time) with a watchdog that
 * fails the run on a hang:
 *  - vCPU threads read guest RAM through write(2) (kernel-mode faults) while the fault
 *    thread runs; the page-request callback queues each request;
 *  - placer threads answer the queue and, at the same time, stream every page of the block
 *    in the background (so placements race with faults and with each other: EEXIST);
 *  - a notifier thread adds and removes notifiers while another calls postcopy_notify;
 *  - a shared-ufd thread registers and unregisters shared userfaultfds (eventfds, kicked,
 *    and a real userfaultfd) while the fault thread polls them;
 *  - two threads run postcopy_state_set against postcopy_state_get.
 * Afterwards: every page holds the source's content, and the counters add up.
 *
 * Usage: stress [small]   ("small": fewer pages and iterations, for helgrind/drd) */
#include "engine_common.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

static uint64_t block_pages = 8192;
static int nvcpu = 3, nplacer = 3, touches = 1500, notify_iters = 2000, shared_iters = 300, state_iters = 20000;

static uint8_t *base;
static RAMBlock *rb;
static MigrationIncomingState *mis;
static PostcopyStandaloneHost *host;

/* ---- the request queue the placers answer ---- */
static pthread_mutex_t qlock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qcond = PTHREAD_COND_INITIALIZER;
static uint64_t *queue;
static uint64_t qhead, qtail, qcap;
static int qdone;
static atomic_long requests_seen, placed_ok, place_errors, streamed_next;

static int on_request(void *opaque, RAMBlock *b, const char *idstr, const PostcopyPageRequest *req)
{
    (void)opaque;
    (void)b;
    (void)idstr;
    atomic_fetch_add(&requests_seen, 1);
    pthread_mutex_lock(&qlock);
    if (qtail - qhead < qcap)
        queue[qtail++ % qcap] = req->offset;
    pthread_cond_signal(&qcond);
    pthread_mutex_unlock(&qlock);
    return 0;
}

static void place(uint64_t off)
{
    uint64_t buf[PAGE / 8];
    uint64_t pg = off / PAGE;
    int rc;
    if (page_is_zero(0, pg)) {
        rc = postcopy_place_page_zero(mis, base + off, rb);
    } else {
        fill_page(buf, 0, pg);
        rc = postcopy_place_page(mis, base + off, buf, rb);
    }
    atomic_fetch_add(rc == 0 ? &placed_ok : &place_errors, 1);
}

/* Answers queued requests first; placer 0 also streams the block in the background,
 * from the last page down, between requests. */
static void *placer_main(void *arg)
{
    int streams = arg != NULL;
    for (;;) {
        uint64_t off;
        int have = 0;
        pthread_mutex_lock(&qlock);
        if (qhead != qtail) {
            off = queue[qhead++ % qcap];
            have = 1;
        } else if (qdone) {
            pthread_mutex_unlock(&qlock);
            return NULL;
        }
        pthread_mutex_unlock(&qlock);
        if (have) {
            place(off);
            continue;
        }
        if (streams) {
            long next = atomic_fetch_add(&streamed_next, 1);
            if ((uint64_t)next < block_pages) {
                place((block_pages - 1 - (uint64_t)next) * PAGE);
                continue;
            }
        }
        pthread_mutex_lock(&qlock);
        while (qhead == qtail && !qdone && (!streams || (uint64_t)atomic_load(&streamed_next) >= block_pages))
            pthread_cond_wait(&qcond, &qlock);
        pthread_mutex_unlock(&qlock);
    }
}

/* ---- vCPUs: reads through the kernel ---- */
struct vcpu {
    int index;
    long bad;
    pthread_t thread;
};

static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    int p[2];
    uint64_t seed = 0x9e3779b97f4a7c15ULL * (uint64_t)(v->index + 1);
    if (pipe(p))
        return NULL;
    for (int i = 0; i < touches; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        uint64_t page = (seed >> 16) % block_pages;
        unsigned w = (unsigned)(seed % (PAGE / 8));
        uint64_t val = 0;
        if (write(p[1], base + page * PAGE + w * 8, 8) != 8 || read(p[0], &val, 8) != 8 ||
            val != (page_is_zero(0, page) ? 0 : page_word(0, page, w)))
            v->bad++;
    }
    close(p[0]);
    close(p[1]);
    return NULL;
}

/* ---- notifiers ---- */
struct counting_notifier {
    NotifierWithReturn n;
    atomic_long calls;
};
static struct counting_notifier notifiers[4];
static atomic_long notify_errors;

static int count_notify(NotifierWithReturn *n, void *data, Error **errp)
{
    (void)data;
    (void)errp;
    atomic_fetch_add(&((struct counting_notifier *)n)->calls, 1);
    return 0;
}

static void *notifier_churn(void *arg)
{
    (void)arg;
    for (int i = 0; i < notify_iters; i++) {
        postcopy_add_notifier(&notifiers[i % 3].n);
        postcopy_remove_notifier(&notifiers[(i + 1) % 3].n);
    }
    for (int i = 0; i < 3; i++)
        postcopy_remove_notifier(&notifiers[i].n);
    return NULL;
}

static void *notifier_caller(void *arg)
{
    (void)arg;
    for (int i = 0; i < notify_iters; i++)
        if (postcopy_notify(POSTCOPY_NOTIFY_INBOUND_LISTEN, NULL) != 0)
            atomic_fetch_add(&notify_errors, 1);
    return NULL;
}

/* ---- shared userfaultfds ---- */
static atomic_long wakes;
static int shared_waker(struct PostCopyFD *pcfd, RAMBlock *b, uint64_t offset)
{
    (void)pcfd;
    (void)b;
    (void)offset;
    atomic_fetch_add(&wakes, 1);
    return 0;
}
static int shared_handler(struct PostCopyFD *pcfd, void *msg)
{
    (void)pcfd;
    (void)msg;
    return 0;
}

static void *shared_churn(void *arg)
{
    (void)arg;
    int efd[4];
    struct PostCopyFD pcfd[5];
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    struct uffdio_api api = {.api = UFFD_API};
    if (uffd >= 0)
        ioctl(uffd, UFFDIO_API, &api);
    for (int i = 0; i < 4; i++) {
        efd[i] = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        pcfd[i] = (struct PostCopyFD){efd[i], NULL, shared_handler, shared_waker, "stress-efd"};
    }
    pcfd[4] = (struct PostCopyFD){uffd, NULL, shared_handler, shared_waker, "stress-uffd"};
    for (int i = 0; i < shared_iters; i++) {
        struct PostCopyFD *a = &pcfd[i % 5], *b = &pcfd[(i + 2) % 5];
        postcopy_register_shared_ufd(a);
        uint64_t one = 1;
        if (write(efd[i % 4], &one, 8) != 8)
            break;
        postcopy_unregister_shared_ufd(b);
    }
    for (int i = 0; i < 5; i++)
        postcopy_unregister_shared_ufd(&pcfd[i]);
    for (int i = 0; i < 4; i++)
        close(efd[i]);
    if (uffd >= 0)
        close(uffd);
    return NULL;
}

/* ---- state set vs get ---- */
static atomic_long state_hist_set[6], state_hist_old[6], state_bad;

static void *state_setter(void *arg)
{
    long seed = (long)arg;
    for (int i = 0; i < state_iters; i++) {
        unsigned v = (unsigned)((seed + i * 7) % 6);
        PostcopyState old = postcopy_state_set((PostcopyState)v);
        if ((unsigned)old > 5) {
            atomic_fetch_add(&state_bad, 1);
            continue;
        }
        atomic_fetch_add(&state_hist_set[v], 1);
        atomic_fetch_add(&state_hist_old[old], 1);
    }
    return NULL;
}

static void *state_getter(void *arg)
{
    (void)arg;
    for (int i = 0; i < state_iters; i++)
        if ((unsigned)postcopy_state_get() > 5)
            atomic_fetch_add(&state_bad, 1);
    return NULL;
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "stress: watchdog expired: deadlock or hang\n";
    if (write(2, msg, sizeof(msg) - 1) < 0)
        _exit(3);
    _exit(2);
}

int main(int argc, char **argv)
{
    int small = argc > 1 && strcmp(argv[1], "small") == 0;
    int mis_storage;
    if (small) {
        block_pages = 512;
        nvcpu = 2;
        nplacer = 2;
        touches = 100;
        notify_iters = 200;
        shared_iters = 40;
        state_iters = 500;
    }
    signal(SIGALRM, on_alarm);
    alarm(small ? 900 : 120);
    qcap = block_pages * 4 + 64;
    queue = calloc(qcap, sizeof(*queue));
    mis = (MigrationIncomingState *)&mis_storage;

    postcopy_infrastructure_init();
    host = postcopy_standalone_host_new(0);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    base = mmap(NULL, block_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(base != MAP_FAILED, "mmap");
    rb = postcopy_standalone_add_ram_block(host, "pc.ram", base, block_pages * PAGE, PAGE, -1, 0);
    CHECK(rb != NULL, "block");
    CHECK_EQ(postcopy_standalone_set_request_callback(host, on_request, NULL), 0);
    for (int i = 0; i < 4; i++)
        notifiers[i].n.notify = count_notify;

    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);

    pthread_t placers[8], aux[6];
    struct vcpu v[8];
    for (int i = 0; i < nvcpu; i++) {
        memset(&v[i], 0, sizeof(v[i]));
        v[i].index = i;
        pthread_create(&v[i].thread, NULL, vcpu_main, &v[i]);
    }
    for (int i = 0; i < nplacer; i++)
        pthread_create(&placers[i], NULL, placer_main, i == 0 ? (void *)1 : NULL);
    pthread_create(&aux[0], NULL, notifier_churn, NULL);
    pthread_create(&aux[1], NULL, notifier_caller, NULL);
    pthread_create(&aux[2], NULL, shared_churn, NULL);
    pthread_create(&aux[3], NULL, state_setter, (void *)1L);
    pthread_create(&aux[4], NULL, state_setter, (void *)4L);
    pthread_create(&aux[5], NULL, state_getter, NULL);

    long bad = 0;
    for (int i = 0; i < nvcpu; i++) {
        pthread_join(v[i].thread, NULL);
        bad += v[i].bad;
    }
    for (int i = 0; i < 6; i++)
        pthread_join(aux[i], NULL);
    /* Let the placers finish the background stream, then stop them. */
    while ((uint64_t)atomic_load(&streamed_next) < block_pages)
        usleep(1000);
    pthread_mutex_lock(&qlock);
    qdone = 1;
    pthread_cond_broadcast(&qcond);
    pthread_mutex_unlock(&qlock);
    for (int i = 0; i < nplacer; i++)
        pthread_join(placers[i], NULL);

    /* Every page arrived, with the source's content. */
    CHECK_EQ(bad, 0);
    long mismatches = 0;
    for (uint64_t pg = 0; pg < block_pages; pg++)
        mismatches += !page_matches((uint64_t *)(base + pg * PAGE), 0, pg);
    CHECK_EQ(mismatches, 0);

    /* The counters add up. */
    PostcopyIncomingStats st;
    CHECK_EQ(postcopy_incoming_get_stats(mis, &st), 0);
    CHECK_EQ(atomic_load(&place_errors), 0);
    CHECK_EQ(st.pages_placed + st.zero_pages_placed, atomic_load(&placed_ok));
    CHECK_EQ(st.requests_sent, atomic_load(&requests_seen));
    CHECK_EQ(st.request_errors, 0);
    CHECK_EQ(st.outstanding_requests, 0);
    CHECK_EQ(st.faults_outside_ram, 0);
    CHECK_EQ(st.faults + st.shared_requests,
             st.faults_already_received + st.duplicate_faults + st.requests_sent + st.request_errors);
    CHECK((long)st.placed_already_present == atomic_load(&placed_ok) - (long)block_pages,
          "EEXIST placements %llu = placements %ld - pages %llu", (unsigned long long)st.placed_already_present,
          atomic_load(&placed_ok), (unsigned long long)block_pages);
    for (uint64_t pg = 0; pg < block_pages; pg++)
        if (postcopy_standalone_page_received(host, rb, pg * PAGE) != 1)
            mismatches++;
    CHECK_EQ(mismatches, 0);

    /* Notifiers: all removed, none fails, none is called any more. */
    CHECK_EQ(atomic_load(&notify_errors), 0);
    long before = atomic_load(&notifiers[0].calls) + atomic_load(&notifiers[1].calls) + atomic_load(&notifiers[2].calls);
    CHECK_EQ(postcopy_notify(POSTCOPY_NOTIFY_INBOUND_LISTEN, NULL), 0);
    CHECK_EQ(atomic_load(&notifiers[0].calls) + atomic_load(&notifiers[1].calls) + atomic_load(&notifiers[2].calls),
             before);
    postcopy_add_notifier(&notifiers[3].n);
    CHECK_EQ(postcopy_notify(POSTCOPY_NOTIFY_INBOUND_LISTEN, NULL), 0);
    CHECK_EQ(atomic_load(&notifiers[3].calls), 1);

    /* Shared ufds: all unregistered. */
    CHECK_EQ(postcopy_shared_ufd_count(), 0);

    /* State: every exchange returned exactly the value some set stored (or the initial
     * NONE): the values stored plus the initial one equal the old values returned plus
     * the final one. */
    CHECK_EQ(atomic_load(&state_bad), 0);
    long stored[6], seen[6];
    for (int i = 0; i < 6; i++) {
        stored[i] = atomic_load(&state_hist_set[i]);
        seen[i] = atomic_load(&state_hist_old[i]);
    }
    stored[POSTCOPY_INCOMING_NONE]++;
    seen[postcopy_state_get()]++;
    int balanced = 1;
    for (int i = 0; i < 6; i++)
        balanced &= stored[i] == seen[i];
    CHECK(balanced, "state exchanges lost or invented a value");

    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    printf("stress: %d vCPUs x %d touches over %llu pages; %ld requests; %ld placements (%llu EEXIST); "
           "%llu faults, %llu duplicates; %ld shared wakes\n",
           nvcpu, touches, (unsigned long long)block_pages, atomic_load(&requests_seen), atomic_load(&placed_ok),
           (unsigned long long)st.placed_already_present, (unsigned long long)st.faults,
           (unsigned long long)st.duplicate_faults, atomic_load(&wakes));
    postcopy_remove_notifier(&notifiers[3].n);
    postcopy_host_unregister();
    postcopy_standalone_host_free(host);
    munmap(base, block_pages * PAGE);
    free(queue);
    return check_summary("stress");
}
