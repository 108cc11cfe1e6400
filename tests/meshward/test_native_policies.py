"""The agent's native policies: the policy directory as each workload's RBAC chain over ECDS,
reloaded as authz reloads it, and `meshward policy lint` for native and hybrid sidecars."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from envoy.config.core.v3 import extension_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from google.protobuf import json_format

from authz.rbac_chain import HTTP_CHAIN, http_chain
from authz.rbac_translation import Workload, translate
from identity.ecds import EcdsStats
from identity.errors import ExtensionConfigError
from identity.extension_configs import EnvoyWorkload
from meshward.cli import cli
from meshward.config import load_config
from meshward.native_policies import NativePolicies, agent_policies_ready, native_policies

REVIEWS = EnvoyWorkload("default", (("app", "reviews"),), "reviews")
RATINGS = EnvoyWorkload("default", (("app", "ratings"),), "ratings")


def policy(name: str, app: str, paths: str, action: str = "DENY") -> str:
    return f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector: {{matchLabels: {{app: {app}}}}}
  action: {action}
  rules: [{{to: [{{operation: {{paths: {paths}}}}}]}}]
"""


# An empty path segment in a template: Envoy's uri_template refuses it, the engine does not.
UNTRANSLATABLE = policy("odd", "reviews", '["/a//{*}"]')
CUSTOM = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: CUSTOM
  provider: {name: rego}
  rules: [{to: [{operation: {paths: ["/custom/*"]}}]}]
