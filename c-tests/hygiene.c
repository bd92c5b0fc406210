/* Security hygiene, during an active migration:
 *  1. every fd the library opens is close-on-exec: children fork+exec'd while setup and
 *     cleanup cycles run on another thread list their /proc/self/fd and inherit none;
 *  2. a fault outside guest RAM (a range someone registered on the library's userfaultfd)
 *     is refused and logged, never placed, and the fault thread keeps serving;
 *  3. a shared userfaultfd's message reaches its handler byte for byte as the kernel wrote
 *     it, and a failing handler does not stop the other fds being served;
 *  4. the library writes nothing outside the ranges the host registered (PROT_NONE guard
 *     pages around each block stay untouched and unpopulated) nor past its out-parameters.
 *
 * Usage: hygiene            (the child mode `hygiene --list-fds` is for test 1) */
#define _GNU_SOURCE
#include "engine_common.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define BLOCK_PAGES 64
#define BLOCK_LEN (BLOCK_PAGES * PAGE)

static uint8_t *area, *blk[2];
static RAMBlock *rbs[2];
static MigrationIncomingState *mis;
static PostcopyStandaloneHost *host;

/* ---- log capture ---- */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char logs[64][256];
static int nlogs;
static void capture_log(void *opaque, int level, const char *msg)
{
    (void)opaque;
    (void)level;
    pthread_mutex_lock(&log_lock);
    snprintf(logs[nlogs % 64], sizeof(logs[0]), "%s", msg);
    nlogs++;
    pthread_mutex_unlock(&log_lock);
}
static int logged(const char *needle)
{
    int found = 0;
    pthread_mutex_lock(&log_lock);
    for (int i = 0; i < 64 && i < nlogs; i++)
        found |= strstr(logs[i], needle) != NULL;
    pthread_mutex_unlock(&log_lock);
    return found;
}

/* ---- a source: requests are answered at once by a placer thread ---- */
static pthread_mutex_t qlock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t qcond = PTHREAD_COND_INITIALIZER;
static struct {
    uint32_t block;
    uint64_t offset;
} queue[4096];
static unsigned qhead, qtail;
static int qquit;
static atomic_int requests;

static int on_request(void *opaque, RAMBlock *b, const char *idstr, const PostcopyPageRequest *req)
{
    (void)opaque;
    (void)b;
    (void)idstr;
    atomic_fetch_add(&requests, 1);
    pthread_mutex_lock(&qlock);
    queue[qtail % 4096].block = req->block_index;
    queue[qtail % 4096].offset = req->offset;
    qtail++;
    pthread_cond_signal(&qcond);
    pthread_mutex_unlock(&qlock);
    return 0;
}

static void *placer(void *arg)
{
    (void)arg;
    uint64_t buf[PAGE / 8];
    pthread_mutex_lock(&qlock);
    for (;;) {
        while (qhead == qtail && !qquit)
            pthread_cond_wait(&qcond, &qlock);
        if (qhead == qtail)
            break;
        uint32_t b = queue[qhead % 4096].block;
        uint64_t off = queue[qhead % 4096].offset;
        qhead++;
        pthread_mutex_unlock(&qlock);
        fill_page(buf, b, off / PAGE);
        postcopy_place_page(mis, blk[b] + off, buf, rbs[b]);
        pthread_mutex_lock(&qlock);
    }
    pthread_mutex_unlock(&qlock);
    return NULL;
}

static PostcopyIncomingStats stats(void)
{
    PostcopyIncomingStats st;
    memset(&st, 0, sizeof(st));
    postcopy_incoming_get_stats(mis, &st);
    return st;
}

static int wait_until(int (*cond)(void))
{
    for (int i = 0; i < 20000; i++) {
        if (cond())
            return 1;
        usleep(500);
    }
    return 0;
}

static uint64_t read_guest(uint8_t *p)
{
    return *(volatile uint64_t *)p;
}

