/* postcopy_place_pages: runs of contiguous pages placed with one call, on real userfaultfd.
 *
 * - Two vCPU threads (registered for blocktime) fault on two pages inside a run; placing
 *   the run wakes both, drops both requests and resolves both faults' blocktime.
 * - A run over a page already present: the present page keeps its content, is woken and
 *   counted (placed_already_present), and the pages after it are still placed.
 * - A source that becomes unreadable part-way: -EFAULT, the pages before the failure are
 *   placed and marked received, the rest are not.
 * - Bad input: NULL arguments, misalignment, runs past the block's end (nothing placed),
 *   an npages whose byte size overflows, an unknown block, 0 pages, before setup and after
 *   cleanup. */
#include "engine_common.h"

#include <sys/syscall.h>

#define NPAGES 64UL
#define LEN (NPAGES * PAGE)

static uint8_t *base;
static MigrationIncomingState *mis;
static PostcopyStandaloneHost *host;
static RAMBlock *rb;
static atomic_int requests, bad_requests;

/* On the fault thread: only counts (CHECK is for the main thread). */
static int on_request(void *opaque, RAMBlock *r, const char *idstr, const PostcopyPageRequest *req)
{
    (void)opaque;
    (void)idstr;
    if (r != rb || req->length != PAGE)
        atomic_fetch_add(&bad_requests, 1);
    atomic_fetch_add(&requests, 1);
    return 0; /* the main thread places it */
}

struct vcpu {
    uint64_t page;
    uint32_t tid;
    uint8_t seen;
    atomic_int go;
    pthread_t thread;
};

static void *vcpu_main(void *arg)
{
    struct vcpu *v = arg;
    __atomic_store_n(&v->tid, (uint32_t)syscall(SYS_gettid), __ATOMIC_RELEASE);
    while (!atomic_load(&v->go))
        usleep(100);
    v->seen = *(volatile uint8_t *)(base + v->page * PAGE + 7); /* blocks until placed */
    return NULL;
}

static int received(uint64_t page)
{
    return postcopy_standalone_page_received(host, rb, page * PAGE);
}

static PostcopyIncomingStats stats(void)
{
    PostcopyIncomingStats st;
    CHECK_EQ(postcopy_incoming_get_stats(mis, &st), 0);
    return st;
}

/* `n` pages of source data, page i filled with byte `fill + i`. */
static uint8_t *source(unsigned n, uint8_t fill)
{
    uint8_t *s = malloc(n * PAGE);
    for (unsigned i = 0; i < n; i++)
        memset(s + i * PAGE, fill + i, PAGE);
    return s;
}

static void wakes_faulting_threads(void)
{
    struct vcpu v[2] = {{.page = 3}, {.page = 9}};
    for (int i = 0; i < 2; i++)
        pthread_create(&v[i].thread, NULL, vcpu_main, &v[i]);
    for (int i = 0; i < 2; i++) {
        while (!__atomic_load_n(&v[i].tid, __ATOMIC_ACQUIRE))
            usleep(100);
        CHECK_EQ(postcopy_standalone_add_vcpu(host, i, v[i].tid), 0);
    }
    CHECK_EQ(postcopy_standalone_set_capabilities(host, true, false), 0);
    CHECK_EQ(postcopy_ram_incoming_init(mis), 0);
    CHECK_EQ(postcopy_ram_prepare_discard(mis), 0);
    CHECK_EQ(postcopy_ram_incoming_setup(mis), 0);

    for (int i = 0; i < 2; i++)
        atomic_store(&v[i].go, 1);
    for (int i = 0; i < 5000 && stats().outstanding_requests < 2; i++)
        usleep(1000);
    CHECK_EQ(stats().outstanding_requests, 2);
    CHECK_EQ(atomic_load(&requests), 2);
    CHECK_EQ(atomic_load(&bad_requests), 0);

    /* Pages 0..15 in one call: both threads resume. */
    uint8_t *src = source(16, 0x10);
    CHECK_EQ(postcopy_place_pages(mis, base, src, 16, rb), 0);
    for (int i = 0; i < 2; i++)
        pthread_join(v[i].thread, NULL);
    CHECK_EQ(v[0].seen, 0x10 + 3);
    CHECK_EQ(v[1].seen, 0x10 + 9);
    int all = 1;
    for (uint64_t p = 0; p < 16; p++)
        all &= received(p) == 1 && base[p * PAGE] == 0x10 + p && base[p * PAGE + PAGE - 1] == 0x10 + p;
    CHECK(all, "every page of the run placed, received and filled");
    CHECK_EQ(received(16), 0);

    PostcopyIncomingStats st = stats();
    CHECK_EQ(st.outstanding_requests, 0);
    CHECK_EQ(st.pages_placed, 16);
    CHECK_EQ(st.placed_already_present, 0);

    PostcopyBlocktimeInfo bt;
    uint64_t faults[2];
    CHECK_EQ(postcopy_blocktime_query(mis, &bt, NULL, NULL, faults, NULL, 2), 2);
    CHECK_EQ(bt.faults, 2);
    CHECK_EQ(bt.resolved_faults, 2);
    CHECK_EQ(bt.outstanding_faults, 0);
    CHECK_EQ(faults[0], 1);
    CHECK_EQ(faults[1], 1);
    free(src);
}

