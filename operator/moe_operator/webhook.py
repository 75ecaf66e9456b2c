"""Admission webhook serving: where kopf's webhook server listens and how it is registered.

In a cluster the API server reaches the operator through the chart's webhook Service, over
HTTPS with a self-signed certificate made at start-up (its CA goes into the registered
ValidatingWebhookConfiguration, which kopf creates and keeps up to date). For a local API server
(development, tests) `webhook_local` serves plain HTTP on 127.0.0.1.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import AsyncIterator
from typing import Any

import kopf

from moe_operator.api import GROUP
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
