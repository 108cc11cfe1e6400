"""The ``k8s`` workload attestor: selectors from the caller's pod, as SPIRE's k8s attestor names them.

Two steps. ``/proc/<pid>/cgroup`` tells which pod (UID) and container (ID) the process runs
in; a process outside a pod gets no ``k8s`` selectors (other attestors may still identify
it). Then the kubelet on this node is asked for its pods (``GET https://<host>:<port>/pods``,
authenticated with the node's service-account token) and the pod with that UID, holding a
container with that ID, gives the selectors::

    k8s:ns:<namespace>                 k8s:pod-name:<name>         k8s:pod-uid:<uid>
    k8s:sa:<service account>           k8s:node-name:<node>
    k8s:pod-label:<key>:<value>        k8s:pod-owner:<kind>:<name> k8s:pod-owner-uid:<kind>:<uid>
    k8s:container-name:<name>          k8s:container-image:<image> (the image and its digest ID)
    k8s:pod-image:<image>              k8s:pod-init-image:<image>  (every container / init container)
    k8s:pod-image-count:<n>            k8s:pod-init-image-count:<n>

A container the kubelet does not list yet (a pod that has just started) is looked up again
a few times before attestation fails.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from identity.errors import AttestationError, InvalidInputError
from identity.peers import PROC, Peer
from identity.selectors import Selector

__all__ = [
    "DEFAULT_KUBELET_CA_PATH",
    "DEFAULT_TOKEN_PATH",
    "K8sAttestor",
    "PodContainer",
    "pod_container_of",
]

DEFAULT_TOKEN_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_KUBELET_CA_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")

_log = logging.getLogger(__name__)

_HEX = "[0-9a-fA-F]"
# A pod's cgroup is named ``pod<uid>``; the systemd cgroup driver writes the UID with '_'
# for '-' (``kubepods-besteffort-pod2c48913c_b29f_...slice``). After it come zero or more
# segments (``docker-``, ``cri-containerd-``, ``crio-``, ``:cri-containerd:``) and the
# container ID last. Cgroup namespaces (Kubernetes >= 1.21) may hide the ``/kubepods``
# prefix (``0::/../../pod<uid>/<id>``), so the match does not anchor on it.
_CGROUP_PATH = re.compile(
    rf"[^A-Za-z0-9]pod(?P<pod>{_HEX}{{8}}[-_]{_HEX}{{4}}[-_]{_HEX}{{4}}[-_]{_HEX}{{4}}[-_]{_HEX}{{12}})"
    r"[^A-Za-z0-9](?:[A-Za-z0-9]+[^A-Za-z0-9])*?(?P<container>[A-Za-z0-9]+)$"
)
_X509_V_ERR_HOSTNAME_MISMATCH = 62  # OpenSSL's verify code: the chain is fine, the name is not
_STATUS_LISTS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")


@dataclass(slots=True, frozen=True)
class PodContainer:
    """Where a process runs: the UID of its pod and the runtime's ID of its container."""

    pod_uid: str
    container_id: str


def pod_container_of(cgroup: str, *, pid: int = 0) -> PodContainer | None:
    """The pod and container named by the text of a ``/proc/<pid>/cgroup`` file, if any.

    Every hierarchy must agree: a process whose cgroups name two containers is refused
    rather than attested as one of them.
    """
    found: PodContainer | None = None
    for line in cgroup.splitlines():
        # ``hierarchy-id:controllers:path``; the path itself may hold ':' (systemd + containerd
        # on cgroup v1 writes ``...pod<uid>.slice:cri-containerd:<id>``).
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].strip().removesuffix(".scope")
        if path.endswith(".slice"):
            # The pod's own slice (no container below it) is not a container.
            continue
        match = _CGROUP_PATH.search(path)
        if match is None:
            continue
        candidate = PodContainer(
            pod_uid=match["pod"].replace("_", "-").lower(), container_id=match["container"]
        )
        if found is not None and found != candidate:
            raise AttestationError(
                f"process {pid} belongs to two containers in its cgroups "
                f"({found.container_id} in pod {found.pod_uid}, "
                f"{candidate.container_id} in pod {candidate.pod_uid})"
            )
        found = candidate
    return found


