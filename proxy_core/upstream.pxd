# C types for the upstream connection and its pool (see setup.py); upstream.py stays the source.
cimport cython
from proxy_core.http1 cimport ResponseParser


@cython.final
cdef class UpstreamConnection:
    cdef public object key
    cdef public object transport
    cdef public ResponseParser parser
    cdef public object sink
    cdef public bint closed
    cdef public double idle_since
    cdef public bint reused
    cdef public bint got_data
    cdef public object circuit
    cdef public double created
    cdef public long requests

    cpdef attach(self, object sink)
    cpdef detach(self)
    cpdef close(self)


@cython.final
cdef class UpstreamPool:
    cdef public object dialer
    cdef public int max_idle
    cdef public double idle_timeout
    cdef public dict _idle
    cdef public object _evictor
    cdef public long connects
    cdef public object writes

    cpdef UpstreamConnection take_idle(self, object key)
    cpdef release(self, UpstreamConnection conn)
