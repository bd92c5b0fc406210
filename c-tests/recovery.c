/* Recovery and preempt at the library level: a broken return path pauses requests while
 * faults keep being recorded, and resuming sends every outstanding request exactly once;
 * cleanup with requests outstanding and the source gone returns; the preempt channel's
 * connect (sync, async, failing), loader thread, reconnect and shutdown. */
#include "engine_common.h"

#include <signal.h>

#define BLOCK_LEN (16UL << 20)
#define NPAGES (BLOCK_LEN / PAGE)
#define TOUCHED 64

static uint8_t *base;
static RAMBlock *rb;
static MigrationIncomingState *mis;
static PostcopyStandaloneHost *host;

/* ---- an in-process source: requests are queued, a thread places them ---- */
static pthread_mutex_t qlock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qcond = PTHREAD_COND_INITIALIZER;
static uint64_t queue[NPAGES];
static int qhead, qtail, source_quit, source_answers = 1;
static int requested_count[NPAGES];
static atomic_int request_fail;

static int on_request(void *opaque, RAMBlock *b, const char *idstr, const PostcopyPageRequest *req)
{
    (void)opaque;
    (void)b;
    (void)idstr;
    if (atomic_load(&request_fail))
        return -EIO;
    pthread_mutex_lock(&qlock);
    requested_count[req->offset / PAGE]++;
    queue[qtail++ % NPAGES] = req->offset;
    pthread_cond_signal(&qcond);
    pthread_mutex_unlock(&qlock);
    return 0;
}

static void *source_thread(void *arg)
{
    (void)arg;
    uint64_t buf[PAGE / 8];
    pthread_mutex_lock(&qlock);
    while (!source_quit) {
        if (qhead == qtail || !source_answers) {
            pthread_cond_wait(&qcond, &qlock);
            continue;
        }
        uint64_t off = queue[qhead++ % NPAGES];
        pthread_mutex_unlock(&qlock);
        fill_page(buf, 0, off / PAGE);
        postcopy_place_page(mis, base + off, buf, rb);
        pthread_mutex_lock(&qlock);
    }
    pthread_mutex_unlock(&qlock);
    return NULL;
}

static int total_requests(void)
{
    int n = 0;
    pthread_mutex_lock(&qlock);
    for (unsigned i = 0; i < NPAGES; i++)
        n += requested_count[i];
    pthread_mutex_unlock(&qlock);
    return n;
}

static atomic_int mismatches;

/* One vCPU-like thread per page, so every page faults at once. */
static void *toucher(void *arg)
{
    uint64_t pg = (uint64_t)(long)arg;
    volatile uint64_t *q = (volatile uint64_t *)(base + pg * PAGE);
    if (q[1] != (page_is_zero(0, pg) ? 0 : page_word(0, pg, 1)))
        atomic_fetch_add(&mismatches, 1);
    return NULL;
}

static void touch_pages(pthread_t *t, long first, int n)
{
    for (int i = 0; i < n; i++)
        pthread_create(&t[i], NULL, toucher, (void *)((first + i) * 5));
}

static void join_all(pthread_t *t, int n)
{
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
}

static PostcopyIncomingStats stats(void)
{
    PostcopyIncomingStats st;
    memset(&st, 0, sizeof(st));
    postcopy_incoming_get_stats(mis, &st);
    return st;
}

static int wait_for(int (*cond)(void))
{
    for (int i = 0; i < 10000; i++) {
        if (cond())
            return 1;
        usleep(1000);
    }
    return 0;
}
static int all_faults_seen(void) { return stats().faults >= TOUCHED; }
static int all_placed(void) { return stats().outstanding_requests == 0; }

