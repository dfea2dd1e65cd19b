"""HTTP/1.1 without I/O: reading and writing messages, and the header rules of a proxy."""
