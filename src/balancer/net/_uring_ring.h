/* The ring machinery of the io_uring relay engine (`_uring.c`'s Python type calls it):
 * the io_uring itself (setup, submission and completion queues, raw system calls),
 * the shared buffer pool, and each pair's directions from recv to send to the hand-back.
 * Included once, by _uring.c: its functions are static, one translation unit.
 */
#ifndef BALANCER_URING_RING_H
#define BALANCER_URING_RING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { DIR_READING, DIR_WRITING, DIR_DONE, DIR_WAITING /* for a buffer of the pool */ };
enum { REASON_DONE, REASON_CLOSED, REASON_ABORTED, REASON_CLIENT, REASON_BACKEND };
enum { OP_RECV0, OP_SEND0, OP_RECV1, OP_SEND1, OP_CANCEL };

#define RING_SUBMIT_EACH (1u << 31) /* not io_uring's: submit each operation alone (measuring) */
#define RING_NO_POOL (1u << 30)     /* not io_uring's: a buffer per direction, no shared pool */
#define POOL_BUFFERS 256            /* buffers in the pool (a power of 2) */

#define PAIR_CLOSING 1 /* close(): no new recv, what was received is sent */
#define PAIR_STOPPED 2 /* failed or aborted: operations cancelled */

typedef struct {
    char *buf;     /* the direction's buffer (with the pool: the one holding what was received) */
    int bid;       /* with the pool: that buffer's id, -1 when none is held */
    char *initial; /* bytes held before the hand-over, sent first; freed once sent */
    uint32_t len, off;
    uint8_t state;
    uint64_t bytes; /* received from this direction's source */
} Direction;

typedef struct {
    int fd[2]; /* 0 client, 1 backend; direction d reads fd[d], writes fd[1-d] */
    Direction dir[2];
    int pending; /* operations in flight */
    int flags;
    int client_eof; /* the client's EOF came before the hand-over: no recv on it */
    int reason, err;
    PyObject *token; /* NULL: the slot is free */
} Pair;

typedef struct {
    PyObject_HEAD int ring_fd, event_fd;
    unsigned setup_flags;
    int submit_each, no_pool;
    uint32_t buffer_size;
    /* submission queue */
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array, *sq_flags;
    struct io_uring_sqe *sqes;
    unsigned sq_entries, queued;
    /* completion queue */
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len, sqes_len;
    /* the pool: buffers the kernel picks for each recv as data arrives (a provided-buffer
     * ring), so an idle connection holds none; NULL: each direction has its own */
    struct io_uring_buf_ring *pbuf;
    char *pool;
    size_t pbuf_len, pool_len;
    uint16_t pbuf_tail;
    uint32_t *waiting; /* (slot << 1 | direction) of recvs that found the pool empty */
    uint32_t wait_head, wait_count;
    uint64_t waits; /* recvs that found the pool empty, since the start */
    /* pairs */
    Pair *pairs;
    uint32_t npairs, *free_slots, nfree;
    uint32_t active;
    PyObject *finished; /* list of result tuples, handed out by reap() */
} Ring;

static int sys_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned submit, unsigned min_complete, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, NULL, 0);
}

static int sys_register(int fd, unsigned opcode, void *arg, unsigned nargs) {
    return (int)syscall(__NR_io_uring_register, fd, opcode, arg, nargs);
}

static int ring_submit(Ring *r, int get_events) {
    unsigned flags = 0;
    if (get_events || (r->setup_flags & IORING_SETUP_DEFER_TASKRUN))
        flags |= IORING_ENTER_GETEVENTS;
    if (r->setup_flags & IORING_SETUP_SQPOLL) {
        __atomic_store_n(r->sq_tail, *r->sq_tail, __ATOMIC_RELEASE);
        unsigned sqf = __atomic_load_n(r->sq_flags, __ATOMIC_ACQUIRE);
        r->queued = 0;
        if (sqf & IORING_SQ_NEED_WAKEUP)
            flags |= IORING_ENTER_SQ_WAKEUP;
        if (!flags)
            return 0;
        return sys_enter(r->ring_fd, 0, 0, flags) < 0 ? -errno : 0;
    }
    if (!r->queued && !flags)
        return 0;
    while (1) {
        int n = sys_enter(r->ring_fd, r->queued, 0, flags);
        if (n >= 0) {
            r->queued -= (unsigned)n < r->queued ? (unsigned)n : r->queued;
            return 0;
        }
        if (errno != EINTR)
            return -errno;
    }
}

static struct io_uring_sqe *ring_sqe(Ring *r) {
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    unsigned tail = *r->sq_tail;
    if (tail - head >= r->sq_entries) {
        ring_submit(r, 0);
        head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        if (tail - head >= r->sq_entries)
            return NULL;
    }
    unsigned index = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[index];
    memset(sqe, 0, sizeof(*sqe));
    r->sq_array[index] = index;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    r->queued++;
    return sqe;
}