static void test_pause_and_resume(void)
{
    pthread_t src, t[TOUCHED];
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    pthread_create(&src, NULL, source_thread, NULL);

    /* The return path breaks before any fault. */
    CHECK_EQ(postcopy_standalone_set_return_path(host, mis, false), 0);
    touch_pages(t, 0, TOUCHED);
    CHECK(wait_for(all_faults_seen), "faults recorded while paused");
    PostcopyIncomingStats st = stats();
    CHECK_EQ(st.paused, 1);
    CHECK_EQ(st.pauses, 1);
    CHECK_EQ(st.outstanding_requests, TOUCHED);
    CHECK_EQ(total_requests(), 0); /* nothing sent while down */

    /* Back: every outstanding request goes out exactly once, the vCPUs resume. */
    CHECK_EQ(postcopy_standalone_set_return_path(host, mis, true), 0);
    join_all(t, TOUCHED);
    CHECK_EQ(atomic_load(&mismatches), 0);
    CHECK(wait_for(all_placed), "all placed");
    st = stats();
    CHECK_EQ(st.paused, 0);
    CHECK_EQ(st.resent_after_resume, TOUCHED);
    CHECK_EQ(total_requests(), TOUCHED);
    int once = 1;
    for (unsigned i = 0; i < NPAGES; i++)
        if (requested_count[i] > 1)
            once = 0;
    CHECK(once, "each request sent exactly once");

    /* A send that fails while the return path is down: held, then sent on resume. */
    atomic_store(&request_fail, 1);
    postcopy_standalone_set_return_path(host, mis, false);
    volatile uint64_t *q = (volatile uint64_t *)(base + 1000 * PAGE);
    touch_pages(t, 200, TOUCHED / 4); /* pages 1000..1075 step 5 */
    for (int i = 0; i < 5000 && stats().outstanding_requests < TOUCHED / 4; i++)
        usleep(1000);
    CHECK_EQ(stats().outstanding_requests, TOUCHED / 4);
    atomic_store(&request_fail, 0);
    postcopy_standalone_set_return_path(host, mis, true);
    join_all(t, TOUCHED / 4);
    CHECK_EQ(atomic_load(&mismatches), 0);
    CHECK(q[1] == page_word(0, 1000, 1), "late page arrived");
    CHECK(wait_for(all_placed), "late pages placed");

    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    pthread_mutex_lock(&qlock);
    source_quit = 1;
    pthread_cond_signal(&qcond);
    pthread_mutex_unlock(&qlock);
    pthread_join(src, NULL);
}

/* ---- preempt ---- */
static int connect_rc;
static MigrationState *async_ms;
static void *complete_later(void *arg)
{
    (void)arg;
    usleep(50000);
    postcopy_preempt_channel_result(async_ms, 0);
    return NULL;
}
static int on_connect(void *opaque, MigrationState *ms)
{
    (void)opaque;
    (void)ms;
    return connect_rc;
}

/* The "channel" is a pipe; load blocks reading it until shutdown closes the write end. */
struct channel {
    int fds[2];
    atomic_int loads;
};
static atomic_int shutdowns;
static int on_load(void *opaque, MigrationIncomingState *m, QEMUFile *file)
{
    (void)opaque;
    (void)m;
    struct channel *ch = (struct channel *)file;
    char c;
    atomic_fetch_add(&ch->loads, 1);
    ssize_t n = read(ch->fds[0], &c, 1);
    return n == 1 ? -EPIPE : 0; /* a byte means "the channel broke" */
}
static void on_shutdown(void *opaque, MigrationIncomingState *m, QEMUFile *file)
{
    (void)opaque;
    (void)m;
    struct channel *ch = (struct channel *)file;
    atomic_fetch_add(&shutdowns, 1);
    close(ch->fds[1]);
}
static char last_log[512];
static void capture_log(void *opaque, int level, const char *msg)
{
    (void)opaque;
    (void)level;
    snprintf(last_log, sizeof(last_log), "%s", msg);
}
static struct channel *load_target;
static int loads_seen(void) { return atomic_load(&load_target->loads) >= 1; }

