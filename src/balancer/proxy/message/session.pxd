# Cython declarations for session.py (the compiled build; see balancer.native).
cimport cython

from balancer.core.stats cimport LatencyHistogram
from balancer.proxy.message.dispatch cimport Dispatcher
from balancer.proxy.message.request cimport Request

cdef class ClientSession:
    cdef public Dispatcher service
    cdef public object transport
    cdef public object peer
    cdef public object peer_key
    cdef public object _peername
    cdef public object arrival
    cdef public object _fds
    cdef public object framing
    cdef public object framer
    cdef public object _raw_buf
    cdef public object _raw_timer
    cdef public bint _detected_raw
    cdef public object held
    cdef public object pending
    cdef public list _out
    cdef public bint _dirty
    cdef public bint _paused_reading
    cdef public bint _paused_writing
    cdef public bint _closing
    cdef public bint _close_after_flush
    cdef public bint gone
    cdef public object last_active
    cdef object __weakref__

    cpdef complete(self, Request req, reply)

    cpdef data_received(self, data)

    @cython.locals(lines=list)
    cpdef _lines(self, data)

    @cython.locals(req=Request, out=list, raw=bint, histogram=LatencyHistogram)
    cpdef try_flush(self)
