"""The ``authz.workers`` processes of ``meshward up``: what each one is configured with.

A Check is CPU-bound Python, so more cores need more processes. Worker ``i`` listens on
``authz.listen``'s port + ``i`` (its health on ``authz.health_listen``'s port + ``i``),
and keeps its own audit spool (each drained by its own shipper into the one store,
idempotent per decision) and access-log ledger. Sidecars list every worker as an
endpoint of their authz cluster, and send access logs and counters to worker 0 only: a
node's two telemetry streams must meet in one ledger.
"""

from __future__ import annotations

from meshward.config import Config

__all__ = ["worker_configs"]


def _shifted(listen: str, worker: int) -> str:
    """``host:port`` moved ``worker`` ports on; "" (off) stays off."""
    if not listen or not worker:
        return listen
    host, _, port = listen.rpartition(":")
    return f"{host}:{int(port) + worker}"


def worker_configs(config: Config) -> list[Config]:
    """One config per worker; worker 0's is ``config`` itself (the paths of one process)."""
    configs = [config]
    authz = config.authz
    for worker in range(1, authz.workers):
        spool = config.audit_spool.with_name(f"{config.audit_spool.name}-{worker}")
        configs.append(
            config.model_copy(
                update={
                    "authz": authz.model_copy(
                        update={
                            "worker": worker,
                            "listen": _shifted(authz.listen, worker),
                            "health_listen": _shifted(authz.health_listen, worker),
                        }
                    ),
                    "audit": config.audit.model_copy(
                        update={"spool": config.audit.spool.model_copy(update={"directory": spool})}
                    ),
                }
            )
        )
    return configs