static void test_preempt(void)
{
    int ms_storage[3];
    MigrationState *ms = (MigrationState *)&ms_storage[0];

    CHECK_EQ(postcopy_preempt_establish_channel(ms), 0); /* capability off */
    CHECK_EQ(postcopy_standalone_set_capabilities(host, false, true), 0);
    CHECK_EQ(postcopy_standalone_set_preempt_callbacks(host, on_connect, on_load, on_shutdown, NULL), 0);

    connect_rc = -ECONNREFUSED;
    CHECK_EQ(postcopy_preempt_establish_channel(ms), -1);
    CHECK(strstr(last_log, "Connection refused") != NULL, "reason logged: %s", last_log);

    connect_rc = 0;
    MigrationState *ms2 = (MigrationState *)&ms_storage[1];
    CHECK_EQ(postcopy_preempt_establish_channel(ms2), 0);

    connect_rc = 1; /* connecting: the host reports later */
    async_ms = (MigrationState *)&ms_storage[2];
    postcopy_preempt_setup(async_ms);
    pthread_t t;
    pthread_create(&t, NULL, complete_later, NULL);
    CHECK_EQ(postcopy_preempt_establish_channel(async_ms), 0);
    pthread_join(t, NULL);

    /* Destination: the loader runs on the channel, a broken channel waits for a new one,
     * cleanup shuts the channel and joins. */
    struct channel a, b;
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    CHECK_EQ(pipe(a.fds), 0);
    CHECK_EQ(pipe(b.fds), 0);
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    CHECK(postcopy_incoming_temp_page(mis, RAM_CHANNEL_POSTCOPY) != NULL, "second temp page with preempt");
    postcopy_preempt_new_channel(mis, (QEMUFile *)&a);
    load_target = &a;
    CHECK(wait_for(loads_seen), "loader started on channel a");
    CHECK_EQ(write(a.fds[1], "x", 1), 1); /* channel a breaks */
    postcopy_preempt_new_channel(mis, (QEMUFile *)&b);
    load_target = &b;
    CHECK(wait_for(loads_seen), "loader resumed on channel b");
    CHECK_EQ(atomic_load(&a.loads), 1);
    CHECK_EQ(postcopy_preempt_channels_seen(mis), 2);

    /* A request outstanding, the source gone: cleanup does not wait forever. */
    source_answers = 0;
    pthread_t hang;
    pthread_create(&hang, NULL, toucher, (void *)(600L * 5));
    for (int i = 0; i < 5000 && stats().outstanding_requests == 0; i++)
        usleep(1000);
    CHECK(stats().outstanding_requests > 0, "a request is outstanding");
    postcopy_standalone_set_return_path(host, mis, false);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(atomic_load(&shutdowns), 1);
    /* The blocked toucher was waiting for a page nobody will place: cleanup unregistered
     * the range, so its fault is retried and maps a fresh zero page (a mismatch). */
    pthread_join(hang, NULL);
    CHECK_EQ(atomic_load(&mismatches), 1);
    close(a.fds[0]);
    close(a.fds[1]);
    close(b.fds[0]);
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "recovery: watchdog expired (hang)\n";
    if (write(2, msg, sizeof(msg) - 1) < 0)
        _exit(3);
    _exit(2);
}

int main(void)
{
    signal(SIGALRM, on_alarm);
    alarm(60);
    int mis_storage;
    mis = (MigrationIncomingState *)&mis_storage;
    host = postcopy_standalone_host_new(0);
    postcopy_standalone_set_log_callback(host, capture_log, NULL);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    base = mmap(NULL, BLOCK_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    rb = postcopy_standalone_add_ram_block(host, "pc.ram", base, BLOCK_LEN, PAGE, -1, 0);
    CHECK(rb != NULL, "block");
    CHECK_EQ(postcopy_standalone_set_request_callback(host, on_request, NULL), 0);

    test_pause_and_resume();
    test_preempt();

    postcopy_host_unregister();
    postcopy_standalone_host_free(host);
    munmap(base, BLOCK_LEN);
    return check_summary("recovery");
}
