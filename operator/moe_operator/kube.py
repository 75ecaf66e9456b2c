"""A thin async Kubernetes REST client (aiohttp) for what kopf does not do: apply children.

Only the calls the operator makes: GET, server-side apply, merge-patch of `status`, DELETE.
Credentials come from kopf's login (handlers.py hands them over as a `Connection`), so the
operator authenticates the same way for kopf's watches and for its own writes.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from opentelemetry import trace

from moe_operator import children, tracing

Obj = dict[str, Any]


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate (mirrors kopf.ConnectionInfo)."""

    server: str
    ca_path: str | None = None
    ca_data: str | bytes | None = None  # base64 (kubeconfig style) or PEM
    insecure: bool | None = None
    token: str | None = None
    scheme: str | None = None
    username: str | None = None
    password: str | None = None
    certificate_path: str | None = None
    certificate_data: str | bytes | None = None
    private_key_path: str | None = None
    private_key_data: str | bytes | None = None


@dataclass(frozen=True)
class Resource:
    """An API resource: where its objects live in the REST tree."""

    group: str
    version: str
    plural: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


#: The kinds the operator writes, by (apiVersion, kind) as they appear in rendered objects.
KINDS: dict[tuple[str, str], Resource] = {
    c.key: Resource(c.group, c.version, c.plural) for c in children.CHILDREN
}


def resource_of(obj: Obj) -> Resource:
    """The resource of a rendered object; unknown kinds are a programming error."""
    try:
        return KINDS[(obj["apiVersion"], obj["kind"])]
    except KeyError:
        raise ValueError(f"the operator does not manage {obj.get('kind')!r} objects") from None


#: What kube-apiserver says when a server-side apply names a field the resource's schema lacks
#: (e.g. a CRD older than the fields we render). It comes as HTTP 500 without a reason: the
#: error from structured-merge-diff is not a metav1.Status (k8s.io/apimachinery/pkg/util/
#: managedfields/internal/structuredmerge.go; kubernetes/kubernetes#122480, #139253).
_SCHEMA_ERRORS = ("failed to create typed patch object", "field not declared in schema")


class ApiError(Exception):
    """A failed API call; `transient` ones are worth retrying (conflict, throttling, 5xx)."""

    def __init__(
        self, status: int, reason: str, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after = retry_after

    @property
    def rejected(self) -> bool:
        """The API server refused the object itself (schema, validation): sending the same
        object again cannot succeed. 400 BadRequest, 422 Invalid, and the 500 that server-side
        apply returns for a field missing from the schema."""
        if self.status in (400, 422):
            return True
        return self.status == 500 and any(text in self.message for text in _SCHEMA_ERRORS)

    @property
    def transient(self) -> bool:
        if self.rejected:
            return False
        return self.status in (408, 409, 429) or self.status >= 500


def _pem(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _ssl_context(conn: Connection) -> ssl.SSLContext | bool:
    if not conn.server.startswith("https"):
        return False
    if conn.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cafile=conn.ca_path)
    if conn.ca_data:
        ctx.load_verify_locations(cadata=_pem(conn.ca_data).decode())
    cert, key = conn.certificate_path, conn.private_key_path
    if conn.certificate_data and conn.private_key_data:
        # ssl only loads client certificates from files.
        with (
            tempfile.NamedTemporaryFile(suffix=".crt", delete=False) as cf,
            tempfile.NamedTemporaryFile(suffix=".key", delete=False) as kf,
        ):
            cf.write(_pem(conn.certificate_data))
            kf.write(_pem(conn.private_key_data))
            cert, key = cf.name, kf.name
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class Client:
    """Stateless about credentials: every request uses the latest `Connection`."""

    def __init__(
        self,
        connection: Callable[[], Connection | None],
        *,
        user_agent: str,
        request_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._connection = connection
        self._tracer = tracer  # one CLIENT span per call (tracing.py)
        self._user_agent = user_agent
        self._timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._session_for: Connection | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _session_now(self) -> tuple[aiohttp.ClientSession, Connection]:
        conn = self._connection()
        if conn is None:
            raise ApiError(503, "NotLoggedIn", "no API credentials yet (kopf has not logged in)")
        if self._session is None or self._session_for != conn:
            await self.close()
            headers = {"User-Agent": self._user_agent}
            if conn.token:
                headers["Authorization"] = f"{conn.scheme or 'Bearer'} {conn.token}"
            auth = aiohttp.BasicAuth(conn.username, conn.password or "") if conn.username else None
            self._session = aiohttp.ClientSession(
                base_url=conn.server.rstrip("/"),
                headers=headers,
                auth=auth,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(ssl=_ssl_context(conn)),
            )
            self._session_for = conn
        return self._session, conn

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        operation: str | None = None,
    ) -> Obj:
        with tracing.api_span(self._tracer, method, path, operation or method.lower()) as span:
            status = 503  # no answer at all
            try:
                session, _ = await self._session_now()
                data = None if body is None else json.dumps(body)
                headers = {"Content-Type": content_type, "Accept": "application/json"}
                try:
                    async with session.request(
                        method, path, params=params, data=data, headers=headers
                    ) as rsp:
                        status = rsp.status
                        text = await rsp.text()
                        if rsp.status >= 400:
                            raise _error(rsp.status, text, rsp.headers.get("Retry-After"))
                        return json.loads(text) if text else {}
                except (
                    aiohttp.ClientConnectionError,
                    aiohttp.ClientPayloadError,
                    TimeoutError,
                ) as err:
                    raise ApiError(503, "Unavailable", f"{method} {path}: {err!r}") from err
            finally:
                tracing.end_api_span(span, status)

    async def get(self, res: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", res.path(namespace, name), operation="get")
        except ApiError as err:
            if err.status == 404:
                return None
            raise

    async def apply(self, obj: Obj, *, field_manager: str) -> Obj:
        """Server-side apply (creates or updates), taking over conflicting fields."""
        res = resource_of(obj)
        meta = obj["metadata"]
        return await self.request(
            "PATCH",
            res.path(meta.get("namespace"), meta["name"]),
            params={"fieldManager": field_manager, "force": "true"},
            body=obj,  # JSON is YAML: the apply content type takes it as is
            content_type="application/apply-patch+yaml",
            operation="apply",
        )

    async def patch_status(
        self, res: Resource, namespace: str | None, name: str, status: Obj
    ) -> Obj:
        """Merge-patch the status subresource."""
        return await self.request(
            "PATCH",
            res.path(namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
            operation="patch_status",
        )

    async def delete(self, res: Resource, namespace: str | None, name: str) -> bool:
        """Delete in the background (dependents go by GC); False if it was already gone."""
        try:
            await self.request(
                "DELETE",
                res.path(namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": "Background",
                },
                operation="delete",
            )
        except ApiError as err:
            if err.status == 404:
                return False
            raise
        return True


def _error(status: int, text: str, retry_after: str | None) -> ApiError:
    reason, message = "Error", text[:500]
    try:
        doc = json.loads(text)
        reason = str(doc.get("reason") or reason)
        message = str(doc.get("message") or message)
    except (ValueError, AttributeError):
        pass
    delay: float | None = None
    if retry_after:
        try:
            delay = float(retry_after)
        except ValueError:
            delay = None
    return ApiError(status, reason, message, delay)
