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
