"""One line saying why a Serve application failed, from Ray Serve's status messages (pure).

Ray Serve's messages carry the replica's exception with its whole traceback: a deployment whose
replicas fail in their constructor reports (ray/serve/_private/deployment_state.py,
`record_replica_startup_failure` and `_check_curr_status`)

    The deployment failed to start 3 times in a row. This may be due to a problem with its
    constructor or initial health check failing. See controller logs for details. Error:
    ray::ServeReplica:moe:LLMEngine.initialize_and_get_metadata() (pid=..., ip=...)
      File "...", line ..., in ...
    TypeError: --tool-call-parser mistral cannot be used with the tokenizer of ...

(the error being `str(RayTaskError.as_instanceof_cause())`), while the application's own message
only names the failed deployments ("Failed to update the deployments ['LLMEngine']."), and
`serve.run` raises with that. KubeRay copies both into the RayService's
`status.{active,pending}ServiceStatus.applicationStatuses` (`message`, and per deployment in
`serveDeploymentStatuses`). `moectl up` and the operator's status both show `app_failure`'s
line: the exception at the bottom of the traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Serve application statuses that mean it does not (fully) serve and will not by waiting.
FAILED_APP_STATES = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})
FAILED_DEPLOYMENT_STATES = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})

MAX_LINE = 500

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# `TypeError: ...`, `vllm.exceptions.VLLMValidationError: ...`, `ray.exceptions.X(Y): ...`
_EXCEPTION = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*(?P<name>[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure|Failed))"
    r"(?:\([\w.]*\))?(?::\s*(?P<message>.*))?$"
)


def root_cause(text: str) -> str:
    """The exception at the bottom of `text` (a message that may hold a traceback), with the
    lines of its message; else the last unindented line; `text` itself when short."""
    lines = [_ANSI.sub("", line).rstrip() for line in text.strip().splitlines()]
    header = None
    for i in range(len(lines) - 1, -1, -1):
        if lines[i] and not lines[i][0].isspace() and _EXCEPTION.match(lines[i]):
            header = i
            break
    if header is not None:
        match = _EXCEPTION.match(lines[header])
        assert match is not None
        rest = [line.strip() for line in lines[header + 1 :] if line.strip()]
        head = match["name"] + (f": {match['message']}" if match["message"] else "")
        line = "; ".join([head, *rest])
    else:
        flat = [line for line in lines if line and not line[0].isspace()]
        line = flat[-1] if flat else text.strip()
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


def app_failure(app: Mapping[str, Any]) -> str:
    """Why a Serve application failed, in one line, from its status in KubeRay's shape
    (`status`, `message`, `serveDeploymentStatuses: {name: {status, message}}`): the root
    cause of each failed deployment's message, else of the application's message."""
    causes = []
    for name, dep in sorted((app.get("serveDeploymentStatuses") or {}).items()):
        dep = dep or {}
        if dep.get("status") in FAILED_DEPLOYMENT_STATES and dep.get("message"):
            causes.append(f"deployment {name}: {root_cause(str(dep['message']))}")
    if not causes and app.get("message"):
        causes.append(root_cause(str(app["message"])))
    return "; ".join(causes) or f"status {app.get('status')}"
