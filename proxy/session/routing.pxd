import cython

from proxy.server.pool cimport Pool
from proxy.server.replies cimport ForwardStep
from proxy.session.forward cimport Forwarding
from router.policy cimport decide_route

cdef class Routing(Forwarding):
    @cython.locals(step=ForwardStep)
    cpdef ForwardStep _send_unit(self, conn, bytes data, analysis, ext, bytes trailer=*)
    cpdef bint _common_unit(self, bytes data)
    cpdef bint _route_now(self, facts, unit, bint whole)
    cpdef _decide(self, facts, token, bint allow_wait=*)
    @cython.locals(pool=Pool)
    cpdef _borrow_now(self, backend)
    cpdef classify(self, sql)
