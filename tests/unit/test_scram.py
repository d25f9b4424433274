"""SCRAM-SHA-256 without the password (proxy.scram, proxy.auth): pg_authid's verifier
text, the ClientKey recovered from a client's proof, and a login to a server made with
that ClientKey, checked on bytes against scramp's client and server."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from scramp import ScramClient

from proxy import wire
from proxy.auth import BackendAuth, Verifiers, password_verifier
from proxy.errors import AuthenticationFailed, ProxyError
from proxy.scram import BadVerifier, KeyClient, ScramKeys, ScramMismatch, Verifier

PASSWORD = "correct horse"


def text_of(v: Verifier) -> str:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${v.iterations}:{b64(v.salt)}${b64(v.stored_key)}:{b64(v.server_key)}"


def client_key_of(password: str, v: Verifier) -> bytes:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), v.salt, v.iterations)
    return hmac.digest(salted, b"Client Key", "sha256")


def login(verifiers: Verifiers, user: str, password: str, *, looked_up: Verifier | None = None,
          libpq: bool = False):
    """A scramp client's whole exchange with the proxy's server side; the exchange."""
    client = ScramClient(["SCRAM-SHA-256"], user, password)
    exchange = verifiers.server_exchange(user, looked_up)
    first = client.get_client_first()
    if libpq:  # libpq leaves the user name out of the SCRAM message
        first = first.replace(f"n={user},", "n=,")
        client.client_first_bare = first[3:]
    client.set_server_first(exchange.first("SCRAM-SHA-256", first.encode()).decode())
    final = exchange.final(client.get_client_final().encode())
    client.set_server_final(final.decode())
    return exchange


def test_a_verifier_parses_from_pg_authid_text_and_hides_its_keys() -> None:
    v = password_verifier(PASSWORD)
    parsed = Verifier.parse(text_of(v))
    assert parsed == v
    assert base64.b64encode(v.stored_key).decode() not in repr(parsed)


@pytest.mark.parametrize("text", [
    "md5" + "0" * 32,
    PASSWORD,
    "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",  # keys too short
    "SCRAM-SHA-256$0:c2FsdA==${k}:{k}",  # no iterations
    "SCRAM-SHA-256$4096:c2F*dA==${k}:{k}",  # not base64
    "SCRAM-SHA-256$4096:c2FsdA=${k}:{k}",  # bad padding
])
def test_bad_verifiers_are_refused_without_quoting_them(text: str) -> None:
    key = base64.b64encode(b"k" * 32).decode()
    text = text.replace("{k}", key)
    with pytest.raises(BadVerifier) as info:
        Verifier.parse(text)
    assert text not in str(info.value) and key not in str(info.value)


@pytest.mark.parametrize("libpq", [False, True])
def test_the_client_key_is_recovered_from_a_right_proof(libpq: bool) -> None:
    v = password_verifier(PASSWORD)
    exchange = login(Verifiers({}, {"app": v}), "app", PASSWORD, libpq=libpq)
    assert exchange.client_key == client_key_of(PASSWORD, v)


def test_a_looked_up_verifier_logs_in_and_a_wrong_password_does_not() -> None:
    v = Verifier.parse(text_of(password_verifier(PASSWORD)))
    verifiers = Verifiers({"other": "x"})
    assert login(verifiers, "app", PASSWORD, looked_up=v).client_key == client_key_of(PASSWORD, v)
    with pytest.raises(AuthenticationFailed) as wrong:
        login(verifiers, "app", "wrong", looked_up=v)
    with pytest.raises(AuthenticationFailed) as unknown:
        login(verifiers, "app", PASSWORD)
    assert wrong.value.message == unknown.value.message == 'password authentication failed for user "app"'


def test_a_key_client_logs_in_to_a_server_holding_the_same_verifier() -> None:
    """The server side is scramp's (inside the proxy's exchange, which takes libpq's "n=,")."""
    v = password_verifier(PASSWORD)
    client = KeyClient(ScramKeys(v, client_key_of(PASSWORD, v)))
    server = Verifiers({}, {"app": v}).server_exchange("app")
    server_first = server.first("SCRAM-SHA-256", client.client_first().encode()).decode()
    server_final = server.final(client.client_final(server_first).encode())  # raises if the proof is wrong
    client.check_server_final(server_final.decode())
    assert server.client_key == client_key_of(PASSWORD, v)


def test_a_key_client_refuses_another_salt_and_a_forged_server() -> None:
    v = password_verifier(PASSWORD)
    keys = ScramKeys(v, client_key_of(PASSWORD, v))
    other = password_verifier(PASSWORD)  # the same password, another salt
    client = KeyClient(keys, nonce="abc")
    salt = base64.b64encode(other.salt).decode()
    with pytest.raises(ScramMismatch, match="another salt or iteration count"):
        client.client_final(f"r=abcdef,s={salt},i=4096")
    client = KeyClient(keys, nonce="abc")
    salt = base64.b64encode(v.salt).decode()
    with pytest.raises(ScramMismatch, match="nonce"):
        client.client_final(f"r=xyz,s={salt},i=4096")
    client.client_final(f"r=abcdef,s={salt},i=4096")
    with pytest.raises(ScramMismatch, match="signature"):
        client.check_server_final("v=" + base64.b64encode(b"x" * 32).decode())


