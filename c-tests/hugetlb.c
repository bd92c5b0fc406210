/* A hugetlbfs RAM block of 2 MiB pages on real userfaultfd.
 *
 * Reserves 2 MiB huge pages (as root: raises nr_hugepages, and puts the old value back at
 * exit, on failures and on fatal signals too; concurrent runs are serialised with a lock
 * file), backs a 16 MiB block with memfd_create(MFD_HUGETLB | MFD_HUGE_2MB), faults on it
 * from four threads, places whole 2 MiB pages with postcopy_place_page and zero pages with
 * postcopy_place_page_zero, and checks every byte. If huge pages cannot be had, prints
 * "SKIP: <why>" and exits 0.
 *
 * Kernel behaviour this relies on (checked here on 6.18):
 * - A hugetlbfs range registered for MISSING faults offers UFFDIO_COPY but not
 *   UFFDIO_ZEROPAGE (the range ioctls are UFFD_API_RANGE_IOCTLS_BASIC), so the library
 *   places zero pages by copying from its own zero page; the test checks the ioctl mask.
 * - Faults are reported at the faulting address; the library aligns them down to the
 *   block's 2 MiB page, so touching several offsets of one huge page yields one request.
 * - UFFDIO_COPY of a huge page must cover the whole page (dst and len 2 MiB aligned); a
 *   second copy onto a present page fails with EEXIST, which the library turns into a wake
 *   and success.
 * - fallocate(PUNCH_HOLE) on the hugetlbfs memfd (what postcopy_ram_incoming_init does to
 *   drop precopy content) frees whole huge pages back to the pool.
 */
#define _GNU_SOURCE
#include "postcopy-ram.h"
#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef MFD_HUGE_2MB
#define MFD_HUGE_2MB (21U << 26) /* log2(2 MiB) << MFD_HUGE_SHIFT */
#endif

#define HPAGE (2UL << 20)
#define NHPAGES 8UL
#define LEN (NHPAGES * HPAGE)
#define NTHREADS 4
#define TOUCHES_PER_PAGE 16

static const char *const sysfs_dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/* ------------------------------------------------ huge page reservation ---- */

/* Where the 2 MiB pool size is set: /proc/sys/vm/nr_hugepages when 2 MiB is the default
 * huge page size (it is that pool), else the per-size sysfs file. */
static char pool_path[128];
static char old_nr[32];      /* what to write back; empty: nothing to restore */
static size_t old_nr_len;
static volatile sig_atomic_t restored;

/* Async-signal-safe: open/write/close only. */
static void restore_pool(void)
{
    if (old_nr_len == 0 || restored)
        return;
    restored = 1;
    int fd = open(pool_path, O_WRONLY);
    if (fd >= 0) {
        ssize_t rc = write(fd, old_nr, old_nr_len);
        (void)rc;
        close(fd);
    }
}

static void on_fatal(int sig)
{
    static const char msg[] = "hugetlb: fatal signal or TIMEOUT; restoring nr_hugepages\n";
    ssize_t rc = write(2, msg, sizeof(msg) - 1);
    (void)rc;
    restore_pool();
    signal(sig, SIG_DFL);
    if (sig == SIGALRM)
        _exit(2);
    raise(sig);
}

static long read_long(const char *path)
{
    char buf[64] = {0};
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    return n > 0 ? strtol(buf, NULL, 10) : -1;
}

