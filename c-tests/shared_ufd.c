/* Shared userfaultfds (vhost-user style) on real userfaultfd.
 *
 * Guest RAM is a shared memfd. The parent (the "hypervisor") maps it MAP_SHARED and adds
 * that mapping as a standalone-host RAM block with fd = the memfd. Three child processes
 * (the "backends") each map the same memfd MAP_SHARED at their own address, open their OWN
 * userfaultfd (syscall, UFFDIO_API, UFFDIO_REGISTER MISSING over their mapping) and send it
 * to the parent over a unix socket (SCM_RIGHTS), with their base address. The parent
 * registers them with postcopy_register_shared_ufd AFTER postcopy_ram_incoming_setup: the
 * library polls fds registered while the fault thread runs at once (QEMU does not).
 *
 * Each child's faults are read by the library's fault thread and handed to the registered
 * pcfdhandler (here: client_handler), which maps the client address to (rb, offset) and
 * calls postcopy_request_shared_page. A source thread answers the requests over a
 * socketpair and a receiver thread places the pages (engine_common.h); each placement runs
 * the registered pcfdwake wakers (client_waker), which call postcopy_wake_shared.
 *
 * Kernel behaviour this relies on (checked on 6.18 with a two-process experiment before
 * writing this test, and exercised by it):
 * - MISSING faults of shmem VMAs go to the userfaultfd registered on the faulting VMA, so
 *   a child's faults arrive on the child's uffd, not on the library's. Another process
 *   holding that fd (here via SCM_RIGHTS) can read the uffd_msg (the address is in the
 *   child's address space) and issue UFFDIO_WAKE on it.
 * - UFFDIO_COPY / UFFDIO_ZEROPAGE into the parent's registered mapping of the memfd put
 *   the page into the shared page cache (shmem_mfill_atomic_pte), so the child's mapping
 *   sees the content on its next fault, and zero pages read as zeros there too. But the
 *   ioctl only wakes waiters of the uffd it was issued on (the parent's). A child thread
 *   sleeping in handle_userfault() on its own uffd stays asleep (userfaultfd_must_wait()
 *   checks the child's page table, which is still empty) until someone issues UFFDIO_WAKE
 *   on the child's uffd for that address: postcopy_wake_shared, from the waker. In the
 *   experiment, a child stayed blocked after the parent's UFFDIO_COPY until the parent's
 *   UFFDIO_WAKE on the child's fd, then read the copied bytes.
 * - Likewise, a page that became present (here: written with pwrite(2) into the memfd,
 *   which fills the page cache without going through any VMA, so nobody is woken) between
 *   the child's fault and the handler's request must be woken explicitly:
 *   postcopy_request_shared_page does that for a page already received.
 * - A page already in the page cache when the child touches it does not fault at all.
 *
 * Scenario (pages of the 1 MiB block; every 7th page is a zero page):
 * - C1 (good): two threads touch pages 0..95, both starting with hot page 0 (a duplicate
 *   request is not sent twice). Its handler "receives" page 50 itself (pwrite + mark
 *   received) before requesting it: request_shared_page must wake the child directly.
 * - C2 (failing handler): faults first on page 128; its handler returns -EIO. C1 is served
 *   afterwards anyway. Page 128 is later placed by the parent; the waker wakes C2.
 * - C3: page 160 is served through its handler; then C3 is unregistered while the fault
 *   thread runs, and its fault on page 161 is left on its fd for the parent to read
 *   itself (the handler is not called); the parent requests it, and after it is placed
 *   wakes C3 with postcopy_wake_shared (no waker runs for an unregistered fd).
 * - Finally the parent reads all of RAM through its own mapping (its own faults fill the
 *   rest), and checks stats: shared_faults, shared_requests, handler errors, requests sent
 *   and outstanding_requests == 0 (shared requests are tracked by guest-RAM address, so
 *   placement clears them). Every child exits 0 after checking every page it touched.
 */
#define _GNU_SOURCE
#include "engine_common.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>

#define NPAGES 256UL
#define LEN (NPAGES * PAGE)
#define NONE 0xffffffffu

#define C1_PAGES 96
#define C1_HOT 0
#define C1_PRERECEIVED 50
#define C2_PAGE 128
#define C3_PAGE_SERVED 160
#define C3_PAGE_UNREGISTERED 161

enum { OP_TOUCH = 1, OP_EXIT = 2 };

