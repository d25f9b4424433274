# Compiled with the hot path (Cython pure-Python mode, setup.py): every unit's SQL is
# classified here; the class stays a Python class (its caches are plain containers).
