# C types for the connection driver and the exchange of server.py when it is compiled
# (see setup.py); server.py stays the source and runs unchanged without this file.
cimport cython
from proxy_core.accesslog cimport AccessLog
from proxy_core.http1 cimport RequestHead, RequestParser, ResponseHead
from proxy_core.router cimport RequestInfo, Router
from proxy_core.stats cimport StatsRecorder
from proxy_core.telemetry cimport TelemetryRecorder
from proxy_core.upstream cimport UpstreamConnection


@cython.final
cdef class _State:
    cdef public object snapshot
    cdef public Router router
    cdef public dict balancers
    cdef public object local_endpoints
    cdef public dict rate_limits
    cdef public dict security
    cdef public dict resilience
    cdef public dict caches
    cdef public dict gateway_routers
    cdef public dict _ops


@cython.final
cdef class HttpConnection:
    cdef public object server
    cdef public object listener
    cdef public object transport
    cdef public RequestParser parser
    cdef public str peer
    cdef public str peer_ip
    cdef public bytes peer_ip_bytes
    cdef public Exchange active
    cdef public object backlog
    cdef public int paused
    cdef public object tunnel
    cdef public bint eof
    cdef public object pending_error
    cdef public object peer_principal
    cdef public object source
    cdef public object h2_stream

    cpdef pause(self, int reason)
    cpdef resume(self, int reason)
    cpdef on_head(self, RequestHead head)
    cpdef on_data(self, bytes data)
    cpdef on_end(self, list trailers)
    cpdef request_done(self, Exchange ex, bint keep_alive)


@cython.final
cdef class Exchange:
    cdef public HttpConnection conn
    cdef public object server
    cdef public _State state
    cdef public RequestHead head
    cdef public object loop
    cdef public double t0
    cdef public double t_wall
    cdef public double duration_ms
    cdef public list flags
    cdef public list body
    cdef public list tried
    cdef public list out
    cdef public list tunnel_pending
    cdef public RequestInfo req
    cdef public object route
    cdef public object match
    cdef public object wc
    cdef public object cluster
    cdef public object balancer
    cdef public bint done
    cdef public bint request_complete
    cdef public Py_ssize_t bytes_received
    cdef public Py_ssize_t bytes_sent
    cdef public Py_ssize_t body_size
    cdef public bint body_retriable
    cdef public list trailers
    cdef public bytes up_head
    cdef public UpstreamConnection upstream
    cdef public object endpoint
    cdef public int attempt
    cdef public object connecting
    cdef public object try_timer
    cdef public object route_timer
    cdef public object retry_timer
    cdef public bint response_started
    cdef public bint resp_chunked
    cdef public bint close_after
    cdef public double up_start
    cdef public object up_time
    cdef public object request_id
    cdef public object xff
    cdef public int status
    cdef public tuple resp_ops
    cdef public object set_cookie
    cdef public object pipe
    cdef public bint up_paused
    cdef public bint counted_on_start
    cdef public bint up_keep_alive
    cdef public Py_ssize_t resp_head_bytes
    cdef public object rl_bucket
    cdef public object cors_ops
    cdef public object mirror_pending
    cdef public object authz
    cdef public object span
    cdef public object up_tls
    cdef public object resilience
    cdef public object grpc_status
    cdef public object cache

    @cython.locals(router=Router, req=RequestInfo)
    cpdef start(self)
    cpdef _to_cluster(self)
    cpdef _prepare_upstream(self, str path, str authority, tuple ops)
    cpdef _attempt(self)
    cpdef _send(self, UpstreamConnection conn)
    cpdef _end_attempt(self)
    cpdef _release_upstream(self, bint reusable)
    cpdef on_body(self, bytes data)
    cpdef on_body_end(self, list trailers)
    cpdef on_head(self, ResponseHead rh)
    cpdef on_data(self, bytes data)
    cpdef on_end(self, list trailers)
    cpdef flush(self)
    cpdef _response_head(self, ResponseHead rh)
    cpdef _complete(self, bint upstream_reusable)
    @cython.locals(alog=AccessLog, telemetry=TelemetryRecorder, destinations=StatsRecorder)
    cpdef record(self)
    cpdef _finish_downstream(self)
