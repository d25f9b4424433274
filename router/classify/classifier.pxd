# Compiled with the hot path (Cython pure-Python mode, setup.py): every unit's SQL is
# classified here. The class stays a Python class: as a C type with a __dict__ (its
# caches are plain containers) the call got cheaper and every attribute dearer.
