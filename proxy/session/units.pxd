# C types for the unit's framing and shape (Cython pure-Python mode, setup.py): every
# unit of the fast case is recognised here.
import cython

@cython.locals(n=Py_ssize_t, length=Py_ssize_t)
cpdef bint is_lone_query(bytes data)

@cython.locals(t=int, n=Py_ssize_t, start_b=Py_ssize_t, end_b=Py_ssize_t, x=Py_ssize_t, end_sql=Py_ssize_t,
               off=Py_ssize_t, described=bint)
cpdef extended_unit(bytes data, stmts)
