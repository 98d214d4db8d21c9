# C fields for the request view of router.py when it is compiled (see setup.py).

cdef class RequestInfo:
    cdef public object method
    cdef public object path
    cdef public object authority
    cdef public object headers
    cdef public object scheme
    cdef public object port
    cdef public object source_ip
    cdef public object generated_cookie
    cdef public object source_principal
    cdef public object source
    cdef public object _path_only
    cdef public object _query
    cdef public object _host


cdef class Router:
    cdef public object snapshot
    cdef public dict _exact
    cdef public tuple _suffix
    cdef public tuple _prefix
    cdef public list _star
    cdef public dict _by_host
    cdef public dict _cache
    cdef public dict _flat
    cdef public dict _plans

    cpdef virtual_host(self, str authority, object port, object default_host=*)
    cpdef match_with(self, object vhost, RequestInfo req)
