"""``authz.workers``: the settings, what each worker is given, what the sidecars list."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from meshward.authz_workers import worker_configs
from meshward.config import Config, ConfigError, load_config
from meshward.envoy_bootstrap import AuthzMode, sidecar_bootstrap
from meshward.envoy_telemetry import AUTHZ_CLUSTER, AUTHZ_TELEMETRY_CLUSTER


def config(**env: str) -> Config:
    return load_config(None, env={f"MESHWARD_AUTHZ__{k.upper()}": v for k, v in env.items()})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"workers": "0"}, "must be 1 to 64 processes"),
        ({"workers": "65"}, "must be 1 to 64 processes"),
        ({"workers": "2", "listen": "unix:///run/authz.sock"}, "needs a TCP listen"),
        ({"workers": "2", "listen": "/run/authz.sock"}, "needs a TCP listen"),
        ({"workers": "2", "listen": "127.0.0.1:0"}, "give listen a fixed port"),
        ({"workers": "3", "listen": "127.0.0.1:65534"}, "listen ports 65534 to 65536"),
        ({"workers": "2", "health_listen": "127.0.0.1:0"}, "give health_listen a fixed port"),
        # The defaults, 9191 and 9192: worker 1's Check port would be worker 0's health.
        ({"workers": "2"}, "health_listen ports 9192 to 9193, which overlap; move"),
        (
            {"workers": "2", "worker": "2", "health_listen": "127.0.0.1:9300"},
            "worker 2 is not one of the 2 workers",
        ),
    ],
)
def test_workers_that_cannot_run_name_what_to_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="authz") as error:
        config(**env)
    assert message in str(error.value)


def test_one_worker_is_the_process_as_configured() -> None:
    one = config(listen="unix:///run/authz.sock")
    assert worker_configs(one) == [one]
    assert config(workers="4", listen="").authz.workers == 4  # authz off: nothing to place


def test_each_worker_gets_its_ports_and_its_own_spool(tmp_path: Path) -> None:
    base = load_config(
        None,
        env={
            "MESHWARD_DATA_DIR": str(tmp_path),
            "MESHWARD_AUTHZ__WORKERS": "3",
            "MESHWARD_AUTHZ__LISTEN": "127.0.0.1:9191",
            "MESHWARD_AUTHZ__HEALTH_LISTEN": "127.0.0.1:9300",
        },
    )
    workers = worker_configs(base)
    assert workers[0] is base
    assert [w.authz.worker for w in workers] == [0, 1, 2]
    assert [w.authz.listen for w in workers] == [f"127.0.0.1:{9191 + i}" for i in range(3)]
    assert [w.authz.health_listen for w in workers] == [f"127.0.0.1:{9300 + i}" for i in range(3)]
    spool = tmp_path / "audit" / "spool"
    assert [w.audit_spool for w in workers] == [
        spool,
        spool.with_name("spool-1"),
        spool.with_name("spool-2"),
    ]
    # Everything else is shared: the policies' settings, the one store.
    assert {w.audit_database_url for w in workers} == {base.audit_database_url}
    assert all(w.authz.rego == base.authz.rego for w in workers)


def test_a_worker_without_health_listens_for_none() -> None:
    workers = worker_configs(config(workers="2", listen="127.0.0.1:9191", health_listen=""))
    assert [w.authz.health_listen for w in workers] == ["", ""]


def _bootstrap(workers: int, mode: AuthzMode) -> dict[str, Any]:
    return sidecar_bootstrap(
        workload="reviews",
        namespace="default",
        labels={"app": "reviews"},
        service=None,
        agent_socket=Path("/run/agent.sock"),
        app_port=8080,
        authz_port=9191,
        authz_workers=workers,
        authz_mode=mode,
    )


def _clusters(workers: int, mode: AuthzMode) -> dict[str, list[int]]:
    bootstrap = _bootstrap(workers, mode)
    return {
        c["name"]: [
            e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ]
        for c in bootstrap["static_resources"]["clusters"]
        if c["name"].startswith(AUTHZ_CLUSTER)
    }


def test_a_sidecar_spreads_checks_over_the_workers_and_logs_to_the_first() -> None:
    assert _clusters(3, AuthzMode.HYBRID) == {
        AUTHZ_CLUSTER: [9191, 9192, 9193],
        AUTHZ_TELEMETRY_CLUSTER: [9191],
    }
    assert _clusters(1, AuthzMode.HYBRID) == {AUTHZ_CLUSTER: [9191]}
    # Nothing to log in ext_authz mode: authz records every request itself.
    assert _clusters(2, AuthzMode.EXT_AUTHZ) == {AUTHZ_CLUSTER: [9191, 9192]}


def test_both_telemetry_streams_of_a_sidecar_go_to_the_first_worker() -> None:
    # The ledger matches a node's counters against its entries: one process sees both.
    bootstrap = _bootstrap(2, AuthzMode.NATIVE)
    listener = bootstrap["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (logger,) = [a for a in manager["access_log"] if "http_grpc" in a["name"]]
    common = logger["typed_config"]["common_config"]
    assert common["grpc_service"]["envoy_grpc"]["cluster_name"] == AUTHZ_TELEMETRY_CLUSTER
    (sink,) = bootstrap["stats_sinks"]
    assert sink["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == (
        AUTHZ_TELEMETRY_CLUSTER
    )
