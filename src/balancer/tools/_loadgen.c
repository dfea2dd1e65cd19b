/* The load client's compiled engine: closed-loop line requests over many connections
 * from one thread with epoll, so the client is never what limits a benchmark.
 *
 * Each connection keeps `pipeline` requests in flight and sends a new one as each reply
 * arrives (refilled per reply, not in bursts). A request is a decimal counter, zero-padded
 * to `size` digits; the expected reply is `prefix` + the same digits. Every request ends
 * as ok or as exactly one error kind, as in the Python engine (balancer.tools.client.load):
 * wrong_reply, server_not_available, timeout, connection_error, error_reply.
 *
 * The GIL is released for the whole run. Latencies go into a log-linear histogram
 * (1/128 relative resolution) whose percentiles are returned in microseconds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_CHUNK 65536
#define MAX_REPLY_LINE (1 << 20)
#define SUB_BITS 7
#define SUB_COUNT (1 << SUB_BITS)
#define HIST_BUCKETS (64 * SUB_COUNT)

enum { K_WRONG, K_NOT_AVAILABLE, K_TIMEOUT, K_CONNECTION, K_ERROR_REPLY, K_COUNT };
static const char *KIND_NAMES[K_COUNT] = {"wrong_reply", "server_not_available", "timeout",
                                          "connection_error", "error_reply"};

typedef struct {
    uint64_t counts[HIST_BUCKETS];
    uint64_t total;
    uint64_t max_ns;
} hist_t;

static int hist_index(uint64_t v) {
    if (v < SUB_COUNT) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - SUB_BITS;
    int sub = (int)((v >> shift) & (SUB_COUNT - 1));
    return (shift + 1) * SUB_COUNT + sub;
}

static uint64_t hist_value(int index) { /* the upper end of a bucket */
    if (index < SUB_COUNT) return (uint64_t)index;
    int shift = index / SUB_COUNT - 1;
    uint64_t sub = (uint64_t)(index % SUB_COUNT);
    return ((SUB_COUNT | sub) << shift) + ((1ULL << shift) - 1);
}

static void hist_record(hist_t *h, uint64_t ns) {
    h->counts[hist_index(ns)]++;
    h->total++;
    if (ns > h->max_ns) h->max_ns = ns;
}

static double hist_percentile_us(const hist_t *h, double pct) {
    if (h->total == 0) return 0.0;
    uint64_t want = (uint64_t)((pct / 100.0) * (double)h->total + 0.5);
    if (want < 1) want = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= want) {
            uint64_t v = hist_value(i);
            if (v > h->max_ns) v = h->max_ns;
            return (double)v / 1000.0;
        }
    }
    return (double)h->max_ns / 1000.0;
}

typedef struct {
    int fd;
    int connecting;
    int want_out;
    uint64_t *sent_ns;  /* ring of send times, `pipeline` slots */
    uint64_t *numbers;  /* ring of request counters */
    int head, count;    /* outstanding requests in the rings */
    char *rbuf;
    size_t rlen, rcap;
    char *wbuf;
    size_t wlen, wcap, woff;
    uint64_t next_number;
    long long remaining; /* requests not yet sent; -1: bounded by time */
    int failures_in_row;
    uint64_t retry_at;
    uint64_t replies;
    int addr_index; /* the address this connect attempt uses */
    int done;
} conn_t;

#define MAX_ADDRS 8

typedef struct {
    struct sockaddr_storage addrs[MAX_ADDRS]; /* what the host resolved to, tried in order */
    socklen_t addrlens[MAX_ADDRS];
    int naddrs;
    int pipeline;
    int size;
    const char *prefix;
    size_t prefix_len;
    uint64_t deadline;
    uint64_t timeout_ns;
    int epfd;
    uint64_t requests, ok;
    uint64_t errors[K_COUNT];
    hist_t *hist;
    char err[256];
} run_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int wbuf_reserve(conn_t *c, size_t more) {
    if (c->wlen + more <= c->wcap) return 0;
    size_t cap = c->wcap ? c->wcap : 4096;
    while (cap < c->wlen + more) cap *= 2;
    char *p = realloc(c->wbuf, cap);
    if (!p) return -1;
    c->wbuf = p;
    c->wcap = cap;
    return 0;
}

