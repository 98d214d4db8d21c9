# C declarations for accesslog.py when it is compiled (see setup.py); the .py stays the source.
cimport cython

cdef dict _QUOTED
cdef tuple _MILLIS
cdef str _quote(str text)


@cython.final
cdef class AccessLog:
    cdef public object sink
    cdef public bint enabled
    cdef public object parquet
    cdef public list _lines
    cdef public object _timer
    cdef public double _interval
    cdef public long _sec
    cdef public str _sec_text

    @cython.locals(sec=long)
    cpdef log(self, double start_time, str method, str path, str protocol, object response_code,
              str response_flags, object bytes_received, object bytes_sent, object duration_ms,
              object upstream_service_time, object x_forwarded_for, object user_agent, object request_id,
              str authority, object upstream_host, object upstream_cluster, object route_name,
              str downstream_remote_address, str listener, object downstream_peer_uri_san=*,
              object grpc_status=*)
