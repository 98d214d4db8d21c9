# C declarations for accesslog.py when it is compiled (see setup.py); the .py stays the source.

cdef dict _QUOTED
cdef tuple _MILLIS
cdef str _quote(str text)