@dataclass(slots=True, frozen=True)
class K8sAttestor:
    """Pod selectors for callers running in a Kubernetes pod on this node.

    ``kubelet_host`` defaults to the loopback address, which needs the agent on the host
    network (as SPIRE's does). The kubelet's serving certificate names the node, not the
    loopback address, so against a loopback address only the chain is verified (SPIRE does
    the same); against a host name the name is verified too. Many clusters sign kubelet
    serving certificates with a CA other than the cluster CA (or self-sign them): set
    ``kubelet_ca_path`` to that CA, or ``skip_kubelet_verification``.
    """

    kubelet_host: str = "127.0.0.1"
    kubelet_port: int = 10250
    kubelet_ca_path: Path = DEFAULT_KUBELET_CA_PATH
    skip_kubelet_verification: bool = False
    token_path: Path = DEFAULT_TOKEN_PATH
    max_poll_attempts: int = 20
    poll_retry_interval: float = 0.5  # seconds between two looks for a container not listed yet
    timeout: float = 10.0  # seconds for each kubelet request (connect, send, read each)
    proc: Path = PROC

    def __post_init__(self) -> None:
        if not 0 < self.kubelet_port < 65536:
            raise InvalidInputError("must be a TCP port (1-65535)", field="kubelet_port")
        if self.max_poll_attempts < 1:
            raise InvalidInputError("must be at least 1", field="max_poll_attempts")
        if self.poll_retry_interval < 0:
            raise InvalidInputError("must not be negative", field="poll_retry_interval")
        if self.timeout <= 0:
            raise InvalidInputError("must be more than 0 seconds", field="timeout")

    @property
    def pods_url(self) -> httpx.URL:
        return httpx.URL(
            scheme="https", host=self.kubelet_host, port=self.kubelet_port, path="/pods"
        )

    def attest(self, peer: Peer) -> tuple[Selector, ...]:
        target = self._pod_container(peer)
        if target is None:
            return ()
        # One client for the polls of one attestation; the CA file is read again on the
        # next attestation, so a rotated kubelet CA is picked up without a restart.
        # trust_env=False: HTTPS_PROXY or SSL_CERT_FILE in the agent's environment must not
        # send the token through a proxy or change which CA is trusted.
        tls = self._tls_context()
        with httpx.Client(verify=tls, timeout=self.timeout, trust_env=False) as client:
            return self._poll(client, target)

    def _pod_container(self, peer: Peer) -> PodContainer | None:
        try:
            cgroup = (self.proc / str(peer.pid) / "cgroup").read_text()
        except OSError as exc:
            raise AttestationError(f"cannot read the cgroups of process {peer.pid}: {exc}") from exc
        target = pod_container_of(cgroup, pid=peer.pid)
        if not peer.is_alive(self.proc):
            # The cgroups read may describe a successor on the same pid.
            raise AttestationError(
                f"process {peer.pid} exited or its pid was reused during attestation"
            )
        return target

    def _poll(self, client: httpx.Client, target: PodContainer) -> tuple[Selector, ...]:
        pod: dict[str, object] | None = None
        for attempt in range(1, self.max_poll_attempts + 1):
            pod = _pod_with_uid(self._pod_list(client), target.pod_uid)
            if pod is not None:
                status = _container_status(pod, target.container_id)
                if status is not None:
                    return tuple(sorted(set(_selectors(pod, status))))
            if attempt < self.max_poll_attempts:
                # A new pod's container reaches the kubelet's status a moment after it starts,
                # and the workload may already be calling the agent.
                _log.debug(
                    "container %s of pod %s not listed by the kubelet yet (attempt %d of %d)",
                    target.container_id,
                    target.pod_uid,
                    attempt,
                    self.max_poll_attempts,
                )
                time.sleep(self.poll_retry_interval)
        tries = f"after {self.max_poll_attempts} attempt(s)"
        if pod is None:
            raise AttestationError(
                f"pod {target.pod_uid} is not among the pods of the kubelet at {self.pods_url} "
                f"{tries}; the agent must run on the workload's node and query its own kubelet"
            )
        raise AttestationError(
            f"container {target.container_id} is not among the containers of pod "
            f"{_pod_name(pod)} listed by the kubelet at {self.pods_url} {tries}"
        )

    def _tls_context(self) -> ssl.SSLContext:
        if self.skip_kubelet_verification:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            context = ssl.create_default_context(cafile=str(self.kubelet_ca_path))
        except (OSError, ssl.SSLError) as exc:
            raise AttestationError(
                f"cannot load the kubelet CA file {self.kubelet_ca_path}: {exc}; set "
                "kubelet_ca_path to a PEM file with the CA of the kubelet's serving certificate",
                field="kubelet_ca_path",
            ) from exc
        context.check_hostname = not _is_loopback_address(self.kubelet_host)
        return context

    def _token(self) -> str:
        # Read at every query: projected service-account tokens are rotated on disk.
        try:
            token = self.token_path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise AttestationError(
                f"cannot read the kubelet bearer token file {self.token_path}: {exc}; set "
                "token_path to the node agent's service-account token",
                field="token_path",
            ) from exc
        if not token:
            raise AttestationError(
                f"the kubelet bearer token file {self.token_path} is empty", field="token_path"
            )
        return token

    def _pod_list(self, client: httpx.Client) -> list[object]:
        token = self._token()
        url = self.pods_url
        try:
            response = client.get(url, headers={"Authorization": f"Bearer {token}"})
        except httpx.TimeoutException as exc:
            raise AttestationError(
                f"the kubelet at {url} did not answer within {self.timeout} s"
            ) from exc
        except httpx.HTTPError as exc:
            failure = _certificate_failure(exc)
            if failure is not None and failure.verify_code == _X509_V_ERR_HOSTNAME_MISMATCH:
                raise AttestationError(
                    f"the kubelet's certificate at {url} is not trusted ({failure.verify_message}); "
                    "set kubelet_host to a name the certificate holds (the node name), or to "
                    "127.0.0.1 to check the certificate's chain only",
                    field="kubelet_host",
                ) from exc
            if failure is not None:
                raise AttestationError(
                    f"the kubelet's certificate at {url} is not trusted ({failure.verify_message}); "
                    "set kubelet_ca_path to the CA that signed it (now "
                    f"{self.kubelet_ca_path}) or skip_kubelet_verification: true",
                    field="kubelet_ca_path",
                ) from exc
            raise AttestationError(
                f"the kubelet at {url} is unreachable ({exc}); check kubelet_host and "
                "kubelet_port, and that the agent runs on the host network"
            ) from exc
        if response.status_code == 401:
            raise AttestationError(
                f"the kubelet at {url} did not accept the bearer token from {self.token_path} "
                "(HTTP 401): the token must be a live service-account token, and the kubelet "
                "must run with --authentication-token-webhook",
                field="token_path",
            )
        if response.status_code == 403:
            raise AttestationError(
                f"the kubelet at {url} does not let the service account of the token in "
                f"{self.token_path} list pods (HTTP 403): grant it 'get' on nodes/proxy",
                field="token_path",
            )
        if response.status_code != 200:
            # The body may help; a kubelet does not echo credentials, but be sure it is not here.
            body = response.text[:200].replace(token, "<token>")
            raise AttestationError(
                f"the kubelet at {url} answered HTTP {response.status_code}: {body}"
            )
        try:
            document = response.json()
        except ValueError as exc:
            raise AttestationError(f"the kubelet at {url} answered invalid JSON: {exc}") from exc
        return _array(_object(document, "the pod list").get("items"), "items")


