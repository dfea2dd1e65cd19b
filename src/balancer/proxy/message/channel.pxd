# Cython declarations for channel.py (the compiled build; see balancer.native).
cimport cython

from balancer.proxy.message.connection cimport BackendConnection
from balancer.proxy.message.request cimport Request

cdef class BackendChannel:
    cdef public object service
    cdef public object backend
    cdef public object owner
    cdef public object framing
    cdef public bint raw
    cdef public Py_ssize_t max_connections
    cdef public list connections
    cdef public object waiting
    cdef public bint retired
    cdef public bint resend_on_close
    cdef public object last

    @cython.locals(conn=BackendConnection, last=BackendConnection, best=BackendConnection,
                   n=Py_ssize_t, best_n=Py_ssize_t, conns=list)
    cpdef send(self, Request req)

    @cython.locals(conn=BackendConnection, usable=Py_ssize_t)
    cpdef bint _would_open(self)
