"""What ``meshward up`` adds to the server: authz as a child process, and the listing.

Server, agent and the audit API share one process (the agent signs with the CA in
memory). Authz runs as ``meshward authz`` in a child of its own (``authz.workers`` of
them): every Check of the mesh goes through it, so it must not compete for a GIL with the
CA and the audit API. The child is configured over its stdin lifeline
(``meshward.lifeline``), so it never outlives ``up``; it drains its audit spool before
it exits.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

from meshward import lifeline
from meshward.authz_workers import worker_configs
from meshward.config import Config, ConfigError

__all__ = ["AuthzChild", "listing", "policies_dir"]

log = logging.getLogger("meshward")
_RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0)
# The sample policy repository of a source checkout, next to this package.
_SAMPLE_POLICIES = Path(__file__).resolve().parent.parent / "policies"


def policies_dir(given: Path | None) -> Path:
    """``--policies``, else ./policies, else the sample ``policies/`` of the checkout."""
    if given is not None:
        if not given.is_dir():
            raise ConfigError(f"--policies {given} is not a directory (it holds istio/ and rego/)")
        return given
    for candidate in (Path("policies"), _SAMPLE_POLICIES):
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(
        "no policies/ here and no sample policies next to meshward; pass --policies DIR, "
        'or set authz.listen to "" to run without authz'
    )


class AuthzChild:
    """``meshward authz`` for ``up``: restarted when it crashes, fatal when misconfigured."""

    def __init__(self, config: Config, policies: Path) -> None:
        self.config = config
        self.policies = policies
        self.child: subprocess.Popen[bytes] | None = None
        self.error: ConfigError | None = None
        self._restarts = 0

    def _start(self) -> subprocess.Popen[bytes]:
        self.child = lifeline.spawn(["authz", "--policies", str(self.policies)], self.config)
        return self.child

    async def supervise(self, on_fatal: asyncio.Event) -> None:
        """Run until cancelled; on a configuration error (exit 1) set ``on_fatal``."""
        try:
            while True:
                child = self._start()
                code = await asyncio.to_thread(child.wait)
                if code == 1:
                    # `meshward authz` printed the error line; restarting would repeat it.
                    self.error = ConfigError(
                        "authz could not start (its error is above); fix it and run up again"
                    )
                    on_fatal.set()
                    return
                delay = _RESTART_BACKOFF[min(self._restarts, len(_RESTART_BACKOFF) - 1)]
                self._restarts += 1
                log.error(
                    "up: authz (pid %d) exited with %s; restarting in %.1fs", child.pid, code, delay
                )
                await asyncio.sleep(delay)
        finally:
            if self.child is not None and self.child.poll() is None:
                await asyncio.shield(asyncio.to_thread(lifeline.stop, self.child))


def listing(
    config: Config,
    *,
    policies: Path | None,
    agent: bool,
    audit: bool,
    agent_policies: Path | None = None,
) -> str:
    """What listens where, for the terminal."""
    server = config.server
    lines = [
        f"meshward {'up' if agent else 'server'}: trust domain {config.trust_domain}, "
        f"data dir {config.data_dir}",
        f"  admin API       unix://{config.admin_socket}",
        f"  server health   {_http(server.health_listen)}",
        f"  node API        {server.node_listen or '(off)'}"
        + (f" (attestation {server.attestation_listen})" if server.node_listen else ""),
    ]
    if agent:
        lines += [
            f"  agent           unix://{config.agent_socket}  (Workload API, SDS and ECDS; "
            "SPIFFE_ENDPOINT_SOCKET)",
            f"  agent health    {_http(config.agent.health_listen)}",
            "  agent policies  "
            + (
                f"{agent_policies}  (RBAC filters for native and hybrid sidecars)"
                if agent_policies is not None
                else "(none: native and hybrid sidecars get no RBAC filters)"
            ),
        ]
    if policies is not None:
        workers = worker_configs(config)
        for worker in workers:
            authz = worker.authz
            several = len(workers) > 1
            name = f"authz {authz.worker}" if several else "authz"
            lines += [
                f"  {name:<15} {authz.listen}  (Envoy ext_authz gRPC"
                + (", access logs" if several and not authz.worker else "")
                + f"), policies {policies}",
                f"  {name + ' health':<15} {_http(authz.health_listen)}",
            ]
    if audit:
        lines.append(f"  audit           http://{config.audit.listen}/  (page, API at /docs)")
    return "\n".join(lines)


def _http(listen: str) -> str:
    return f"http://{listen}/ready" if listen else "(off)"
