# C types for the text checks every unit's SQL goes through (Cython pure-Python mode,
# setup.py): typed as str, the substring tests are C calls, not method lookups.
import cython

cpdef parse_hint(str sql)
cpdef bint mentions_sync_commit(str sql)
@cython.locals(text=bytes)
cpdef literal_shape(str sql)
@cython.locals(head=str, c=str, low=str, ch=Py_UCS4, prev=Py_UCS4, quotes=Py_ssize_t, double_quotes=Py_ssize_t,
               after_semicolon=bint)
cpdef bint is_trivial_select(str sql)
