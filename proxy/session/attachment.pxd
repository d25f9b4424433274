import cython

from proxy.server.pool cimport Pool
from proxy.server.replies cimport ForwardStep, Step
from proxy.session.stream cimport ByteStream

cdef class Attachment(ByteStream):
    cpdef _attach(self, conn, backend, unit, facts)
    cpdef _detach(self, server)
    @cython.locals(pool=Pool)
    cpdef _release(self)
    @cython.locals(fwd=ForwardStep)
    cpdef unit_ready(self, server, Step step)
    cpdef _settle(self, server)
