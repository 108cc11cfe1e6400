"""The certificate authority: key slots, their rotation, and signing of X509- and JWT-SVIDs.

Each slot holds an X.509 signing certificate and a JWT signing key with one lifetime.
A slot goes PREPARED → ACTIVE → OLD, then is pruned:

* at 1/2 of the active slot's life the next slot is prepared and its root (and JWT key)
  published in the bundle at once, so every peer trusts it before anything chains to it;
* at 5/6 of the active slot's life the prepared slot becomes active;
* an old slot stays in the bundle until it expires plus a grace, then is pruned.

Time is always an argument (``now``): the server passes the wall clock, tests a fake one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import SpiffeId, TrustDomain

from identity.bundle import JwtAuthority, TrustBundle
from identity.errors import CAUnavailableError, InvalidInputError
from identity.issuance_log import IssuanceLog
from identity.keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    generate_key,
    jwt_algorithm,
    load_private_key,
    load_public_key,
    write_private_key,
)
from identity.metrics import IdentityMetrics
from identity.store.database import Database
from identity.store.issued import IssuedCertificate
from identity.store.journal import (
    SlotRecord,
    StoredBundle,
    delete_slot,
    list_slots,
    load_bundle,
    save_bundle,
    save_slot,
)
from identity.upstream import UpstreamAuthority
from identity.x509certs import BACKDATE, Issuer, build_ca_certificate, build_leaf

__all__ = [
    "CASettings",
    "CertificateAuthority",
    "JwtSvidIssue",
    "Slot",
    "SlotState",
    "X509SvidIssue",
]

log = logging.getLogger(__name__)


class SlotState(StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    OLD = "old"


@dataclass(slots=True, frozen=True)
class CASettings:
    key_type: KeyType = KeyType.EC_P256
    jwt_key_type: KeyType = KeyType.EC_P256
    ttl: timedelta = timedelta(hours=24)
    x509_svid_ttl: timedelta = timedelta(hours=1)
    jwt_svid_ttl: timedelta = timedelta(minutes=5)
    bundle_grace: timedelta = timedelta(hours=1)
    refresh_hint: timedelta = timedelta(minutes=5)


@dataclass(slots=True, frozen=True)
class Slot:
    id: str
    state: SlotState
    key_type: KeyType
    certificate: x509.Certificate
    upstream_chain: tuple[x509.Certificate, ...]
    jwt: JwtAuthority
    # None when the key files were lost: the slot can no longer sign but its root and
    # JWT key stay published until it expires, because SVIDs may still chain to them.
    issuer: Issuer | None
    jwt_key: PrivateKey | None
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None

    @property
    def not_before(self) -> datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return (self.certificate, *self.upstream_chain)

    def at_fraction(self, fraction: float) -> datetime:
        return self.not_before + (self.not_after - self.not_before) * fraction

    @property
    def prepare_at(self) -> datetime:
        return self.at_fraction(1 / 2)

    @property
    def activate_at(self) -> datetime:
        return self.at_fraction(5 / 6)


@dataclass(slots=True, frozen=True)
class X509SvidIssue:
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, then the issuers below the root
    spiffe_id: SpiffeId
    capped: bool  # NotAfter was cut to the issuing CA's NotAfter


@dataclass(slots=True, frozen=True)
class JwtSvidIssue:
    token: str
    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: datetime
    key_id: str
    capped: bool


class CertificateAuthority:
    def __init__(
        self,
        *,
        db: Database,
        trust_domain: TrustDomain,
        key_dir: Path,
        settings: CASettings,
        metrics: IdentityMetrics,
        upstream: UpstreamAuthority | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.settings = settings
        self._db = db
        self._key_dir = key_dir
        # The CA's own key directory is private whatever it was before.
        key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(key_dir, 0o700)
        self._metrics = metrics
        self._upstream = upstream
        self._lock = threading.Lock()
        self._slots: tuple[Slot, ...] = ()
        self._active: Slot | None = None
        self._bundle: TrustBundle | None = None
        self._issued = IssuanceLog(db)

    # -- state ---------------------------------------------------------------------------

    @property
    def upstream(self) -> UpstreamAuthority | None:
        return self._upstream

    @property
    def active(self) -> Slot | None:
        return self._active

    @property
    def slots(self) -> tuple[Slot, ...]:
        return self._slots

    @property
    def bundle(self) -> TrustBundle:
        if self._bundle is None:
            raise CAUnavailableError("the CA has not been loaded yet")
        return self._bundle

    def load(self, now: datetime) -> None:
        """Read the journal and key files, then rotate whatever is due (bootstrap included)."""
        with self._db.transaction() as session:
            records = list_slots(session)
            stored = load_bundle(session, trust_domain=self.trust_domain.name)
        slots = tuple(self._restore(record) for record in records)
        for slot in slots:
            self._check_trust_domain(slot)
        with self._lock:
            self._set_slots(slots)
            sequence = stored.sequence if stored else 0
            self._bundle = self._build_bundle(sequence)
            # A first start has nothing to publish yet: rotation publishes the first CA.
            if slots and (stored is None or self._bundle_changed(stored)):
                self._publish(now, sequence + 1)
        self.rotate(now)

    def rotate(self, now: datetime, *, force: bool = False) -> list[str]:
        """Advance the slots to ``now``; with ``force`` prepare and activate a new CA at once.

        Returns what happened, one line per change (for logs and ``meshward ca rotate``).
        """
        with self._lock:
            events: list[str] = []
            slots = list(self._slots)
            active = self._active
            prepared = next((s for s in slots if s.state is SlotState.PREPARED), None)
            if prepared is not None and prepared.not_after <= now:
                slots.remove(prepared)
                events.append(f"pruned CA {prepared.id} (expired before it was activated)")
                prepared = None
            if active is not None and active.not_after <= now:
                events.append(
                    f"active CA {active.id} expired at {active.not_after:%Y-%m-%dT%H:%M:%SZ}"
                )
            need_active = active is None or active.not_after <= now
            due_prepare = force or need_active or (active is not None and now >= active.prepare_at)
            due_activate = (
                force or need_active or (active is not None and now >= active.activate_at)
            )
            if due_prepare and prepared is None:
                prepared = self._new_slot(now)
                slots.append(prepared)
                events.append(
                    f"prepared CA {prepared.id} (valid until {prepared.not_after:%Y-%m-%dT%H:%M:%SZ})"
                )
            if due_activate and prepared is not None:
                slots = [
                    replace(s, state=SlotState.OLD, retired_at=now)
                    if s.state is SlotState.ACTIVE
                    else s
                    for s in slots
                ]
                slots = [
                    replace(s, state=SlotState.ACTIVE, activated_at=now)
                    if s.id == prepared.id
                    else s
                    for s in slots
                ]
                events.append(f"activated CA {prepared.id}")
            for slot in list(slots):
                if (
                    slot.state is SlotState.OLD
                    and slot.not_after + self.settings.bundle_grace <= now
                ):
                    slots.remove(slot)
                    events.append(f"pruned CA {slot.id} (expired; removed from the bundle)")
            if events:
                self._commit(tuple(slots), now)
                for event in events:
                    log.info("ca: %s", event)
            return events

    # -- signing -------------------------------------------------------------------------

    def sign_x509_svid(
        self,
        *,
        public_key: PublicKey,
        spiffe_id: SpiffeId,
        dns_names: tuple[str, ...] = (),
        ttl: timedelta | None,
        issued_to: str,
        now: datetime,
    ) -> X509SvidIssue:
        started = time.perf_counter()
        slot = self._require_active(now)
        assert slot.issuer is not None
        not_after = now + (ttl or self.settings.x509_svid_ttl)
        capped = not_after > slot.not_after
        if capped:
            log.warning(
                "ca: X509-SVID for %s capped at the CA's NotAfter %s", spiffe_id, slot.not_after
            )
            not_after = slot.not_after
        cert = build_leaf(
            public_key=public_key,
            spiffe_id=spiffe_id,
            dns_names=dns_names,
            not_before=now - BACKDATE,
            not_after=not_after,
            issuer=slot.issuer,
        )
        self._record(
            cert, spiffe_id=str(spiffe_id), issued_to=issued_to, slot_id=slot.id, kind="x509-svid"
        )
        self._metrics.svids_signed.labels("x509_svid").inc()
        self._metrics.signing_seconds.labels("x509_svid").observe(time.perf_counter() - started)
        return X509SvidIssue(
            certificate=cert, chain=(cert, *slot.chain), spiffe_id=spiffe_id, capped=capped
        )

    def sign_jwt_svid(
        self,
        *,
        spiffe_id: SpiffeId,
        audience: tuple[str, ...],
        ttl: timedelta | None,
        now: datetime,
    ) -> JwtSvidIssue:
        started = time.perf_counter()
        if not audience or any(not a.strip() for a in audience):
            raise InvalidInputError("at least one non-empty audience is required", field="audience")
        slot = self._require_active(now)
        assert slot.jwt_key is not None
        expires_at = now + (ttl or self.settings.jwt_svid_ttl)
        capped = expires_at > slot.not_after
        if capped:
            log.warning(
                "ca: JWT-SVID for %s capped at the key's expiry %s", spiffe_id, slot.not_after
            )
            expires_at = slot.not_after
        token = jwt.encode(
            {
                "sub": str(spiffe_id),
                "aud": list(audience),
                "exp": int(expires_at.timestamp()),
                "iat": int(now.timestamp()),
            },
            slot.jwt_key,
            algorithm=jwt_algorithm(slot.jwt_key),
            headers={"kid": slot.jwt.key_id, "typ": "JWT"},
        )
        self._metrics.svids_signed.labels("jwt_svid").inc()
        self._metrics.signing_seconds.labels("jwt_svid").observe(time.perf_counter() - started)
        return JwtSvidIssue(
            token=token,
            spiffe_id=spiffe_id,
            audience=audience,
            expires_at=expires_at,
            key_id=slot.jwt.key_id,
            capped=capped,
        )

    # -- internals -----------------------------------------------------------------------

    def _require_active(self, now: datetime) -> Slot:
        slot = self._active
        if slot is None or slot.issuer is None or slot.jwt_key is None or slot.not_after <= now:
            raise CAUnavailableError("no active CA; the server is starting or rotation failed")
        return slot

    def _new_slot(self, now: datetime) -> Slot:
        slot_id = str(uuid.uuid4())
        key = generate_key(self.settings.key_type)
        jwt_key = generate_key(self.settings.jwt_key_type)
        not_after = now + self.settings.ttl
        upstream = self._upstream
        if upstream is not None and not_after > upstream.issuer.not_after:
            log.warning(
                "ca: CA lifetime capped at the upstream certificate's NotAfter %s",
                upstream.issuer.not_after,
            )
            not_after = upstream.issuer.not_after
        if not_after <= now:
            raise CAUnavailableError(
                "the upstream authority has expired; renew ca.upstream.cert_file"
            )
        cert = build_ca_certificate(
            key=key,
            trust_domain=self.trust_domain,
            common_name=f"meshward CA {slot_id[:8]}",
            not_before=now - BACKDATE,
            not_after=not_after,
            issuer=upstream.issuer if upstream else None,
        )
        # Keys reach the disk before the journal names them, so a journal row never lacks its key.
        write_private_key(self._key_path(slot_id, "x509"), key)
        write_private_key(self._key_path(slot_id, "jwt"), jwt_key)
        self._record(
            cert,
            spiffe_id=self.trust_domain.as_spiffe_id(),
            issued_to="meshward-server",
            slot_id=slot_id,
            kind="ca",
        )
        self._metrics.svids_signed.labels("ca").inc()
        intermediates = upstream.intermediates if upstream else ()
        return Slot(
            id=slot_id,
            state=SlotState.PREPARED,
            key_type=self.settings.key_type,
            certificate=cert,
            upstream_chain=intermediates,
            issuer=Issuer.of(cert, key, intermediates),
            jwt=JwtAuthority(key_id=_key_id(), public_key=jwt_key.public_key()),
            jwt_key=jwt_key,
            created_at=now,
            activated_at=None,
            retired_at=None,
        )

    def _commit(self, slots: tuple[Slot, ...], now: datetime) -> None:
        """Persist the new journal and bundle in one transaction, then switch the in-memory view."""
        kept = {s.id for s in slots}
        dropped = [s for s in self._slots if s.id not in kept]
        previous_sequence = self._bundle.sequence if self._bundle else 0
        old_slots, old_active = self._slots, self._active
        self._set_slots(slots)
        bundle = self._build_bundle(previous_sequence)
        changed = self._bundle is None or _bundle_content(bundle) != _bundle_content(self._bundle)
        sequence = previous_sequence + 1 if changed else previous_sequence
        try:
            with self._db.transaction() as session:
                for slot in slots:
                    save_slot(session, record=self._to_record(slot))
                for slot in dropped:
                    delete_slot(session, slot_id=slot.id)
                if changed:
                    save_bundle(session, bundle=self._stored(bundle, sequence, now))
        except Exception:
            self._slots, self._active = old_slots, old_active
            raise
        self._bundle = replace(bundle, sequence=sequence)
        for slot in dropped:
            for kind in ("x509", "jwt"):
                self._key_path(slot.id, kind).unlink(missing_ok=True)

    def _publish(self, now: datetime, sequence: int) -> None:
        bundle = self._build_bundle(sequence)
        with self._db.transaction() as session:
            save_bundle(session, bundle=self._stored(bundle, sequence, now))
        self._bundle = bundle

    def _bundle_changed(self, stored: StoredBundle) -> bool:
        assert self._bundle is not None
        return (stored.x509_authorities_pem, stored.jwt_authorities_json) != _bundle_content(
            self._bundle
        )

    def _set_slots(self, slots: tuple[Slot, ...]) -> None:
        self._slots = slots
        self._active = next((s for s in slots if s.state is SlotState.ACTIVE), None)

    def _build_bundle(self, sequence: int) -> TrustBundle:
        roots = (
            self._upstream.roots if self._upstream else tuple(s.certificate for s in self._slots)
        )
        return TrustBundle(
            trust_domain=self.trust_domain,
            x509_authorities=roots,
            jwt_authorities=tuple(s.jwt for s in self._slots),
            sequence=sequence,
            refresh_hint_seconds=int(self.settings.refresh_hint.total_seconds()),
        )

    def _stored(self, bundle: TrustBundle, sequence: int, now: datetime) -> StoredBundle:
        pem, jwks = _bundle_content(bundle)
        return StoredBundle(
            trust_domain=self.trust_domain.name,
            x509_authorities_pem=pem,
            jwt_authorities_json=jwks,
            sequence=sequence,
            updated_at=now,
        )

    def _record(
        self, cert: x509.Certificate, *, spiffe_id: str, issued_to: str, slot_id: str, kind: str
    ) -> None:
        self._issued.record(
            IssuedCertificate(
                serial=f"{cert.serial_number:x}",
                kind=kind,
                spiffe_id=spiffe_id,
                issued_to=issued_to,
                ca_slot_id=slot_id,
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
            )
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every issued certificate is recorded in the database."""
        return self._issued.flush(timeout)

    def close(self) -> None:
        self._issued.close()

    def _key_path(self, slot_id: str, kind: str) -> Path:
        return self._key_dir / f"{slot_id}.{kind}.key.pem"

    def _to_record(self, slot: Slot) -> SlotRecord:
        pem = serialization.Encoding.PEM
        return SlotRecord(
            id=slot.id,
            state=slot.state.value,
            key_type=slot.key_type.value,
            certificate_pem=slot.certificate.public_bytes(pem).decode(),
            upstream_chain_pem="".join(c.public_bytes(pem).decode() for c in slot.upstream_chain),
            jwt_key_id=slot.jwt.key_id,
            jwt_public_key_pem=slot.jwt.public_key.public_bytes(
                pem, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
            not_before=slot.not_before,
            not_after=slot.not_after,
            created_at=slot.created_at,
            activated_at=slot.activated_at,
            retired_at=slot.retired_at,
        )

    def _check_trust_domain(self, slot: Slot) -> None:
        sans = slot.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uris != [self.trust_domain.as_spiffe_id()]:
            raise CAUnavailableError(
                f"the database holds a CA for {', '.join(uris)}, not for trust domain "
                f"{self.trust_domain.name}; use a new data dir (or database) for a new trust domain",
                field="trust_domain",
            )

    def _restore(self, record: SlotRecord) -> Slot:
        cert = x509.load_pem_x509_certificate(record.certificate_pem.encode())
        chain = tuple(
            x509.load_pem_x509_certificates(record.upstream_chain_pem.encode())
            if record.upstream_chain_pem
            else ()
        )
        state = SlotState(record.state)
        issuer: Issuer | None = None
        jwt_key: PrivateKey | None = None
        try:
            issuer = Issuer.of(
                cert, load_private_key(self._key_path(record.id, "x509").read_bytes()), chain
            )
            jwt_key = load_private_key(self._key_path(record.id, "jwt").read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            log.error("ca: key of CA %s unusable (%s); a new CA will replace it", record.id, exc)
            issuer, jwt_key = None, None
            if state is not SlotState.OLD:
                state = SlotState.OLD
        return Slot(
            id=record.id,
            state=state,
            key_type=KeyType(record.key_type),
            certificate=cert,
            upstream_chain=chain,
            jwt=JwtAuthority(
                key_id=record.jwt_key_id,
                public_key=load_public_key(record.jwt_public_key_pem.encode()),
            ),
            issuer=issuer,
            jwt_key=jwt_key,
            created_at=record.created_at,
            activated_at=record.activated_at,
            retired_at=record.retired_at,
        )


def _key_id() -> str:
    return uuid.uuid4().hex


def _bundle_content(bundle: TrustBundle) -> tuple[str, str]:
    return bundle.pem().decode(), json.dumps(bundle.jwt_keys(), sort_keys=True)
