/* The bench's sink in C: the same HTTP/1.1 keep-alive server as bench/sink.py,
 * at a fraction of its CPU per request.
 *
 *     cc -O2 -o sink bench/sink.c && ./sink --port-file F [--port P]
 *
 * Why C: in the scale-out figure the processors, the broker and the sink share
 * the machine's cores, so every microsecond the sink spends on a request is one
 * the processors do not get; the Python sink (uvloop) spends ~15 µs a request
 * when requests arrive one by one. bench/harness.py builds this file when a C
 * compiler is there and falls back to bench/sink.py otherwise.
 *
 * Behaviour (kept equal to bench/sink.py, which tests/test_bench_sink.py checks on
 * both): every request is answered "200 OK" with an empty body; a request whose
 * body holds "t":<epoch ms> adds receive ms - t to the latency samples. Control
 * requests (GET): /_stats -> "count first_ms last_ms", /_lat -> the samples as a
 * JSON array of ms, /_reset -> forget counts and samples. One thread, epoll,
 * level-triggered; loopback only. SIGINT or SIGTERM ends it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK 65536

static const char OK[] = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

typedef struct {
    char *data;
    size_t len, cap;
} buf_t;

typedef struct {
    int fd;
    buf_t in, out;
} conn_t;

static long count;
static double first_ms, last_ms;
static double *lat;
static size_t lat_len, lat_cap;
static volatile sig_atomic_t stopping;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void reserve(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data) die("realloc");
    b->cap = cap;
}

static void append(buf_t *b, const char *s, size_t n) {
    reserve(b, n);
    memcpy(b->data + b->len, s, n);
    b->len += n;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

/* The value of the Content-Length header in head[0, n), 0 when absent. */
static long content_length(const char *head, size_t n) {
    static const char name[] = "\r\ncontent-length:";
    size_t k = sizeof name - 1;
    for (size_t i = 0; i + k <= n; i++) {
        if (head[i] == '\r' && strncasecmp(head + i, name, k) == 0) {
            const char *p = head + i + k;
            while (*p == ' ' || *p == '\t') p++;
            return strtol(p, NULL, 10);
        }
    }
    return 0;
}

/* Adds a latency sample if body[0, n) holds "t":<number>. */
static void stamp(const char *body, size_t n, double at_ms) {
    const char *p = memmem(body, n, "\"t\":", 4);
    if (!p) return;
    p += 4;
    const char *end = body + n;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    if (p >= end || !(*p == '-' || (*p >= '0' && *p <= '9'))) return;
    char number[64];
    size_t m = 0;
    while (p + m < end && m < sizeof number - 1 &&
           (p[m] == '-' || p[m] == '.' || (p[m] >= '0' && p[m] <= '9')))
        m++;
    memcpy(number, p, m);
    number[m] = 0;
    if (lat_len == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 65536;
        lat = realloc(lat, lat_cap * sizeof *lat);
        if (!lat) die("realloc");
    }
    lat[lat_len++] = at_ms - strtod(number, NULL);
}

static void control(const char *path, size_t n, buf_t *out) {
    buf_t body = {0};
    char text[128];
    if (n >= 7 && memcmp(path, "/_stats", 7) == 0) {
        int k = snprintf(text, sizeof text, "%ld %.3f %.3f", count, first_ms, last_ms);
        append(&body, text, (size_t)k);
    } else if (n >= 5 && memcmp(path, "/_lat", 5) == 0) {
        append(&body, "[", 1);
        for (size_t i = 0; i < lat_len; i++) {
            int k = snprintf(text, sizeof text, i ? ",%.3f" : "%.3f", lat[i]);
            append(&body, text, (size_t)k);
        }
        append(&body, "]", 1);
    } else if (n >= 7 && memcmp(path, "/_reset", 7) == 0) {
        count = 0;
        first_ms = last_ms = 0.0;
        lat_len = 0;
        append(&body, "ok", 2);
    }
    int k = snprintf(text, sizeof text, "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n\r\n", body.len);
    append(out, text, (size_t)k);
    if (body.len) append(out, body.data, body.len);
    free(body.data);
}

/* Answers every complete request in c->in; keeps the incomplete rest. */
static void parse(conn_t *c) {
    size_t pos = 0;
    for (;;) {
        char *start = c->in.data + pos;
        size_t avail = c->in.len - pos;
        char *end = memmem(start, avail, "\r\n\r\n", 4);
        if (!end) break;
        size_t head = (size_t)(end - start);
        long length = content_length(start, head + 2);
        if (length < 0) length = 0;
        size_t total = head + 4 + (size_t)length;
        if (avail < total) break;
        double at = now_ms();
        if (avail > 6 && memcmp(start, "GET /_", 6) == 0) {
            char *space = memchr(start + 4, ' ', head - 4);
            control(start + 4, space ? (size_t)(space - start - 4) : head - 4, &c->out);
        } else {
            count++;
            if (first_ms == 0.0) first_ms = at;
            last_ms = at;
            if (length) stamp(start + head + 4, (size_t)length, at);
            append(&c->out, OK, sizeof OK - 1);
        }
        pos += total;
    }
    if (pos) {
        memmove(c->in.data, c->in.data + pos, c->in.len - pos);
        c->in.len -= pos;
    }
}

static int flush_out(conn_t *c) {
    size_t done = 0;
    while (done < c->out.len) {
        ssize_t k = write(c->fd, c->out.data + done, c->out.len - done);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) break;
            return -1;
        }
        done += (size_t)k;
    }
    memmove(c->out.data, c->out.data + done, c->out.len - done);
    c->out.len -= done;
    return 0;
}

static void drop(int ep, conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in.data);
    free(c->out.data);
    free(c);
}

static void on_stop(int sig) {
    (void)sig;
    stopping = 1;
}

int main(int argc, char **argv) {
    int port = 0;
    const char *port_file = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--port") == 0) port = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--port-file") == 0) port_file = argv[i + 1];
        else {
            fprintf(stderr, "usage: %s [--port P] [--port-file F]\n", argv[0]);
            return 2;
        }
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_stop;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    /* A deep accept queue: the capacity test opens many connections at once. */
    if (listen(lfd, 1024) < 0) die("listen");
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    if (port_file) {
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.tmp", port_file);
        FILE *f = fopen(tmp, "w");
        if (!f) die("port file");
        fprintf(f, "%d", ntohs(addr.sin_port));
        fclose(f);
        if (rename(tmp, port_file) < 0) die("rename");
    }

    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(ep, events, 256, 1000);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    if (!c) die("calloc");
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
                continue;
            }
            if (events[i].events & EPOLLOUT) {
                if (flush_out(c) < 0) {
                    drop(ep, c);
                    continue;
                }
            }
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                reserve(&c->in, READ_CHUNK);
                ssize_t k = read(c->fd, c->in.data + c->in.len, READ_CHUNK);
                if (k == 0 || (k < 0 && errno != EAGAIN && errno != EINTR)) {
                    drop(ep, c);
                    continue;
                }
                if (k > 0) {
                    c->in.len += (size_t)k;
                    parse(c);
                    if (flush_out(c) < 0) {
                        drop(ep, c);
                        continue;
                    }
                }
            }
            /* Wait for the socket to drain only while answers are queued. */
            struct epoll_event cev = {.events = EPOLLIN | (c->out.len ? EPOLLOUT : 0), .data.ptr = c};
            if (c->out.len || (events[i].events & EPOLLOUT))
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &cev);
        }
    }
    return 0;
}