static long default_hugepage_kb(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[128];
    long kb = -1;
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "Hugepagesize: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}

static int skip(const char *why, const char *detail)
{
    restore_pool();
    printf("SKIP: %s%s%s\n", why, detail ? ": " : "", detail ? detail : "");
    return 0;
}

/* Makes sure `n` 2 MiB pages are free. Returns NULL, or why not. */
static const char *reserve(long n, char *detail, size_t dlen)
{
    char free_path[160];
    snprintf(free_path, sizeof(free_path), "%s/free_hugepages", sysfs_dir);
    if (default_hugepage_kb() == 2048)
        snprintf(pool_path, sizeof(pool_path), "/proc/sys/vm/nr_hugepages");
    else
        snprintf(pool_path, sizeof(pool_path), "%s/nr_hugepages", sysfs_dir);
    long nr = read_long(pool_path), free_now = read_long(free_path);
    if (nr < 0 || free_now < 0) {
        snprintf(detail, dlen, "cannot read %s or %s", pool_path, free_path);
        return "no 2 MiB huge page pool";
    }
    if (free_now >= n)
        return NULL;
    /* Remember the old value before touching it, so every exit path can restore it. */
    snprintf(old_nr, sizeof(old_nr), "%ld\n", nr);
    old_nr_len = strlen(old_nr);
    char want[32];
    int len = snprintf(want, sizeof(want), "%ld\n", nr + (n - free_now));
    int fd = open(pool_path, O_WRONLY);
    if (fd < 0 || write(fd, want, (size_t)len) != len) {
        snprintf(detail, dlen, "writing %s: %s (needs root)", pool_path, strerror(errno));
        if (fd >= 0)
            close(fd);
        old_nr_len = 0; /* nothing changed */
        return "cannot raise nr_hugepages";
    }
    close(fd);
    long got = read_long(free_path);
    if (got < n) {
        snprintf(detail, dlen, "%ld of %ld free after raising %s (memory fragmented?)", got, n, pool_path);
        return "the kernel could not allocate enough 2 MiB pages";
    }
    return NULL;
}

/* ------------------------------------------------------------ contents ---- */

static inline int hpage_is_zero(uint64_t hp)
{
    return hp % 3 == 1;
}
static inline uint64_t word_of(uint64_t hp, uint64_t w)
{
    return hpage_is_zero(hp) ? 0 : (0x4855474500000000ULL ^ (hp << 40) ^ w);
}
static void fill_hpage(uint64_t *dst, uint64_t hp)
{
    for (uint64_t w = 0; w < HPAGE / 8; w++)
        dst[w] = word_of(hp, w);
}

/* -------------------------------------------------- source and placer ---- */

static MigrationIncomingState *mis;
static PostcopyStandaloneHost *host;
static RAMBlock *rb;
static uint8_t *base;
static atomic_int requests[NHPAGES];
static atomic_long placed, place_errors, bad_requests;

/* Reads page requests and places what the source would send: whole 2 MiB pages. Data
 * pages alternate between a private buffer and the library's temp page (as QEMU assembles
 * huge pages in postcopy_tmp_pages before placing them). */
static void *placer_main(void *arg)
{
    int fd = *(int *)arg;
    uint64_t *buf = malloc(HPAGE);
    PostcopyPageRequest r;
    ssize_t n;
    while ((n = read(fd, &r, sizeof(r))) == (ssize_t)sizeof(r)) {
        uint64_t hp = r.offset / HPAGE;
        if (r.length != HPAGE || r.offset % HPAGE || hp >= NHPAGES || r.block_index != 0) {
            atomic_fetch_add(&bad_requests, 1);
            continue;
        }
        atomic_fetch_add(&requests[hp], 1);
        int rc;
        if (hpage_is_zero(hp)) {
            rc = postcopy_place_page_zero(mis, base + r.offset, rb);
        } else {
            uint64_t *from = buf;
            if (hp % 2) {
                from = postcopy_incoming_temp_page(mis, RAM_CHANNEL_PRECOPY);
                if (!from)
                    from = buf;
            }
            fill_hpage(from, hp);
            rc = postcopy_place_page(mis, base + r.offset, from, rb);
        }
        if (rc)
            atomic_fetch_add(&place_errors, 1);
        else
            atomic_fetch_add(&placed, 1);
    }
    free(buf);
    return NULL;
}

/* ------------------------------------------------------------- vCPUs ---- */

struct vcpu {
    int index;
    long bad;
    pthread_t thread;
};
static atomic_int go;

/* Every vCPU starts on huge page 0 (at its own offsets), so page 0 is faulted by several
 * threads at once (one request); then vCPU i touches huge pages i and i + 4. */
static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    uint64_t seed = 0x2545f4914f6cdd1dULL * (uint64_t)(v->index + 1);
    while (!atomic_load(&go))
        ;
    uint64_t pages[3] = {0, (uint64_t)v->index, (uint64_t)v->index + 4};
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < TOUCHES_PER_PAGE; i++) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            uint64_t w = seed % (HPAGE / 8);
            volatile uint64_t *p = (volatile uint64_t *)(base + pages[k] * HPAGE);
            uint64_t val = p[w];
            v->bad += val != word_of(pages[k], w);
            p[w] = val;
        }
    }
    return NULL;
}

