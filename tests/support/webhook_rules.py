"""The API server's validation of a ValidatingWebhookConfiguration, as a checker for tests.

A port of the rules a real API server applies on create and update (a failing object is a 422
and, for the operator, a crash loop at start-up), from kubernetes/kubernetes:

* pkg/apis/admissionregistration/validation/validation.go: `validateValidatingWebhook`
  (name fully qualified, rules, failurePolicy, matchPolicy, sideEffects None/NoneOnDryRun,
  timeoutSeconds 1..30, exactly one of clientConfig.url / clientConfig.service) and
  `validateAdmissionReviewVersions` (at least one of v1, v1beta1; no duplicates);
* staging/src/k8s.io/apiserver/pkg/util/webhook/validation.go: `ValidateWebhookService` (name,
  namespace, port 1..65535, path starting with '/', no empty segment such as in '//x', each
  segment a DNS-1123 subdomain) and `ValidateWebhookURL` (https, a host, no user, query or
  fragment).

One rule is ours, not the API server's: a Service reference needs `caBundle`, because the
operator's certificate is self-signed and the API server would not trust it otherwise (it falls
back to the system roots, and every admission call would fail with failurePolicy Fail).
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_OPERATIONS = {"*", "CREATE", "UPDATE", "DELETE", "CONNECT"}


def _subdomain_problems(value: str) -> list[str]:
    if len(value) > 253:
        return ["must be no more than 253 characters"]
    if not _DNS1123_SUBDOMAIN.match(value):
        return ["must be a lowercase RFC 1123 subdomain"]
    return []


def service_problems(service: dict[str, Any], where: str) -> list[str]:
    """`ValidateWebhookService` of k8s.io/apiserver/pkg/util/webhook/validation.go."""
    problems = []
    if not service.get("name"):
        problems.append(f"{where}.name: service name is required")
    if not service.get("namespace"):
        problems.append(f"{where}.namespace: service namespace is required")
    port = service.get("port", 443)  # defaulted to 443 by the API server
    if not isinstance(port, int) or not 1 <= port <= 65535:
        problems.append(f"{where}.port: port is not valid: {port!r}")
    path = service.get("path")
    if path is None or path in ("", "/"):
        return problems
    if path == "//":
        return [*problems, f"{where}.path: {path!r}: segment[0] may not be empty"]
    if not path.startswith("/"):
        problems.append(f"{where}.path: {path!r}: must start with a '/'")
    rest = path[1:]
    if rest.endswith("/"):
        rest = rest[:-1]
    for i, step in enumerate(rest.split("/")):
        if not step:
            problems.append(f"{where}.path: {path!r}: segment[{i}] may not be empty")
            continue
        problems += [
            f"{where}.path: {path!r}: segment[{i}]: {p}" for p in _subdomain_problems(step)
        ]
    return problems


def url_problems(url: str, where: str, *, require_https: bool = True) -> list[str]:
    """`ValidateWebhookURL` of k8s.io/apiserver/pkg/util/webhook/validation.go."""
    parts = urllib.parse.urlsplit(url)
    problems = []
    if require_https and parts.scheme != "https":
        problems.append(f"{where}: {parts.scheme!r}: 'https' is the only allowed URL scheme")
    if not parts.netloc:
        problems.append(f"{where}: host must be provided")
    if "@" in parts.netloc:
        problems.append(f"{where}: user information is not permitted in the URL")
    if parts.fragment:
        problems.append(f"{where}: fragments are not permitted in the URL")
    if parts.query:
        problems.append(f"{where}: query parameters are not permitted in the URL")
    return problems


def _rule_problems(rule: dict[str, Any], where: str) -> list[str]:
    problems = []
    operations = rule.get("operations") or []
    if not operations:
        problems.append(f"{where}.operations: Required value")
    if len(operations) > 1 and "*" in operations:
        problems.append(f"{where}.operations: if '*' is present, must not specify other operations")
    problems += [
        f"{where}.operations: {op!r} not supported" for op in operations if op not in _OPERATIONS
    ]
    for key in ("apiGroups", "apiVersions", "resources"):
        values = rule.get(key) or []
        if not values:
            problems.append(f"{where}.{key}: Required value")
        if len(values) > 1 and "*" in values:
            problems.append(f"{where}.{key}: if '*' is present, must not specify others")
    if any(v == "" for v in rule.get("apiVersions") or []) or any(
        r == "" for r in rule.get("resources") or []
    ):
        problems.append(f"{where}: empty apiVersion or resource")
    if rule.get("scope", "*") not in ("Cluster", "Namespaced", "*"):
        problems.append(f"{where}.scope: {rule.get('scope')!r} not supported")
    return problems


def configuration_problems(config: dict[str, Any], *, require_https: bool = True) -> list[str]:
    """Everything the API server (and the CA rule above) refuses in this configuration."""
    problems = []
    name = (config.get("metadata") or {}).get("name", "")
    problems += [f"metadata.name: {p}" for p in _subdomain_problems(name)]
    seen: set[str] = set()
    for i, hook in enumerate(config.get("webhooks") or []):
        where = f"webhooks[{i}]"
        hook_name = hook.get("name", "")
        # IsFullyQualifiedName: a DNS-1123 subdomain with at least three segments.
        if _subdomain_problems(hook_name) or hook_name.count(".") < 2:
            problems.append(f"{where}.name: {hook_name!r} must be a fully qualified domain name")
        if hook_name in seen:
            problems.append(f"{where}.name: Duplicate value {hook_name!r}")
        seen.add(hook_name)
        for j, rule in enumerate(hook.get("rules") or []):
            problems += _rule_problems(rule, f"{where}.rules[{j}]")
        if hook.get("failurePolicy", "Fail") not in ("Fail", "Ignore"):
            problems.append(f"{where}.failurePolicy: not supported")
        if hook.get("matchPolicy", "Equivalent") not in ("Exact", "Equivalent"):
            problems.append(f"{where}.matchPolicy: not supported")
        if hook.get("sideEffects") not in ("None", "NoneOnDryRun"):
            problems.append(f"{where}.sideEffects: must be None or NoneOnDryRun")
        timeout = hook.get("timeoutSeconds")
        if timeout is not None and not 1 <= timeout <= 30:
            problems.append(f"{where}.timeoutSeconds: must be between 1 and 30 seconds")
        versions = hook.get("admissionReviewVersions") or []
        if not {"v1", "v1beta1"} & set(versions):
            problems.append(f"{where}.admissionReviewVersions: must include v1 or v1beta1")
        if len(set(versions)) != len(versions) or not all(
            _DNS1035_LABEL.match(v) for v in versions
        ):
            problems.append(f"{where}.admissionReviewVersions: duplicate or invalid version")
        client = hook.get("clientConfig") or {}
        where_cc = f"{where}.clientConfig"
        if ("url" in client) == ("service" in client):
            problems.append(f"{where_cc}: exactly one of url or service is required")
        elif "url" in client:
            problems += url_problems(client["url"], f"{where_cc}.url", require_https=require_https)
        else:
            problems += service_problems(client["service"], f"{where_cc}.service")
            if not client.get("caBundle"):
                problems.append(f"{where_cc}.caBundle: needed to trust the self-signed certificate")
    return problems
