# Which hot modules run compiled is settled before the first of them is imported.
import hotpath as _hotpath

_hotpath.choose()
