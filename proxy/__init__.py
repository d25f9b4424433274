# Which hot modules run compiled is settled before the first of them is imported.
from proxy import compiled as _compiled

_compiled.choose()