static void update_events(run_t *r, conn_t *c, int want_out) {
    if (c->fd < 0 || want_out == c->want_out) return;
    struct epoll_event ev = {.events = EPOLLIN | (want_out ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(r->epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

static void close_conn(run_t *r, conn_t *c, int kind) {
    if (c->fd >= 0) {
        epoll_ctl(r->epfd, EPOLL_CTL_DEL, c->fd, NULL);
        struct linger lg = {1, 0};
        if (kind != -1) setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(c->fd);
    }
    c->fd = -1;
    if (kind >= 0) r->errors[kind] += (uint64_t)c->count;
    c->count = 0;
    c->head = 0;
    c->rlen = 0;
    c->wlen = c->woff = 0;
    c->want_out = 0;
    c->connecting = 0;
}

static int sending_over(run_t *r, conn_t *c, uint64_t now) {
    if (c->remaining == 0) return 1;
    return c->remaining < 0 && now >= r->deadline;
}

static int flush_out(run_t *r, conn_t *c) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                update_events(r, c, 1);
                return 0;
            }
            if (errno == EINTR) continue;
            return -1;
        }
        c->woff += (size_t)n;
    }
    c->wlen = c->woff = 0;
    update_events(r, c, 0);
    return 0;
}

/* Queue requests until `pipeline` are in flight or the run says stop; then write. */
static int fill(run_t *r, conn_t *c, uint64_t now) {
    int added = 0;
    while (c->count < r->pipeline && !sending_over(r, c, now)) {
        if (wbuf_reserve(c, (size_t)r->size + 24) < 0) return -1;
        int w = snprintf(c->wbuf + c->wlen, 24 + (size_t)r->size, "%0*llu\n", r->size,
                         (unsigned long long)c->next_number);
        c->wlen += (size_t)w;
        int slot = (c->head + c->count) % r->pipeline;
        c->sent_ns[slot] = now;
        c->numbers[slot] = c->next_number;
        c->count++;
        c->next_number++;
        if (c->remaining > 0) c->remaining--;
        r->requests++;
        added++;
    }
    if (added && !c->want_out) return flush_out(r, c);
    return 0;
}

static int check_reply(run_t *r, conn_t *c, const char *line, size_t len, uint64_t now) {
    if (len && line[len - 1] == '\r') len--;
    if (c->count == 0) {
        r->errors[K_WRONG]++;
        return 0;
    }
    int slot = c->head;
    c->head = (c->head + 1) % r->pipeline;
    c->count--;
    char want[48];
    int w = snprintf(want, sizeof want, "%0*llu", r->size > 40 ? 0 : r->size,
                     (unsigned long long)c->numbers[slot]);
    int ok = 0;
    if (len == r->prefix_len + (size_t)(r->size > w ? r->size : w) &&
        memcmp(line, r->prefix, r->prefix_len) == 0) {
        const char *rest = line + r->prefix_len;
        size_t rest_len = len - r->prefix_len;
        size_t pad = rest_len - (size_t)w;
        ok = 1;
        for (size_t i = 0; i < pad; i++) {
            if (rest[i] != '0') {
                ok = 0;
                break;
            }
        }
        if (ok && memcmp(rest + pad, want, (size_t)w) != 0) ok = 0;
    }
    if (ok) {
        r->ok++;
        hist_record(r->hist, now - c->sent_ns[slot]);
    } else if (len == 20 && memcmp(line, "Server not available", 20) == 0) {
        r->errors[K_NOT_AVAILABLE]++;
    } else if (len >= 5 && memcmp(line, "Error", 5) == 0) {
        r->errors[K_ERROR_REPLY]++;
    } else {
        r->errors[K_WRONG]++;
    }
    return 0;
}

static void connection_ended(run_t *r, conn_t *c, uint64_t now, int kind);

static void start_connect(run_t *r, conn_t *c, uint64_t now) {
    struct sockaddr_storage *addr = &r->addrs[c->addr_index];
    int fd = socket(addr->ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        c->retry_at = now + 50000000ULL;
        return;
    }
    c->retry_at = now; /* the connect's start, for its timeout */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    c->connecting = 1;
    c->want_out = 1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(r->epfd, EPOLL_CTL_ADD, fd, &ev);
    if (connect(fd, (struct sockaddr *)addr, r->addrlens[c->addr_index]) < 0 &&
        errno != EINPROGRESS) {
        connection_ended(r, c, now, K_CONNECTION);
    }
}

/* A connection ended (`kind`: what its outstanding requests count as, or -1 for a clean
 * close); decide whether this client goes on, as the Python engine does. */
static void connection_ended(run_t *r, conn_t *c, uint64_t now, int kind) {
    if (c->connecting && c->addr_index + 1 < r->naddrs) {
        /* a connect that failed: the host's next address first, as asyncio does */
        close_conn(r, c, -2);
        c->addr_index++;
        start_connect(r, c, now);
        return;
    }
    c->addr_index = 0;
    close_conn(r, c, kind);
    if (c->replies > 0) {
        c->failures_in_row = 0;
    } else {
        c->failures_in_row++;
    }
    c->replies = 0;
    if (sending_over(r, c, now)) {
        c->done = 1;
        return;
    }
    if (c->failures_in_row == 0) {
        c->retry_at = now;
        return;
    }
    if (c->remaining >= 0) {
        if (c->failures_in_row >= 3) { /* a count-bounded client that cannot get through */
            r->requests += (uint64_t)c->remaining;
            r->errors[K_CONNECTION] += (uint64_t)c->remaining;
            c->remaining = 0;
            c->done = 1;
            return;
        }
        c->retry_at = now + 50000000ULL * (uint64_t)c->failures_in_row;
        return;
    }
    r->requests++; /* a time-bounded client owes one request per failed attempt */
    r->errors[K_CONNECTION]++;
    uint64_t pause = 50000000ULL * (uint64_t)c->failures_in_row;
    if (pause > 500000000ULL) pause = 500000000ULL;
    c->retry_at = now + pause;
}

