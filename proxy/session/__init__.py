"""A client session after the handshake (proxy.session.client.ClientSession) and its parts:
the transaction (transaction), what follows the client between server connections
(carried), the read-your-writes token (consistency), units in the byte stream (units),
and what the session may ask of the process (host). Import from the submodules."""
