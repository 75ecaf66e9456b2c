"""A Serve application that fails to start is one line naming the replica's exception, for
`moectl up` and for the MoEDeployment's status (moe_serving.failures).

The messages are made the way Ray Serve 2.60 makes them (the installed ray's
serve/_private/deployment_state.py): a replica's constructor exception is
`str(RayTaskError.as_instanceof_cause())` (ActorReplicaWrapper.check_ready), recorded as
"A replica failed to start with exception. Retrying ... Error:\\n<that>"
(record_replica_startup_failure) and, once Serve gives up, "The deployment failed to start N
times in a row. ... Error:\\n<that>" (_check_curr_status); the application's message then only
names the deployment (application_state.py, "Failed to update the deployments [...]"), and
`serve.run` raises "Deploying application <name> failed: <application message>"
(serve/_private/client.py, _wait_for_application_running). A failure in the app's build
function is "Deploying app '<name>' failed with exception:\\n<traceback>" (application_state.py).
"""

from __future__ import annotations

import inspect
import traceback
from types import SimpleNamespace
from typing import Any

import pytest

from moe_serving.failures import app_failure, root_cause
from moe_serving.local import start_failure

PARSER_ERROR = (
    "--tool-call-parser mistral cannot be used with the tokenizer of '/models/mixtral': "
    "Mistral parser could not locate the tool call token in the tokenizer!"
)
EXPECTED = f"TypeError: {PARSER_ERROR}"


def _validate() -> None:
    raise TypeError(PARSER_ERROR)


def _start_engine() -> None:
    try:
        int("x")
    except ValueError:
        _validate()  # raised while handling another: a chained traceback


def replica_error() -> str:
    """The replica's error as Serve's controller records it (check_ready)."""
    exceptions = pytest.importorskip("ray.exceptions")
    try:
        _start_engine()
    except TypeError as exc:
        err = exceptions.RayTaskError(
            "ServeReplica:moe:LLMEngine.initialize_and_get_metadata",
            traceback.format_exc(),
            exc,
            proctitle="ray::ServeReplica:moe:LLMEngine.initialize_and_get_metadata",
            pid=4242,
            ip="10.0.0.7",
            actor_repr="<ray.serve._private.replica.ServeReplica object>",
            actor_id="4e1f",
        )
        return str(err.as_instanceof_cause())
    raise AssertionError("unreachable")


def serve_source(module: str) -> str:
    mod = pytest.importorskip(f"ray.serve._private.{module}")
    return inspect.getsource(mod)


def test_the_wrappers_are_ray_serves_own() -> None:
    """The texts wrapped around the replica's error below are in the installed Ray Serve."""
    deployment_state = serve_source("deployment_state")
    assert "A replica failed to start with exception. Retrying" in deployment_state
    assert '"in a row. This may be due to a problem with its "' in deployment_state
    assert "str(e.as_instanceof_cause())" in deployment_state
    assert "Failed to update the deployments" in serve_source("application_state")
    assert "failed with exception:" in serve_source("application_state")


def test_root_cause_of_a_replica_that_failed_to_start() -> None:
    error = replica_error()
    assert "\x1b[" in error and "Traceback" not in error.splitlines()[0]  # Ray's colours
    retrying = f"A replica failed to start with exception. Retrying 2 more time(s). Error:\n{error}"
    gave_up = (
        "The deployment failed to start 3 times in a row. This may be due to a problem with "
        "its constructor or initial health check failing. See controller logs for details. "
        f"Error:\n{error}"
    )
    assert root_cause(retrying) == EXPECTED
    assert root_cause(gave_up) == EXPECTED


def test_root_cause_of_a_failed_build_and_of_plain_messages() -> None:
    try:
        _start_engine()
    except TypeError:
        built = f"Deploying app 'moe' failed with exception:\n{traceback.format_exc()}"
    assert root_cause(built) == EXPECTED
    # A multi-line exception message keeps its lines; no traceback: the message itself.
    assert root_cause("Traceback:\n  File x\nValueError: bad spec\nfield: must be > 0") == (
        "ValueError: bad spec; field: must be > 0"
    )
    assert root_cause("Failed to update the deployments ['LLMEngine'].") == (
        "Failed to update the deployments ['LLMEngine']."
    )


def kuberay_app(error: str) -> dict[str, Any]:
    """The application as KubeRay copies it into the RayService status (AppStatus)."""
    return {
        "status": "DEPLOY_FAILED",
        "message": "Failed to update the deployments ['LLMEngine'].",
        "serveDeploymentStatuses": {
            "Ingress": {"status": "HEALTHY", "message": ""},
            "LLMEngine": {"status": "DEPLOY_FAILED", "message": error},
        },
    }


def test_app_failure_names_the_failed_deployment_and_its_cause() -> None:
    line = app_failure(
        kuberay_app("The deployment failed to start 3 times. Error:\n" + replica_error())
    )
    assert line == f"deployment LLMEngine: {EXPECTED}"
    assert "\n" not in line


def test_moectl_up_line_from_serve_status_not_from_serve_runs_exception() -> None:
    """serve.run's exception names only the deployment; the line comes from serve.status()."""
    error = "The deployment failed to start 3 times. Error:\n" + replica_error()
    status = SimpleNamespace(
        status=SimpleNamespace(value="DEPLOY_FAILED"),
        message="Failed to update the deployments ['LLMEngine'].",
        deployments={
            "LLMEngine": SimpleNamespace(
                status=SimpleNamespace(value="DEPLOY_FAILED"), message=error
            )
        },
    )
    raised = RuntimeError(
        "Deploying application moe failed: Failed to update the deployments ['LLMEngine']."
    )
    assert start_failure(status, raised) == f"deployment LLMEngine: {EXPECTED}"
    # Serve itself unreachable: the exception's own last line.
    assert start_failure(None, raised) == str(raised)


def test_moectl_up_exits_non_zero_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    """`moectl up` whose app fails to start (run_local raises StartFailed, as it does after
    Serve's DEPLOY_FAILED): exit code 2 and one line on stderr, no traceback."""
    from moe_operator import cli, up
    from moe_serving import local, parser_support

    def fake_prepare(dep: Any, **_: Any) -> Any:
        return SimpleNamespace(
            model_dir=tmp_path,
            notes=[],
            app=SimpleNamespace(engine=None),
            plan=SimpleNamespace(
                summary="EP2", nodes_per_replica=1, initial_replicas=1, gpus_per_node=2
            ),
        )

    def failing_run_local(app: Any, **_: Any) -> None:
        raise local.StartFailed(f"deployment LLMEngine: {EXPECTED} (details in x)")

    monkeypatch.setattr(cli, "_missing_modules", lambda names: [])
    monkeypatch.setattr(up, "prepare", fake_prepare)
    monkeypatch.setattr(
        parser_support, "check_engine", lambda engine: parser_support.ParserSupport(None, None)
    )
    monkeypatch.setattr(local, "run_local", failing_run_local)
    with pytest.raises(SystemExit) as exited:
        cli.main(["up", "--log-dir", str(tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"moectl: error: tiny did not start: deployment LLMEngine: {EXPECTED} (details in x)"
    ]
