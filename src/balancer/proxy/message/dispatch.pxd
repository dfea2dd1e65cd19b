# Cython declarations for dispatch.py (the compiled build; see balancer.native).
cimport cython

from balancer.proxy.message.channel cimport BackendChannel
from balancer.proxy.message.connection cimport BackendConnection
from balancer.proxy.message.request cimport Request

cdef class Dispatcher:
    cdef public object config
    cdef public object pool
    cdef public object histogram
    cdef public object access_log
    cdef public object client_framing
    cdef public object max_buffered
    cdef public bint hash_by_message
    cdef public object policy_start
    cdef public object policy_finish
    cdef public object loop
    cdef public object bound
    cdef public object tasks
    cdef public bint draining
    cdef public object sessions
    cdef public dict channels
    cdef public list dirty_sessions
    cdef public list dirty_conns
    cdef public bint _flush_scheduled
    cdef public object queue
    cdef public object budget
    cdef public object buffered
    cdef public object freed
    cdef public bint stopped
    cdef public object too_long
    cdef public object not_available
    cdef public object retries
    cdef public object retries_over_budget
    cdef public object refused
    cdef public object queue_full
    cdef public object queue_timeouts
    cdef public object idle_closed
    cdef public object invalid
    cdef public object buffer_cuts
    cdef public object loops
    cdef public object drain_cut
    cdef public object _shed_logged_at
    cdef dict __dict__

    @cython.locals(req=Request, n=Py_ssize_t)
    cpdef settle(self, backend, pending, list replies)

    @cython.locals(req=Request, conn=BackendConnection, ch=BackendChannel)
    cpdef dispatch_batch(self, session, list payloads)
