# C types for coalesce.py when it is compiled (see setup.py); the .py stays the source.
cimport cython


@cython.final
cdef class CoalescingTransport:
    cdef public object transport
    cdef public WriteBatch batch
    cdef list _held

    cpdef write(self, object data)
    cpdef flush(self)


@cython.final
cdef class WriteBatch:
    cdef public object loop
    cdef list _pending
    cdef list _finished
    cdef bint _scheduled
    cdef object _flush_cb
    cdef object _context

    cpdef add(self, CoalescingTransport transport)
    cpdef record_later(self, object item)
    cdef _schedule(self)
    cpdef flush(self)
