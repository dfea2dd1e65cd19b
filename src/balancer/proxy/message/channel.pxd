# Cython declarations for channel.py (the compiled build; see balancer.native).
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
