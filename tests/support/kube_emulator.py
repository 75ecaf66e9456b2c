"""A Kubernetes API emulator for the operator's tests: kmock's, extended with what we rely on.

kmock's `KubernetesEmulator` serves discovery, stores objects and streams watch events, but it
merges every PATCH the same way and has no server-side apply, resourceVersion / generation,
owner garbage collection, status / scale subresources or admission. `ApiServer` keeps kmock's
HTTP server, request parsing and discovery endpoints and replaces the object handling with:

* resourceVersion (one global counter) and metadata.generation (bumped when anything but
  metadata/status changes), uid, creationTimestamp;
* PATCH as merge-patch, JSON-patch (with `test`), and server-side apply
  (`application/apply-patch+yaml`): create-on-PATCH, fields a manager stops applying are removed;
* status and scale subresources (the main endpoint ignores status and vice versa);
* finalizers + deletionTimestamp, and background garbage collection through ownerReferences;
* watches that resume from a resourceVersion (410 Gone when it is too old), server timeouts;
* label selectors on list / watch;
* validating admission through the ValidatingWebhookConfigurations the operator registers
  (a real HTTP round trip to kopf's webhook server), and the API server's own validation of
  those configurations (webhook_rules.py: a configuration it would refuse is a 422 here too);
* the structural schema of kinds registered with one (our CRD, KubeRay's RayService when its CRDs
  are present; k8s_schema.py): unknown fields pruned (`fieldValidation=Strict`: 400), nulls
  pruned, defaults filled in, types / enums / bounds / patterns / CEL rules checked (422 Invalid),
  and a server-side apply naming a field the schema lacks refused as kube-apiserver refuses it:
  HTTP 500 "failed to create typed patch object ...: field not declared in schema";
* fault injection (any status code, Retry-After, dropped watch streams, a frozen API) and a
  record of every request (verb, group, resource, subresource) for the RBAC check, plus the
  authorization checks the OwnerReferencesPermissionEnforcement admission plugin makes.

It is deliberately small: one write lock, the whole state in memory, no persistence.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import aiohttp.web
import kmock
import yaml
from kmock._internal import rendering

from . import webhook_rules
from .k8s_schema import Schema

Obj = dict[str, Any]
Key = tuple[str, str | None, str]  # (resource key "group/version/plural", namespace, name)

WRITE_VERBS = frozenset({"create", "update", "patch", "delete", "deletecollection"})


@dataclass(frozen=True)
class Kind:
    """One resource type the emulator serves."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ("get", "list", "watch", "create", "update", "patch", "delete")
    #: JSON paths (dot-separated) of the scale subresource, when present.
    scale_spec: str = "spec.replicas"
    scale_status: str = "status.replicas"
    scale_selector: str = "status.selector"

    @property
    def key(self) -> str:
        return f"{self.group}/{self.version}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


@dataclass
class Call:
    """One request as the RBAC authorizer would see it."""

    id: int
    method: str
    verb: str
    group: str | None
    version: str | None
    resource: str | None  # plural, or "plural/subresource"
    namespace: str | None
    name: str | None
    user_agent: str
    content_type: str
    token: str = ""  # the bearer token: which client (process) sent it
    status: int = 0
    #: A server-side apply that created the object: RBAC checks `create` too (as the API
    #: server's patch handler does for create-on-apply).
    created: bool = False
    params: dict[str, str] = field(default_factory=dict)
    body: str = ""  # the request body as sent (what a client disclosed to the API)

    @property
    def is_write(self) -> bool:
        # An admission plugin's authorization check is not a request the client sent.
        return self.verb in WRITE_VERBS and self.method != "AUTHORIZE"

    @property
    def is_resource(self) -> bool:
        return self.resource is not None


@dataclass
class Fault:
    """Answer matching requests with an error instead of serving them."""

    match: Callable[[Call], bool]
    status: int
    times: int = 1
    retry_after: int | None = None
    hits: int = 0
    #: Instead of an error: accept the request (200, headers sent) and then send nothing and
    #: never close it, as a stuck watch behind a broken proxy (the client must time out).
    hang: bool = False