static void skips_present_pages(void)
{
    /* Page 20 alone first, then 16..31 as one run. */
    uint8_t *one = source(1, 0xa0);
    uint8_t *src = source(16, 0x40);
    CHECK_EQ(postcopy_place_page(mis, base + 20 * PAGE, one, rb), 0);
    PostcopyIncomingStats before = stats();
    CHECK_EQ(postcopy_place_pages(mis, base + 16 * PAGE, src, 16, rb), 0);
    PostcopyIncomingStats after = stats();
    CHECK_EQ(after.placed_already_present - before.placed_already_present, 1);
    CHECK_EQ(after.pages_placed - before.pages_placed, 16);
    CHECK_EQ(base[20 * PAGE], 0xa0); /* kept */
    int all = 1;
    for (uint64_t p = 16; p < 32; p++)
        all &= received(p) == 1 && (p == 20 || base[p * PAGE + 5] == 0x40 + (p - 16));
    CHECK(all, "the pages around the present one placed");

    /* A run that is entirely present: success, every page counted as present. */
    before = stats();
    CHECK_EQ(postcopy_place_pages(mis, base + 16 * PAGE, src, 16, rb), 0);
    after = stats();
    CHECK_EQ(after.placed_already_present - before.placed_already_present, 16);
    CHECK_EQ(base[17 * PAGE], 0x41);
    free(one);
    free(src);
}

static void stops_at_an_unreadable_source(void)
{
    /* Four source pages, the last two PROT_NONE. */
    uint8_t *src = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(src != MAP_FAILED, "mmap");
    memset(src, 0x77, 2 * PAGE);
    CHECK_EQ(mprotect(src + 2 * PAGE, 2 * PAGE, PROT_NONE), 0);
    PostcopyIncomingStats before = stats();
    CHECK_EQ(postcopy_place_pages(mis, base + 40 * PAGE, src, 4, rb), -EFAULT);
    PostcopyIncomingStats after = stats();
    CHECK_EQ(after.pages_placed - before.pages_placed, 2);
    CHECK_EQ(received(40), 1);
    CHECK_EQ(received(41), 1);
    CHECK_EQ(received(42), 0);
    CHECK_EQ(received(43), 0);
    CHECK_EQ(base[41 * PAGE + 100], 0x77);
    munmap(src, 4 * PAGE);
}

static void refuses_bad_input(void)
{
    uint8_t *src = source(8, 0x20);
    PostcopyIncomingStats before = stats();
    CHECK_EQ(postcopy_place_pages(NULL, base + 48 * PAGE, src, 1, rb), -EINVAL);
    CHECK_EQ(postcopy_place_pages(mis, base + 48 * PAGE, src, 1, NULL), -EINVAL);
    CHECK_EQ(postcopy_place_pages(mis, base + 48 * PAGE, NULL, 1, rb), -EINVAL);
    CHECK_EQ(postcopy_place_pages(mis, base + 48 * PAGE + 8, src, 1, rb), -EINVAL);   /* misaligned */
    CHECK_EQ(postcopy_place_pages(mis, base + 60 * PAGE, src, 8, rb), -EFAULT);       /* past the end */
    CHECK_EQ(postcopy_place_pages(mis, base + 48 * PAGE, src, UINT64_MAX, rb), -EFAULT); /* overflow */
    CHECK_EQ(postcopy_place_pages(mis, base + LEN, src, 1, rb), -EFAULT);             /* outside */
    CHECK_EQ(postcopy_place_pages(mis, base + 48 * PAGE, src, 1, (RAMBlock *)src), -EFAULT); /* unknown */
    CHECK_EQ(postcopy_place_pages(mis, base + 48 * PAGE, src, 0, rb), 0);             /* nothing */
    CHECK_EQ(received(60), 0);
    CHECK_EQ(received(48), 0);
    CHECK_EQ(stats().pages_placed, before.pages_placed);
    /* The last page of the block, exactly. */
    CHECK_EQ(postcopy_place_pages(mis, base + 56 * PAGE, src, 8, rb), 0);
    CHECK_EQ(received(63), 1);
    CHECK_EQ(base[63 * PAGE], 0x27);
    free(src);
}

int main(void)
{
    int mis_storage;
    mis = (MigrationIncomingState *)&mis_storage;
    postcopy_infrastructure_init();
    host = postcopy_standalone_host_new(0);
    CHECK_EQ(postcopy_standalone_host_install(host), 0);
    CHECK_EQ(postcopy_standalone_set_request_callback(host, on_request, NULL), 0);
    base = mmap(NULL, LEN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(base != MAP_FAILED, "mmap");
    rb = postcopy_standalone_add_ram_block(host, "pc.ram", base, LEN, PAGE, -1, 0);
    CHECK(rb != NULL, "block");

    uint8_t page[PAGE] = {0};
    CHECK_EQ(postcopy_place_pages(mis, base, page, 1, rb), -ENODEV); /* before setup */

    wakes_faulting_threads();
    skips_present_pages();
    stops_at_an_unreadable_source();
    refuses_bad_input();

    CHECK_EQ(postcopy_ram_incoming_cleanup(mis), 0);
    CHECK_EQ(postcopy_place_pages(mis, base, page, 1, rb), -ENODEV); /* after cleanup */
    CHECK_EQ(postcopy_host_unregister(), 0);
    postcopy_standalone_host_free(host);
    munmap(base, LEN);
    printf("place_pages: runs placed, present pages skipped, partial failure accounted\n");
    return check_summary("place_pages");
}
