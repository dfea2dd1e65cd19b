# Cython declarations for request.py (the compiled build; see balancer.native).
cimport cython


@cython.freelist(1024)
cdef class Request:
    cdef public object session
    cdef public object payload
    cdef public object reply
    cdef public object backend
    cdef public object tried
    cdef public object attempts
    cdef public object shortages
    cdef public double started
    cdef public double sent
    cdef public double queued_at
