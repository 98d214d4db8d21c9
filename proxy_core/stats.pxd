# C types for stats.py when it is compiled (see setup.py); the .py stays the source.
cimport cython


@cython.final
cdef class StatsRecorder:
    cdef public dict destinations

    cpdef record(self, str destination, object status, object duration_ms, str flags=*)
