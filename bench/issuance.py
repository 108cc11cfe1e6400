"""X509-SVID issuance rate: meshward's CA (sign + record in SQLite) vs raw cryptography.

Both sides sign the same kind of certificate (P-256 CA, P-256 leaf key, the X509-SVID
extensions) in one run on one machine; the ratio is what the target is stated in.

    .venv/bin/python bench/issuance.py [--seconds 3] [--database-url URL]

Target: ratio >= 0.5 on SQLite.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client import CollectorRegistry
from spiffe import SpiffeId, TrustDomain

from identity.authority import CASettings, CertificateAuthority
from identity.metrics import IdentityMetrics
from identity.store.database import Database, sqlite_url
from identity.store.issued import list_issued

TARGET = 0.5


def rate(
    fn: Callable[[int], None], seconds: float, finish: Callable[[], object] = lambda: None
) -> float:
    """Calls per second; ``finish`` runs inside the timed span (waiting for persistence)."""
    fn(0)  # warm up
    finish()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn(done)
        done += 1
    finish()
    return done / (time.perf_counter() - started)


def raw_signer(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> Callable[[int], None]:
    leaf_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    uri = x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("spiffe://example.org/bench")]
    )
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())

    def sign(i: int) -> None:
        now = datetime.now(UTC)
        (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshward")]))
            .issuer_name(ca_cert.subject)
            .public_key(leaf_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(uri, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    return sign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per side")
    parser.add_argument("--database-url", help="default: SQLite in a temporary directory")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = Database(args.database_url or sqlite_url(Path(tmp)))
        db.migrate()
        ca = CertificateAuthority(
            db=db,
            trust_domain=TrustDomain("example.org"),
            key_dir=Path(tmp) / "keys",
            settings=CASettings(),
            metrics=IdentityMetrics(CollectorRegistry()),
        )
        ca.load(datetime.now(UTC))
        active = ca.active
        assert active is not None
        assert active.issuer is not None
        key = active.issuer.key
        assert isinstance(key, ec.EllipticCurvePrivateKey)

        spiffe_id = SpiffeId("spiffe://example.org/bench")
        leaf_key = ec.generate_private_key(ec.SECP256R1()).public_key()

        def ours(i: int) -> None:
            ca.sign_x509_svid(
                public_key=leaf_key,
                spiffe_id=spiffe_id,
                ttl=None,
                issued_to="bench",
                now=datetime.now(UTC),
            )

        raw = rate(raw_signer(key, active.certificate), args.seconds)
        meshward = rate(ours, args.seconds, finish=ca.flush)
        with db.transaction() as session:
            recorded = len(list_issued(session, spiffe_id=str(spiffe_id)))
        ca.close()
        db.dispose()

    backend = "SQLite" if not args.database_url else db.display_url
    ratio = meshward / raw
    print(f"raw cryptography build+sign : {raw:9.0f} certs/s")
    print(f"meshward sign+record ({backend}): {meshward:9.0f} SVIDs/s")
    print(f"records committed            : {recorded:9d}")
    print(
        f"ratio                        : {ratio:9.2f}  (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