struct hello {
    uint64_t base;
    uint64_t len;
};
struct cmd {
    uint32_t op;
    uint32_t nthreads;
    uint32_t first;
    uint32_t count;
    uint32_t hot;
    uint32_t pad;
};
struct reply {
    uint32_t bad;
    uint32_t checked;
};

static const char *volatile stage = "start";

static void on_alarm(int sig)
{
    (void)sig;
    static const char msg[] = "shared_ufd: TIMEOUT, stuck while: ";
    ssize_t rc = write(2, msg, sizeof(msg) - 1);
    const char *what = stage;
    rc = write(2, what, strlen(what));
    rc = write(2, "\n", 1);
    (void)rc;
    _exit(2); /* the children die with us (PR_SET_PDEATHSIG) */
}

/* ---------------------------------------------------------------- child side ---- */

struct toucher {
    uint8_t *base;
    struct cmd c;
    uint32_t index;
    uint32_t bad, checked;
    pthread_t thread;
};

static void *toucher_main(void *arg)
{
    struct toucher *t = arg;
    if (t->c.hot != NONE) {
        t->bad += !page_matches((const uint64_t *)(t->base + (uint64_t)t->c.hot * PAGE), 0, t->c.hot);
        t->checked++;
    }
    for (uint32_t i = t->index; i < t->c.count; i += t->c.nthreads) {
        uint32_t pg = t->c.first + i;
        if (pg == t->c.hot)
            continue;
        /* The first read faults into the child's own userfaultfd and sleeps until woken. */
        t->bad += !page_matches((const uint64_t *)(t->base + (uint64_t)pg * PAGE), 0, pg);
        t->checked++;
    }
    return NULL;
}

static int send_fd(int sock, int fd, const void *data, size_t len)
{
    struct iovec iov = {(void *)data, len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = sizeof(u.buf);
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &fd, sizeof(int));
    return sendmsg(sock, &m, 0) == (ssize_t)len ? 0 : -1;
}

static int recv_fd(int sock, void *data, size_t len)
{
    struct iovec iov = {data, len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = sizeof(u.buf);
    if (recvmsg(sock, &m, MSG_CMSG_CLOEXEC) != (ssize_t)len)
        return -1;
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    if (!h || h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
        return -1;
    int fd;
    memcpy(&fd, CMSG_DATA(h), sizeof(int));
    return fd;
}

/* A backend: its own mapping of the memfd and its own userfaultfd over it. Exit status 0
 * when every page it touched held the source's content. */
static void child_main(int sock, int memfd, void *parent_map, pid_t parent)
{
    uint32_t bad = 0;
    signal(SIGALRM, SIG_DFL); /* the parent's handler reports the parent's stage */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(10);
    alarm(120); /* never outlive a stuck test */

    /* Map the memfd anew (the inherited mapping is still there, so the address differs
     * from the parent's), then drop the inherited one. */
    uint8_t *base = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (base == MAP_FAILED)
        _exit(11);
    munmap(parent_map, LEN);

    /* Non-blocking, as QEMU makes a backend's fd: the parent's fault thread reads it after
     * poll and must never block on it. */
    int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        _exit(12);
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(uffd, UFFDIO_API, &api))
        _exit(13);
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)base, .len = LEN},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg))
        _exit(14);
    if (!(reg.ioctls & (1ULL << _UFFDIO_WAKE)))
        _exit(15);
    struct hello h = {(uint64_t)(uintptr_t)base, LEN};
    if (send_fd(sock, uffd, &h, sizeof(h)))
        _exit(16);
    /* The parent's copy keeps the context (and the registration) alive; if the parent
     * dies, the last reference goes and the kernel wakes every waiter. */
    close(uffd);

    struct cmd c;
    while (read_all(sock, &c, sizeof(c)) == 0) {
        if (c.op == OP_EXIT)
            _exit(bad ? 1 : 0);
        if (c.op != OP_TOUCH || c.nthreads == 0 || c.nthreads > 4)
            _exit(17);
        struct toucher t[4];
        struct reply r = {0, 0};
        for (uint32_t i = 0; i < c.nthreads; i++) {
            t[i] = (struct toucher){.base = base, .c = c, .index = i};
            if (pthread_create(&t[i].thread, NULL, toucher_main, &t[i]))
                _exit(18);
        }
        for (uint32_t i = 0; i < c.nthreads; i++) {
            pthread_join(t[i].thread, NULL);
            r.bad += t[i].bad;
            r.checked += t[i].checked;
        }
        bad += r.bad;
        if (write_all(sock, &r, sizeof(r)))
            _exit(19);
    }
    _exit(20); /* the parent went away */
}