static void finish_if_idle(run_t *r, conn_t *c, uint64_t now) {
    if (c->fd >= 0 && !c->connecting && c->count == 0 && sending_over(r, c, now)) {
        close_conn(r, c, -1);
        c->done = 1;
    }
}

static void on_readable(run_t *r, conn_t *c, uint64_t now) {
    for (;;) {
        if (c->rcap - c->rlen < READ_CHUNK) {
            size_t cap = c->rcap ? c->rcap * 2 : READ_CHUNK * 2;
            char *p = realloc(c->rbuf, cap);
            if (!p) {
                connection_ended(r, c, now, K_CONNECTION);
                return;
            }
            c->rbuf = p;
            c->rcap = cap;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            connection_ended(r, c, now, K_CONNECTION);
            return;
        }
        if (n == 0) {
            connection_ended(r, c, now, K_CONNECTION);
            return;
        }
        c->rlen += (size_t)n;
        size_t start = 0;
        char *nl;
        while ((nl = memchr(c->rbuf + start, '\n', c->rlen - start)) != NULL) {
            size_t end = (size_t)(nl - c->rbuf);
            check_reply(r, c, c->rbuf + start, end - start, now);
            c->replies++;
            start = end + 1;
        }
        if (start) {
            memmove(c->rbuf, c->rbuf + start, c->rlen - start);
            c->rlen -= start;
        }
        if (c->rlen > MAX_REPLY_LINE) {
            connection_ended(r, c, now, K_WRONG);
            return;
        }
        if (fill(r, c, now) < 0) {
            connection_ended(r, c, now, K_CONNECTION);
            return;
        }
        if ((size_t)n < c->rcap - c->rlen) break; /* the socket is drained */
    }
    finish_if_idle(r, c, now);
}

static void on_writable(run_t *r, conn_t *c, uint64_t now) {
    if (c->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            connection_ended(r, c, now, K_CONNECTION);
            return;
        }
        c->connecting = 0;
        update_events(r, c, 0);
        if (fill(r, c, now) < 0) connection_ended(r, c, now, K_CONNECTION);
        return;
    }
    if (flush_out(r, c) < 0) connection_ended(r, c, now, K_CONNECTION);
}

static int resolve(run_t *r, const char *host, int port) {
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0 || res == NULL) {
        snprintf(r->err, sizeof r->err, "cannot resolve %s: %s", host, gai_strerror(rc));
        return -1;
    }
    for (struct addrinfo *ai = res; ai != NULL && r->naddrs < MAX_ADDRS; ai = ai->ai_next) {
        memcpy(&r->addrs[r->naddrs], ai->ai_addr, ai->ai_addrlen);
        r->addrlens[r->naddrs] = ai->ai_addrlen;
        r->naddrs++;
    }
    freeaddrinfo(res);
    return 0;
}

/* The whole run, without the GIL; 0, or -1 with r->err set. */
static int run_load(run_t *r, conn_t *conns, int nconns, uint64_t *started, uint64_t *finished) {
    struct epoll_event *events = calloc((size_t)nconns, sizeof *events);
    if (!events) {
        snprintf(r->err, sizeof r->err, "out of memory");
        return -1;
    }
    uint64_t now = now_ns();
    *started = now;
    for (int i = 0; i < nconns; i++) start_connect(r, &conns[i], now);
    uint64_t last_scan = now;
    for (;;) {
        int active = 0;
        int n = epoll_wait(r->epfd, events, nconns, 5);
        now = now_ns();
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
                if (c->connecting || (events[i].events & EPOLLOUT)) on_writable(r, c, now);
            }
            if (c->fd >= 0 && !c->connecting && (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                on_readable(r, c, now);
        }
        if (n == 0 || now - last_scan >= 5000000ULL) {
            last_scan = now;
            for (int i = 0; i < nconns; i++) {
                conn_t *c = &conns[i];
                if (c->done) continue;
                if (c->fd >= 0 && c->count > 0 && now - c->sent_ns[c->head] > r->timeout_ns) {
                    connection_ended(r, c, now, K_TIMEOUT);
                } else if (c->fd >= 0 && c->connecting && now - c->retry_at > r->timeout_ns) {
                    connection_ended(r, c, now, K_CONNECTION);
                } else if (c->fd < 0 && now >= c->retry_at) {
                    c->retry_at = now;
                    start_connect(r, c, now);
                } else {
                    finish_if_idle(r, c, now);
                }
            }
        }
        for (int i = 0; i < nconns; i++) active += !conns[i].done;
        if (!active) break;
    }
    *finished = now_ns();
    free(events);
    return 0;
}