/* ---- 1. close-on-exec ---- */
static int list_fds_child(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    if (!d)
        return 1;
    while ((e = readdir(d))) {
        char path[300], target[300];
        if (e->d_name[0] == '.' || atoi(e->d_name) == dirfd(d))
            continue;
        snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof(target) - 1);
        target[n > 0 ? n : 0] = 0;
        printf("%s %s\n", e->d_name, target);
    }
    closedir(d);
    return 0;
}

/* Fds this process was started with and passes on (not close-on-exec): a child may have
 * them; none of them is the library's. */
static int inherited[64], ninherited;
static void note_inherited_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        int fd = atoi(e->d_name);
        if (e->d_name[0] != '.' && fd != dirfd(d) && !(fcntl(fd, F_GETFD) & FD_CLOEXEC) && ninherited < 64)
            inherited[ninherited++] = fd;
    }
    if (d)
        closedir(d);
}
static int was_inherited(int fd)
{
    for (int i = 0; i < ninherited; i++)
        if (inherited[i] == fd)
            return 1;
    return fd <= 2;
}

static atomic_int cycling_stop;
static MigrationIncomingState *cycle_mis;
static void *setup_cycles(void *arg)
{
    (void)arg;
    /* Opens and closes userfaultfds and eventfds while children are forked. */
    while (!atomic_load(&cycling_stop)) {
        postcopy_ram_supported_by_host(cycle_mis, NULL);
    }
    return NULL;
}

static void test_cloexec(void)
{
    /* The library's fds of the active migration are close-on-exec. */
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int library_fds = 0, cloexec = 0;
    while (d && (e = readdir(d))) {
        char path[300], target[300];
        int fd = atoi(e->d_name);
        if (e->d_name[0] == '.' || fd == dirfd(d))
            continue;
        snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof(target) - 1);
        target[n > 0 ? n : 0] = 0;
        if (strstr(target, "userfaultfd") || strstr(target, "eventfd")) {
            library_fds++;
            cloexec += (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
        }
    }
    if (d)
        closedir(d);
    CHECK(library_fds >= 2, "the migration's userfaultfd and eventfd are open (%d)", library_fds);
    CHECK_EQ(cloexec, library_fds);

    /* Children exec'd while the library opens and closes fds on another thread. */
    int other_mis_storage;
    cycle_mis = (MigrationIncomingState *)&other_mis_storage;
    pthread_t cycler;
    pthread_create(&cycler, NULL, setup_cycles, NULL);
    int children = 0, leaked = 0;
    for (int i = 0; i < 20; i++) {
        int p[2];
        if (pipe2(p, O_CLOEXEC))
            break;
        pid_t pid = fork();
        if (pid == 0) {
            dup2(p[1], 1); /* dup2 clears FD_CLOEXEC on the new fd only */
            execl("/proc/self/exe", "hygiene", "--list-fds", (char *)NULL);
            _exit(127);
        }
        close(p[1]);
        char buf[4096];
        size_t len = 0;
        ssize_t n;
        while ((n = read(p[0], buf + len, sizeof(buf) - 1 - len)) > 0)
            len += (size_t)n;
        buf[len] = 0;
        close(p[0]);
        int status = 0;
        waitpid(pid, &status, 0);
        children += WIFEXITED(status) && WEXITSTATUS(status) == 0;
        for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
            int fd = atoi(line);
            if (!was_inherited(fd) || strstr(line, "userfaultfd") || strstr(line, "eventfd")) {
                leaked++;
                fprintf(stderr, "hygiene: child %d inherited fd %s\n", i, line);
            }
        }
    }
    atomic_store(&cycling_stop, 1);
    pthread_join(cycler, NULL);
    CHECK_EQ(children, 20);
    CHECK_EQ(leaked, 0);
    printf("hygiene: %d library fds close-on-exec; %d children exec'd during the migration inherited %d fds\n",
           library_fds, children, leaked);
}

