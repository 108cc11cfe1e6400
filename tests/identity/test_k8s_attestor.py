"""The k8s workload attestor against a kubelet-shaped HTTPS server run by the test.

The kubelet cannot run here. Each test serves a ``/pods`` PodList (as a kubelet on a
containerd / CRI-O / Docker node returns it) over real TLS on a loopback port picked at
run time, with a serving certificate signed by a CA made for the test, and checks the
bearer token the attestor presents. Fake /proc trees give the caller's cgroups.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.errors import AttestationError, InvalidInputError
from identity.k8s_attestor import K8sAttestor, PodContainer, pod_container_of
from identity.peers import Peer
from identity.selectors import Selector
from tests.identity.certs import FakeUpstreamCA, key_pem, make_upstream_ca, new_key, pem

TOKEN = "eyJhbGciOiJSUzI1NiJ9.node-agent-token.c2lnbmF0dXJl"
POD_UID = "2c48913c-b29f-11e7-9350-020968147796"
CONTAINER_ID = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961"
ENVOY_ID = "5e8e4d7a0f3c1b2a99887766554433221100ffeeddccbbaa0011223344556677"
INIT_ID = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0"
DEBUG_ID = "aa11bb22cc33dd44ee55ff6600778899aabbccddeeff00112233445566778899"
PID = 4242
START = 987654

# /proc/<pid>/cgroup of a process in container CONTAINER_ID of pod POD_UID, as each
# cgroup layout and runtime writes it, with the scheme the kubelet gives the container ID.
CGROUPS = {
    "v1 cgroupfs docker": (
        "docker",
        "12:pids:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/" + CONTAINER_ID,
        "11:memory:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/" + CONTAINER_ID,
        "1:name=systemd:/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/"
        + CONTAINER_ID,
    ),
    "v1 systemd containerd": (
        "containerd",
        "10:cpuset:/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod2c48913c_b29f_11e7_9350_020968147796.slice:cri-containerd:{CONTAINER_ID}",
    ),
    "v2 systemd containerd": (
        "containerd",
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        "kubepods-besteffort-pod2c48913c_b29f_11e7_9350_020968147796.slice/"
        f"cri-containerd-{CONTAINER_ID}.scope",
    ),
    "v2 systemd cri-o": (
        "cri-o",
        "0::/kubepods.slice/kubepods-burstable.slice/"
        "kubepods-burstable-pod2c48913c_b29f_11e7_9350_020968147796.slice/"
        f"crio-{CONTAINER_ID}.scope",
    ),
    "v2 systemd docker": (
        "docker",
        "0::/kubepods.slice/kubepods-pod2c48913c_b29f_11e7_9350_020968147796.slice/"
        f"docker-{CONTAINER_ID}.scope",
    ),
    "v2 kind node in docker": (
        "containerd",
        "0::/system.slice/docker-" + "7" * 64 + ".scope/kubelet.slice/kubelet-kubepods.slice/"
        "kubelet-kubepods-besteffort.slice/"
        "kubelet-kubepods-besteffort-pod2c48913c_b29f_11e7_9350_020968147796.slice/"
        f"cri-containerd-{CONTAINER_ID}.scope",
    ),
    "v2 cgroup namespace": (
        "containerd",
        f"0::/../../pod2c48913c-b29f-11e7-9350-020968147796/{CONTAINER_ID}",
    ),
}


# -- cgroup parsing --------------------------------------------------------------------


@pytest.mark.parametrize("form", CGROUPS)
def test_pod_and_container_from_each_cgroup_form(form: str) -> None:
    _, *lines = CGROUPS[form]
    text = "\n".join(lines) + "\n"
    assert pod_container_of(text) == PodContainer(pod_uid=POD_UID, container_id=CONTAINER_ID)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("0::/user.slice/user-1000.slice/session-3.scope\n", id="login session"),
        pytest.param(
            "12:pids:/system.slice/containerd.service\n0::/init.scope\n", id="system service"
        ),
        pytest.param(f"0::/system.slice/docker-{CONTAINER_ID}.scope\n", id="plain docker"),
        pytest.param(
            "0::/kubepods.slice/kubepods-besteffort.slice/"
            "kubepods-besteffort-pod2c48913c_b29f_11e7_9350_020968147796.slice\n",
            id="pod slice, no container",
        ),
        pytest.param("", id="empty"),
    ],
)
def test_processes_outside_pods_have_no_pod(text: str) -> None:
    assert pod_container_of(text) is None


def test_cgroups_naming_two_containers_are_refused() -> None:
    text = (
        f"11:memory:/kubepods/besteffort/pod{POD_UID}/{CONTAINER_ID}\n"
        f"10:cpu:/kubepods/besteffort/pod{POD_UID}/{ENVOY_ID}\n"
    )
    with pytest.raises(AttestationError, match="two containers"):
        pod_container_of(text, pid=PID)


# -- a kubelet, a node, a caller -------------------------------------------------------


def pod_list(
    scheme: str = "containerd", *, web_started: bool = True, with_workload: bool = True
) -> dict[str, Any]:
    """A kubelet ``/pods`` answer: a coredns pod and the ``shop/web`` pod (web, envoy, an
    init container that ran, an ephemeral debug container)."""
    now = "2026-01-01T10:00:00Z"
    web_status: dict[str, Any] = {
        "name": "web",
        "image": "ghcr.io/acme/web:1.4.2",
        "imageID": "ghcr.io/acme/web@sha256:" + "1" * 64,
        "containerID": f"{scheme}://{CONTAINER_ID}",
        "ready": True,
        "restartCount": 0,
        "started": True,
        "state": {"running": {"startedAt": now}},
    }
    if not web_started:
        # A container being created: the kubelet lists it without an ID yet.
        web_status = {
            "name": "web",
            "image": "ghcr.io/acme/web:1.4.2",
            "imageID": "",
            "ready": False,
            "restartCount": 0,
            "started": False,
            "state": {"waiting": {"reason": "ContainerCreating"}},
        }
    coredns = {
        "metadata": {
            "name": "coredns-5d78c9869d-8xk2p",
            "namespace": "kube-system",
            "uid": "6f0d4c2e-1a2b-4c3d-9e8f-0a1b2c3d4e5f",
            "labels": {"k8s-app": "kube-dns"},
        },
        "spec": {
            "serviceAccountName": "coredns",
            "nodeName": "node-1",
            "containers": [{"name": "coredns", "image": "registry.k8s.io/coredns/coredns:v1.11.1"}],
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "coredns",
                    "image": "registry.k8s.io/coredns/coredns:v1.11.1",
                    "imageID": "registry.k8s.io/coredns/coredns@sha256:" + "2" * 64,
                    "containerID": f"{scheme}://" + "3" * 64,
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        },
    }
    web = {
        "metadata": {
            "name": "web-7d9c6b8f4-x2x9k",
            "generateName": "web-7d9c6b8f4-",
            "namespace": "shop",
            "uid": POD_UID,
            "resourceVersion": "48213",
            "creationTimestamp": now,
            "labels": {"app": "web", "pod-template-hash": "7d9c6b8f4"},
            "annotations": {"kubernetes.io/config.seen": now},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "web-7d9c6b8f4",
                    "uid": "8a7b6c5d-4e3f-2a1b-0c9d-8e7f6a5b4c3d",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "serviceAccountName": "web",
            "serviceAccount": "web",
            "nodeName": "node-1",
            "initContainers": [{"name": "migrate", "image": "ghcr.io/acme/migrate:1.4.2"}],
            "containers": [
                {"name": "web", "image": "ghcr.io/acme/web:1.4.2"},
                {"name": "envoy", "image": "envoyproxy/envoy:v1.30.1"},
            ],
            "ephemeralContainers": [{"name": "debugger", "image": "busybox:1.36"}],
        },
        "status": {
            "phase": "Running",
            "podIP": "10.244.1.17",
            "initContainerStatuses": [
                {
                    "name": "migrate",
                    "image": "ghcr.io/acme/migrate:1.4.2",
                    "imageID": "ghcr.io/acme/migrate@sha256:" + "4" * 64,
                    "containerID": f"{scheme}://{INIT_ID}",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed"}},
                }
            ],
            "containerStatuses": [
                web_status,
                {
                    "name": "envoy",
                    "image": "docker.io/envoyproxy/envoy:v1.30.1",
                    "imageID": "docker.io/envoyproxy/envoy@sha256:" + "5" * 64,
                    "containerID": f"{scheme}://{ENVOY_ID}",
                    "ready": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                },
            ],
            "ephemeralContainerStatuses": [
                {
                    "name": "debugger",
                    "image": "docker.io/library/busybox:1.36",
                    "imageID": "docker.io/library/busybox@sha256:" + "6" * 64,
                    "containerID": f"{scheme}://{DEBUG_ID}",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        },
    }
    return {
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": {},
        "items": [coredns, web] if with_workload else [coredns],
    }


# Every selector of the web container of shop/web-7d9c6b8f4-x2x9k, as SPIRE names them.
POD_SELECTORS = {
    "k8s:ns:shop",
    "k8s:sa:web",
    "k8s:node-name:node-1",
    f"k8s:pod-uid:{POD_UID}",
    "k8s:pod-name:web-7d9c6b8f4-x2x9k",
    "k8s:pod-label:app:web",
    "k8s:pod-label:pod-template-hash:7d9c6b8f4",
    "k8s:pod-owner:ReplicaSet:web-7d9c6b8f4",
    "k8s:pod-owner-uid:ReplicaSet:8a7b6c5d-4e3f-2a1b-0c9d-8e7f6a5b4c3d",
    "k8s:pod-image-count:2",
    "k8s:pod-image:ghcr.io/acme/web:1.4.2",
    "k8s:pod-image:ghcr.io/acme/web@sha256:" + "1" * 64,
    "k8s:pod-image:docker.io/envoyproxy/envoy:v1.30.1",
    "k8s:pod-image:docker.io/envoyproxy/envoy@sha256:" + "5" * 64,
    "k8s:pod-init-image-count:1",
    "k8s:pod-init-image:ghcr.io/acme/migrate:1.4.2",
    "k8s:pod-init-image:ghcr.io/acme/migrate@sha256:" + "4" * 64,
}
WEB_SELECTORS = POD_SELECTORS | {
    "k8s:container-name:web",
    "k8s:container-image:ghcr.io/acme/web:1.4.2",
    "k8s:container-image:ghcr.io/acme/web@sha256:" + "1" * 64,
}


@dataclass
class KubeletState:
    """What the fake kubelet answers (the last document repeats) and what it received."""

    token: str
    documents: list[dict[str, Any]]
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_document(self) -> dict[str, Any]:
        return self.documents.pop(0) if len(self.documents) > 1 else self.documents[0]


class _KubeletServer(ThreadingHTTPServer):
    state: KubeletState


class _KubeletHandler(BaseHTTPRequestHandler):
    server: _KubeletServer

    def do_GET(self) -> None:
        state = self.server.state
        authorization = self.headers.get("Authorization")
        with state.lock:
            state.requests.append((self.path, authorization))
            document = state.next_document()
        if authorization != f"Bearer {state.token}":
            self._send(401, b"Unauthorized", "text/plain")
        elif self.path != "/pods":
            self._send(404, b"404 page not found", "text/plain")
        else:
            self._send(200, json.dumps(document).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output to the test's own


@dataclass
class Kubelet:
    port: int
    state: KubeletState
    ca_file: Path  # the CA that signed the serving certificate


def make_ca(name: str) -> FakeUpstreamCA:
    now = datetime.now(UTC)
    return make_upstream_ca(
        name, not_before=now - timedelta(hours=1), not_after=now + timedelta(days=1)
    )


def serving_cert(
    ca: FakeUpstreamCA, directory: Path, *, dns: str, ip: str | None
) -> tuple[Path, Path]:
    """A kubelet serving certificate, as kubelet TLS bootstrap issues one: names the node."""
    key = new_key("p256")
    now = datetime.now(UTC)
    names: list[x509.GeneralName] = [x509.DNSName(dns)]
    if ip is not None:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"system:node:{dns}")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    cert_file, key_file = directory / "kubelet.crt", directory / "kubelet.key"
    cert_file.write_bytes(pem(cert))
    key_file.write_bytes(key_pem(key))
    return cert_file, key_file


@pytest.fixture
def kubelet_ca(tmp_path: Path) -> FakeUpstreamCA:
    return make_ca("kubelet-serving-ca")


@pytest.fixture
def serve_kubelet(tmp_path: Path, kubelet_ca: FakeUpstreamCA) -> Iterator[Any]:
    """Start fake kubelets: ``serve_kubelet(*documents, dns=..., ip=...)`` → Kubelet."""
    running: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def serve(
        *documents: dict[str, Any], dns: str = "node-1", ip: str | None = "127.0.0.1"
    ) -> Kubelet:
        directory = tmp_path / f"kubelet-{len(running)}"
        directory.mkdir()
        cert_file, key_file = serving_cert(kubelet_ca, directory, dns=dns, ip=ip)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_file, key_file)
        server = _KubeletServer(("127.0.0.1", 0), _KubeletHandler)
        server.daemon_threads = False  # server_close() then waits for handlers to finish
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.state = KubeletState(token=TOKEN, documents=list(documents) or [pod_list()])
        # A short poll keeps shutdown() quick; it does not affect what the tests observe.
        thread = threading.Thread(
            target=server.serve_forever, args=(0.02,), name="fake-kubelet", daemon=True
        )
        thread.start()
        running.append((server, thread))
        ca_file = directory / "ca.crt"
        ca_file.write_bytes(pem(kubelet_ca.certificate))
        return Kubelet(port=server.server_address[1], state=server.state, ca_file=ca_file)

    yield serve
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "serviceaccount" / "token"
    path.parent.mkdir()
    path.write_text(TOKEN + "\n")  # as mounted: the attestor must not send the newline
    return path


def fake_proc(root: Path, cgroup: str, *, start: int = START) -> Path:
    proc = root / "proc"
    (proc / str(PID)).mkdir(parents=True, exist_ok=True)
    rest = ["S"] + ["0"] * 18 + [str(start)] + ["0"] * 30
    (proc / str(PID) / "stat").write_text(f"{PID} (web) {' '.join(rest)}\n")
    (proc / str(PID) / "cgroup").write_text(cgroup)
    return proc


def in_container(root: Path, container_id: str = CONTAINER_ID) -> Path:
    """A /proc where the caller runs in ``container_id`` of the web pod (cgroup v2, containerd)."""
    pod_slice = f"kubepods-pod{POD_UID.replace('-', '_')}.slice"
    return fake_proc(root, f"0::/kubepods.slice/{pod_slice}/cri-containerd-{container_id}.scope\n")


CALLER = Peer(pid=PID, uid=1000, gid=1000, start_time=START)


def attestor(kubelet: Kubelet, token_file: Path, proc: Path, **overrides: Any) -> K8sAttestor:
    settings: dict[str, Any] = {
        "kubelet_port": kubelet.port,
        "kubelet_ca_path": kubelet.ca_file,
        "token_path": token_file,
        "max_poll_attempts": 3,
        "poll_retry_interval": 0.0,
        "timeout": 30.0,
        "proc": proc,
    }
    settings.update(overrides)
    return K8sAttestor(**settings)


def names(selectors: tuple[Selector, ...]) -> set[str]:
    return {str(s) for s in selectors}


# -- attestation -----------------------------------------------------------------------


@pytest.mark.parametrize("form", CGROUPS)
def test_full_selector_set(form: str, tmp_path: Path, serve_kubelet: Any, token_file: Path) -> None:
    scheme, *lines = CGROUPS[form]
    kubelet = serve_kubelet(pod_list(scheme))
    proc = fake_proc(tmp_path, "\n".join(lines) + "\n")

    selectors = attestor(kubelet, token_file, proc).attest(CALLER)

    assert names(selectors) == WEB_SELECTORS
    assert list(selectors) == sorted(set(selectors))
    # One query, to /pods, with the token from the file and nothing else (no newline).
    assert kubelet.state.requests == [("/pods", f"Bearer {TOKEN}")]


@pytest.mark.parametrize(
    ("container_id", "name", "images"),
    [
        pytest.param(
            INIT_ID,
            "migrate",
            {"ghcr.io/acme/migrate:1.4.2", "ghcr.io/acme/migrate@sha256:" + "4" * 64},
            id="init container",
        ),
        pytest.param(
            DEBUG_ID,
            "debugger",
            {"docker.io/library/busybox:1.36", "docker.io/library/busybox@sha256:" + "6" * 64},
            id="ephemeral container",
        ),
    ],
)
def test_init_and_ephemeral_containers_are_found(
    container_id: str,
    name: str,
    images: set[str],
    tmp_path: Path,
    serve_kubelet: Any,
    token_file: Path,
) -> None:
    kubelet = serve_kubelet(pod_list())
    selectors = attestor(kubelet, token_file, in_container(tmp_path, container_id)).attest(CALLER)
    assert names(selectors) == POD_SELECTORS | {f"k8s:container-name:{name}"} | {
        f"k8s:container-image:{image}" for image in images
    }


def test_process_not_in_a_pod_has_no_k8s_selectors(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet()
    proc = fake_proc(tmp_path, "0::/user.slice/user-1000.slice/session-3.scope\n")
    assert attestor(kubelet, token_file, proc).attest(CALLER) == ()
    assert kubelet.state.requests == []  # nothing to ask the kubelet about


def test_pod_not_found_fails_after_the_retries(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet(pod_list(with_workload=False))
    with pytest.raises(AttestationError, match=f"pod {POD_UID} is not among the pods") as caught:
        attestor(kubelet, token_file, in_container(tmp_path)).attest(CALLER)
    assert f"https://127.0.0.1:{kubelet.port}/pods" in str(caught.value)
    assert len(kubelet.state.requests) == 3


def test_container_listed_on_a_later_query_is_attested(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    """A new pod calls the agent before the kubelet lists its container's ID."""
    kubelet = serve_kubelet(pod_list(web_started=False), pod_list())
    selectors = attestor(kubelet, token_file, in_container(tmp_path)).attest(CALLER)
    assert names(selectors) == WEB_SELECTORS
    assert len(kubelet.state.requests) == 2


