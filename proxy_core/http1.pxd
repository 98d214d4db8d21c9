# C types for the parsers of http1.py when it is compiled (see setup.py); the .py stays the source.

cdef frozenset _FRAMING


cdef class _Head:
    pass

cdef class RequestHead(_Head):
    cdef public bytes method
    cdef public bytes target
    cdef public str version
    cdef public list headers
    cdef public bint keep_alive
    cdef public bint upgrade
    cdef public object content_length
    cdef public bint chunked
    cdef public bint expect_continue

cdef class ResponseHead(_Head):
    cdef public int status
    cdef public bytes reason
    cdef public str version
    cdef public list headers
    cdef public bint keep_alive
    cdef public object content_length
    cdef public bint chunked

cdef class EventCollector:
    cdef public list events

cdef class _Parser:
    cdef public object _parser
    cdef public object sink
    cdef public object _collector
    cdef public list _headers
    cdef public object _trailers
    cdef public bint _in_head
    cdef public Py_ssize_t _head_size
    cdef public Py_ssize_t _partial
    cdef public object _content_length
    cdef public bint _chunked
    cdef public bint _expect
    cdef public Py_ssize_t max_header_bytes
    cdef public Py_ssize_t max_headers
    cdef public bint _switched
    cdef public int _error_status
    cdef public int _large_status

    cpdef on_header(self, bytes name, bytes value)
    cpdef _begin_message(self)
    cpdef _end_head(self)
    cpdef _trailer(self, bytes name, bytes value)
    cpdef _framing(self, bytes name, bytes value)
    cpdef list _feed(self, bytes data)

cdef class RequestParser(_Parser):
    cdef public bytes _url

cdef class ResponseParser(_Parser):
    cdef public bytes _reason
    cdef public bint _head_request
    cdef public bint _until_eof
    cdef public bint _in_body
