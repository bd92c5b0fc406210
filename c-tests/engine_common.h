/* Shared pieces of the destination-engine harnesses: deterministic guest RAM, a source
 * thread answering page requests over a socketpair, a receiver placing what it sends. */
#ifndef POSTCOPY_TEST_ENGINE_COMMON_H
#define POSTCOPY_TEST_ENGINE_COMMON_H
#include "postcopy-ram.h"
#include "check.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#define PAGE 4096UL

/* The source's content of page `page` of block `block`: zero for every 7th page, else a
 * pattern that names the block, the page and the word. */
static inline int page_is_zero(unsigned block, uint64_t page)
{
    (void)block;
    return page % 7 == 3;
}
static inline uint64_t page_word(unsigned block, uint64_t page, unsigned word)
{
    return ((uint64_t)(block + 1) << 56) ^ (page << 12) ^ word ^ 0x5a5a0000u;
}
static inline void fill_page(uint64_t *dst, unsigned block, uint64_t page)
{
    for (unsigned w = 0; w < PAGE / 8; w++)
        dst[w] = page_is_zero(block, page) ? 0 : page_word(block, page, w);
}
static inline int page_matches(const uint64_t *p, unsigned block, uint64_t page)
{
    for (unsigned w = 0; w < PAGE / 8; w++)
        if (p[w] != (page_is_zero(block, page) ? 0 : page_word(block, page, w)))
            return 0;
    return 1;
}

/* What the source sends for one page: header, then PAGE bytes unless zero. */
struct page_msg {
    uint32_t block;
    uint32_t zero;
    uint64_t offset;
};

struct source {
    int req_fd;  /* reads PostcopyPageRequest records */
    int data_fd; /* writes page messages */
    atomic_long requests;
    pthread_t thread;
};

static inline int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= n;
    }
    return 0;
}
static inline int read_all(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= n;
    }
    return 0;
}

static inline int send_page(int fd, unsigned block, uint64_t offset)
{
    uint64_t buf[PAGE / 8];
    struct page_msg m = {block, (uint32_t)page_is_zero(block, offset / PAGE), offset};
    if (write_all(fd, &m, sizeof(m)))
        return -1;
    if (m.zero)
        return 0;
    fill_page(buf, block, offset / PAGE);
    return write_all(fd, buf, PAGE);
}

static inline void *source_main(void *arg)
{
    struct source *s = arg;
    PostcopyPageRequest r;
    while (read_all(s->req_fd, &r, sizeof(r)) == 0) {
        atomic_fetch_add(&s->requests, 1);
        if (send_page(s->data_fd, r.block_index, r.offset))
            break;
    }
    return NULL;
}

struct receiver {
    MigrationIncomingState *mis;
    PostcopyStandaloneHost *host;
    int data_fd;
    uint8_t *bases[8];
    atomic_long placed, errors;
    pthread_t thread;
};

static inline void *receiver_main(void *arg)
{
    struct receiver *r = arg;
    static __thread uint64_t buf[PAGE / 8];
    struct page_msg m;
    while (read_all(r->data_fd, &m, sizeof(m)) == 0) {
        RAMBlock *rb = postcopy_standalone_block_at(r->host, m.block);
        int rc;
        if (m.zero) {
            rc = postcopy_place_page_zero(r->mis, r->bases[m.block] + m.offset, rb);
        } else {
            if (read_all(r->data_fd, buf, PAGE))
                break;
            rc = postcopy_place_page(r->mis, r->bases[m.block] + m.offset, buf, rb);
        }
        if (rc)
            atomic_fetch_add(&r->errors, 1);
        else
            atomic_fetch_add(&r->placed, 1);
    }
    return NULL;
}

/* Starts a source/receiver pair: the source answers requests read from req[1] with pages
 * written to data[0]; the receiver places what it reads from data[1] into the `nbases`
 * blocks at `bases`. Returns 0, or pthread_create's error. */
static inline int start_source_and_receiver(int req[2], int data[2], struct source *src, struct receiver *rcv,
                                            MigrationIncomingState *mis, PostcopyStandaloneHost *host,
                                            uint8_t *const *bases, int nbases)
{
    src->req_fd = req[1];
    src->data_fd = data[0];
    rcv->mis = mis;
    rcv->host = host;
    rcv->data_fd = data[1];
    for (int b = 0; b < nbases; b++)
        rcv->bases[b] = bases[b];
    int rc = pthread_create(&src->thread, NULL, source_main, src);
    return rc ? rc : pthread_create(&rcv->thread, NULL, receiver_main, rcv);
}

/* Ends a source/receiver pair: shutting the request and data sockets ends both loops;
 * then both threads are joined and all four socket ends closed. */
static inline void stop_source_and_receiver(int req[2], int data[2], struct source *src, struct receiver *rcv)
{
    shutdown(req[0], SHUT_RDWR);
    shutdown(data[1], SHUT_RDWR);
    pthread_join(src->thread, NULL);
    pthread_join(rcv->thread, NULL);
    close(req[0]);
    close(req[1]);
    close(data[0]);
    close(data[1]);
}

static inline int count_dir(const char *path)
{
    int n = 0;
    DIR *d = opendir(path);
    if (!d)
        return -1;
    while (readdir(d))
        n++;
    closedir(d);
    return n - 2;
}
static inline int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    int n = 0, c;
    if (!f)
        return -1;
    while ((c = fgetc(f)) != EOF)
        n += c == '\n';
    fclose(f);
    return n;
}
#endif
