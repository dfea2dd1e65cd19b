# Cython declarations for connection.py (the compiled build; see balancer.native).
cimport cython

from balancer.proxy.message.request cimport Request

cdef class BackendConnection:
    cdef public object channel
    cdef public bint _raw
    cdef public object transport
    cdef public bint connected
    cdef public bint closed
    cdef public bint usable
    cdef public bint retiring
    cdef public bint scheduled
    cdef public object owner
    cdef public object _loop_registration
    cdef public object _error
    cdef public bint _eof
    cdef public bint _by_us
    cdef public object pending
    cdef public list out
    cdef public object served
    cdef public object _framer
    cdef object __weakref__

    cpdef enqueue(self, Request req)

    @cython.locals(out=list, n=Py_ssize_t)
    cpdef flush(self)

    @cython.locals(replies=list, written=Py_ssize_t)
    cpdef data_received(self, data)
