# Which hot modules run compiled is settled before the first of them is imported
# (router's policy and classifier are compiled, with proxy's session and server).
import hotpath as _hotpath

_hotpath.choose()
