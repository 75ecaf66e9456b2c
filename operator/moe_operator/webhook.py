"""The validating admission webhook: what it refuses, where kopf's server listens, how it is
registered.

`validate_moedeployment` refuses a MoEDeployment the operator could not deploy (the spec's
models, then the render checks and the planner), naming the field and what to change; the
operator registers it only when it runs a webhook server (`register_validation`).

In a cluster the API server reaches the operator through the chart's webhook Service, over
HTTPS with a self-signed certificate made at start-up (its CA goes into the registered
ValidatingWebhookConfiguration, which kopf creates and keeps up to date). For a local API server
(development, tests) `webhook_local` serves plain HTTP on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import kopf
from pydantic import ValidationError

from moe_operator.api import GROUP, PLURAL, VERSION, MoEDeploymentSpec, ObjectMeta
from moe_operator.errors import describe
from moe_operator.planner import PlanningError, plan
from moe_operator.render import Owner, RenderError, check_renderable, render
from moe_operator.runtime import plain
from moe_operator.settings import OperatorConfig

#: Name of the ValidatingWebhookConfiguration kopf manages.
WEBHOOK_CONFIGURATION = f"moe-operator.{GROUP}"


class ServiceWebhookServer(kopf.WebhookServer):
    """kopf's server, registered as a Service reference (port = the Service's, not the pod's)."""

    def __init__(self, *, service: str, namespace: str, service_port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.service_namespace = namespace
        self.service_port = service_port

    async def __call__(self, fn: Any) -> AsyncIterator[Any]:
        async for config in super().__call__(fn):
            # kopf appends "/<handler id>" to the service path (admission._inject_handler_id),
            # so the root path is "" here: "/" would become "//validate-spec", which the API
            # server refuses (empty path segment), and the operator would crash-loop.
            service_config: dict[str, Any] = {
                "service": {
                    "name": self.service,
                    "namespace": self.service_namespace,
                    "port": self.service_port,
                    "path": (self.path or "").rstrip("/"),
                }
            }
            if "caBundle" in config:
                service_config["caBundle"] = config["caBundle"]
            yield service_config


def self_signed(hostnames: list[str], directory: str) -> tuple[str, str, bytes]:
    """A self-signed certificate for the webhook Service names: (certfile, keyfile, PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(tz=datetime.UTC)
    sans: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    certfile, keyfile = os.path.join(directory, "tls.crt"), os.path.join(directory, "tls.key")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    with open(certfile, "wb") as f:
        f.write(pem)
    with open(keyfile, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(keyfile, 0o600)
    return certfile, keyfile, pem


def configure_admission(settings: kopf.OperatorSettings, cfg: OperatorConfig) -> None:
    """Point kopf's admission settings at the right server; kopf registers the webhook."""
    settings.admission.managed = WEBHOOK_CONFIGURATION
    if cfg.webhook_local:
        settings.admission.server = kopf.WebhookServer(
            addr="127.0.0.1", port=cfg.webhook_port or None, host="127.0.0.1", insecure=True
        )
        return
    if not cfg.webhook_service_ready():
        raise ValueError(
            "the webhook needs MOE_OPERATOR_WEBHOOK_SERVICE and MOE_OPERATOR_NAMESPACE "
            "(the chart sets both when webhook.enabled is true)"
        )
    assert cfg.webhook_service is not None and cfg.namespace is not None
    service, ns = cfg.webhook_service, cfg.namespace
    hosts = [f"{service}.{ns}.svc", service, f"{service}.{ns}", f"{service}.{ns}.svc.cluster.local"]
    if cfg.webhook_host and cfg.webhook_host not in hosts:
        hosts.insert(0, cfg.webhook_host)
    certfile, keyfile, pem = self_signed(hosts, cfg.webhook_cert_dir)
    settings.admission.server = ServiceWebhookServer(
        service=service,
        namespace=ns,
        service_port=cfg.webhook_service_port,
        addr="0.0.0.0",
        port=cfg.webhook_port,
        host=hosts[0],
        certfile=certfile,
        pkeyfile=keyfile,
        cadata=pem,
    )


# ----------------------------------------------------------------------------- the admission rule


def validate_body(body: Mapping[str, Any]) -> list[str]:
    """Problems with a MoEDeployment as the webhook reports them (empty list: valid)."""
    problems: list[str] = []
    name = (body.get("metadata") or {}).get("name")
    if name is not None:
        try:
            ObjectMeta.model_validate({"name": name})
        except ValidationError as err:
            problems += describe(err, prefix="metadata")
    try:
        spec = MoEDeploymentSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as err:
        return problems + describe(err, prefix="spec")
    try:
        check_renderable(spec)
        chosen = plan(spec)
        render(Owner(name or "x", "default", "uid"), spec, chosen)
    except (PlanningError, RenderError) as err:
        problems.append(str(err))
    return problems


def register_validation() -> None:
    """Register the admission handler, once. Only with a webhook server: kopf refuses to start
    when admission handlers exist and no server is configured (the chart's default)."""
    registry = kopf.get_default_registry()
    if any(h.id == "validate-spec" for h in registry._webhooks.get_all_handlers()):
        return
    kopf.on.validate(GROUP, VERSION, PLURAL, id="validate-spec", operations=["CREATE", "UPDATE"])(
        validate_moedeployment
    )


def validate_moedeployment(**kwargs: Any) -> None:
    """Reject a spec the operator could not deploy, naming the field and what to change."""
    body, old = kwargs["body"], kwargs.get("old")
    if kwargs.get("operation") == "UPDATE" and old is not None and _same_spec(old, body):
        return  # metadata-only changes (labels, kopf's annotations) are not re-judged
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    problems = validate_body(body)
    if problems:
        raise kopf.AdmissionError("; ".join(problems), code=422)


def _same_spec(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return plain(old.get("spec") or {}) == plain(new.get("spec") or {})