/* --------------------------------------------------------------- parent side ---- */

static PostcopyStandaloneHost *host;
static int memfd;

struct client {
    const char *name;
    pid_t pid;
    int sock;
    int uffd;
    uint64_t base; /* the client's address of the block's first byte */
    RAMBlock *rb;
    int fail;               /* the handler fails every message */
    uint32_t prereceived;   /* page the handler "receives" itself before requesting */
    uint32_t watch_page;    /* page whose waker calls are counted in watch_wakes */
    atomic_int handled;     /* handler calls */
    atomic_int bad_msgs;    /* messages that were not page faults inside the client's range */
    atomic_int wakes;       /* waker calls */
    atomic_int watch_wakes; /* waker calls for watch_page */
    PostCopyFD pcfd;
};

/* The pcfdhandler: the library's fault thread read one message from the client's fd. */
static int client_handler(struct PostCopyFD *pcfd, void *ufd)
{
    struct client *c = pcfd->data;
    const struct uffd_msg *msg = ufd;
    atomic_fetch_add(&c->handled, 1);
    if (msg->event != UFFD_EVENT_PAGEFAULT) {
        atomic_fetch_add(&c->bad_msgs, 1);
        return -EINVAL;
    }
    uint64_t addr = msg->arg.pagefault.address;
    if (addr < c->base || addr >= c->base + LEN) {
        atomic_fetch_add(&c->bad_msgs, 1);
        return -EFAULT;
    }
    if (c->fail)
        return -EIO;
    uint64_t offset = addr - c->base; /* the block maps the memfd from offset 0 */
    if (offset / PAGE == c->prereceived) {
        /* The page arrives between the fault and the request, by a path that wakes
         * nobody: written straight into the page cache, marked received. */
        uint64_t buf[PAGE / 8];
        uint64_t off = offset & ~(PAGE - 1);
        fill_page(buf, 0, off / PAGE);
        if (pwrite(memfd, buf, PAGE, (off_t)off) != (ssize_t)PAGE)
            return -errno;
        postcopy_standalone_mark_received(host, c->rb, off, PAGE);
    }
    return postcopy_request_shared_page(pcfd, c->rb, addr, offset);
}

/* The pcfdwake: a page of `rb` at `offset` was placed; wake the client's waiters there. */
static int client_waker(struct PostCopyFD *pcfd, RAMBlock *rb, uint64_t offset)
{
    struct client *c = pcfd->data;
    if (rb != c->rb || offset >= LEN)
        return 0;
    atomic_fetch_add(&c->wakes, 1);
    if (offset / PAGE == c->watch_page)
        atomic_fetch_add(&c->watch_wakes, 1);
    return postcopy_wake_shared(pcfd, c->base + offset, rb);
}

static void touch(struct client *c, uint32_t nthreads, uint32_t first, uint32_t count, uint32_t hot)
{
    struct cmd cmd = {OP_TOUCH, nthreads, first, count, hot, 0};
    CHECK_EQ(write_all(c->sock, &cmd, sizeof(cmd)), 0);
}

static struct reply await_reply(struct client *c, const char *what)
{
    struct reply r = {NONE, 0};
    stage = what;
    CHECK(read_all(c->sock, &r, sizeof(r)) == 0, "%s: reply from %s", what, c->name);
    return r;
}

static void wait_handled(struct client *c, int n, const char *what)
{
    stage = what;
    while (atomic_load(&c->handled) < n)
        usleep(1000); /* bounded by alarm() */
}

static void wait_placed(struct receiver *rcv, uint64_t n, const char *what)
{
    stage = what;
    while ((uint64_t)(atomic_load(&rcv->placed) + atomic_load(&rcv->errors)) < n)
        usleep(1000); /* bounded by alarm() */
}

/* The fault thread counts a request after handing it to the host, so the page can be
 * placed (and its faulting thread resumed) before the counter moves: wait for it. */
static void wait_sent(MigrationIncomingState *mis, uint64_t n, const char *what)
{
    PostcopyIncomingStats st;
    stage = what;
    for (;;) {
        memset(&st, 0, sizeof(st));
        if (postcopy_incoming_get_stats(mis, &st) != 0 || st.requests_sent >= n)
            return;
        usleep(1000); /* bounded by alarm() */
    }
}