class ApiError(Exception):
    """A Kubernetes `Status` failure."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (None deletes a key)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    """RFC 6902 JSON patch (add, remove, replace, test); a failed `test` is a 422 as in k8s."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = doc
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1] if parts else ""
        kind = op["op"]
        try:
            if kind == "test":
                current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
                if current != op.get("value"):
                    raise ApiError(422, "Invalid", f"test failed at {op['path']}")
            elif kind == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if last == "-" else int(last), op["value"])
                else:
                    parent[last] = op["value"]
            elif kind == "replace":
                if isinstance(parent, list):
                    parent[int(last)] = op["value"]
                else:
                    if last not in parent:
                        raise ApiError(422, "Invalid", f"no {op['path']} to replace")
                    parent[last] = op["value"]
            elif kind == "remove":
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            else:
                raise ApiError(400, "BadRequest", f"unsupported JSON-patch op {kind}")
        except (KeyError, IndexError, ValueError) as err:
            raise ApiError(422, "Invalid", f"JSON patch failed at {op['path']}: {err}") from err
    return doc


def _leaf_paths(obj: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths of the fields a manager set (lists are atomic, as in SSA without list-map keys)."""
    if isinstance(obj, dict) and obj:
        out: set[tuple[str, ...]] = set()
        for key, value in obj.items():
            out |= _leaf_paths(value, (*prefix, key))
        return out
    return {prefix}


def _remove_path(obj: Obj, path: tuple[str, ...]) -> None:
    node: Any = obj
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _prune_empty(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _prune_empty(v) for k, v in obj.items() if v != {} or k in ("spec", "status")}
    return obj


def parse_selector(text: str | None) -> Callable[[dict[str, str]], bool]:
    """Equality- and existence-based label selectors (`a=b,c!=d,e,!f`)."""
    terms: list[tuple[str, str, str]] = []  # (operator, key, value)
    for raw in (text or "").split(","):
        term = raw.strip()
        if "!=" in term:
            k, v = term.split("!=", 1)
            terms.append(("!=", k, v))
        elif "=" in term:
            k, v = re.split(r"==?", term, maxsplit=1)
            terms.append(("=", k, v))
        elif term.startswith("!"):
            terms.append(("!", term[1:], ""))
        elif term:
            terms.append(("exists", term, ""))

    def check(labels: dict[str, str]) -> bool:
        for op, k, v in terms:
            ok = {
                "!=": labels.get(k) != v,
                "=": labels.get(k) == v,
                "!": k not in labels,
                "exists": k in labels,
            }[op]
            if not ok:
                return False
        return True

    return check


def _get_path(obj: Obj, dotted: str) -> Any:
    node: Any = obj
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the API semantics listed in the module docstring."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.kinds: dict[str, Kind] = {}
        self.store: dict[Key, Obj] = {}
        self.managed: dict[tuple[Key, str], Obj] = {}  # (object, field manager) -> applied config
        self.rv = 0
        self.log: list[tuple[int, str, Obj]] = []  # (rv, resource key, watch event)
        self.log_floor = 0  # events at or below this rv are compacted (410 Gone)
        self._changed = asyncio.Event()
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.frozen = False
        self.after_write: Callable[[Call], Awaitable[None] | None] | None = None
        self.watch_generation = 0  # bumped to drop all open watch streams
        self.admission_enabled = True
        self.admission_rejections: list[str] = []
        self.schemas: dict[str, Schema] = {}  # resource key -> structural schema
        self.schema_rejections: list[tuple[int, str]] = []  # (HTTP status, message)

    # ----------------------------------------------------------------------------- registry

    def register(self, kind: Kind, schema: Obj | None = None) -> None:
        """Serve a resource type (discovery + objects); with `schema` (a CRD version's
        openAPIV3Schema) its objects are pruned, defaulted and validated as a CRD's are."""
        self.kinds[kind.key] = kind
        if schema is not None:
            self.schemas[kind.key] = Schema(schema)
        ref = kmock.resource(group=kind.group, version=kind.version, plural=kind.plural)
        self.resources[ref] = kmock.ResourceInfo(
            kind=kind.kind,
            singular=kind.kind.lower(),
            namespaced=kind.namespaced,
            verbs=set(kind.verbs),
            subresources=set(kind.subresources),
        )

    # ------------------------------------------------------------------------- HTTP entry

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        res = request.resource
        if res is None or not res.plural:
            return await super()._handle(request)  # discovery, /version, non-k8s paths
        key = f"{res.group}/{res.version}/{res.plural}"
        raw = request._raw_request
        assert raw is not None
        call = self._record(request, key)
        if self.frozen:
            # A crashed operator: the connection goes away without an answer.
            call.status = -1
            if raw.transport is not None:
                raw.transport.close()
            return aiohttp.web.Response(status=503)
        for fault in self.faults:
            if fault.hits < fault.times and fault.match(call):
                fault.hits += 1
                call.status = fault.status
                if fault.hang:
                    return await self._hang(raw)
                headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
                return self._status_response(
                    ApiError(fault.status, "Injected", f"injected fault {fault.status}"), headers
                )
        kind = self.kinds.get(key)
        try:
            if kind is None:
                raise ApiError(404, "NotFound", f"the server could not find resource {key}")
            if call.verb == "watch":
                call.status = 200
                return await self._serve_watch_stream(request, kind)
            body = await self._dispatch(request, call, kind)
        except ApiError as err:
            call.status = err.status
            return self._status_response(err)
        call.status = 201 if call.verb == "create" else 200
        if call.is_write and self.after_write is not None:
            result = self.after_write(call)
            if result is not None:
                await result
        return aiohttp.web.json_response(body, status=call.status)

    def _record(self, request: rendering.Request, key: str) -> Call:
        raw = request._raw_request
        assert raw is not None
        res = request.resource
        assert res is not None
        method = str(raw.method).upper()
        params = dict(raw.query)
        if method == "GET":
            verb = (
                "watch"
                if params.get("watch") in ("true", "1")
                else ("get" if request.name else "list")
            )
        else:
            verb = {
                "POST": "create",
                "PUT": "update",
                "PATCH": "patch",
                "DELETE": "delete" if request.name else "deletecollection",
            }.get(method, method.lower())
        plural = res.plural if not request.subresource else f"{res.plural}/{request.subresource}"
        call = Call(
            id=len(self.calls),
            method=method,
            verb=verb,
            group=res.group,
            version=res.version,
            resource=plural,
            namespace=request.namespace,
            name=request.name,
            user_agent=raw.headers.get("User-Agent", ""),
            content_type=raw.headers.get("Content-Type", ""),
            token=raw.headers.get("Authorization", "").removeprefix("Bearer "),
            params=params,
            body=request.text,
        )
        self.calls.append(call)
        return call

    @staticmethod
    def _status_response(
        err: ApiError, headers: dict[str, str] | None = None
    ) -> aiohttp.web.Response:
        body = {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "message": err.message,
            "reason": err.reason,
            "code": err.status,
        }
        if not err.reason:
            del body["reason"]  # as a 500 from an error that is not a metav1.Status
        return aiohttp.web.json_response(body, status=err.status, headers=headers)

    async def _dispatch(self, request: rendering.Request, call: Call, kind: Kind) -> Any:
        ns = request.namespace if kind.namespaced else None
        sub = request.subresource
        if call.verb == "list":
            return self.list_objects(kind, ns, call.params.get("labelSelector"))
        if call.verb == "get":
            obj = self.read(kind, ns, request.name or "")
            if sub == "scale":
                return self._scale_view(kind, obj)
            return obj
        validation = call.params.get("fieldValidation") or "Warn"  # the server's default
        if call.verb == "create":
            created = await self.create(
                kind, _body(request), namespace=ns, admit=True, field_validation=validation
            )
            self._gc_admission_checks(call, kind, created, None)
            return created
        if call.verb == "patch":
            before = self.find(kind, ns, request.name or "")
            call.created = call.content_type.startswith("application/apply-patch") and (
                before is None
            )
            after = await self.modify(
                kind,
                ns,
                request.name or "",
                _body(request),
                content_type=call.content_type.split(";")[0].strip(),
                subresource=sub,
                field_manager=call.params.get("fieldManager", ""),
                field_validation=validation,
            )
            self._gc_admission_checks(call, kind, after, before)
            return after
        if call.verb == "delete":
            return await self.destroy(kind, ns, request.name or "")
        raise ApiError(405, "MethodNotAllowed", f"{call.method} is not served")

    def _gc_admission_checks(self, call: Call, kind: Kind, new: Obj, old: Obj | None) -> None:
        """Record the authorization checks of the OwnerReferencesPermissionEnforcement admission
        plugin (kubernetes plugin/pkg/admission/gc/gc_admission.go) as calls of the same client:
        changing ownerReferences needs `delete` on the object itself, and each ownerReference
        that newly has blockOwnerDeletion: true needs `update` on the owner's `finalizers`
        subresource. The RBAC tests then see them like any other call the operator makes."""
        new_refs = new.get("metadata", {}).get("ownerReferences") or []
        old_refs = (old or {}).get("metadata", {}).get("ownerReferences") or []
        if new_refs == old_refs:
            return
        checks = [(kind.group, kind.plural)]
        was_blocking = {r.get("uid") for r in old_refs if r.get("blockOwnerDeletion")}
        for ref in new_refs:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in was_blocking:
                continue
            group = ref["apiVersion"].rpartition("/")[0]
            owners = [k for k in self.kinds.values() if (k.group, k.kind) == (group, ref["kind"])]
            checks += [(o.group, f"{o.plural}/finalizers") for o in owners]
        for group, resource in checks:
            self.calls.append(
                Call(
                    id=len(self.calls),
                    method="AUTHORIZE",
                    verb="update" if resource.endswith("/finalizers") else "delete",
                    group=group,
                    version=None,
                    resource=resource,
                    namespace=call.namespace,
                    name=None,
                    user_agent=call.user_agent,
                    content_type="",
                    token=call.token,
                    status=200,
                )
            )

    # ------------------------------------------------------------------------ operations

    def _key(self, kind: Kind, ns: str | None, name: str) -> Key:
        return (kind.key, ns if kind.namespaced else None, name)

    def read(self, kind: Kind, ns: str | None, name: str) -> Obj:
        obj = self.store.get(self._key(kind, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
        return copy.deepcopy(obj)

    def find(self, kind: Kind, ns: str | None, name: str) -> Obj | None:
        """The stored object or None (for assertions)."""
        obj = self.store.get(self._key(kind, ns, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_items(self, kind: Kind, ns: str | None = None) -> list[Obj]:
        return [
            copy.deepcopy(obj)
            for (k, o_ns, _), obj in sorted(self.store.items(), key=lambda kv: kv[0][2])
            if k == kind.key and (ns is None or o_ns == ns)
        ]

    def list_objects(self, kind: Kind, ns: str | None, selector: str | None) -> Obj:
        match = parse_selector(selector)
        items = [
            obj
            for obj in self.list_items(kind, ns)
            if match(obj.get("metadata", {}).get("labels") or {})
        ]
        return {
            "apiVersion": "v1",
            "kind": f"{kind.kind}List",
            "metadata": {"resourceVersion": str(self.rv)},
            "items": items,
        }

    async def create(
        self,
        kind: Kind,
        body: Obj,
        *,
        namespace: str | None = None,
        admit: bool = False,
        field_validation: str = "Strict",  # what kubectl sends (tests write as kubectl would)
    ) -> Obj:
        body = copy.deepcopy(body)
        meta = body.setdefault("metadata", {})
        ns = namespace or meta.get("namespace") or ("default" if kind.namespaced else None)
        name = meta.get("name")
        if not name and meta.get("generateName"):
            name = meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        key = self._key(kind, ns, name)
        if kind.namespaced:
            meta["namespace"] = ns
        if "status" in kind.subresources:
            body.pop("status", None)  # status is written through its subresource only
        body = self._schema_check(kind, body, None, field_validation)
        meta = body["metadata"]
        if admit:
            await self._admit(kind, "CREATE", body, None)
        self._validate(kind, body)
        # From here on no await: the check and the commit are atomic on the event loop.
        if key in self.store:
            raise ApiError(409, "AlreadyExists", f'{kind.plural} "{name}" already exists')
        body["apiVersion"] = kind.api_version
        body["kind"] = kind.kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        for server_owned in ("resourceVersion", "deletionTimestamp"):
            meta.pop(server_owned, None)
        self._commit(kind, key, body, "ADDED")
        return copy.deepcopy(body)

    async def modify(
        self,
        kind: Kind,
        ns: str | None,
        name: str,
        patch: Any,
        *,
        content_type: str = "application/merge-patch+json",
        subresource: str | None = None,
        field_manager: str = "",
        field_validation: str = "Strict",
    ) -> Obj:
        key = self._key(kind, ns, name)
        apply = content_type == "application/apply-patch+yaml"
        if apply and not field_manager:
            raise ApiError(422, "Invalid", "fieldManager is required for apply patches")
        if apply:
            self._typed_patch_check(kind, ns, name, patch)
        if apply and key not in self.store:
            # Server-side apply creates what does not exist.
            created = await self.create(
                kind, patch, namespace=ns, admit=True, field_validation="Ignore"
            )
            self.managed[(key, field_manager)] = _applied_config(patch)
            return created
        while True:
            old = self.store.get(key)
            if old is None:
                raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
            new = self._patched(kind, key, old, patch, content_type, subresource, field_manager)
            new = self._schema_check(kind, new, old, "Ignore" if apply else field_validation)
            if new == old:
                return copy.deepcopy(old)  # a no-op write does not bump resourceVersion
            self._validate(kind, new)
            if subresource in (None, "scale"):
                await self._admit(kind, "UPDATE", new, old)
                if self.store.get(key) is not old:
                    continue  # changed while admission ran: recompute on the fresh object
            if apply:
                self.managed[(key, field_manager)] = _applied_config(patch)
            meta = new["metadata"]
            if _spec_changed(old, new):
                meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
            self._commit(kind, key, new, "MODIFIED")
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                self._remove(kind, key)
            return copy.deepcopy(new)

    def _typed_patch_check(self, kind: Kind, ns: str | None, name: str, patch: Any) -> None:
        """Server-side apply first converts the patch to the schema's type: a field the schema
        lacks fails there, whatever fieldValidation says, as a bare 500 (no reason) from
        structured-merge-diff (k8s.io/apimachinery/pkg/util/managedfields/internal/
        structuredmerge.go; kubernetes/kubernetes#122480, #139253)."""
        schema = self.schemas.get(kind.key)
        if schema is None or not isinstance(patch, dict):
            return
        unknown = schema.unknown_fields(_applied_config(patch))
        if unknown:
            where = f"{ns}/{name}" if ns else name
            message = (
                f"failed to create typed patch object ({where}; {kind.group}/{kind.version}, "
                f"Kind={kind.kind}): {unknown[0]}: field not declared in schema"
            )
            self.schema_rejections.append((500, message))
            raise ApiError(500, "", message)

    def _schema_check(self, kind: Kind, obj: Obj, old: Obj | None, field_validation: str) -> Obj:
        """Prune, default and validate as the API server does for a CRD (no-op without one)."""
        schema = self.schemas.get(kind.key)
        if schema is None:
            return obj
        name = (obj.get("metadata") or {}).get("name")
        if field_validation == "Strict":
            unknown = schema.unknown_fields(obj)
            if unknown:
                fields = ", ".join(f'unknown field "{u.lstrip(".")}"' for u in unknown)
                message = f"strict decoding error: {fields}"
                self.schema_rejections.append((400, message))
                raise ApiError(400, "BadRequest", message)
        stored, problems = schema.admit(obj, old)
        if problems:
            listed = problems[0] if len(problems) == 1 else "[" + ", ".join(problems) + "]"
            message = f'{kind.kind}.{kind.group} "{name}" is invalid: {listed}'
            self.schema_rejections.append((422, message))
            raise ApiError(422, "Invalid", message)
        return stored

    @staticmethod
    def _validate(kind: Kind, obj: Obj) -> None:
        """The API server's validation of the kinds where the operator's writes could fail it."""
        if kind.key == WEBHOOKS.key:
            # The one relaxation: the operator's local mode registers a plain-http URL for a
            # local API server (tests); a real API server accepts https only.
            problems = webhook_rules.configuration_problems(obj, require_https=False)
            if problems:
                raise ApiError(422, "Invalid", f"{kind.kind} is invalid: " + "; ".join(problems))

    def _patched(
        self,
        kind: Kind,
        key: Key,
        old: Obj,
        patch: Any,
        content_type: str,
        subresource: str | None,
        field_manager: str,
    ) -> Obj:
        if subresource == "scale":
            new = copy.deepcopy(old)
            node = new
            *parents, leaf = kind.scale_spec.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = (patch.get("spec") or {}).get("replicas")
        elif content_type == "application/apply-patch+yaml":
            config = _applied_config(patch)
            previous = self.managed.get((key, field_manager), {})
            new = copy.deepcopy(old)
            for path in _leaf_paths(previous) - _leaf_paths(config):
                _remove_path(new, path)
            new = _prune_empty(merge_patch(new, config))
        elif content_type == "application/json-patch+json":
            new = json_patch(old, patch)
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            new = merge_patch(old, patch)
        else:
            raise ApiError(415, "UnsupportedMediaType", f"unsupported patch {content_type}")
        return self._split_subresource(kind, old, new, subresource)

    def _split_subresource(self, kind: Kind, old: Obj, new: Obj, sub: str | None) -> Obj:
        """Main endpoint keeps the old status; /status keeps everything but status."""
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        new.setdefault("metadata", {})
        for immutable in ("uid", "creationTimestamp", "name", "namespace", "generation"):
            if immutable in old["metadata"]:
                new["metadata"][immutable] = old["metadata"][immutable]
        if old["metadata"].get("deletionTimestamp"):
            new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        else:
            new["metadata"].pop("deletionTimestamp", None)
        new["metadata"]["resourceVersion"] = old["metadata"].get("resourceVersion")
        if "status" not in kind.subresources:
            return new
        if sub == "status":
            out = copy.deepcopy(old)
            if "status" in new:
                out["status"] = new["status"]
            else:
                out.pop("status", None)
            return out
        if "status" in old:
            new["status"] = old["status"]
        else:
            new.pop("status", None)
        return new

    async def destroy(self, kind: Kind, ns: str | None, name: str) -> Obj:
        key = self._key(kind, ns, name)
        obj = self.store.get(key)
        if obj is None:
            raise ApiError(404, "NotFound", f'{kind.plural} "{name}" not found')
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(obj)
                new["metadata"]["deletionTimestamp"] = _now()
                self._commit(kind, key, new, "MODIFIED")
            return copy.deepcopy(self.store[key])
        self._remove(kind, key)
        return copy.deepcopy(obj)

    def _remove(self, kind: Kind, key: Key) -> None:
        """Remove an object and garbage-collect its dependents (background propagation)."""
        obj = self.store.pop(key)
        for mkey in [m for m in self.managed if m[0] == key]:
            del self.managed[mkey]
        self.rv += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._emit(kind.key, {"type": "DELETED", "object": gone})
        uid = obj["metadata"].get("uid")
        dependents = [
            (k, o)
            for k, o in self.store.items()
            if any(ref.get("uid") == uid for ref in o["metadata"].get("ownerReferences") or [])
        ]
        for dkey, dobj in dependents:
            dkind = self.kinds[dkey[0]]
            if dobj["metadata"].get("finalizers"):
                if not dobj["metadata"].get("deletionTimestamp"):
                    new = copy.deepcopy(dobj)
                    new["metadata"]["deletionTimestamp"] = _now()
                    self._commit(dkind, dkey, new, "MODIFIED")
            elif dkey in self.store:
                self._remove(dkind, dkey)

    def _commit(self, kind: Kind, key: Key, obj: Obj, event: str) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.store[key] = obj
        self._emit(kind.key, {"type": event, "object": copy.deepcopy(obj)})

    def _emit(self, resource_key: str, event: Obj) -> None:
        self.log.append((self.rv, resource_key, event))
        self._pulse()

    def _pulse(self) -> None:
        """Wake every watcher (lock-free: state changes happen between awaits)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _scale_view(self, kind: Kind, obj: Obj) -> Obj:
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": obj["metadata"]["name"],
                "namespace": obj["metadata"].get("namespace"),
                "resourceVersion": obj["metadata"]["resourceVersion"],
            },
            "spec": {"replicas": _get_path(obj, kind.scale_spec)},
            "status": {
                "replicas": _get_path(obj, kind.scale_status) or 0,
                "selector": _get_path(obj, kind.scale_selector) or "",
            },
        }

    # --------------------------------------------------------------------------- watches

    def compact(self) -> None:
        """Forget the event history, so resuming an older watch gets 410 Gone."""
        self.log.clear()
        self.log_floor = self.rv

    async def drop_watches(self) -> None:
        """End every open watch stream (clients must reconnect from their resourceVersion)."""
        self.watch_generation += 1
        self._pulse()

    async def _hang(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Answer 200 and then nothing, until the client gives up (or `drop_watches()`)."""
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        generation = self.watch_generation
        while self.watch_generation == generation:
            if raw.transport is None or raw.transport.is_closing():
                break
            await asyncio.sleep(0.1)
        return response

    async def _serve_watch_stream(
        self, request: rendering.Request, kind: Kind
    ) -> aiohttp.web.StreamResponse:
        raw = request._raw_request
        assert raw is not None
        params = dict(raw.query)
        ns = request.namespace if kind.namespaced else None
        match = parse_selector(params.get("labelSelector"))
        since = params.get("resourceVersion")
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)

        def wanted(event: Obj) -> bool:
            meta = event["object"]["metadata"]
            if kind.namespaced and ns is not None and meta.get("namespace") != ns:
                return False
            return match(meta.get("labels") or {})

        async def send(event: Obj) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        generation = self.watch_generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            if since and since != "0":
                if int(since) < self.log_floor:
                    gone = {
                        "kind": "Status",
                        "code": 410,
                        "reason": "Expired",
                        "message": "too old resource version",
                        "status": "Failure",
                    }
                    await send({"type": "ERROR", "object": gone})
                    await response.write_eof()
                    return response
                position = int(since)
                events = [e for rv, k, e in self.log if k == kind.key and rv > position]
            else:
                events = [{"type": "ADDED", "object": o} for o in self.list_items(kind, ns)]
            position = self.rv
            while True:
                for event in events:
                    if wanted(event):
                        await send(event)
                events = []
                waiter = self._changed
                if self.rv == position and self.watch_generation == generation:
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        break
                    if raw.transport is None or raw.transport.is_closing():
                        return response  # the client went away
                    # Wake up now and then to notice a client that disconnected.
                    nap = 0.5 if remaining is None else min(remaining, 0.5)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(waiter.wait(), nap)
                    if self.rv == position and self.watch_generation == generation:
                        continue
                if self.watch_generation != generation:
                    break
                events = [e for rv, k, e in self.log if k == kind.key and rv > position]
                position = self.rv
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    # ------------------------------------------------------------------------- admission

    async def _admit(self, kind: Kind, operation: str, obj: Obj, old: Obj | None) -> None:
        """Call every matching validating webhook the operator registered (fail-closed)."""
        if not self.admission_enabled:
            return
        configs = [
            o
            for (k, _, _), o in self.store.items()
            if k == "admissionregistration.k8s.io/v1/validatingwebhookconfigurations"
        ]
        for config in configs:
            for hook in config.get("webhooks") or []:
                if not _rules_match(hook.get("rules") or [], kind, operation):
                    continue
                url = (hook.get("clientConfig") or {}).get("url")
                if not url:
                    continue
                review = {
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "request": {
                        "uid": str(uuid.uuid4()),
                        "kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
                        "resource": {
                            "group": kind.group,
                            "version": kind.version,
                            "resource": kind.plural,
                        },
                        "requestKind": {
                            "group": kind.group,
                            "version": kind.version,
                            "kind": kind.kind,
                        },
                        "name": obj.get("metadata", {}).get("name"),
                        "namespace": obj.get("metadata", {}).get("namespace"),
                        "operation": operation,
                        "userInfo": {"username": "tester"},
                        "object": obj,
                        "oldObject": old,
                        "dryRun": False,
                        "options": {},
                    },
                }
                try:
                    async with (
                        aiohttp.ClientSession() as session,
                        session.post(url, json=review) as rsp,
                    ):
                        if rsp.status != 200:
                            raise ApiError(
                                500, "InternalError", f"webhook {url}: HTTP {rsp.status}"
                            )
                        answer = await rsp.json()
                except aiohttp.ClientError as err:
                    # failurePolicy Fail, as kopf registers it: no verdict, no write.
                    raise ApiError(
                        500,
                        "InternalError",
                        f'failed calling webhook "{hook.get("name")}": {err}',
                    ) from err
                verdict = answer.get("response") or {}
                if not verdict.get("allowed", False):
                    status = verdict.get("status") or {}
                    message = status.get("message") or "denied"
                    self.admission_rejections.append(message)
                    raise ApiError(
                        int(status.get("code") or 400),
                        "Invalid",
                        f'admission webhook "{hook.get("name")}" denied the request: {message}',
                    )

    # --------------------------------------------------------------------------- helpers

    def operator_calls(
        self, since: int = 0, agents: Iterable[str] = ("kopf", "moe-operator")
    ) -> list[Call]:
        """Calls made by the operator (kopf and our client), from index `since` on."""
        prefixes = tuple(agents)
        return [c for c in self.calls[since:] if c.user_agent.startswith(prefixes)]

    def operator_writes(self, since: int = 0) -> list[Call]:
        return [c for c in self.operator_calls(since) if c.is_write]


def _rules_match(rules: list[Obj], kind: Kind, operation: str) -> bool:
    for rule in rules:
        groups = rule.get("apiGroups") or []
        versions = rule.get("apiVersions") or []
        resources = rule.get("resources") or []
        operations = rule.get("operations") or []
        if (
            (kind.group in groups or "*" in groups)
            and (kind.version in versions or "*" in versions)
            and (kind.plural in resources or "*" in resources)
            and (operation in operations or "*" in operations)
        ):
            return True
    return False


def _body(request: rendering.Request) -> Any:
    if request.data is not None and not isinstance(request.data, dict | list):
        return request.data
    if request.data is not None:
        return request.data
    text = request.text
    return yaml.safe_load(text) if text else {}


def _applied_config(patch: Obj) -> Obj:
    """The fields an apply sets, without identity and server-owned metadata."""
    config = copy.deepcopy(patch)
    config.pop("status", None)
    meta = config.get("metadata", {})
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
        meta.pop(key, None)
    return config


def _spec_changed(old: Obj, new: Obj) -> bool:
    def strip(obj: Obj) -> Obj:
        return {k: v for k, v in obj.items() if k not in ("metadata", "status")}

    return strip(old) != strip(new)


# Resource types the operator's tests serve. Their verbs/subresources follow the real API.
CRDS = Kind(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    "CustomResourceDefinition",
    namespaced=False,
)
NAMESPACES = Kind("", "v1", "namespaces", "Namespace", namespaced=False)
EVENTS = Kind("", "v1", "events", "Event")
NEW_EVENTS = Kind("events.k8s.io", "v1", "events", "Event")
SERVICES = Kind("", "v1", "services", "Service", subresources=("status",))
PDBS = Kind("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", subresources=("status",))
NETPOLS = Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
RAYSERVICES = Kind("ray.io", "v1", "rayservices", "RayService", subresources=("status",))
WEBHOOKS = Kind(
    "admissionregistration.k8s.io",
    "v1",
    "validatingwebhookconfigurations",
    "ValidatingWebhookConfiguration",
    namespaced=False,
)
PEERINGS = Kind("kopf.dev", "v1", "clusterkopfpeerings", "ClusterKopfPeering", namespaced=False)


def moedeployments_kind(group: str, version: str, plural: str, kind: str) -> Kind:
    return Kind(group, version, plural, kind, subresources=("status", "scale"))
