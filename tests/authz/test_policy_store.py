"""PolicyStore: istio/ and rego/ loaded, versioned and swapped in together."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from authz.errors import PolicyLoadError
from authz.policy_store import PolicyStore

ALLOW = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewer, namespace: default}
spec:
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"""
BAD_ISTIO = ALLOW.replace('methods: ["GET"]', "methods: GET")
MODULE = "package envoy.authz\n\nallow if input.ok\n"
V0_TEST = "package envoy.authz_test\n\ntest_allow {\n\ttrue\n}\n"


def write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def loaded(root: Path, **kwargs: object) -> PolicyStore:
    store = PolicyStore(root, trust_domain="example.org", **kwargs)  # type: ignore[arg-type]
    assert store.reload(), store.issues
    return store


@pytest.mark.parametrize(
    ("files", "rego"),
    [
        ({"istio/a.yaml": ALLOW}, False),
        ({"istio/a.yaml": ALLOW, "rego/roles/data.json": "{}"}, False),
        ({"istio/a.yaml": ALLOW, "rego/envoy/authz/policy_test.rego": V0_TEST}, False),
        ({"istio/a.yaml": ALLOW, "rego/.hidden/p.rego": "not rego"}, False),
        ({"rego/envoy/authz/policy.rego": MODULE}, True),
    ],
    ids=["no rego/", "data only", "tests only", "hidden only", "modules"],
)
def test_rego_is_served_only_with_modules(
    tmp_path: Path, files: dict[str, str], rego: bool
) -> None:
    write(tmp_path, files)
    current = loaded(tmp_path).current
    assert current is not None
    assert (current.rego is not None) is rego


def test_one_version_covers_both_directories(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/p.rego": MODULE, "rego/roles/data.json": "{}"})
    store = loaded(tmp_path)
    versions = {store.current.version}  # type: ignore[union-attr]
    for relative, text in [
        ("rego/roles/data.json", '{"a": 1}'),
        ("rego/p.rego", MODULE + "\nother := 1\n"),
        ("istio/a.yaml", ALLOW.replace("viewer", "reader")),
    ]:
        write(tmp_path, {relative: text})
        assert store.changed()
        assert store.reload()
        assert store.current is not None
        versions.add(store.current.version)
    assert len(versions) == 4
    # The same files give the same version: another store (the e2e tests' oracle) agrees.
    assert loaded(tmp_path).current.version in versions  # type: ignore[union-attr]


def test_rego_tests_neither_reload_nor_break_the_set(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/envoy/authz/policy.rego": MODULE})
    store = loaded(tmp_path)
    first = store.current
    write(tmp_path, {"rego/envoy/authz/policy_test.rego": V0_TEST, "rego/notes.md": "x"})
    assert not store.changed()
    # Another change reloads with the (Rego v0) test module beside it, and it is ignored.
    write(tmp_path, {"rego/envoy/authz/policy.rego": MODULE + "\nx := 1\n"})
    assert store.changed()
    assert store.reload()
    assert store.current is not first
    assert store.current is not None
    assert store.current.rego is not None
    assert not any(f.endswith("_test.rego") for f in store.current.rego.files)
    version = store.current.version
    os.utime(tmp_path / "rego/envoy/authz/policy_test.rego", ns=(1, 1))
    assert not store.changed()
    assert loaded(tmp_path).current.version == version  # type: ignore[union-attr]


def test_problems_of_both_engines_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/p.rego": MODULE})
    outcomes: list[bool] = []
    store = loaded(tmp_path, on_reload=outcomes.append)
    good = store.current
    write(tmp_path, {"istio/a.yaml": BAD_ISTIO, "rego/p.rego": "package envoy.authz\n\nallow {\n"})
    assert not store.reload()
    assert store.current is good
    assert [(Path(i.file).name, i.document, i.line) for i in store.issues] == [
        ("a.yaml", 0, None),
        ("p.rego", 0, 3),
    ]
    assert str(PolicyLoadError(store.issues)).startswith("2 problem(s) in the policy directory:")
    assert outcomes == [True, False]
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/p.rego": MODULE})
    assert store.reload()
    assert store.issues == []
    assert outcomes == [True, False, True]


def test_removing_every_module_removes_the_rego_engine(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/p.rego": MODULE})
    store = loaded(tmp_path)
    (tmp_path / "rego/p.rego").unlink()
    assert store.changed()
    assert store.reload()
    assert store.current is not None
    assert store.current.rego is None


def test_decision_path_and_dry_run_packages_reach_the_engine(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "rego/gate.rego": "package mesh.gate\n\ndecision := true\n",
            "rego/staged.rego": "package mesh.staged\n\nx := 1\n",
        },
    )
    store = loaded(
        tmp_path, rego_decision="mesh/gate/decision", rego_dry_run_packages=("mesh.staged",)
    )
    rego = store.current.rego  # type: ignore[union-attr]
    assert rego is not None
    assert rego.decision == "data.mesh.gate.decision"
    assert rego.dry_run_packages == frozenset({"mesh.staged"})


def test_a_file_past_the_size_limit_is_a_problem_and_the_last_good_set_serves(
    tmp_path: Path,
) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/envoy/authz/policy.rego": MODULE})
    limit = max(len(ALLOW), len(MODULE))
    store = loaded(tmp_path, max_file_bytes=limit)  # every file at or under it: served
    first = store.current
    assert first is not None
    write(tmp_path, {"rego/roles/data.json": '{"r": "' + "x" * limit + '"}'})
    assert store.changed()
    assert not store.reload()
    assert store.current is first
    [issue] = store.issues
    assert issue.file == str(tmp_path / "rego" / "roles" / "data.json")
    assert f"is larger than {limit} bytes (authz.max_policy_file_bytes)" in issue.message