"""


@pytest.fixture(autouse=True)
def no_meshward_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESHWARD_"):
            monkeypatch.delenv(name)


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = directory / "istio" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def source(directory: Path) -> NativePolicies:
    config = load_config(None, env={}, flags={"data_dir": str(directory / "data")})
    native = native_policies(config, directory, trust_domain="example.org")
    native.load()
    return native


def chain_of(native: NativePolicies, workload: EnvoyWorkload) -> extension_pb2.TypedExtensionConfig:
    configs = native.latest.for_workload(workload)
    assert list(configs) == [HTTP_CHAIN]
    return configs[HTTP_CHAIN]


# -- generations ---------------------------------------------------------------------------


def test_each_workload_gets_its_chain_as_one_extension_config(tmp_path: Path) -> None:
    write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", '["/admin"]')})
    native = source(tmp_path)
    config = chain_of(native, REVIEWS)
    assert config.name == HTTP_CHAIN
    matcher = extension_matcher_pb2.ExtensionWithMatcher()
    assert config.typed_config.Unpack(matcher)
    # Exactly the translation of this workload's policies, as authz.rbac_chain shapes it.
    expected = http_chain(
        translate(native.store.current.istio, Workload("default", {"app": "reviews"}, "reviews"))
    )
    assert config == json_format.ParseDict(
        expected.as_config(), extension_pb2.TypedExtensionConfig()
    )
    assert native.latest.for_workload(REVIEWS)[HTTP_CHAIN] is config  # built once


def test_a_change_to_another_workloads_policies_leaves_this_chain_as_it_was(
    tmp_path: Path,
) -> None:
    write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", '["/admin"]')})
    native = source(tmp_path)
    before = native.latest
    reviews, ratings = chain_of(native, REVIEWS), chain_of(native, RATINGS)
    write(tmp_path, {"ratings.yaml": policy("deny-secret", "ratings", '["/secret"]')})
    assert native.load()
    assert native.latest.version == before.version + 1
    assert chain_of(native, REVIEWS) == reviews  # same digest: its Envoys get no push
    assert chain_of(native, RATINGS) != ratings


def test_an_unchanged_policy_set_makes_no_generation(tmp_path: Path) -> None:
    write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", '["/admin"]')})
    native = source(tmp_path)
    version = native.latest.version
    (tmp_path / "istio" / "reviews.yaml").touch()
    assert native.store.changed()
    assert not native.load()
    assert native.latest.version == version


def test_a_bad_change_keeps_the_last_good_set_and_ready_says_so(tmp_path: Path) -> None:
    write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", '["/admin"]')})
    native = source(tmp_path)
    good = native.latest
    write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", "/admin")})
    assert not native.load()
    assert native.latest is good
    ok, details = agent_policies_ready(native, EcdsStats())
    assert ok
    reload = details["native_policies"]["last_reload"]
    assert reload["outcome"] == "rejected"
    assert "keeps serving" in reload["message"]
    assert "spec.rules[0].to[0].operation.paths" in reload["problems"][0]


def test_without_any_good_set_every_request_is_refused_with_the_problems(
    tmp_path: Path,
) -> None:
    write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", "/admin")})
    native = source(tmp_path)
    with pytest.raises(ExtensionConfigError) as info:
        native.latest.for_workload(REVIEWS)
    assert "has not loaded" in info.value.message
    assert "spec.rules[0].to[0].operation.paths" in info.value.message
    ok, details = agent_policies_ready(native, EcdsStats())
    assert not ok
    assert details["native_policies"]["policy_set"] is None


def test_a_workload_whose_policies_cannot_be_translated_gets_an_error_and_is_listed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path, {"reviews.yaml": UNTRANSLATABLE})
    native = source(tmp_path)
    with caplog.at_level(logging.ERROR, logger="meshward"):
        for _ in range(2):
            with pytest.raises(ExtensionConfigError) as info:
                native.latest.for_workload(REVIEWS)
    message = info.value.message
    assert str(tmp_path / "istio" / "reviews.yaml") + "[0]" in message
    assert "spec.rules[0].to[0].operation.paths" in message
    assert "--authz-mode ext_authz" in message
    assert len(caplog.records) == 1  # logged once per generation
    chain_of(native, RATINGS)  # the policy does not apply there
    _, details = agent_policies_ready(native, EcdsStats())
    (failed,) = details["native_policies"]["translation_failed"]
    assert failed["workload"] == {
        "namespace": "default",
        "labels": {"app": "reviews"},
        "service": "reviews",
    }
    assert failed["error"] == message


def test_streams_wake_on_a_new_generation(tmp_path: Path) -> None:
    write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", '["/admin"]')})

    async def scenario() -> int:
        native = source(tmp_path)
        version = native.latest.version
        waiter = asyncio.ensure_future(native.changed(version))
        await asyncio.sleep(0)
        assert not waiter.done()
        write(tmp_path, {"reviews.yaml": policy("deny-admin", "reviews", '["/root"]')})
        native.load()
        return (await asyncio.wait_for(waiter, 5)).version - version

    assert asyncio.run(scenario()) == 1


def test_agent_policies_is_a_config_key(tmp_path: Path) -> None:
    config = load_config(None, env={"MESHWARD_AGENT__POLICIES": str(tmp_path)})
    assert config.agent.policies == tmp_path
    load = load_config(None, env={})
    with pytest.raises(Exception, match=r"agent.policies .* is not a directory"):
        native_policies(load, tmp_path / "missing", trust_domain="example.org")


# -- policy lint ---------------------------------------------------------------------------


def lint(directory: Path, *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(
        cli,
        [
            "policy",
            "lint",
            str(directory),
            "--trust-domain",
            "example.org",
            "--output",
            "json",
            *args,
        ],
    )
    return result.exit_code, json.loads(result.output)


@pytest.mark.parametrize(
    ("mode", "code", "severity"),
    [("hybrid", 1, "error"), ("native", 1, "error"), ("ext_authz", 0, "warning")],
)
def test_lint_reports_what_the_rbac_filters_cannot_enforce(
    tmp_path: Path, mode: str, code: int, severity: str
) -> None:
    write(tmp_path, {"reviews.yaml": UNTRANSLATABLE})
    exit_code, report = lint(tmp_path, "--authz-mode", mode)
    assert exit_code == code
    (issue,) = report["issues"]
    assert issue["severity"] == severity
    assert (issue["document"], issue["field"]) == (0, "spec.rules[0].to[0].operation.paths")
    assert "cannot be enforced by Envoy's RBAC filter" in issue["message"]


def test_lint_defaults_to_hybrid_and_warns_native_users_of_custom_policies(tmp_path: Path) -> None:
    write(tmp_path, {"reviews.yaml": UNTRANSLATABLE})
    assert lint(tmp_path)[0] == 1  # hybrid, the sidecars' default
    write(tmp_path, {"reviews.yaml": CUSTOM})
    assert lint(tmp_path) == (0, lint(tmp_path, "--authz-mode", "hybrid")[1])
    code, report = lint(tmp_path, "--authz-mode", "native")
    assert code == 0
    (issue,) = report["issues"]
    assert issue["severity"] == "warning"
    assert issue["field"] == "spec.action"
    assert "every request it selects is denied" in issue["message"]
