"""The operator's own Kubernetes API calls, for what kopf does not do: apply children.

Only the calls the operator makes: GET, server-side apply, merge-patch of `status`, DELETE,
through the official `kubernetes` client (its synchronous `ApiClient`, a urllib3 connection
pool). Its calls block, so `Client` runs them in a small thread pool of its own
(`MOE_OPERATOR_API_WORKERS` threads), never on kopf's event loop; handlers see an async API.

Credentials: `load_configuration` reads the in-cluster service account, else the kubeconfig,
with the official client's own loaders (`kubernetes.config`), so kubeconfig exec plugins, auth
providers and the rotation of in-cluster tokens work as they do for any official-client program
(its `refresh_api_key_hook` re-reads the token). handlers.login hands kopf the same credentials
as a `kopf.ConnectionInfo`, so kopf's watches and the operator's writes authenticate alike.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.config import ConfigException, load_incluster_config, load_kube_config
from kubernetes.config.kube_config import KUBE_CONFIG_DEFAULT_LOCATION
from opentelemetry import trace

from moe_operator import children, tracing

Obj = dict[str, Any]


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


def api_error(err: ApiException) -> ApiError:
    """The official client's `ApiException` as an `ApiError`: the HTTP status, the reason and
    message of the API's `metav1.Status` (else the HTTP reason and the body's text) and the
    Retry-After header in seconds. Status 0 (the client got no HTTP answer, e.g. a TLS error)
    is a 503, as any other failure to reach the API server."""
    status = int(err.status or 0)
    reason = str(err.reason or "Error")
    body = err.body
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    if not status:
        return ApiError(503, "Unavailable", reason)
    message = text[:500] or reason
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        reason = str(doc.get("reason") or reason)
        message = str(doc.get("message") or message)
    retry_after = err.headers.get("Retry-After") if err.headers else None
    delay: float | None = None
    if retry_after:
        try:
            delay = float(retry_after)
        except ValueError:
            delay = None  # an HTTP date: the caller's own delay applies
    return ApiError(status, reason, message, delay)


def load_configuration() -> Configuration | None:
    """The in-cluster service account, else the kubeconfig ($KUBECONFIG, ~/.kube/config), read
    by the official client's loaders into a Configuration of our own (kopf.login_via_client
    loads the same, but into the client's process-wide default); None when there is neither."""
    cfg = Configuration()
    try:
        load_incluster_config(client_configuration=cfg)
    except ConfigException:
        # $KUBECONFIG as it is now: the client's default is the value when it was imported.
        path = os.environ.get("KUBECONFIG") or KUBE_CONFIG_DEFAULT_LOCATION
        try:
            load_kube_config(config_file=path, client_configuration=cfg)
        except ConfigException:
            return None
    return cfg


def authorization(cfg: Configuration) -> tuple[str | None, str | None]:
    """(scheme, credentials) of the Authorization header the configuration sends now (a
    bearer token, or basic auth from a kubeconfig's username and password), as kopf's
    login_via_client reads it; the refresh hook of exec plugins and in-cluster tokens runs."""
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    if not parts:
        return None, None
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], parts[1]


class Client:
    """The operator's API calls on the official client, off the event loop.

    Why `ApiClient` with the resource paths and not `kubernetes.dynamic.DynamicClient`: the
    paths of the four kinds we write are known (`KINDS`), and DynamicClient first discovers
    every API group (/version, /api, /apis and each group-version, cached in a file under
    /tmp), needs discovery again whenever a CRD appears later (KubeRay installed after the
    operator), and adds nothing we use. The calls are the client's own generic request path
    (`param_serialize` + `call_api`, what DynamicClient.request does): its authentication
    (with the token refresh hook), TLS, proxy and connection pool.

    Credentials: every call uses the latest Configuration from `configuration` (a new one
    after each kopf login); one ApiClient (one connection pool) per Configuration.
    """

    def __init__(
        self,
        configuration: Callable[[], Configuration | None],
        *,
        user_agent: str,
        request_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        workers: int = 32,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._configuration = configuration
        self._tracer = tracer  # one CLIENT span per call (tracing.py)
        self._user_agent = user_agent
        # urllib3: connect timeout, then the longest wait for the next bytes of the answer.
        self._timeout = (connect_timeout, request_timeout)
        self._workers = workers
        # The sync client blocks: its calls run here, at most `workers` at a time.
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube-api")
        self._api: ApiClient | None = None
        self._api_for: Configuration | None = None

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._api is not None:
            self._api.rest_client.close()
            self._api = self._api_for = None

    def _api_now(self) -> ApiClient:
        cfg = self._configuration()
        if cfg is None:
            raise ApiError(503, "NotLoggedIn", "no API credentials yet (kopf has not logged in)")
        if self._api is None or self._api_for is not cfg:
            old = self._api
            # One pooled connection per worker thread: none waits for another's, none idles.
            cfg.connection_pool_maxsize = self._workers
            api = ApiClient(configuration=cfg)
            api.user_agent = self._user_agent
            self._api, self._api_for = api, cfg
            if old is not None:
                old.rest_client.close()  # idle connections of the old credentials
        return self._api

    def _call(
        self,
        api: ApiClient,
        method: str,
        path: str,
        query: list[tuple[str, str]] | None,
        body: Any,
        content_type: str,
    ) -> tuple[int, Obj]:
        """One blocking request (in a worker thread): (HTTP status, decoded body)."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = api.param_serialize(
            method,
            path,
            query_params=query,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        rsp = api.call_api(*request, _request_timeout=self._timeout)
        data = rsp.read()
        if not 200 <= rsp.status <= 299:
            raise ApiException(http_resp=rsp)
        return rsp.status, (json.loads(data) if data else {})

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        operation: str | None = None,
    ) -> Obj:
        with tracing.api_span(self._tracer, method, path, operation or method.lower()) as span:
            status = 503  # no answer at all
            try:
                api = self._api_now()
                loop = asyncio.get_running_loop()
                try:
                    status, obj = await loop.run_in_executor(
                        self._executor, self._call, api, method, path, query, body, content_type
                    )
                except ApiException as err:
                    error = api_error(err)
                    status = error.status
                    raise error from err
                except (urllib3.exceptions.HTTPError, OSError) as err:
                    raise ApiError(503, "Unavailable", f"{method} {path}: {err!r}") from err
                return obj
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
            query=[("fieldManager", field_manager), ("force", "true")],
            body=obj,  # sent as JSON, which is YAML: the apply content type takes it as is
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