static int stats(MigrationIncomingState *mis, PostcopyIncomingStats *st)
{
    memset(st, 0, sizeof(*st));
    return postcopy_incoming_get_stats(mis, st);
}

int main(void)
{
    int mis_storage;
    MigrationIncomingState *mis = (MigrationIncomingState *)&mis_storage;
    struct client cl[3] = {
        {.name = "C1", .prereceived = C1_PRERECEIVED, .watch_page = NONE},
        {.name = "C2", .fail = 1, .prereceived = NONE, .watch_page = NONE},
        {.name = "C3", .prereceived = NONE, .watch_page = C3_PAGE_UNREGISTERED},
    };
    struct client *c1 = &cl[0], *c2 = &cl[1], *c3 = &cl[2];
    Error *err = NULL;

    signal(SIGALRM, on_alarm);
    alarm(120);
    setvbuf(stdout, NULL, _IOLBF, 0);

    memfd = memfd_create("guest-ram", MFD_CLOEXEC);
    CHECK(memfd >= 0, "memfd_create: %s", strerror(errno));
    CHECK_EQ(ftruncate(memfd, LEN), 0);
    uint8_t *base = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    CHECK(base != MAP_FAILED, "mmap: %s", strerror(errno));
    if (memfd < 0 || base == MAP_FAILED)
        return check_summary("shared_ufd");
    memset(base, 0xee, LEN); /* precopy garbage: init must punch it out of the memfd */

    /* The backends, forked before the library starts any thread. */
    for (int i = 0; i < 3; i++) {
        int sv[2];
        CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid == 0) {
            for (int j = 0; j < i; j++)
                close(cl[j].sock);
            close(sv[0]);
            child_main(sv[1], memfd, base, parent);
        }
        CHECK(pid > 0, "fork: %s", strerror(errno));
        close(sv[1]);
        cl[i].pid = pid;
        cl[i].sock = sv[0];
        struct hello h = {0, 0};
        stage = "receiving a backend's userfaultfd";
        cl[i].uffd = recv_fd(sv[0], &h, sizeof(h));
        CHECK(cl[i].uffd >= 0, "uffd of %s received", cl[i].name);
        CHECK_EQ(h.len, LEN);
        CHECK(h.base != (uint64_t)(uintptr_t)base, "%s maps the block elsewhere", cl[i].name);
        cl[i].base = h.base;
    }

    postcopy_infrastructure_init();
    host = postcopy_standalone_host_new(0);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    RAMBlock *rb = postcopy_standalone_add_ram_block(host, "shared.ram", base, LEN, PAGE, memfd, 0);
    CHECK(rb != NULL, "add block");
    CHECK(postcopy_ram_supported_by_host(mis, &err), "supported: %s", err ? postcopy_error_message(err) : "");

    int req[2], data[2];
    struct source src = {0};
    struct receiver rcv = {0};
    CHECK_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, req), 0);
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, data), 0);
    CHECK_EQ(postcopy_standalone_set_request_fd(host, req[0]), 0);

    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_prepare_discard(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    postcopy_state_set(POSTCOPY_INCOMING_RUNNING);

    CHECK_EQ(start_source_and_receiver(req, data, &src, &rcv, mis, host, &base, 1), 0);

    /* Registered while the fault thread runs: polled from now on. */
    for (int i = 0; i < 3; i++) {
        cl[i].rb = rb;
        cl[i].pcfd = (PostCopyFD){
            .fd = cl[i].uffd,
            .data = &cl[i],
            .handler = client_handler,
            .waker = client_waker,
            .idstr = cl[i].name,
        };
        postcopy_register_shared_ufd(&cl[i].pcfd);
    }
    CHECK_EQ(postcopy_shared_ufd_count(), 3);
    postcopy_register_shared_ufd(&c1->pcfd); /* twice: ignored */
    CHECK_EQ(postcopy_shared_ufd_count(), 3);

    /* C2 faults first and its handler fails. */
    touch(c2, 1, C2_PAGE, 1, NONE);
    wait_handled(c2, 1, "waiting for C2's handler");
    /* The library counts the failure after the handler returns. */
    PostcopyIncomingStats st;
    stage = "waiting for C2's handler error to be counted";
    while (stats(mis, &st) == 0 && st.shared_handler_errors == 0)
        usleep(1000); /* bounded by alarm() */
    CHECK_EQ(st.shared_handler_errors, 1);

    /* C1 is served all the same: 96 pages, two threads, a shared hot page, and page 50
     * received between its fault and its request. */
    touch(c1, 2, 0, C1_PAGES, C1_HOT);
    struct reply r = await_reply(c1, "waiting for C1's pages");
    CHECK_EQ(r.bad, 0);
    CHECK_EQ(r.checked, C1_PAGES + 1); /* the hot page is checked by both threads */

    /* C2's page arrives (placed by the loading thread, here main); its waker wakes C2. */
    {
        uint64_t buf[PAGE / 8];
        fill_page(buf, 0, C2_PAGE);
        if (page_is_zero(0, C2_PAGE))
            CHECK_EQ(postcopy_place_page_zero(mis, base + C2_PAGE * PAGE, rb), 0);
        else
            CHECK_EQ(postcopy_place_page(mis, base + C2_PAGE * PAGE, buf, rb), 0);
    }
    r = await_reply(c2, "waiting for C2 to be woken by its waker");
    CHECK_EQ(r.bad, 0);
    CHECK_EQ(r.checked, 1);
    CHECK_EQ(atomic_load(&c2->handled), 1);
    /* postcopy_notify_shared_wake (what placement runs) calls every registered waker. */
    {
        /* No placement (and so no waker) in flight: C1's 95 requested pages are done. */
        wait_placed(&rcv, C1_PAGES - 1, "waiting for C1's placements to return");
        int w1 = atomic_load(&c1->wakes), w2 = atomic_load(&c2->wakes), w3 = atomic_load(&c3->wakes);
        CHECK_EQ(postcopy_notify_shared_wake(rb, C2_PAGE * PAGE), 0);
        CHECK_EQ(atomic_load(&c1->wakes), w1 + 1);
        CHECK_EQ(atomic_load(&c2->wakes), w2 + 1);
        CHECK_EQ(atomic_load(&c3->wakes), w3 + 1);
    }

    /* C3: served while registered... */
    touch(c3, 1, C3_PAGE_SERVED, 1, NONE);
    r = await_reply(c3, "waiting for C3's first page");
    CHECK_EQ(r.bad, 0);
    CHECK_EQ(atomic_load(&c3->handled), 1);

    /* ...then unregistered while the fault thread runs: its next fault stays on its fd. */
    postcopy_unregister_shared_ufd(&c3->pcfd);
    CHECK_EQ(postcopy_shared_ufd_count(), 2);
    postcopy_unregister_shared_ufd(&c3->pcfd); /* twice: harmless */
    CHECK_EQ(postcopy_shared_ufd_count(), 2);
    touch(c3, 1, C3_PAGE_UNREGISTERED, 1, NONE);
    stage = "waiting for C3's fault on its own fd";
    struct pollfd pfd = {c3->uffd, POLLIN, 0};
    CHECK_EQ(poll(&pfd, 1, 60000), 1);
    struct uffd_msg msg;
    memset(&msg, 0, sizeof(msg));
    CHECK_EQ(read(c3->uffd, &msg, sizeof(msg)), (long)sizeof(msg));
    CHECK_EQ(msg.event, UFFD_EVENT_PAGEFAULT);
    uint64_t c3_addr = msg.arg.pagefault.address;
    CHECK_EQ(c3_addr & ~(PAGE - 1), c3->base + C3_PAGE_UNREGISTERED * PAGE);
    CHECK_EQ(atomic_load(&c3->handled), 1); /* the library did not read it */
    /* The parent serves it by hand: request, wait for the placement, wake. */
    uint64_t c3_off = C3_PAGE_UNREGISTERED * PAGE;
    CHECK_EQ(postcopy_request_shared_page(&c3->pcfd, rb, c3_addr, c3_off), 0);
    stage = "waiting for page 161 to be placed";
    while (postcopy_standalone_page_received(host, rb, c3_off) != 1)
        usleep(1000); /* bounded by alarm() */
    CHECK_EQ(postcopy_wake_shared(&c3->pcfd, c3_addr, rb), 0);
    r = await_reply(c3, "waiting for C3 after the explicit wake");
    CHECK_EQ(r.bad, 0);

    /* 96 C1 pages minus page 50, C3's two pages; C2's page was never requested. */
    const uint64_t shared_sent = (C1_PAGES - 1) + 2;
    wait_placed(&rcv, shared_sent, "waiting for the receiver's bookkeeping");
    wait_sent(mis, shared_sent, "waiting for the request counter");
    CHECK_EQ(stats(mis, &st), 0);
    uint64_t c1_msgs = (uint64_t)atomic_load(&c1->handled);
    CHECK(c1_msgs == C1_PAGES || c1_msgs == C1_PAGES + 1, "C1 messages %llu: one per page, the hot page maybe twice",
          (unsigned long long)c1_msgs);
    CHECK_EQ(st.shared_faults, c1_msgs + 1 /* C2 */ + 1 /* C3, while registered */);
    CHECK_EQ(st.shared_requests, c1_msgs + 1 /* C3 by its handler */ + 1 /* C3 by hand */);
    CHECK_EQ(st.shared_handler_errors, 1);
    CHECK_EQ(st.requests_sent, shared_sent);
    CHECK_EQ(atomic_load(&src.requests), (long)shared_sent);
    CHECK(st.faults_already_received >= 1, "page 50 found received: %llu", (unsigned long long)st.faults_already_received);
    CHECK_EQ(st.faults, 0); /* the parent itself has not faulted yet */
    CHECK_EQ(st.outstanding_requests, 0);
    CHECK_EQ(atomic_load(&rcv.errors), 0);
    printf("shared_ufd: C1 %llu faults, C2 1 (handler failed), C3 1 + 1 unregistered; %llu shared requests, %llu sent\n",
           (unsigned long long)c1_msgs, (unsigned long long)st.shared_requests, (unsigned long long)st.requests_sent);

    /* The parent reads all of RAM through its own mapping: the pages the backends touched
     * are there, the rest fault into the library's own userfaultfd and are fetched. */
    stage = "the parent reading every page";
    long mismatches = 0;
    for (uint64_t pg = 0; pg < NPAGES; pg++)
        mismatches += !page_matches((const uint64_t *)(base + pg * PAGE), 0, pg);
    CHECK_EQ(mismatches, 0);
    const uint64_t own = NPAGES - (C1_PAGES + 1 /* C2 */ + 2 /* C3 */);
    /* UFFDIO_COPY wakes the faulting thread before postcopy_place_page does its
     * bookkeeping: wait for the receiver to return from the last placement. */
    wait_placed(&rcv, shared_sent + own, "waiting for the receiver's last placement");
    wait_sent(mis, shared_sent + own, "waiting for the request counter");
    CHECK_EQ(stats(mis, &st), 0);
    CHECK_EQ(st.faults, own);
    CHECK_EQ(st.requests_sent, shared_sent + own);
    CHECK_EQ(st.outstanding_requests, 0);
    CHECK_EQ(atomic_load(&rcv.errors), 0);
    /* No waker ran for C3 once unregistered; the registered ones ran for every placement. */
    CHECK_EQ(atomic_load(&c3->watch_wakes), 0);
    CHECK_EQ(atomic_load(&c1->bad_msgs) + atomic_load(&c2->bad_msgs) + atomic_load(&c3->bad_msgs), 0);
    CHECK(atomic_load(&c1->wakes) >= (int)(own + C1_PAGES - 1), "C1's waker ran for each placement: %d",
          atomic_load(&c1->wakes));

    /* The backends exit 0 when every page they read was right. */
    for (int i = 0; i < 3; i++) {
        struct cmd cmd = {OP_EXIT, 0, 0, 0, 0, 0};
        CHECK_EQ(write_all(cl[i].sock, &cmd, sizeof(cmd)), 0);
        int status = -1;
        stage = "waiting for a backend to exit";
        CHECK_EQ(waitpid(cl[i].pid, &status, 0), cl[i].pid);
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "%s exit status %#x", cl[i].name, status);
    }

    /* INBOUND_END in QEMU: unregister, then close. */
    postcopy_unregister_shared_ufd(&c1->pcfd);
    postcopy_unregister_shared_ufd(&c2->pcfd);
    CHECK_EQ(postcopy_shared_ufd_count(), 0);
    for (int i = 0; i < 3; i++) {
        close(cl[i].uffd);
        close(cl[i].sock);
    }
    stage = "cleanup";
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(postcopy_incoming_get_stats(mis, &st), 0);
    CHECK_EQ(st.outstanding_requests, 0);

    stop_source_and_receiver(req, data, &src, &rcv);
    CHECK_EQ(postcopy_host_unregister(), 0);
    postcopy_standalone_host_free(host);
    munmap(base, LEN);
    close(memfd);
    alarm(0);
    return check_summary("shared_ufd");
}
