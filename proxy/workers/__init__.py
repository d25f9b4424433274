"""`pgsplit run --workers N`: a supervisor (monitor, admin API, the data plane's fan-out)
and N worker processes serving clients on one port."""
