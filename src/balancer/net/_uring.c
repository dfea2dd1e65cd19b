/* The io_uring relay engine of tcp mode: one ring relays many socket pairs.
 *
 * How it works: `Ring` owns an io_uring (raw system calls, no liburing) and an
 * eventfd registered with it, which the kernel signals when completions are
 * posted; the asyncio loop watches that eventfd and calls `reap()`. A pair is
 * two connected sockets (client, backend) given with `add()`: the ring dups the
 * client's descriptor (its Python transport keeps its own, paused) and borrows
 * the backend's, which Python holds open until the pair is handed back and
 * closes only after any cancellation of the pair's operations was submitted.
 *
 * Each direction of a pair has one buffer of `buffer_size` bytes and is, at
 * any time, reading (a recv in flight), writing (a send in flight, re-issued
 * until the buffer is sent) or done: a slow reader stalls the send, so no new
 * recv is made on the other side and the memory stays bounded. A recv of 0
 * (EOF) is passed on with shutdown(SHUT_WR); a failed recv or send stops the
 * pair: its other operations are cancelled and the side whose socket failed
 * is reported. `close()` lets what was received be sent, then ends both
 * directions; `abort()` cancels at once. A pair ends when none of its
 * operations is in flight: the ring closes its dup and `reap()` returns
 * (token, reason, errno, client_bytes, backend_bytes) for it.
 *
 * Submissions made while completions are processed, and those queued by
 * `add()`/`close()` during one loop turn (`flush()`), go to the kernel in one
 * io_uring_enter.
 *
 * This file is the Python type; the ring machinery it calls is `_uring_ring.h`.
 */
#include "_uring_ring.h"