static uint64_t user_data(uint32_t slot, int op) { return ((uint64_t)slot << 3) | (uint64_t)op; }

/* Queue an operation of pair `slot`; -1 when the submission queue stays full. */
static int queue_op(Ring *r, uint32_t slot, int op) {
    Pair *p = &r->pairs[slot];
    struct io_uring_sqe *sqe = ring_sqe(r);
    if (sqe == NULL)
        return -1;
    int d = op >> 1;
    Direction *dir = &p->dir[d];
    if (op == OP_RECV0 || op == OP_RECV1) {
        sqe->opcode = IORING_OP_RECV;
        sqe->fd = p->fd[d];
        sqe->len = r->buffer_size;
        if (r->pool) {
            sqe->flags |= IOSQE_BUFFER_SELECT;
            sqe->buf_group = 0;
        } else {
            sqe->addr = (uint64_t)(uintptr_t)dir->buf;
        }
        dir->state = DIR_READING;
    } else {
        sqe->opcode = IORING_OP_SEND;
        sqe->fd = p->fd[1 - d];
        sqe->addr = (uint64_t)(uintptr_t)((dir->initial ? dir->initial : dir->buf) + dir->off);
        sqe->len = dir->len - dir->off;
        sqe->msg_flags = MSG_NOSIGNAL;
        dir->state = DIR_WRITING;
    }
    sqe->user_data = user_data(slot, op);
    p->pending++;
    if (r->submit_each)
        ring_submit(r, 0);
    return 0;
}

static void pool_add(Ring *r, unsigned bid) {
    /* bufs[0].resv is the ring's tail: only addr, len and bid are written */
    struct io_uring_buf *b = &r->pbuf->bufs[r->pbuf_tail & (POOL_BUFFERS - 1)];
    b->addr = (uint64_t)(uintptr_t)(r->pool + (size_t)bid * r->buffer_size);
    b->len = r->buffer_size;
    b->bid = (uint16_t)bid;
    r->pbuf_tail++;
    __atomic_store_n(&r->pbuf->tail, r->pbuf_tail, __ATOMIC_RELEASE);
}

static void next_read(Ring *r, uint32_t slot, int d);

/* Give a direction's buffer back to the pool, and a recv that waited for one its turn. */
static void pool_return(Ring *r, Direction *dir) {
    if (!r->pool || dir->bid < 0)
        return;
    pool_add(r, (unsigned)dir->bid);
    dir->bid = -1;
    dir->buf = NULL;
    while (r->wait_count) {
        uint32_t entry = r->waiting[r->wait_head];
        r->wait_head = (r->wait_head + 1) % (2 * r->npairs);
        r->wait_count--;
        Pair *p = &r->pairs[entry >> 1];
        if (p->token && !(p->flags & PAIR_STOPPED) && p->dir[entry & 1].state == DIR_WAITING) {
            next_read(r, entry >> 1, entry & 1);
            break;
        }
    }
}

static int pool_wait(Ring *r, uint32_t slot, int d) {
    if (r->wait_count >= 2 * r->npairs)
        return -1;
    r->waiting[(r->wait_head + r->wait_count) % (2 * r->npairs)] = slot << 1 | (uint32_t)d;
    r->wait_count++;
    r->waits++;
    r->pairs[slot].dir[d].state = DIR_WAITING;
    return 0;
}

static void stop_pair(Ring *r, uint32_t slot, int reason, int err) {
    Pair *p = &r->pairs[slot];
    if (p->flags & PAIR_STOPPED)
        return;
    p->flags |= PAIR_STOPPED;
    p->reason = reason;
    p->err = err;
    for (int i = 0; i < 2; i++) {
        if (p->pending == 0)
            break;
        struct io_uring_sqe *sqe = ring_sqe(r);
        if (sqe == NULL) { /* no room to cancel: shutting the socket ends its operations */
            shutdown(p->fd[i], SHUT_RDWR);
            continue;
        }
        sqe->opcode = IORING_OP_ASYNC_CANCEL;
        sqe->fd = p->fd[i];
        sqe->cancel_flags = IORING_ASYNC_CANCEL_FD | IORING_ASYNC_CANCEL_ALL;
        sqe->user_data = user_data(slot, OP_CANCEL);
        p->pending++;
    }
}