def test_container_never_listed_fails_naming_pod_and_container(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet(pod_list(web_started=False))
    with pytest.raises(AttestationError, match="after 3 attempt") as caught:
        attestor(kubelet, token_file, in_container(tmp_path)).attest(CALLER)
    assert f"container {CONTAINER_ID}" in str(caught.value)
    assert "shop/web-7d9c6b8f4-x2x9k" in str(caught.value)
    assert len(kubelet.state.requests) == 3


def test_kubelet_certificate_from_another_ca_is_refused(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet()
    other_ca = tmp_path / "other-ca.crt"
    other_ca.write_bytes(pem(make_ca("some-other-ca").certificate))
    with pytest.raises(AttestationError, match=r"certificate .* is not trusted") as caught:
        attestor(kubelet, token_file, in_container(tmp_path), kubelet_ca_path=other_ca).attest(
            CALLER
        )
    assert str(other_ca) in str(caught.value)
    assert "skip_kubelet_verification" in str(caught.value)
    assert kubelet.state.requests == []  # the token never left


def test_kubelet_name_is_verified_when_it_is_not_a_loopback_address(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    """Against 127.0.0.1 only the chain is checked (the certificate names the node); a
    host name must be in the certificate."""
    kubelet = serve_kubelet(dns="node-1", ip=None)
    proc = in_container(tmp_path)
    assert names(attestor(kubelet, token_file, proc).attest(CALLER)) == WEB_SELECTORS
    with pytest.raises(
        AttestationError, match=r"(?i)certificate .* is not trusted.*hostname"
    ) as caught:
        attestor(kubelet, token_file, proc, kubelet_host="localhost").attest(CALLER)
    assert caught.value.field == "kubelet_host"


def test_skip_kubelet_verification_accepts_any_certificate(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet()
    proc = in_container(tmp_path)
    unrelated = tmp_path / "missing-ca.crt"  # not even read when verification is off
    selectors = attestor(
        kubelet, token_file, proc, kubelet_ca_path=unrelated, skip_kubelet_verification=True
    ).attest(CALLER)
    assert names(selectors) == WEB_SELECTORS


def test_unreadable_kubelet_ca_file_is_named(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet()
    missing = tmp_path / "nowhere" / "ca.crt"
    with pytest.raises(AttestationError, match=f"kubelet CA file {missing}"):
        attestor(kubelet, token_file, in_container(tmp_path), kubelet_ca_path=missing).attest(
            CALLER
        )


def test_missing_token_file_is_named(tmp_path: Path, serve_kubelet: Any) -> None:
    kubelet = serve_kubelet()
    missing = tmp_path / "serviceaccount" / "token"
    with pytest.raises(AttestationError, match=f"bearer token file {missing}"):
        attestor(kubelet, missing, in_container(tmp_path)).attest(CALLER)
    assert kubelet.state.requests == []


def test_rejected_token_names_the_token_file(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet()
    token_file.write_text("a-token-the-kubelet-does-not-know\n")
    with pytest.raises(AttestationError, match="did not accept the bearer token") as caught:
        attestor(kubelet, token_file, in_container(tmp_path)).attest(CALLER)
    assert str(token_file) in str(caught.value)
    assert "HTTP 401" in str(caught.value)
    assert "a-token-the-kubelet-does-not-know" not in str(caught.value)


def test_token_is_read_again_for_each_query(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    """Projected service-account tokens rotate on disk; the next query must use the new one."""
    kubelet = serve_kubelet()
    proc = in_container(tmp_path)
    agent = attestor(kubelet, token_file, proc)
    agent.attest(CALLER)
    kubelet.state.token = "rotated-token"
    token_file.write_text("rotated-token")
    assert names(agent.attest(CALLER)) == WEB_SELECTORS
    assert [auth for _, auth in kubelet.state.requests] == [
        f"Bearer {TOKEN}",
        "Bearer rotated-token",
    ]


def test_token_never_appears_in_logs(
    tmp_path: Path, serve_kubelet: Any, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    kubelet = serve_kubelet(pod_list(web_started=False), pod_list())
    proc = in_container(tmp_path)
    attestor(kubelet, token_file, proc).attest(CALLER)  # with a retry, which logs
    kubelet.state.token = "something-else"
    with pytest.raises(AttestationError) as caught:
        attestor(kubelet, token_file, proc).attest(CALLER)  # refused by the kubelet

    assert "not listed by the kubelet yet" in caplog.text  # the check below is not vacuous
    assert "HTTP Request: GET" in caplog.text  # httpx logged its requests
    assert TOKEN not in caplog.text
    assert TOKEN not in str(caught.value)


def test_unreachable_kubelet_is_named(tmp_path: Path, token_file: Path) -> None:
    # A port this test holds but does not listen on: connections are refused.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        agent = K8sAttestor(
            kubelet_port=port,
            token_path=token_file,
            skip_kubelet_verification=True,
            proc=in_container(tmp_path),
        )
        with pytest.raises(
            AttestationError, match=f"kubelet at https://127.0.0.1:{port}/pods is unreachable"
        ):
            agent.attest(CALLER)


def test_kubelet_answer_of_the_wrong_shape_is_an_attestation_error(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    broken = copy.deepcopy(pod_list())
    broken["items"][1]["status"]["containerStatuses"] = {"web": "running"}
    kubelet = serve_kubelet(broken)
    with pytest.raises(AttestationError, match="containerStatuses is not a JSON array"):
        attestor(kubelet, token_file, in_container(tmp_path)).attest(CALLER)


def test_pid_reused_while_reading_cgroups_fails(
    tmp_path: Path, serve_kubelet: Any, token_file: Path
) -> None:
    kubelet = serve_kubelet()
    proc = in_container(tmp_path)
    fake_proc(tmp_path, (proc / str(PID) / "cgroup").read_text(), start=START + 1)
    with pytest.raises(AttestationError, match="pid was reused"):
        attestor(kubelet, token_file, proc).attest(CALLER)
    assert kubelet.state.requests == []


def test_exited_process_fails(tmp_path: Path, token_file: Path) -> None:
    (tmp_path / "proc").mkdir()
    with pytest.raises(AttestationError, match=f"cgroups of process {PID}"):
        K8sAttestor(token_path=token_file, proc=tmp_path / "proc").attest(CALLER)


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_poll_attempts", 0),
        ("poll_retry_interval", -1.0),
        ("timeout", 0.0),
        ("kubelet_port", 0),
    ],
)
def test_bad_settings_are_refused(setting: str, value: object) -> None:
    with pytest.raises(InvalidInputError, match=setting):
        K8sAttestor(**{setting: value})  # type: ignore[arg-type]
