# C types for the balancers of lb.py when it is compiled (see setup.py); the .py stays the source.

cdef class _Balancer:
    cdef public tuple endpoints
    cdef public tuple _keys
    cdef public object _rng


cdef class RoundRobinBalancer(_Balancer):
    cdef public Py_ssize_t _next


cdef class LeastRequestBalancer(_Balancer):
    cdef public list _active
    cdef public dict _index
    cdef public dict _by_key
    cdef public int choice_count

    cdef object _slot(self, object ep)
