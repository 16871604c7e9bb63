"""TLS for the cluster: a small certificate authority, and the Dask ``Security`` of each role.

Dask's TLS is mutual: every server (scheduler, nanny, worker) asks its peers for a
certificate signed by the CA, and every connection presents one.  Hostnames are not
checked (Dask turns that off), so one certificate and key may serve every role.

.. code-block:: bash

    python3 -m glinthawk_dask.runtime.tls certs/           # ca.pem, cert.pem, key.pem for 127.0.0.1/localhost
    python3 -m glinthawk_dask.runtime.tls certs/ --host 10.0.0.5 --host node1.example

Instead of passing files to every command, Dask's configuration may hold them
(``distributed.comm.tls.ca-file``, ``distributed.comm.tls.client.cert`` and ``.key``, ...,
or the environment variables ``DASK_DISTRIBUTED__COMM__TLS__CA_FILE`` and so on): a
``Client`` and every Dask server read them when no ``Security`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import GlinthawkError

__all__ = ["TLSFiles", "make_certs", "security"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
ROLES = ("client", "scheduler", "worker")


@dataclass(frozen=True)
class TLSFiles:
    """PEM files: the CA certificate, and a certificate and key it signed."""

    ca_file: str
    cert: str
    key: str


def make_certs(directory: str | os.PathLike, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365) -> TLSFiles:
    """Write ``ca.pem``, ``cert.pem`` and ``key.pem`` into ``directory`` (created if needed).

    A new CA signs one certificate, for servers and clients both, naming ``hosts``
    (IP addresses or DNS names).  The CA's own key is not kept: to add hosts, make a new
    set and give it to every process.  ``key.pem`` is readable by its owner only.
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise GlinthawkError("making certificates needs the cryptography package: pip install cryptography") from None

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "glinthawk-dask"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("glinthawk-dask CA")).issuer_name(name("glinthawk-dask CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    hosts = list(dict.fromkeys(hosts))  # without repeats
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0] if hosts else "glinthawk")).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(str(out / "ca.pem"), str(out / "cert.pem"), str(out / "key.pem"))
    Path(files.ca_file).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    Path(files.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return files


def security(role: str, ca_file: str | None = None, cert: str | None = None, key: str | None = None):
    """The ``distributed.Security`` of ``role`` (client, scheduler or worker) from PEM files.

    None when no file is given (Dask's configuration applies then); all three are
    needed otherwise, since Dask's TLS is mutual.  Encryption is required: the role
    refuses plain ``tcp://`` peers.
    """
    from distributed import Security

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    given = {"ca_file (--tls-ca-file)": ca_file, "cert (--tls-cert)": cert, "key (--tls-key)": key}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise GlinthawkError("TLS needs ca_file, cert and key together (--tls-ca-file, --tls-cert and --tls-key "
                             f"on the command line); missing {', '.join(missing)}")
    for name, value in given.items():
        if not os.path.isfile(value):
            raise GlinthawkError(f"{name} {value}: no such file")
    return Security(**{"tls_ca_file": ca_file, f"tls_{role}_cert": cert, f"tls_{role}_key": key,
                       "require_encryption": True})


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m glinthawk_dask.runtime.tls",
                                     description="Make a CA and a certificate/key for the cluster's TLS.")
    parser.add_argument("directory", help="where to write ca.pem, cert.pem and key.pem")
    parser.add_argument("--host", action="append", default=None,
                        help="IP address or DNS name the certificate names (repeatable) "
                             f"[default: {' '.join(DEFAULT_HOSTS)}]")
    parser.add_argument("--days", type=int, default=365, help="validity [default: 365]")
    args = parser.parse_args(argv)
    try:
        files = make_certs(args.directory, hosts=args.host or DEFAULT_HOSTS, days=args.days)
    except (GlinthawkError, OSError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"--tls-ca-file {files.ca_file} --tls-cert {files.cert} --tls-key {files.key}")


if __name__ == "__main__":  # pragma: no cover
    _main()