static int Ring_init(Ring *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"entries", "flags", "buffer_size", "max_pairs", NULL};
    unsigned entries = 1024, flags = 0, buffer_size = 64 * 1024, max_pairs = 1u << 18;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|IIII", kwlist, &entries, &flags, &buffer_size,
                                     &max_pairs))
        return -1;
    if (buffer_size == 0 || max_pairs == 0 || max_pairs > (1u << 28)) {
        PyErr_SetString(PyExc_ValueError, "buffer_size and max_pairs must be positive");
        return -1;
    }
    ring_free(self);
    self->buffer_size = buffer_size;
    self->submit_each = (flags & RING_SUBMIT_EACH) != 0;
    self->no_pool = (flags & RING_NO_POOL) != 0;
    flags &= ~(RING_SUBMIT_EACH | RING_NO_POOL);
    int rc = ring_init(self, entries, flags, max_pairs);
    if (rc < 0) {
        ring_free(self);
        errno = -rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Ring *self = (Ring *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->ring_fd = self->event_fd = -1;
    self->finished = PyList_New(0);
    if (self->finished == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void Ring_dealloc(Ring *self) {
    ring_free(self);
    Py_CLEAR(self->finished);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check_open(Ring *self) {
    if (self->ring_fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return -1;
    }
    return 0;
}

static PyObject *Ring_add(Ring *self, PyObject *args) {
    int client_fd, backend_fd, client_eof;
    Py_buffer initial;
    PyObject *token;
    if (!PyArg_ParseTuple(args, "iiy*pO", &client_fd, &backend_fd, &initial, &client_eof, &token))
        return NULL;
    if (check_open(self) < 0 || self->nfree == 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_OverflowError, "the ring relays as many pairs as it can");
        PyBuffer_Release(&initial);
        return NULL;
    }
    uint32_t slot = self->free_slots[self->nfree - 1];
    Pair *p = &self->pairs[slot];
    memset(p, 0, sizeof(*p));
    p->fd[0] = fcntl(client_fd, F_DUPFD_CLOEXEC, 0);
    p->fd[1] = backend_fd;
    p->dir[0].bid = p->dir[1].bid = -1;
    if (!self->pool) {
        p->dir[0].buf = malloc(self->buffer_size);
        p->dir[1].buf = malloc(self->buffer_size);
    }
    if (initial.len > 0 && (p->dir[0].initial = malloc((size_t)initial.len)) != NULL)
        memcpy(p->dir[0].initial, initial.buf, (size_t)initial.len);
    int failed = p->fd[0] < 0 || (!self->pool && (!p->dir[0].buf || !p->dir[1].buf)) ||
                 (initial.len > 0 && !p->dir[0].initial);
    int err = errno;
    if (failed) {
        if (p->fd[0] >= 0)
            close(p->fd[0]);
        free(p->dir[0].buf);
        free(p->dir[1].buf);
        free(p->dir[0].initial);
        memset(p, 0, sizeof(*p));
        PyBuffer_Release(&initial);
        errno = err ? err : ENOMEM;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->nfree--;
    self->active++;
    Py_INCREF(token);
    p->token = token;
    p->dir[0].len = (uint32_t)initial.len;
    p->client_eof = client_eof;
    PyBuffer_Release(&initial);
    int rc = 0;
    if (p->dir[0].len)
        rc = queue_op(self, slot, OP_SEND0);
    else
        next_read(self, slot, 0);
    if (rc < 0 || queue_op(self, slot, OP_RECV1) < 0)
        stop_pair(self, slot, REASON_ABORTED, EBUSY);
    if (p->pending == 0)
        finish_pair(self, slot);
    return PyLong_FromUnsignedLong(slot);
}

static Pair *pair_arg(Ring *self, PyObject *arg, uint32_t *slot) {
    unsigned long value = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (value >= self->npairs || self->pairs[value].token == NULL) {
        PyErr_SetString(PyExc_KeyError, "no such pair");
        return NULL;
    }
    *slot = (uint32_t)value;
    return &self->pairs[value];
}

static PyObject *Ring_close_pair(Ring *self, PyObject *arg) {
    uint32_t slot;
    Pair *p = pair_arg(self, arg, &slot);
    if (p == NULL)
        return NULL;
    if (!(p->flags & (PAIR_CLOSING | PAIR_STOPPED))) {
        p->flags |= PAIR_CLOSING;
        /* cancel the recvs in flight; the sends finish, then each direction ends */
        for (int d = 0; d < 2; d++) {
            if (p->dir[d].state == DIR_WAITING) { /* nothing received: it ends now */
                p->dir[d].state = DIR_DONE;
                shutdown(p->fd[1 - d], SHUT_WR);
                continue;
            }
            if (p->dir[d].state != DIR_READING)
                continue;
            struct io_uring_sqe *sqe = ring_sqe(self);
            if (sqe == NULL) {
                shutdown(p->fd[d], SHUT_RD);
                continue;
            }
            sqe->opcode = IORING_OP_ASYNC_CANCEL;
            sqe->addr = user_data(slot, d << 1);
            sqe->user_data = user_data(slot, OP_CANCEL);
            p->pending++;
        }
    }
    Py_RETURN_NONE;
}

static PyObject *Ring_abort_pair(Ring *self, PyObject *arg) {
    uint32_t slot;
    Pair *p = pair_arg(self, arg, &slot);
    if (p == NULL)
        return NULL;
    stop_pair(self, slot, REASON_ABORTED, 0);
    if (p->pending == 0)
        finish_pair(self, slot);
    Py_RETURN_NONE;
}

static PyObject *Ring_counts(Ring *self, PyObject *arg) {
    uint32_t slot;
    Pair *p = pair_arg(self, arg, &slot);
    if (p == NULL)
        return NULL;
    return Py_BuildValue("(KK)", (unsigned long long)p->dir[0].bytes,
                         (unsigned long long)p->dir[1].bytes);
}

static PyObject *take_finished(Ring *self) {
    PyObject *done = self->finished;
    self->finished = PyList_New(0);
    if (self->finished == NULL) {
        self->finished = done;
        return NULL;
    }
    return done;
}

static PyObject *Ring_flush(Ring *self, PyObject *unused) {
    if (check_open(self) < 0)
        return NULL;
    int rc = ring_submit(self, 0);
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return take_finished(self);
}

static int cq_overflowed(Ring *r) {
    return (__atomic_load_n(r->sq_flags, __ATOMIC_ACQUIRE) & IORING_SQ_CQ_OVERFLOW) != 0;
}

static PyObject *Ring_reap(Ring *self, PyObject *unused) {
    if (check_open(self) < 0)
        return NULL;
    uint64_t count;
    if (read(self->event_fd, &count, sizeof(count)) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    int defer = (self->setup_flags & IORING_SETUP_DEFER_TASKRUN) != 0;
    if (defer)
        ring_submit(self, 1); /* runs the deferred completions */
    /* Completions beyond the CQ's size wait in the kernel (no eventfd signal for them)
     * until an io_uring_enter with GETEVENTS flushes them: go on until none is left. */
    for (int round = 0; round < 4096; round++) {
        int seen = ring_process(self);
        int over = cq_overflowed(self);
        int rc = ring_submit(self, over);
        if (rc < 0) {
            errno = -rc;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (!over && !(defer && seen))
            break;
    }
    return take_finished(self);
}

static PyObject *Ring_fileno(Ring *self, PyObject *unused) {
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->event_fd);
}

static PyObject *Ring_close(Ring *self, PyObject *unused) {
    ring_free(self);
    Py_RETURN_NONE;
}

static PyObject *Ring_get_active(Ring *self, void *closure) {
    return PyLong_FromUnsignedLong(self->active);
}

static PyObject *Ring_get_waits(Ring *self, void *closure) {
    return PyLong_FromUnsignedLongLong(self->waits);
}

static PyObject *Ring_get_pooled(Ring *self, void *closure) {
    return PyBool_FromLong(self->pool != NULL);
}

static PyObject *Ring_get_queued(Ring *self, void *closure) {
    return PyLong_FromUnsignedLong(self->queued);
}

static PyMethodDef Ring_methods[] = {
    {"add", (PyCFunction)Ring_add, METH_VARARGS,
     "add(client_fd, backend_fd, initial, client_eof, token) -> pair: relay the two sockets "
     "(the client's dup'd, the backend's borrowed until the hand-back), `initial` sent to "
     "the backend first"},
    {"close_pair", (PyCFunction)Ring_close_pair, METH_O,
     "close_pair(pair): send what was received, then end both directions"},
    {"abort_pair", (PyCFunction)Ring_abort_pair, METH_O, "abort_pair(pair): stop at once"},
    {"counts", (PyCFunction)Ring_counts, METH_O,
     "counts(pair) -> (client_bytes, backend_bytes) received so far"},
    {"reap", (PyCFunction)Ring_reap, METH_NOARGS,
     "reap() -> [(token, reason, errno, client_bytes, backend_bytes)]: process completions"},
    {"flush", (PyCFunction)Ring_flush, METH_NOARGS,
     "flush() -> finished pairs: submit what is queued"},
    {"fileno", (PyCFunction)Ring_fileno, METH_NOARGS, "the eventfd signalled on completions"},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, "close the ring and every pair's dup"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"active", (getter)Ring_get_active, NULL, "pairs being relayed", NULL},
    {"queued", (getter)Ring_get_queued, NULL, "submissions not yet given to the kernel", NULL},
    {"pooled", (getter)Ring_get_pooled, NULL, "recvs take buffers from the shared pool", NULL},
    {"waits", (getter)Ring_get_waits, NULL, "recvs that found the pool empty and waited", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "balancer.net._uring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(entries=1024, flags=0, buffer_size=65536, max_pairs=262144)",
    .tp_new = Ring_new,
    .tp_init = (initproc)Ring_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "balancer.net._uring",
    .m_doc = "The io_uring relay engine of tcp mode.", .m_size = -1,
};

PyMODINIT_FUNC PyInit__uring(void) {
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "SETUP_SQPOLL", IORING_SETUP_SQPOLL);
    PyModule_AddIntConstant(m, "SETUP_SINGLE_ISSUER", IORING_SETUP_SINGLE_ISSUER);
    PyModule_AddIntConstant(m, "SETUP_DEFER_TASKRUN", IORING_SETUP_DEFER_TASKRUN);
    PyModule_AddIntConstant(m, "SETUP_COOP_TASKRUN", IORING_SETUP_COOP_TASKRUN);
    PyModule_AddIntConstant(m, "SUBMIT_EACH", (long)RING_SUBMIT_EACH);
    PyModule_AddIntConstant(m, "NO_POOL", (long)RING_NO_POOL);
    PyModule_AddIntConstant(m, "DONE", REASON_DONE);
    PyModule_AddIntConstant(m, "CLOSED", REASON_CLOSED);
    PyModule_AddIntConstant(m, "ABORTED", REASON_ABORTED);
    PyModule_AddIntConstant(m, "CLIENT_FAILED", REASON_CLIENT);
    PyModule_AddIntConstant(m, "BACKEND_FAILED", REASON_BACKEND);
    return m;
}