static PyObject *py_run(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"host",   "port",     "connections", "pipeline", "duration",
                             "requests_per_client", "timeout",     "size",     "prefix", NULL};
    const char *host;
    int port, nconns, pipeline, size;
    double duration, timeout;
    long long per_client;
    Py_buffer prefix;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "siiidLdiy*", kwlist, &host, &port, &nconns,
                                     &pipeline, &duration, &per_client, &timeout, &size, &prefix))
        return NULL;
    if (nconns < 1 || nconns > 100000 || pipeline < 1 || pipeline > 65536 || size < 0 ||
        size > 65536 || timeout <= 0 || port < 1 || port > 65535) {
        PyBuffer_Release(&prefix);
        PyErr_SetString(PyExc_ValueError, "load settings out of range");
        return NULL;
    }
    run_t r;
    memset(&r, 0, sizeof r);
    r.pipeline = pipeline;
    r.size = size;
    r.prefix = prefix.buf;
    r.prefix_len = (size_t)prefix.len;
    r.timeout_ns = (uint64_t)(timeout * 1e9);
    r.hist = calloc(1, sizeof(hist_t));
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    int failed = r.hist == NULL || conns == NULL;
    for (int i = 0; !failed && i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].next_number = 1;
        conns[i].remaining = duration > 0 ? -1 : per_client;
        conns[i].sent_ns = calloc((size_t)pipeline, sizeof(uint64_t));
        conns[i].numbers = calloc((size_t)pipeline, sizeof(uint64_t));
        failed = conns[i].sent_ns == NULL || conns[i].numbers == NULL;
    }
    uint64_t started = 0, finished = 0;
    int rc = -1;
    if (failed) {
        snprintf(r.err, sizeof r.err, "out of memory");
    } else {
        Py_BEGIN_ALLOW_THREADS;
        rc = resolve(&r, host, port);
        if (rc == 0) {
            r.epfd = epoll_create1(EPOLL_CLOEXEC);
            r.deadline = now_ns() + (uint64_t)(duration > 0 ? duration * 1e9 : 0);
            rc = r.epfd < 0 ? -1 : run_load(&r, conns, nconns, &started, &finished);
            if (r.epfd >= 0) close(r.epfd);
        }
        Py_END_ALLOW_THREADS;
    }
    PyBuffer_Release(&prefix);
    if (conns) {
        for (int i = 0; i < nconns; i++) {
            if (conns[i].fd >= 0) close(conns[i].fd);
            free(conns[i].sent_ns);
            free(conns[i].numbers);
            free(conns[i].rbuf);
            free(conns[i].wbuf);
        }
        free(conns);
    }
    PyObject *result = NULL;
    if (rc != 0) {
        PyErr_SetString(PyExc_OSError, r.err[0] ? r.err : "load run failed");
    } else {
        PyObject *errors = PyDict_New();
        for (int k = 0; errors && k < K_COUNT; k++) {
            PyObject *v = PyLong_FromUnsignedLongLong(r.errors[k]);
            if (!v || PyDict_SetItemString(errors, KIND_NAMES[k], v) < 0) Py_CLEAR(errors);
            Py_XDECREF(v);
        }
        if (errors) {
            const hist_t *h = r.hist;
            result = Py_BuildValue(
                "{s:K,s:K,s:N,s:d,s:{s:d,s:d,s:d,s:d,s:d}}", "requests",
                (unsigned long long)r.requests, "ok", (unsigned long long)r.ok, "errors", errors,
                "elapsed_s", (double)(finished - started) / 1e9, "latency_us", "p50",
                hist_percentile_us(h, 50.0), "p90", hist_percentile_us(h, 90.0), "p99",
                hist_percentile_us(h, 99.0), "p999", hist_percentile_us(h, 99.9), "max",
                (double)h->max_ns / 1000.0);
        }
    }
    free(r.hist);
    return result;
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))py_run, METH_VARARGS | METH_KEYWORDS,
     "run(host, port, connections, pipeline, duration, requests_per_client, timeout, size, "
     "prefix) -> dict\n\nOne closed-loop load run; duration <= 0 bounds it by count instead."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "balancer.tools._loadgen",
                                    "The load client's compiled engine (epoll, one thread).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__loadgen(void) { return PyModule_Create(&module); }
