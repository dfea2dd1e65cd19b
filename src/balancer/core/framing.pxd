cdef class LineFramer:
    cdef public Py_ssize_t max_line
    cdef public bytearray _buf
    cdef public Py_ssize_t held
