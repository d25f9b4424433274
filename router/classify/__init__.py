"""SQL text -> routing and session-state analysis (router.classify.classifier). Import
from the submodules; the names below are re-exported for proxy/session.py only."""

from router.classify.analysis import Analysis, Pin, Route, TxControl, Unpin

__all__ = ["Analysis", "Pin", "Route", "TxControl", "Unpin"]