static int stats(PostcopyIncomingStats *st)
{
    memset(st, 0, sizeof(*st));
    return postcopy_incoming_get_stats(mis, st);
}

/* --------------------------------------------------------------- main ---- */

int main(void)
{
    int mis_storage;
    char detail[512] = "";
    Error *err = NULL;
    mis = (MigrationIncomingState *)&mis_storage;
    setvbuf(stdout, NULL, _IOLBF, 0);

    int sigs[] = {SIGALRM, SIGSEGV, SIGBUS, SIGABRT, SIGTERM, SIGINT, SIGHUP, SIGQUIT};
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        signal(sigs[i], on_fatal);
    atexit(restore_pool);
    alarm(120);

    /* Concurrent runs (several cargo test processes) would save and restore each other's
     * pool sizes: one at a time. */
    int lock = open("/tmp/postcopy-ram-hugetlb.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lock >= 0 && flock(lock, LOCK_EX) != 0) {
        close(lock);
        lock = -1;
    }

    const char *why = reserve((long)NHPAGES, detail, sizeof(detail));
    if (why)
        return skip(why, detail);
    int memfd = memfd_create("hugetlb-ram", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
    if (memfd < 0)
        return skip("memfd_create(MFD_HUGETLB | MFD_HUGE_2MB) failed", strerror(errno));
    if (ftruncate(memfd, LEN) != 0)
        return skip("ftruncate of the hugetlbfs memfd failed", strerror(errno));
    base = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, memfd, 0);
    if (base == MAP_FAILED)
        return skip("mmap of 8 huge pages failed", strerror(errno));
    CHECK_EQ((uintptr_t)base % HPAGE, 0);
    memset(base, 0xee, LEN); /* precopy garbage that init must discard */

    /* The kernel offers no UFFDIO_ZEROPAGE on hugetlbfs. */
    {
        int u = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        CHECK(u >= 0, "userfaultfd: %s", strerror(errno));
        struct uffdio_api api = {.api = UFFD_API, .features = 0};
        CHECK_EQ(ioctl(u, UFFDIO_API, &api), 0);
        CHECK(api.features & UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS offered");
        struct uffdio_register reg = {.range = {(uint64_t)(uintptr_t)base, LEN}, .mode = UFFDIO_REGISTER_MODE_MISSING};
        CHECK_EQ(ioctl(u, UFFDIO_REGISTER, &reg), 0);
        CHECK(reg.ioctls & (1ULL << _UFFDIO_COPY), "COPY offered on hugetlbfs");
        CHECK(!(reg.ioctls & (1ULL << _UFFDIO_ZEROPAGE)), "no ZEROPAGE on hugetlbfs (ioctls %#llx)",
              (unsigned long long)reg.ioctls);
        struct uffdio_range range = {(uint64_t)(uintptr_t)base, LEN};
        CHECK_EQ(ioctl(u, UFFDIO_UNREGISTER, &range), 0);
        close(u);
    }

    postcopy_infrastructure_init();
    host = postcopy_standalone_host_new(0);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    rb = postcopy_standalone_add_ram_block(host, "hugetlb.ram", base, LEN, HPAGE, memfd, 0);
    CHECK(rb != NULL, "add a 2 MiB-page block");
    CHECK(postcopy_ram_supported_by_host(mis, &err), "supported: %s", err ? postcopy_error_message(err) : "");

    int req[2];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, req), 0);
    CHECK_EQ(postcopy_standalone_set_request_fd(host, req[0]), 0);
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_prepare_discard(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);
    postcopy_state_set(POSTCOPY_INCOMING_RUNNING);
    /* init punched the garbage out of the file: the pages went back to the pool. */
    CHECK_EQ(postcopy_standalone_page_received(host, rb, 0), 0);

    pthread_t placer;
    CHECK_EQ(pthread_create(&placer, NULL, placer_main, &req[1]), 0);
    struct vcpu v[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        v[i] = (struct vcpu){.index = i};
        CHECK_EQ(pthread_create(&v[i].thread, NULL, vcpu_main, &v[i]), 0);
    }
    atomic_store(&go, 1);
    long bad = 0;
    for (int i = 0; i < NTHREADS; i++) {
        pthread_join(v[i].thread, NULL);
        bad += v[i].bad;
    }
    CHECK_EQ(bad, 0);

    /* UFFDIO_COPY wakes the faulting threads before postcopy_place_page's bookkeeping, and
     * the fault thread counts a request after handing it over: wait for both to settle. */
    PostcopyIncomingStats st;
    while (atomic_load(&placed) + atomic_load(&place_errors) < (long)NHPAGES)
        usleep(1000); /* bounded by alarm() */
    while (stats(&st) == 0 && st.requests_sent < NHPAGES)
        usleep(1000); /* bounded by alarm() */
    CHECK_EQ(stats(&st), 0);
    CHECK_EQ(atomic_load(&place_errors), 0);
    CHECK_EQ(atomic_load(&bad_requests), 0);
    for (uint64_t hp = 0; hp < NHPAGES; hp++)
        CHECK(atomic_load(&requests[hp]) == 1, "huge page %llu requested %d times", (unsigned long long)hp,
              atomic_load(&requests[hp]));
    CHECK_EQ(st.requests_sent, NHPAGES);
    CHECK_EQ(st.pages_placed, NHPAGES - 3);
    CHECK_EQ(st.zero_pages_placed, 3); /* pages 1, 4, 7: copied from the library's zero page */
    CHECK_EQ(st.outstanding_requests, 0);
    CHECK(st.faults >= NHPAGES, "faults %llu", (unsigned long long)st.faults);
    CHECK_EQ(st.faults_outside_ram, 0);
    /* Every fault was sent, a duplicate of one sent, or found already placed. */
    CHECK_EQ(st.faults, st.requests_sent + st.duplicate_faults + st.faults_already_received);

    /* Every byte of every huge page. */
    long mismatches = 0;
    for (uint64_t hp = 0; hp < NHPAGES; hp++) {
        const uint64_t *p = (const uint64_t *)(base + hp * HPAGE);
        for (uint64_t w = 0; w < HPAGE / 8; w++)
            mismatches += p[w] != word_of(hp, w);
    }
    CHECK_EQ(mismatches, 0);
    for (uint64_t hp = 0; hp < NHPAGES; hp++)
        CHECK_EQ(postcopy_standalone_page_received(host, rb, hp * HPAGE), 1);

    /* Placing a present huge page again succeeds (EEXIST) and changes nothing. */
    uint64_t *buf = malloc(HPAGE);
    memset(buf, 0x77, HPAGE);
    CHECK_EQ(postcopy_place_page(mis, base, buf, rb), 0);
    CHECK_EQ(postcopy_place_page_zero(mis, base + 2 * HPAGE, rb), 0);
    CHECK_EQ(stats(&st), 0);
    CHECK_EQ(st.placed_already_present, 2);
    CHECK_EQ(((volatile uint64_t *)base)[5], word_of(0, 5));
    CHECK_EQ(((volatile uint64_t *)(base + 2 * HPAGE))[7], word_of(2, 7));
    /* Only whole huge pages: an address inside one is misaligned. */
    CHECK_EQ(postcopy_place_page(mis, base + 4096, buf, rb), -EINVAL);
    CHECK_EQ(postcopy_place_page_zero(mis, base + HPAGE / 2, rb), -EINVAL);
    CHECK_EQ(postcopy_place_page(mis, base + LEN, buf, rb), -EFAULT);
    free(buf);

    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    shutdown(req[0], SHUT_RDWR);
    pthread_join(placer, NULL);
    close(req[0]);
    close(req[1]);
    CHECK_EQ(postcopy_host_unregister(), 0);
    postcopy_standalone_host_free(host);
    munmap(base, LEN);
    close(memfd);
    restore_pool();
    if (lock >= 0)
        close(lock);
    alarm(0);
    printf("hugetlb: %lu huge pages of 2 MiB faulted by %d threads, %llu faults (%llu duplicates), %lu requests, "
           "3 zero pages\n",
           NHPAGES, NTHREADS, (unsigned long long)st.faults, (unsigned long long)st.duplicate_faults, NHPAGES);
    return check_summary("hugetlb");
}
