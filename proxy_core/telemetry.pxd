# C types for telemetry.py when it is compiled (see setup.py); the .py stays the source.
cimport cython


@cython.final
cdef class TelemetryRecorder:
    cdef public long max_rows
    cdef public long dropped_total
    cdef public list _rows
    cdef public long _free
    cdef public long _dropped
    cdef public list _dims
    cdef public dict _index
    cdef public object _snapshot

    cpdef record(self, object snapshot, object route, object wc, object cluster, object endpoint, object req,
                 object start_time, object response_code, object response_flags, object duration_ms,
                 object request_bytes, object response_bytes, object source=*, object mutual_tls=*,
                 object grpc_status=*)
