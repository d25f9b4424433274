"""Throwaway certificates for sandbox servers that speak TLS.

Owns: a test certificate authority and a server certificate it signed, valid for
127.0.0.1 and localhost (the sandbox's servers listen there), made with the openssl
command line (scripts/install.sh installs it). A second call in another directory makes an
unrelated authority: the certificate a client must refuse.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SandboxCa", "make_sandbox_ca"]


@dataclass(frozen=True)
class SandboxCa:
    ca_cert: Path  # what a client trusts (sslrootcert)
    server_cert: Path  # signed by it, for 127.0.0.1 and localhost
    server_key: Path


def make_sandbox_ca(directory: Path, name: str = "pgsplit sandbox CA") -> SandboxCa:
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl is missing: scripts/install.sh (make test) installs it")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.crt"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", str(ca_key), "-out", str(ca_cert))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))
    return SandboxCa(ca_cert, cert, key)