static void finish_pair(Ring *r, uint32_t slot) {
    Pair *p = &r->pairs[slot];
    close(p->fd[0]); /* the dup; fd[1] is borrowed */
    int reason = p->reason;
    if (!(p->flags & PAIR_STOPPED))
        reason = (p->flags & PAIR_CLOSING) ? REASON_CLOSED : REASON_DONE;
    PyObject *result = Py_BuildValue("(OiiKK)", p->token, reason, p->err,
                                     (unsigned long long)p->dir[0].bytes,
                                     (unsigned long long)p->dir[1].bytes);
    if (result == NULL || PyList_Append(r->finished, result) < 0)
        PyErr_Clear(); /* out of memory: the pair is dropped; its transports stay to Python */
    Py_XDECREF(result);
    Py_CLEAR(p->token);
    for (int d = 0; d < 2; d++) {
        if (r->pool)
            pool_return(r, &p->dir[d]);
        else
            free(p->dir[d].buf);
        free(p->dir[d].initial);
    }
    memset(p, 0, sizeof(*p));
    r->free_slots[r->nfree++] = slot;
    r->active--;
}

/* Start direction `d` reading again, or end it after what close() let through. */
static void next_read(Ring *r, uint32_t slot, int d) {
    Pair *p = &r->pairs[slot];
    if ((p->flags & PAIR_CLOSING) || (d == 0 && p->client_eof)) {
        p->dir[d].state = DIR_DONE;
        shutdown(p->fd[1 - d], SHUT_WR);
    } else if (queue_op(r, slot, d << 1) < 0) {
        stop_pair(r, slot, d ? REASON_BACKEND : REASON_CLIENT, EBUSY);
    }
}

static void complete(Ring *r, uint64_t data, int res, unsigned cflags) {
    uint32_t slot = (uint32_t)(data >> 3);
    int op = (int)(data & 7);
    if (slot >= r->npairs)
        return;
    Pair *p = &r->pairs[slot];
    if (p->token == NULL)
        return;
    p->pending--;
    if (op != OP_CANCEL && (cflags & IORING_CQE_F_BUFFER)) {
        Direction *dir = &p->dir[op >> 1];
        dir->bid = (int)(cflags >> IORING_CQE_BUFFER_SHIFT);
        dir->buf = r->pool + (size_t)dir->bid * r->buffer_size;
        if (res <= 0 || (p->flags & PAIR_STOPPED))
            pool_return(r, dir);
    }
    if (op != OP_CANCEL && !(p->flags & PAIR_STOPPED)) {
        int d = op >> 1;
        Direction *dir = &p->dir[d];
        if (op == OP_RECV0 || op == OP_RECV1) {
            if (res == -ENOBUFS && r->pool && !(p->flags & PAIR_CLOSING)) {
                if (pool_wait(r, slot, d) < 0)
                    stop_pair(r, slot, d ? REASON_BACKEND : REASON_CLIENT, ENOBUFS);
            } else if (res > 0) {
                dir->len = (uint32_t)res;
                dir->off = 0;
                dir->bytes += (uint64_t)res;
                if (queue_op(r, slot, op + 1) < 0)
                    stop_pair(r, slot, d ? REASON_CLIENT : REASON_BACKEND, EBUSY);
            } else if (res == 0) {
                dir->state = DIR_DONE;
                shutdown(p->fd[1 - d], SHUT_WR);
            } else if (res == -ECANCELED && (p->flags & PAIR_CLOSING)) {
                dir->state = DIR_DONE;
                shutdown(p->fd[1 - d], SHUT_WR);
            } else {
                stop_pair(r, slot, d ? REASON_BACKEND : REASON_CLIENT, -res);
            }
        } else if (res >= 0) {
            dir->off += (uint32_t)res;
            if (dir->off < dir->len) {
                if (queue_op(r, slot, op) < 0)
                    stop_pair(r, slot, d ? REASON_CLIENT : REASON_BACKEND, EBUSY);
            } else {
                if (dir->initial) {
                    free(dir->initial);
                    dir->initial = NULL;
                } else {
                    pool_return(r, dir);
                }
                next_read(r, slot, d);
            }
        } else {
            /* the send to fd[1-d] failed: that side's peer is gone */
            stop_pair(r, slot, d ? REASON_CLIENT : REASON_BACKEND, -res);
        }
    }
    if (p->pending == 0 &&
        ((p->flags & PAIR_STOPPED) || (p->dir[0].state == DIR_DONE && p->dir[1].state == DIR_DONE)))
        finish_pair(r, slot);
}

static int ring_process(Ring *r) {
    int seen = 0;
    while (1) {
        unsigned head = *r->cq_head;
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        if (head == tail)
            break;
        while (head != tail) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            uint64_t data = cqe->user_data;
            int res = cqe->res;
            unsigned cflags = cqe->flags;
            head++;
            __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
            complete(r, data, res, cflags);
            seen++;
        }
    }
    return seen;
}

