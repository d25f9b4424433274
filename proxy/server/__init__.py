"""The server side of the data plane: connections to backends, the replies they carry,
and the pools that lend them. Nothing here imports the client side (proxy.session): a
server connection talks to the session it is lent to through replies.StepOwner."""
