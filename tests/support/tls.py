"""Test certificates: a throwaway CA and a server certificate for 127.0.0.1 / localhost.

Made with the ``openssl`` command line (the ``cryptography`` package is not a dependency).
Elliptic-curve keys keep generation to a few milliseconds.

    files = make_certificates(tmp_path)      # files.ca, files.cert, files.key
    reason = redis_tls_unsupported()         # None, or why this redis-server cannot do TLS
"""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def make_certificates(directory: Path, *, name: str = "test") -> TlsFiles:
    """A CA (``{name}-ca.pem``) and a server certificate it signed, valid for 127.0.0.1,
    ::1 and localhost, for two days."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is not on PATH")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = f"{name}-ca.pem", f"{name}-ca.key"
    cert, key, csr = f"{name}-server.pem", f"{name}-server.key", f"{name}-server.csr"
    _openssl(
        "req", "-x509", "-new", *_EC, "-keyout", ca_key, "-out", ca, "-days", "2",
        "-subj", f"/CN=upbit-broker {name} CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    _openssl("req", "-new", *_EC, "-keyout", key, "-out", csr, "-subj", "/CN=localhost",
             cwd=directory)  # fmt: skip
    ext = directory / f"{name}-ext.cnf"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext.name,
        cwd=directory,
    )  # fmt: skip
    return TlsFiles(directory / ca, directory / cert, directory / key)


@functools.cache
def redis_tls_unsupported() -> str | None:
    """None when this redis-server serves TLS; otherwise the precise reason it cannot."""
    binary = shutil.which("redis-server")
    if binary is None:
        return "redis-server is not on PATH"
    if shutil.which("openssl") is None:
        return "the openssl command (needed to make test certificates) is not on PATH"
    with tempfile.TemporaryDirectory(prefix="upbit-tls-probe-") as tmp:
        files = make_certificates(Path(tmp), name="probe")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--tls-cert-file", str(files.cert), "--tls-key-file", str(files.key),
             "--tls-ca-cert-file", str(files.ca), "--tls-auth-clients", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    out = (proc.stdout.read() if proc.stdout else "").strip().splitlines()
                    return f"redis-server refused --tls-port: {out[-1] if out else proc.returncode}"
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    return None
                except OSError:
                    time.sleep(0.05)
            return "redis-server did not open its --tls-port within 5 s"
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


__all__ = ["TlsFiles", "make_certificates", "redis_tls_unsupported"]
