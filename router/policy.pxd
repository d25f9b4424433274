# Compiled with the hot path (Cython pure-Python mode, setup.py): the decision is made
import cython

# once per unit, and the session's routing calls it as a C function.
cpdef decide_route(unit, session, topo, load, long tiebreak=*, bint allow_wait=*)
cdef _read(session, topo, load, long tiebreak, bint allow_wait)
cdef _primary(topo, bint writes, str reason, token=*, load=*, long tiebreak=*)
@cython.locals(best_score=double, score=double)
cdef _pick(tuple candidates, load, long tiebreak)