/* ---- 2. a fault outside guest RAM ---- */
static int library_uffd(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int found = -1;
    while (d && (e = readdir(d))) {
        char path[300], target[300];
        snprintf(path, sizeof(path), "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof(target) - 1);
        target[n > 0 ? n : 0] = 0;
        if (strstr(target, "userfaultfd"))
            found = atoi(e->d_name);
    }
    if (d)
        closedir(d);
    return found;
}

static uint8_t *stray;
static atomic_int stray_done;
static void *touch_stray(void *arg)
{
    (void)arg;
    read_guest(stray);
    atomic_store(&stray_done, 1);
    return NULL;
}
static int outside_seen(void) { return stats().faults_outside_ram >= 1; }

static void test_fault_outside_ram(void)
{
    int ufd = library_uffd();
    CHECK(ufd >= 0, "the library's userfaultfd");
    stray = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct uffdio_register reg = {.range = {(uint64_t)stray, PAGE}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    CHECK_EQ(ioctl(ufd, UFFDIO_REGISTER, &reg), 0);
    PostcopyIncomingStats before = stats();
    pthread_t t;
    pthread_create(&t, NULL, touch_stray, NULL);
    CHECK(wait_until(outside_seen), "the fault outside guest RAM was read");
    PostcopyIncomingStats after = stats();
    CHECK_EQ(after.faults_outside_ram, before.faults_outside_ram + 1);
    CHECK_EQ(after.requests_sent, before.requests_sent); /* never requested */
    CHECK_EQ(after.pages_placed + after.zero_pages_placed, before.pages_placed + before.zero_pages_placed);
    CHECK(logged("outside guest RAM"), "logged");
    /* Never placed: the page is still missing and its thread still waits. */
    unsigned char vec = 1;
    CHECK_EQ(mincore(stray, PAGE, &vec), 0);
    CHECK_EQ(vec & 1, 0);
    CHECK_EQ(atomic_load(&stray_done), 0);
    /* The fault thread keeps serving guest RAM. */
    CHECK_EQ(read_guest(blk[0] + 5 * PAGE + 8), page_is_zero(0, 5) ? 0 : page_word(0, 5, 1));
    /* Release the stray thread (unregistering wakes it; it maps a fresh page). */
    struct uffdio_range range = {(uint64_t)stray, PAGE};
    CHECK_EQ(ioctl(ufd, UFFDIO_UNREGISTER, &range), 0);
    pthread_join(t, NULL);
    munmap(stray, PAGE);
    printf("hygiene: a fault outside guest RAM was logged and counted, never requested or placed\n");
}

/* ---- 3. shared userfaultfds ---- */
struct client {
    int uffd;
    uint8_t *mem;             /* the client's view of block 1 (its own private memory) */
    struct PostCopyFD pcfd;
    struct uffd_msg got[8];   /* what the handler received, byte for byte */
    atomic_int ngot;
    int fail;                 /* the handler returns an error after serving */
    atomic_int woken;
};
static struct client clients[2];

/* Resolves a client fault with the guest page's content (what vhost-user does once the
 * page arrived); `off` is the offset inside block 1. */
static int client_fill(struct client *c, uint64_t off)
{
    uint64_t buf[PAGE / 8];
    fill_page(buf, 1, off / PAGE);
    struct uffdio_copy copy = {.dst = (uint64_t)c->mem + off, .src = (uint64_t)buf, .len = PAGE};
    if (ioctl(c->uffd, UFFDIO_COPY, &copy) && errno != EEXIST)
        return -errno;
    return 0;
}

static int client_handler(struct PostCopyFD *pcfd, void *ufd)
{
    struct client *c = pcfd->data;
    struct uffd_msg *msg = ufd;
    int n = atomic_load(&c->ngot);
    if (n < 8)
        memcpy(&c->got[n], msg, sizeof(*msg));
    atomic_store(&c->ngot, n + 1);
    uint64_t off = (msg->arg.pagefault.address & ~(PAGE - 1)) - (uint64_t)c->mem;
    if (c->fail) {
        /* Serves its own fault, then reports an error. */
        client_fill(c, off);
        return -EIO;
    }
    /* Asks the library for the page; the waker fills the client once it is placed. */
    return postcopy_request_shared_page(pcfd, rbs[1], msg->arg.pagefault.address, off);
}

static int client_waker(struct PostCopyFD *pcfd, RAMBlock *rb, uint64_t offset)
{
    struct client *c = pcfd->data;
    if (rb != rbs[1])
        return 0;
    atomic_fetch_add(&c->woken, 1);
    return client_fill(c, offset & ~(PAGE - 1));
}

static int client_open(struct client *c, int fail, const char *name)
{
    memset(c, 0, sizeof(*c));
    c->fail = fail;
    c->uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (c->uffd < 0)
        return -1;
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_THREAD_ID};
    if (ioctl(c->uffd, UFFDIO_API, &api))
        return -1;
    c->mem = mmap(NULL, BLOCK_LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    struct uffdio_register reg = {.range = {(uint64_t)c->mem, BLOCK_LEN}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(c->uffd, UFFDIO_REGISTER, &reg))
        return -1;
    c->pcfd = (struct PostCopyFD){c->uffd, c, client_handler, client_waker, name};
    return 0;
}

struct touch {
    uint8_t *addr;
    uint32_t tid;
    uint64_t val;
    pthread_t thread;
};
static void *toucher(void *arg)
{
    struct touch *t = arg;
    t->tid = (uint32_t)syscall(SYS_gettid);
    t->val = read_guest(t->addr);
    return NULL;
}

static void test_shared(void)
{
    CHECK_EQ(client_open(&clients[0], 1, "failing-client"), 0);
    CHECK_EQ(client_open(&clients[1], 0, "client"), 0);
    postcopy_register_shared_ufd(&clients[0].pcfd);
    postcopy_register_shared_ufd(&clients[1].pcfd);
    CHECK_EQ(postcopy_shared_ufd_count(), 2);
    PostcopyIncomingStats before = stats();

    /* Faults on both clients, the failing one first, then the good one twice. */
    struct touch t[4] = {{clients[0].mem + 3 * PAGE + 16, 0, 0, 0},
                         {clients[1].mem + 7 * PAGE + 24, 0, 0, 0},
                         {clients[0].mem + 9 * PAGE, 0, 0, 0},
                         {clients[1].mem + 11 * PAGE + 8, 0, 0, 0}};
    for (int i = 0; i < 4; i++) {
        pthread_create(&t[i].thread, NULL, toucher, &t[i]);
        pthread_join(t[i].thread, NULL);
    }
    for (int i = 0; i < 4; i++) {
        struct client *c = &clients[i % 2];
        uint64_t off = (uint64_t)(t[i].addr - c->mem);
        CHECK_EQ(t[i].val, page_is_zero(1, off / PAGE) ? 0 : page_word(1, off / PAGE, (unsigned)(off % PAGE) / 8));
    }

    /* Each handler got the kernel's message unchanged: a page fault at the page the
     * thread touched (page-aligned: no UFFD_FEATURE_EXACT_ADDRESS), a read, the thread's
     * id, the reserved fields zero. */
    for (int ci = 0; ci < 2; ci++) {
        struct client *c = &clients[ci];
        CHECK_EQ(atomic_load(&c->ngot), 2);
        for (int k = 0; k < 2 && k < atomic_load(&c->ngot); k++) {
            struct touch *tt = &t[ci + 2 * k];
            struct uffd_msg want;
            memset(&want, 0, sizeof(want));
            want.event = UFFD_EVENT_PAGEFAULT;
            want.arg.pagefault.flags = 0;
            want.arg.pagefault.address = (uint64_t)tt->addr & ~(PAGE - 1);
            want.arg.pagefault.feat.ptid = tt->tid;
            CHECK(memcmp(&want, &c->got[k], sizeof(want)) == 0,
                  "client %d message %d: event %#x address %#llx ptid %u flags %#llx", ci, k, c->got[k].event,
                  (unsigned long long)c->got[k].arg.pagefault.address, c->got[k].arg.pagefault.feat.ptid,
                  (unsigned long long)c->got[k].arg.pagefault.flags);
        }
    }
    PostcopyIncomingStats after = stats();
    CHECK_EQ(after.shared_faults - before.shared_faults, 4);
    CHECK_EQ(after.shared_handler_errors - before.shared_handler_errors, 2);
    CHECK_EQ(after.shared_requests - before.shared_requests, 2);
    CHECK(atomic_load(&clients[1].woken) >= 2, "the good client was woken by its waker");
    CHECK(logged("failing-client"), "the failing handler was logged");
    /* The guest itself is still served. */
    CHECK_EQ(read_guest(blk[0] + 40 * PAGE), page_is_zero(0, 40) ? 0 : page_word(0, 40, 0));

    for (int ci = 0; ci < 2; ci++) {
        postcopy_unregister_shared_ufd(&clients[ci].pcfd);
        close(clients[ci].uffd);
        munmap(clients[ci].mem, BLOCK_LEN);
    }
    CHECK_EQ(postcopy_shared_ufd_count(), 0);
    printf("hygiene: shared messages reached their handlers unchanged; a failing handler did not stop the other fd\n");
}

/* ---- 4. nothing written outside the registered ranges ---- */
/* Never populated: no byte of the guard was ever written (or read). */
static int guard_untouched(uint8_t *g)
{
    unsigned char vec = 1;
    return mincore(g, PAGE, &vec) == 0 && (vec & 1) == 0;
}

static void test_no_stray_writes(void)
{
    uint64_t buf[PAGE / 8];
    memset(buf, 0xa5, sizeof(buf));
    uint8_t *guards[3] = {blk[0] - PAGE, blk[0] + BLOCK_LEN, blk[1] + BLOCK_LEN};
    for (int b = 0; b < 2; b++) {
        uint8_t *before = blk[b] - PAGE, *after = blk[b] + BLOCK_LEN;
        CHECK_EQ(postcopy_place_page(mis, before, buf, rbs[b]), -EFAULT);
        CHECK_EQ(postcopy_place_page(mis, after, buf, rbs[b]), -EFAULT);
        CHECK_EQ(postcopy_place_page_zero(mis, before, rbs[b]), -EFAULT);
        CHECK_EQ(postcopy_place_page_zero(mis, after, rbs[b]), -EFAULT);
        /* The last page's end, misaligned so a copy would straddle into the guard. */
        CHECK_EQ(postcopy_place_page(mis, after - 8, buf, rbs[b]), -EINVAL);
        CHECK_EQ(postcopy_place_page(mis, blk[1 - b], buf, rbs[b]), -EFAULT);
        CHECK_EQ(postcopy_standalone_discard_range(host, rbs[b], BLOCK_LEN - PAGE, 2 * PAGE), -EINVAL);
        CHECK_EQ(postcopy_standalone_mark_received(host, rbs[b], BLOCK_LEN, PAGE), -EINVAL);
        CHECK_EQ(postcopy_request_shared_page(&clients[1].pcfd, rbs[b], 0, BLOCK_LEN), -EINVAL);
    }
    /* The last page of block 0 is placed normally, right against the guard. */
    fill_page(buf, 0, BLOCK_PAGES - 1);
    CHECK_EQ(postcopy_place_page(mis, blk[0] + BLOCK_LEN - PAGE, buf, rbs[0]), 0);
    CHECK(page_matches((uint64_t *)(blk[0] + BLOCK_LEN - PAGE), 0, BLOCK_PAGES - 1), "last page");
    for (int g = 0; g < 3; g++)
        CHECK(guard_untouched(guards[g]), "guard page %d untouched", g);

    /* Out-parameters: nothing past the struct or past `capacity` entries. */
    struct {
        PostcopyIncomingStats st;
        uint64_t canary;
    } s;
    s.canary = 0x1122334455667788ULL;
    CHECK_EQ(postcopy_incoming_get_stats(mis, &s.st), 0);
    CHECK_EQ(s.canary, 0x1122334455667788ULL);
    struct {
        PostcopyBlocktimeInfo info;
        uint64_t canary;
    } bi;
    bi.canary = 0x1122334455667788ULL;
    uint32_t ms[3] = {0, 0, 0xdeadbeef};
    uint64_t ns[3] = {0, 0, 0xdeadbeef}, faults[3] = {0, 0, 0xdeadbeef}, lat[3] = {0, 0, 0xdeadbeef};
    int n = postcopy_blocktime_query(mis, &bi.info, ms, ns, faults, lat, 2);
    CHECK_EQ(n, 4); /* four vCPUs tracked, two asked for */
    CHECK_EQ(bi.canary, 0x1122334455667788ULL);
    CHECK(ms[2] == 0xdeadbeef && ns[2] == 0xdeadbeef && faults[2] == 0xdeadbeef && lat[2] == 0xdeadbeef,
          "nothing past capacity");
    printf("hygiene: placements outside the blocks refused; guard pages untouched and unpopulated; out-parameters "
           "bounded\n");
}

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "hygiene: watchdog expired (hang)\n";
    if (write(2, msg, sizeof(msg) - 1) < 0)
        _exit(3);
    _exit(2);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--list-fds") == 0)
        return list_fds_child();
    note_inherited_fds();
    signal(SIGALRM, on_alarm);
    alarm(120);
    int mis_storage;
    mis = (MigrationIncomingState *)&mis_storage;

    /* guard | block 0 | guard | block 1 | guard, the guards PROT_NONE */
    size_t area_len = (2 * BLOCK_PAGES + 3) * PAGE;
    area = mmap(NULL, area_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    blk[0] = area + PAGE;
    blk[1] = blk[0] + BLOCK_LEN + PAGE;
    for (int b = 0; b < 2; b++)
        mprotect(blk[b], BLOCK_LEN, PROT_READ | PROT_WRITE);

    postcopy_infrastructure_init();
    host = postcopy_standalone_host_new(0);
    postcopy_standalone_set_log_callback(host, capture_log, NULL);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    const char *names[2] = {"pc.ram", "shared.ram"};
    for (int b = 0; b < 2; b++) {
        rbs[b] = postcopy_standalone_add_ram_block(host, names[b], blk[b], BLOCK_LEN, PAGE, -1, 0);
        CHECK(rbs[b] != NULL, "block %d", b);
    }
    CHECK_EQ(postcopy_standalone_set_request_callback(host, on_request, NULL), 0);
    CHECK_EQ(postcopy_standalone_set_capabilities(host, true, false), 0);
    for (uint32_t i = 0; i < 4; i++)
        postcopy_standalone_add_vcpu(host, i, 100000 + i);
    pthread_t placer_thread;
    pthread_create(&placer_thread, NULL, placer, NULL);
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    /* A page through the normal path first: the migration is live. */
    CHECK_EQ(read_guest(blk[0] + PAGE), page_is_zero(0, 1) ? 0 : page_word(0, 1, 0));

    test_cloexec();
    test_fault_outside_ram();
    test_shared();
    test_no_stray_writes();

    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    pthread_mutex_lock(&qlock);
    qquit = 1;
    pthread_cond_signal(&qcond);
    pthread_mutex_unlock(&qlock);
    pthread_join(placer_thread, NULL);
    for (int g = 0; g < 3; g++)
        CHECK(guard_untouched((uint8_t *[]){blk[0] - PAGE, blk[0] + BLOCK_LEN, blk[1] + BLOCK_LEN}[g]),
              "guard %d untouched after cleanup", g);
    postcopy_host_unregister();
    postcopy_standalone_host_free(host);
    munmap(area, area_len);
    return check_summary("hygiene");
}