def test_a_wrong_client_key_is_refused_by_the_server() -> None:
    v = password_verifier(PASSWORD)
    client = KeyClient(ScramKeys(v, client_key_of("wrong", v)))
    server = Verifiers({}, {"app": v}).server_exchange("app")
    server_first = server.first("SCRAM-SHA-256", client.client_first().encode()).decode()
    with pytest.raises(AuthenticationFailed):
        server.final(client.client_final(server_first).encode())


def test_backend_auth_with_keys_answers_scram_and_refuses_md5_and_cleartext_clearly() -> None:
    v = password_verifier(PASSWORD)
    keys = ScramKeys(v, client_key_of(PASSWORD, v))
    for code, payload, method in ((wire.AUTH_MD5, b"salt", "md5"), (wire.AUTH_CLEARTEXT, b"", "password")):
        with pytest.raises(AuthenticationFailed) as info:
            BackendAuth("app", keys).respond(code, payload)
        assert info.value.sqlstate == "28P01"
        assert f"asks {method} authentication" in info.value.message
        assert PASSWORD not in info.value.message and base64.b64encode(v.salt).decode() not in info.value.message
    auth = BackendAuth("app", keys)
    first = auth.respond(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    assert b"n,,n=,r=" in first
    with pytest.raises(AuthenticationFailed, match="without the password"):
        auth.respond(wire.AUTH_SASL_CONTINUE, b"r=nope,s=c2FsdA==,i=4096")


def _backend_login(auth: BackendAuth, server, *, final: bool) -> None:
    """`auth` against the proxy's own server side, as a backend would drive it; the
    server's SASLFinal is left out when `final` is false (a server, or someone between,
    that skips its signature)."""
    initial = auth.respond(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    _, client_first = wire.parse_sasl_initial(initial[5:])
    server_first = server.first("SCRAM-SHA-256", client_first)
    client_final = auth.respond(wire.AUTH_SASL_CONTINUE, server_first)
    server_final = server.final(client_final[5:])
    if final:
        assert auth.respond(wire.AUTH_SASL_FINAL, server_final) is None


@pytest.mark.parametrize("with_keys", [True, False])
def test_authentication_ok_needs_the_servers_scram_signature(with_keys: bool) -> None:
    v = password_verifier(PASSWORD)
    credential = ScramKeys(v, client_key_of(PASSWORD, v)) if with_keys else PASSWORD
    verifiers = Verifiers({}, {"app": v})
    # The whole exchange: AuthenticationOk is taken.
    auth = BackendAuth("app", credential)
    _backend_login(auth, verifiers.server_exchange("app"), final=True)
    assert auth.respond(wire.AUTH_OK, b"") is None
    # No SASLFinal, or not even a server-first-message: AuthenticationOk is refused.
    auth = BackendAuth("app", credential)
    _backend_login(auth, verifiers.server_exchange("app"), final=False)
    with pytest.raises(ProxyError, match="without its server signature"):
        auth.respond(wire.AUTH_OK, b"")
    auth = BackendAuth("app", credential)
    auth.respond(wire.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    with pytest.raises(ProxyError, match="without its server signature"):
        auth.respond(wire.AUTH_OK, b"")
    # Without SCRAM (trust), AuthenticationOk alone is the login.
    assert BackendAuth("app", credential).respond(wire.AUTH_OK, b"") is None


def _server_first_shape(verifiers: Verifiers, user: str, looked_up: Verifier | None = None) -> tuple[int, int]:
    """(salt length, iteration count) of the server-first-message a client gets for `user`."""
    client = ScramClient(["SCRAM-SHA-256"], user, "whatever")
    first = verifiers.server_exchange(user, looked_up).first("SCRAM-SHA-256", client.get_client_first().encode())
    attrs = dict(part.split("=", 1) for part in first.decode().split(","))
    return len(base64.b64decode(attrs["s"])), int(attrs["i"])


@pytest.mark.parametrize("iterations", [4096, 8192])
def test_an_unknown_user_gets_the_salt_length_and_iterations_of_a_real_verifier(iterations: int) -> None:
    """As PostgreSQL makes them (16-byte salts, the server's scram_iterations): the
    configured verifiers' count is taken by the decoy and the [[users]] passwords."""
    real = password_verifier(PASSWORD, iterations)
    assert len(real.salt) == 16
    verifiers = Verifiers({"pw_user": "pw"}, {"v_user": real, "v_user2": password_verifier("x", iterations),
                                             "odd": password_verifier("y", 10000)})
    shape = _server_first_shape(verifiers, "v_user")
    assert shape == (16, iterations)
    assert _server_first_shape(verifiers, "nobody") == shape
    assert _server_first_shape(verifiers, "someone else") == shape
    assert _server_first_shape(verifiers, "pw_user") == shape
    assert _server_first_shape(verifiers, "looked_up", real) == shape
    # Without [[users]] verifiers: PostgreSQL's default.
    assert _server_first_shape(Verifiers({"pw_user": "pw"}), "nobody") == (16, 4096)


def test_a_key_client_aborts_on_a_mandatory_extension() -> None:
    v = password_verifier(PASSWORD)
    client = KeyClient(ScramKeys(v, client_key_of(PASSWORD, v)), nonce="abc")
    salt = base64.b64encode(v.salt).decode()
    with pytest.raises(ScramMismatch, match="mandatory SCRAM extension"):
        client.client_final(f"m=ext,r=abcdef,s={salt},i={v.iterations}")
