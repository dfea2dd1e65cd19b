# Cython declarations for stats.py (the compiled build; see balancer.native).
cdef class LatencyHistogram:
    cdef public object bounds
    cdef public list counts
    cdef public double total
    cdef object __weakref__

    cpdef observe(self, double seconds)
