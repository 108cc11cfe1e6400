"""Load Istio AuthorizationPolicy YAML into a compiled, immutable PolicySet.

Every ``*.yaml``/``*.yml`` under the directory (recursively, hidden entries skipped)
may hold several kubectl-style documents. Loading is all or nothing: every problem
in every file is collected, and if there is any, ``PolicyLoadError`` lists them all
(file, document index, field path, what to fix) and no set is returned.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from authz.errors import PolicyIssue, PolicyLoadError
from authz.istio_policy import (
    Action,
    Attribute,
    CidrMatch,
    Clause,
    CompiledPolicy,
    ListValueMatch,
    Matcher,
    MatchKind,
    PolicySet,
    Rule,
    StringMatch,
    compile_path_template,
    compile_string,
    is_path_template,
)
from authz.policy_files import is_istio_file, list_files, read_files

__all__ = [
    "API_VERSIONS",
    "KNOWN_PROVIDERS",
    "WHEN_KEYS",
    "load_policies",
    "load_policy_sources",
    "parse_documents",
]

API_VERSIONS = frozenset({"security.istio.io/v1", "security.istio.io/v1beta1"})
KNOWN_PROVIDERS = frozenset({"rego"})
DRY_RUN_ANNOTATION = "istio.io/dry-run"

# The `when` keys accepted (Istio's "Authorization Policy Conditions" page, plus
# source.serviceAccount and source.trustDomain); keys with brackets are matched
# by the patterns below.
WHEN_KEYS: Mapping[str, Attribute] = {
    "source.ip": Attribute.SOURCE_IP,
    "remote.ip": Attribute.REMOTE_IP,
    "source.namespace": Attribute.SOURCE_NAMESPACE,
    "source.principal": Attribute.SOURCE_PRINCIPAL,
    "source.serviceAccount": Attribute.SOURCE_SERVICE_ACCOUNT,
    "source.trustDomain": Attribute.SOURCE_TRUST_DOMAIN,
    "request.auth.principal": Attribute.REQUEST_PRINCIPAL,
    "request.auth.audiences": Attribute.AUTH_AUDIENCES,
    "request.auth.presenter": Attribute.AUTH_PRESENTER,
    "destination.ip": Attribute.DESTINATION_IP,
    "destination.port": Attribute.DESTINATION_PORT,
    "connection.sni": Attribute.SNI,
}
_HEADER_KEY = re.compile(r"request\.headers\[([^\[\]]+)\]")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)")
_FILTER_KEY = re.compile(r"experimental\.envoy\.filters\.([A-Za-z0-9_.-]+)\[([^\[\]]+)\]")
_WHEN_KEYS_HELP = (
    "request.headers[<name>], "
    + ", ".join(WHEN_KEYS)
    + ", request.auth.claims[<claim>] (nested: [<a>][<b>]), "
    "experimental.envoy.filters.<filter>[<key>]"
)

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Go's strconv.ParseBool, which Istio uses for the dry-run annotation.
_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}

_DOC_KEYS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_KEYS = (
    "name",
    "namespace",
    "labels",
    "annotations",
    # Present in `kubectl get -o yaml` output; harmless, so accepted and ignored.
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
)
_SPEC_KEYS = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
_TARGET_REF_KEYS = ("group", "kind", "name", "namespace")
_RULE_KEYS = ("from", "to", "when")
_CONDITION_KEYS = ("key", "values", "notValues")

# Compiles one policy value; a value may stand for several matchers (trust-domain aliases).
_IDENTITY_FIELDS = ("principals", "notPrincipals", "namespaces", "notNamespaces")
# The trust domain Istio's principals use to mean "this mesh's" (and its aliases).
CLUSTER_LOCAL = "cluster.local"
_MAX_SERVICE_ACCOUNTS = 16
_MAX_SERVICE_ACCOUNT_LENGTH = 320

_StringCompiler = Callable[[str], tuple[Matcher, ...]]


def load_policies(
    directory: Path,
    *,
    root_namespace: str = "istio-system",
    trust_domain: str,
    trust_domain_aliases: Iterable[str] = (),
) -> PolicySet:
    """Read every policy file under ``directory``; raise PolicyLoadError listing all problems."""
    if not directory.is_dir():
        raise PolicyLoadError(
            [PolicyIssue(str(directory), 0, "", "is not a directory of AuthorizationPolicy YAML")]
        )
    issues: list[PolicyIssue] = []
    sources = read_files(list_files(directory, is_istio_file), issues)
    return load_policy_sources(
        [(str(path), raw) for path, raw in sources],
        root_namespace=root_namespace,
        trust_domain=trust_domain,
        trust_domain_aliases=trust_domain_aliases,
        issues=issues,
    )


def load_policy_sources(
    sources: Sequence[tuple[str, bytes]],
    *,
    root_namespace: str = "istio-system",
    trust_domain: str,
    trust_domain_aliases: Iterable[str] = (),
    issues: list[PolicyIssue] | None = None,
) -> PolicySet:
    """Like ``load_policies`` for (file name, contents) already read."""
    issues = issues if issues is not None else []
    compiler = _Compiler(trust_domain, tuple(trust_domain_aliases), issues)
    policies: list[CompiledPolicy] = []
    for file, raw in sources:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append(PolicyIssue(file, 0, "", f"cannot be read: {exc}"))
            continue
        policies.extend(compiler.compile_file(file, text))
    return _finish(policies, root_namespace, issues)


def parse_documents(
    text: str,
    *,
    file: str = "<string>",
    root_namespace: str = "istio-system",
    trust_domain: str,
    trust_domain_aliases: Iterable[str] = (),
) -> PolicySet:
    """Like ``load_policies`` for the text of one file, named ``file`` in the issues."""
    issues: list[PolicyIssue] = []
    compiler = _Compiler(trust_domain, tuple(trust_domain_aliases), issues)
    return _finish(compiler.compile_file(file, text), root_namespace, issues)


def _finish(
    policies: list[CompiledPolicy], root_namespace: str, issues: list[PolicyIssue]
) -> PolicySet:
    seen: dict[tuple[str, str], CompiledPolicy] = {}
    for policy in policies:
        key = (policy.namespace, policy.name)
        if key in seen:
            first = seen[key]
            issues.append(
                PolicyIssue(
                    policy.file,
                    policy.document,
                    "metadata.name",
                    f"policy {policy.namespace}/{policy.name} is also defined in "
                    f"{first.file} (document {first.document}); names must be unique "
                    "within a namespace",
                )
            )
        else:
            seen[key] = policy
    if issues:
        raise PolicyLoadError(issues)
    return PolicySet(tuple(policies), root_namespace=root_namespace)


class _Compiler:
    """Validates and compiles documents, appending every problem to ``issues``."""

    def __init__(self, trust_domain: str, aliases: tuple[str, ...], issues: list[PolicyIssue]):
        self._domains = (trust_domain, *(a for a in aliases if a != trust_domain))
        self._issues = issues
        self._file = ""
        self._doc = 0
        self._namespace = "default"  # of the policy being compiled

    # -- plumbing ---------------------------------------------------------------

    def _error(self, field: str, message: str) -> None:
        self._issues.append(PolicyIssue(self._file, self._doc, field, message))

    def _mapping(self, value: Any, field: str) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self._error(field, f"must be a mapping, not {_kind(value)}")
            return None
        return value

    def _known_keys(self, value: Mapping[str, Any], allowed: tuple[str, ...], field: str) -> None:
        for key in value:
            if key not in allowed:
                where = f"{field}.{key}" if field else str(key)
                self._error(where, f"unknown field; expected one of: {', '.join(allowed)}")

    def _list(self, value: Any, field: str) -> list[Any]:
        if not isinstance(value, list):
            self._error(field, f"must be a list, not {_kind(value)}")
            return []
        return value

    def _strings(self, value: Any, field: str) -> list[tuple[str, str]]:
        """(field path, value) of each entry of a list of non-empty strings."""
        out: list[tuple[str, str]] = []
        for i, item in enumerate(self._list(value, field)):
            where = f"{field}[{i}]"
            if not isinstance(item, str):
                self._error(where, f"must be a string, not {_kind(item)}; quote it")
            elif item == "":
                self._error(where, "empty value not allowed; use '*' for any non-empty value")
            else:
                out.append((where, item))
        return out

    # -- documents --------------------------------------------------------------

    def compile_file(self, file: str, text: str) -> list[CompiledPolicy]:
        self._file, self._doc = file, 0
        out: list[CompiledPolicy] = []
        # Documents are parsed lazily, so a syntax error belongs to the one after the
        # last document handed out.
        next_index = 0
        try:
            for index, document in enumerate(yaml.safe_load_all(text)):
                self._doc, next_index = index, index + 1
                if document is None:
                    continue  # an empty document (e.g. a trailing '---') is not an error
                policy = self._document(document)
                if policy is not None:
                    out.append(policy)
        except yaml.YAMLError as exc:
            self._doc = next_index
            self._error("", f"is not valid YAML: {exc}".replace("\n", " "))
        return out

    def _document(self, document: Any) -> CompiledPolicy | None:
        doc = self._mapping(document, "(document)")
        if doc is None:
            return None
        errors_before = len(self._issues)
        self._known_keys(doc, _DOC_KEYS, "")
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        # isinstance first: a YAML list or mapping here is unhashable.
        api_ok = isinstance(api_version, str) and api_version in API_VERSIONS
        kind_ok = kind == "AuthorizationPolicy"
        if not api_ok:
            self._error(
                "apiVersion",
                f"{api_version!r} is not supported; use security.istio.io/v1 (or v1beta1)",
            )
        if not kind_ok:
            self._error("kind", f"{kind!r} is not supported; only AuthorizationPolicy is")
        if not (api_ok and kind_ok):
            return None

        name, namespace, dry_run = self._metadata(doc.get("metadata"))
        spec = doc.get("spec", {})
        if spec is None:
            spec = {}
        policy = self._spec(spec, name or "", namespace, dry_run)
        if policy is None or len(self._issues) != errors_before:
            return None
        return policy

    def _metadata(self, value: Any) -> tuple[str | None, str, bool]:
        if value is None:
            self._error("metadata", "is required: metadata.name (and metadata.namespace)")
            return None, "default", False
        meta = self._mapping(value, "metadata")
        if meta is None:
            return None, "default", False
        self._known_keys(meta, _METADATA_KEYS, "metadata")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            self._error("metadata.name", "is required: the policy's name")
            name = None
        elif len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
            self._error(
                "metadata.name",
                f"{name!r} must be lowercase letters, digits, '-' and '.' (a DNS subdomain)",
            )
        namespace = meta.get("namespace", "default")
        if (
            not isinstance(namespace, str)
            or len(namespace) > 63
            or not _DNS_LABEL.fullmatch(namespace)
        ):
            self._error(
                "metadata.namespace",
                f"{namespace!r} must be a namespace name (lowercase letters, digits, '-')",
            )
            namespace = "default"
        dry_run = False
        annotations = meta.get("annotations")
        if annotations is not None:
            ann = self._mapping(annotations, "metadata.annotations")
            if ann is not None and DRY_RUN_ANNOTATION in ann:
                raw = ann[DRY_RUN_ANNOTATION]
                field = f"metadata.annotations[{DRY_RUN_ANNOTATION}]"
                if not isinstance(raw, str) or raw not in _BOOLS:
                    self._error(
                        field, f'must be the string "true" or "false", not {raw!r}; quote it'
                    )
                else:
                    dry_run = _BOOLS[raw]
        return name, namespace, dry_run

    def _spec(self, value: Any, name: str, namespace: str, dry_run: bool) -> CompiledPolicy | None:
        spec = self._mapping(value, "spec")
        if spec is None:
            return None
        self._known_keys(spec, _SPEC_KEYS, "spec")

        raw_action = spec.get("action", "ALLOW")
        action = Action.ALLOW
        if not isinstance(raw_action, str) or raw_action not in Action.__members__:
            self._error("spec.action", f"{raw_action!r} is not one of ALLOW, DENY, AUDIT, CUSTOM")
        else:
            action = Action(raw_action)

        provider = self._provider(spec, action)
        if action is Action.CUSTOM and dry_run:
            self._error(
                f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
                "dry-run is not supported for CUSTOM policies; remove the annotation",
            )

        self._namespace = namespace
        match_labels = self._selector(spec.get("selector"))
        target_services = self._target_refs(spec, namespace)
        if match_labels is not None and target_services is not None:
            self._error("spec", "set at most one of selector and targetRefs")

        rules: list[Rule] = []
        if "rules" in spec and spec["rules"] is not None:
            for i, raw_rule in enumerate(self._list(spec["rules"], "spec.rules")):
                rule = self._rule(raw_rule, i)
                if rule is not None:
                    rules.append(rule)
        return CompiledPolicy(
            namespace=namespace,
            name=name,
            action=action,
            rules=tuple(rules),
            file=self._file,
            document=self._doc,
            provider=provider,
            dry_run=dry_run,
            match_labels=match_labels,
            target_services=target_services,
        )

    def _provider(self, spec: Mapping[str, Any], action: Action) -> str | None:
        if "provider" not in spec:
            if action is Action.CUSTOM:
                self._error(
                    "spec.provider", "is required for action CUSTOM: provider: {name: rego}"
                )
            return None
        if action is not Action.CUSTOM:
            self._error("spec.provider", "is only allowed with action CUSTOM; remove it")
            return None
        provider = self._mapping(spec["provider"], "spec.provider")
        if provider is None:
            return None
        self._known_keys(provider, ("name",), "spec.provider")
        name = provider.get("name")
        if not isinstance(name, str) or not name:
            self._error("spec.provider.name", "is required: the extension provider's name (rego)")
            return None
        if name not in KNOWN_PROVIDERS:
            self._error(
                "spec.provider.name",
                f"unknown provider {name!r}; the only provider is 'rego'",
            )
            return None
        return name

    def _selector(self, value: Any) -> tuple[tuple[str, str], ...] | None:
        if value is None:
            return None
        selector = self._mapping(value, "spec.selector")
        if selector is None:
            return None
        self._known_keys(selector, ("matchLabels",), "spec.selector")
        labels = selector.get("matchLabels") or {}
        labels_map = self._mapping(labels, "spec.selector.matchLabels")
        if labels_map is None:
            return None
        out: list[tuple[str, str]] = []
        for key, label in labels_map.items():
            if not isinstance(key, str) or not isinstance(label, str):
                self._error(
                    f"spec.selector.matchLabels[{key}]",
                    f"label values must be strings, not {_kind(label)}; quote it",
                )
            else:
                out.append((key, label))
        return tuple(sorted(out))

    def _target_refs(self, spec: Mapping[str, Any], namespace: str) -> tuple[str, ...] | None:
        if "targetRef" in spec and "targetRefs" in spec:
            self._error("spec", "set targetRefs or the older targetRef, not both")
        if "targetRefs" in spec:
            field, refs = "spec.targetRefs", self._list(spec["targetRefs"], "spec.targetRefs")
            fields = [f"{field}[{i}]" for i in range(len(refs))]
        elif "targetRef" in spec:
            refs, fields = [spec["targetRef"]], ["spec.targetRef"]
        else:
            return None
        if not refs:
            return None  # an empty list is the same as no targetRefs: the whole namespace
        names: list[str] = []
        for where, raw in zip(fields, refs, strict=True):
            ref = self._mapping(raw, where)
            if ref is None:
                continue
            self._known_keys(ref, _TARGET_REF_KEYS, where)
            if "kind" not in ref:
                self._error(f"{where}.kind", "is required: Service")
            elif ref["kind"] != "Service":
                self._error(f"{where}.kind", f"{ref['kind']!r} is not supported; use Service")
            if ref.get("group", "") not in ("", "core"):
                self._error(f"{where}.group", 'must be "" (the core group) for kind Service')
            if ref.get("namespace", namespace) != namespace:
                self._error(
                    f"{where}.namespace",
                    f"must be the policy's namespace {namespace!r}: a policy can only target "
                    "Services of its own namespace",
                )
            target = ref.get("name")
            if not isinstance(target, str) or not target:
                self._error(f"{where}.name", "is required: the Service's name")
            else:
                names.append(target)
        return tuple(names)

    # -- rules ------------------------------------------------------------------

    def _rule(self, value: Any, index: int) -> Rule | None:
        field = f"spec.rules[{index}]"
        if value is None:
            value = {}
        rule = self._mapping(value, field)
        if rule is None:
            return None
        self._known_keys(rule, _RULE_KEYS, field)
        for key in ("from", "to"):
            # Istio rejects `from: []`: read as "no constraint" it would match everyone.
            if rule.get(key) == []:
                self._error(f"{field}.{key}", "must not be empty; remove it or list entries")
        sources = tuple(
            self._block(item, f"{field}.from[{i}]", "source", self._source_clauses)
            for i, item in enumerate(self._list(rule.get("from") or [], f"{field}.from"))
        )
        operations = tuple(
            self._block(item, f"{field}.to[{i}]", "operation", self._operation_clauses)
            for i, item in enumerate(self._list(rule.get("to") or [], f"{field}.to"))
        )
        conditions: list[Clause] = []
        for i, item in enumerate(self._list(rule.get("when") or [], f"{field}.when")):
            conditions.extend(self._condition(item, f"{field}.when[{i}]"))
        return Rule(
            index=index, sources=sources, operations=operations, conditions=tuple(conditions)
        )

    def _block(
        self,
        value: Any,
        field: str,
        inner: str,
        compile_fields: Callable[[Mapping[str, Any], str], list[Clause]],
    ) -> tuple[Clause, ...]:
        entry = self._mapping(value, field)
        if entry is None:
            return ()
        self._known_keys(entry, (inner,), field)
        body = entry.get(inner)
        where = f"{field}.{inner}"
        if not body:
            self._error(
                where, f"is required and must not be empty (set at least one {inner} field)"
            )
            return ()
        mapping = self._mapping(body, where)
        if mapping is None:
            return ()
        if all(v == [] or v is None for v in mapping.values()):
            # Only empty lists would constrain nothing: an ALLOW would allow anyone.
            self._error(
                where,
                f"has only empty lists; list at least one value (Istio rejects an empty {inner})",
            )
            return ()
        return tuple(compile_fields(mapping, where))

    def _fields(
        self,
        body: Mapping[str, Any],
        where: str,
        spec: Mapping[str, tuple[Attribute, _StringCompiler | None]],
    ) -> list[Clause]:
        allowed = tuple(k for base in spec for k in (base, "not" + base[0].upper() + base[1:]))
        self._known_keys(body, allowed, where)
        clauses: list[Clause] = []
        for base, (attribute, compile_one) in spec.items():
            negative = "not" + base[0].upper() + base[1:]
            for key, negated in ((base, False), (negative, True)):
                if key not in body:
                    continue
                clause = self._clause(
                    attribute, body[key], f"{where}.{key}", negated, compile_one or self._plain
                )
                if clause is not None:
                    clauses.append(clause)
        return clauses

    def _source_clauses(self, body: Mapping[str, Any], where: str) -> list[Clause]:
        # Istio's CRD validation: serviceAccounts/notServiceAccounts exclude all four of
        # principals, notPrincipals, namespaces and notNamespaces, and hold at most 16
        # entries of at most 320 characters.
        accounts = [k for k in ("serviceAccounts", "notServiceAccounts") if k in body]
        identities = [k for k in _IDENTITY_FIELDS if k in body]
        if accounts and identities:
            self._error(
                f"{where}.{accounts[0]}",
                f"cannot be set together with {', '.join(identities)}; serviceAccounts and "
                "notServiceAccounts exclude principals and namespaces (and their not* forms)",
            )
        for key in accounts:
            values = body[key]
            if isinstance(values, list) and len(values) > _MAX_SERVICE_ACCOUNTS:
                self._error(
                    f"{where}.{key}", f"has {len(values)} entries; at most {_MAX_SERVICE_ACCOUNTS}"
                )
        return self._fields(
            body,
            where,
            {
                "principals": (Attribute.SOURCE_PRINCIPAL, self._principal),
                "requestPrincipals": (Attribute.REQUEST_PRINCIPAL, None),
                "namespaces": (Attribute.SOURCE_NAMESPACE, None),
                "serviceAccounts": (Attribute.SOURCE_SERVICE_ACCOUNT, self._own_service_account),
                "trustDomains": (Attribute.SOURCE_TRUST_DOMAIN, self._trust_domain),
                "ipBlocks": (Attribute.SOURCE_IP, _cidr),
                "remoteIpBlocks": (Attribute.REMOTE_IP, _cidr),
            },
        )

    def _operation_clauses(self, body: Mapping[str, Any], where: str) -> list[Clause]:
        return self._fields(
            body,
            where,
            {
                "hosts": (Attribute.HOST, _host),
                "ports": (Attribute.DESTINATION_PORT, _port),
                "methods": (Attribute.METHOD, None),
                "paths": (Attribute.PATH, _path),
            },
        )

    def _condition(self, value: Any, field: str) -> list[Clause]:
        condition = self._mapping(value, field)
        if condition is None:
            return []
        self._known_keys(condition, _CONDITION_KEYS, field)
        key = condition.get("key")
        if not isinstance(key, str) or not key:
            self._error(f"{field}.key", f"is required; one of {_WHEN_KEYS_HELP}")
            return []
        parsed = self._when_key(key)
        if parsed is None:
            self._error(f"{field}.key", f"unknown key {key!r}; use one of {_WHEN_KEYS_HELP}")
            return []
        attribute, sub_key = parsed
        if not condition.get("values") and not condition.get("notValues"):
            self._error(field, f"set at least one of values or notValues for {key!r}")
            return []
        compile_one = self._compiler_for(attribute)
        clauses: list[Clause] = []
        for name, negated in (("values", False), ("notValues", True)):
            if name in condition:
                clause = self._clause(
                    attribute, condition[name], f"{field}.{name}", negated, compile_one, sub_key
                )
                if clause is not None:
                    clauses.append(clause)
        return clauses

    def _when_key(self, key: str) -> tuple[Attribute, tuple[str, ...]] | None:
        if key in WHEN_KEYS:
            return WHEN_KEYS[key], ()
        if m := _HEADER_KEY.fullmatch(key):
            return Attribute.HEADER, (m.group(1).lower(),)
        if m := _CLAIM_KEY.fullmatch(key):
            return Attribute.AUTH_CLAIM, tuple(re.findall(r"\[([^\[\]]+)\]", m.group(1)))
        if m := _FILTER_KEY.fullmatch(key):
            return Attribute.FILTER_METADATA, ("envoy.filters." + m.group(1), m.group(2))
        return None

    def _compiler_for(self, attribute: Attribute) -> _StringCompiler:
        return {
            Attribute.FILTER_METADATA: _filter_value,
            Attribute.SOURCE_PRINCIPAL: self._principal,
            Attribute.SOURCE_SERVICE_ACCOUNT: self._service_account,
            Attribute.SOURCE_TRUST_DOMAIN: self._trust_domain,
            Attribute.SOURCE_IP: _cidr,
            Attribute.REMOTE_IP: _cidr,
            Attribute.DESTINATION_IP: _cidr,
            Attribute.DESTINATION_PORT: _port,
        }.get(attribute, self._plain)

    def _clause(
        self,
        attribute: Attribute,
        raw: Any,
        field: str,
        negated: bool,
        compile_one: _StringCompiler,
        key: tuple[str, ...] = (),
    ) -> Clause | None:
        matchers: list[Matcher] = []
        for where, text in self._strings(raw, field):
            try:
                matchers.extend(compile_one(text))
            except ValueError as exc:
                self._error(where, str(exc))
        if not matchers:
            return None
        return Clause(attribute, tuple(matchers), negated, field, key)

    # -- value compilers (raise ValueError naming what to fix) ------------------

    @staticmethod
    def _plain(value: str) -> tuple[Matcher, ...]:
        return (compile_string(value),)

    def _with_domains(
        self, value: str, split: Callable[[str], tuple[str, str]]
    ) -> tuple[Matcher, ...]:
        """Expand a value naming the local trust domain or an alias to all of them.

        Istio rewrites such principals for every alias, so a policy written for one
        trust domain keeps matching peers of the others.
        """
        domain, rest = split(value)
        if domain in self._domains:
            return tuple(compile_string(d + rest) for d in self._domains)
        return (compile_string(value),)

    def _principal(self, value: str) -> tuple[Matcher, ...]:
        def split(v: str) -> tuple[str, str]:
            domain, sep, rest = v.partition("/")
            # As istiod does: a principal in cluster.local names the local trust domain.
            return (self._domains[0] if domain == CLUSTER_LOCAL else domain), sep + rest

        return self._with_domains(value, split)

    def _trust_domain(self, value: str) -> tuple[Matcher, ...]:
        return self._with_domains(value, lambda v: (v, ""))

    def _own_service_account(self, value: str) -> tuple[Matcher, ...]:
        # Istio's API: "<serviceaccount> may also be used to use the same namespace as the
        # AuthorizationPolicy" (the serviceAccounts field; the when key stays qualified).
        if "/" not in value and value and "*" not in value:
            if len(value) > _MAX_SERVICE_ACCOUNT_LENGTH:
                raise ValueError(
                    f"is {len(value)} characters; at most {_MAX_SERVICE_ACCOUNT_LENGTH}"
                )
            return (StringMatch(MatchKind.EXACT, f"{self._namespace}/{value}"),)
        return self._service_account(value)

    @staticmethod
    def _service_account(value: str) -> tuple[Matcher, ...]:
        if len(value) > _MAX_SERVICE_ACCOUNT_LENGTH:
            raise ValueError(f"is {len(value)} characters; at most {_MAX_SERVICE_ACCOUNT_LENGTH}")
        parts = value.split("/")
        if len(parts) != 2 or not all(parts) or "*" in value:
            raise ValueError(
                f"{value!r} must be <namespace>/<service account> or, in serviceAccounts, "
                "<service account> of the policy's namespace, e.g. default/web or web (no "
                "wildcards)"
            )
        return (StringMatch(MatchKind.EXACT, value),)


def _cidr(value: str) -> tuple[Matcher, ...]:
    try:
        return (CidrMatch(ipaddress.ip_network(value, strict=False)),)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or CIDR range (e.g. 10.0.0.1, 10.0.0.0/16, fd00::/8)"
        ) from None


def _filter_value(value: str) -> tuple[Matcher, ...]:
    if len(value) > 2 and value.startswith("[") and value.endswith("]"):
        return (ListValueMatch(compile_string(value[1:-1])),)
    return (compile_string(value),)


def _port(value: str) -> tuple[Matcher, ...]:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"{value!r} is not a port; use a number from 1 to 65535")
    return (StringMatch(MatchKind.EXACT, str(int(value))),)


def _host(value: str) -> tuple[Matcher, ...]:
    return (compile_string(value, ignore_case=True),)


def _path(value: str) -> tuple[Matcher, ...]:
    if is_path_template(value):
        return (compile_path_template(value),)
    # Istio would take /users/{id} literally and never match it; that is always a
    # mistake (a DENY that silently denies nothing), so it is refused here.
    if re.search(r"\{[^}]*\}", value):
        raise ValueError(
            f"path {value!r}: only the template operators {{*}} and {{**}} are supported"
        )
    return (compile_string(value),)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), f"a {type(value).__name__}"
    )
