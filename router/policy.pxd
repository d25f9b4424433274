# Compiled with the hot path (Cython pure-Python mode, setup.py): the decision is made
# once per unit, and the session's routing calls it as a C function.
import cython

cpdef decide_route(unit, session, topo, load, Py_ssize_t tiebreak=*, bint allow_wait=*)
cdef _read(session, topo, load, Py_ssize_t tiebreak, bint allow_wait)
cdef _primary(topo, bint writes, str reason, token=*, load=*, Py_ssize_t tiebreak=*)
@cython.locals(best_score=double, score=double)
cdef _pick(tuple candidates, load, Py_ssize_t tiebreak)