def _is_loopback_address(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The verification failure under an httpx error, if a certificate caused it."""
    seen: BaseException | None = exc
    for _ in range(10):  # httpx -> httpcore -> ssl is three deep; a chain never needs more
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


# -- the kubelet's PodList, read defensively: JSON of the wrong shape is an error, not a crash


def _object(value: object, where: str) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AttestationError(f"kubelet /pods answer: {where} is not a JSON object")
    return value


def _array(value: object, where: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise AttestationError(f"kubelet /pods answer: {where} is not a JSON array")
    return value


def _text(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AttestationError(f"kubelet /pods answer: {where} is not a string")
    return value


def _pod_with_uid(items: list[object], uid: str) -> dict[str, object] | None:
    for index, item in enumerate(items):
        pod = _object(item, f"items[{index}]")
        metadata = _object(pod.get("metadata"), f"items[{index}].metadata")
        if _text(metadata.get("uid"), f"items[{index}].metadata.uid") == uid:
            return pod
    return None


def _statuses(pod: dict[str, object], kind: str) -> Iterator[dict[str, object]]:
    status = _object(pod.get("status"), "status")
    for index, item in enumerate(_array(status.get(kind), f"status.{kind}")):
        yield _object(item, f"status.{kind}[{index}]")


def _container_status(pod: dict[str, object], container_id: str) -> dict[str, object] | None:
    for kind in _STATUS_LISTS:
        for status in _statuses(pod, kind):
            # ``containerd://<id>``, ``cri-o://<id>``, ``docker://<id>``; empty until it starts.
            listed = _text(status.get("containerID"), f"status.{kind}[].containerID")
            if listed.partition("://")[2] == container_id:
                return status
    return None


def _pod_name(pod: dict[str, object]) -> str:
    metadata = _object(pod.get("metadata"), "metadata")
    namespace = _text(metadata.get("namespace"), "metadata.namespace")
    name = _text(metadata.get("name"), "metadata.name")
    return f"{namespace}/{name}"


def _images(statuses: Iterator[dict[str, object]]) -> tuple[list[str], int]:
    """Tag and digest forms of each image, as SPIRE matches both; and how many containers."""
    images: list[str] = []
    count = 0
    for status in statuses:
        count += 1
        images += [_text(status.get("image"), "image"), _text(status.get("imageID"), "imageID")]
    return images, count


def _selectors(pod: dict[str, object], container: dict[str, object]) -> list[Selector]:
    metadata = _object(pod.get("metadata"), "metadata")
    spec = _object(pod.get("spec"), "spec")
    pod_images, pod_image_count = _images(_statuses(pod, "containerStatuses"))
    init_images, init_image_count = _images(_statuses(pod, "initContainerStatuses"))
    container_images, _ = _images(iter([container]))
    pairs: list[tuple[str, str]] = [
        ("ns", _text(metadata.get("namespace"), "metadata.namespace")),
        ("sa", _text(spec.get("serviceAccountName"), "spec.serviceAccountName")),
        ("node-name", _text(spec.get("nodeName"), "spec.nodeName")),
        ("pod-uid", _text(metadata.get("uid"), "metadata.uid")),
        ("pod-name", _text(metadata.get("name"), "metadata.name")),
        ("pod-image-count", str(pod_image_count)),
        ("pod-init-image-count", str(init_image_count)),
        ("container-name", _text(container.get("name"), "containerStatuses[].name")),
    ]
    pairs += [("container-image", image) for image in container_images]
    pairs += [("pod-image", image) for image in pod_images]
    pairs += [("pod-init-image", image) for image in init_images]
    for key, value in _object(metadata.get("labels"), "metadata.labels").items():
        pairs.append(("pod-label", f"{key}:{_text(value, f'metadata.labels.{key}')}"))
    for index, item in enumerate(_array(metadata.get("ownerReferences"), "ownerReferences")):
        owner = _object(item, f"metadata.ownerReferences[{index}]")
        kind = _text(owner.get("kind"), "ownerReferences[].kind")
        name = _text(owner.get("name"), "ownerReferences[].name")
        uid = _text(owner.get("uid"), "ownerReferences[].uid")
        pairs += [("pod-owner", f"{kind}:{name}"), ("pod-owner-uid", f"{kind}:{uid}")]
    # Empty fields (an image ID before the pull finishes) give no selector rather than
    # a selector that would match anything registered with an empty value.
    return [Selector("k8s", key, value) for key, value in pairs if value]