static void ring_free(Ring *r) {
    if (r->pairs) {
        for (uint32_t i = 0; i < r->npairs; i++) {
            Pair *p = &r->pairs[i];
            if (p->token) {
                close(p->fd[0]);
                if (!r->pool) {
                    free(p->dir[0].buf);
                    free(p->dir[1].buf);
                }
                free(p->dir[0].initial);
                free(p->dir[1].initial);
                Py_CLEAR(p->token);
            }
        }
    }
    if (r->ring_fd >= 0)
        close(r->ring_fd); /* the kernel cancels what is still in flight */
    if (r->event_fd >= 0)
        close(r->event_fd);
    r->ring_fd = r->event_fd = -1;
    if (r->sqes && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
    r->sqes = NULL;
    r->sq_map = r->cq_map = NULL;
    if (r->pool)
        munmap(r->pool, r->pool_len);
    if (r->pbuf)
        munmap(r->pbuf, r->pbuf_len);
    r->pool = NULL;
    r->pbuf = NULL;
    free(r->waiting);
    r->waiting = NULL;
    r->wait_head = r->wait_count = 0;
    free(r->pairs);
    free(r->free_slots);
    r->pairs = NULL;
    r->free_slots = NULL;
    r->npairs = r->nfree = r->active = 0;
}

/* The pool of buffers, registered as a provided-buffer ring; without it (a kernel before
 * 5.19) each direction gets its own buffer. */
static void pool_init(Ring *r) {
    r->pbuf_len = POOL_BUFFERS * sizeof(struct io_uring_buf);
    r->pool_len = (size_t)POOL_BUFFERS * r->buffer_size;
    r->pbuf = mmap(NULL, r->pbuf_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    r->pool = mmap(NULL, r->pool_len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    r->waiting = malloc(2 * (size_t)r->npairs * sizeof(uint32_t));
    struct io_uring_buf_reg reg;
    memset(&reg, 0, sizeof(reg));
    reg.ring_addr = (uint64_t)(uintptr_t)r->pbuf;
    reg.ring_entries = POOL_BUFFERS;
    reg.bgid = 0;
    if (r->pbuf == MAP_FAILED || r->pool == MAP_FAILED || !r->waiting ||
        sys_register(r->ring_fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) {
        if (r->pbuf != MAP_FAILED)
            munmap(r->pbuf, r->pbuf_len);
        if (r->pool != MAP_FAILED)
            munmap(r->pool, r->pool_len);
        free(r->waiting);
        r->pbuf = NULL;
        r->pool = NULL;
        r->waiting = NULL;
        return;
    }
    r->pbuf_tail = 0;
    for (unsigned bid = 0; bid < POOL_BUFFERS; bid++)
        pool_add(r, bid);
}

static int ring_init(Ring *r, unsigned entries, unsigned flags, uint32_t max_pairs) {
    struct io_uring_params params;
    memset(&params, 0, sizeof(params));
    params.flags = flags | IORING_SETUP_CQSIZE;
    params.cq_entries = entries * 8;
    if (flags & IORING_SETUP_SQPOLL)
        params.sq_thread_idle = 1000;
    r->ring_fd = sys_setup(entries, &params);
    if (r->ring_fd < 0)
        return -errno;
    r->setup_flags = flags;
    r->sq_map_len = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    r->cq_map_len = params.cq_off.cqes + params.cq_entries * sizeof(struct io_uring_cqe);
    int single = params.features & IORING_FEAT_SINGLE_MMAP;
    if (single && r->cq_map_len > r->sq_map_len)
        r->sq_map_len = r->cq_map_len;
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     r->ring_fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        return -errno;
    r->cq_map = single ? r->sq_map
                       : mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_POPULATE, r->ring_fd, IORING_OFF_CQ_RING);
    if (r->cq_map == MAP_FAILED)
        return -errno;
    r->sqes_len = params.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   r->ring_fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        return -errno;
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + params.sq_off.head);
    r->sq_tail = (unsigned *)(sq + params.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + params.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + params.sq_off.array);
    r->sq_flags = (unsigned *)(sq + params.sq_off.flags);
    r->sq_entries = params.sq_entries;
    r->cq_head = (unsigned *)(cq + params.cq_off.head);
    r->cq_tail = (unsigned *)(cq + params.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + params.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + params.cq_off.cqes);
    r->event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->event_fd < 0)
        return -errno;
    if (sys_register(r->ring_fd, IORING_REGISTER_EVENTFD, &r->event_fd, 1) < 0)
        return -errno;
    r->pairs = calloc(max_pairs, sizeof(Pair));
    r->free_slots = malloc(max_pairs * sizeof(uint32_t));
    if (!r->pairs || !r->free_slots)
        return -ENOMEM;
    r->npairs = max_pairs;
    for (uint32_t i = 0; i < max_pairs; i++)
        r->free_slots[i] = max_pairs - 1 - i;
    r->nfree = max_pairs;
    if (!r->no_pool)
        pool_init(r);
    return 0;
}

#endif /* BALANCER_URING_RING_H */
