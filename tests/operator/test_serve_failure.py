"""A Serve application that fails to deploy makes the MoEDeployment Degraded with the replica's
root cause, instead of Progressing forever.

KubeRay (ray-operator/controllers/ray/rayservice_controller.go) deploys a new RayService to a
*pending* cluster and promotes it to active only once its applications are RUNNING, so a first
rollout whose engine replicas never start reports its application (DEPLOY_FAILED, with the
deployments' messages from the Ray dashboard: getAndCheckServeStatus) under
`status.pendingServiceStatus.applicationStatuses` while Ready stays False/Initializing
(calculateStatus, calculateConditions). With the `ray.io/initializing-timeout` annotation it
gives up: Ready False with reason InitializingTimeout, terminal (markFailedOnInitializingTimeout).
Before, the operator only read activeServiceStatus and stayed Progressing.
"""

from __future__ import annotations

from expectations import cond, is_

from tests.support import kube_emulator as em
from tests.support.operator_harness import MOED, NS, KubeRay, Operator, mixtral
from tests.support.waiting import eventually

REPLICA_ERROR = (
    "The deployment failed to start 3 times in a row. This may be due to a problem with its "
    "constructor or initial health check failing. See controller logs for details. Error:\n"
    "\x1b[36mray::ServeReplica:moe:LLMEngine.initialize_and_get_metadata()\x1b[39m "
    "(pid=4242, ip=10.0.0.7, actor_id=4e1f, repr=<ServeReplica>)\n"
    '  File "/app/moe_serving/engine.py", line 170, in start\n'
    "    await init_app_state(engine, state, args, tasks)\n"
    "TypeError: --quantization fp8 is not supported on this GPU (compute capability 7.0)"
)
CAUSE = "TypeError: --quantization fp8 is not supported on this GPU (compute capability 7.0)"


async def test_first_rollout_whose_app_fails_is_degraded_with_the_root_cause(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await operator.start()
    await api.create(MOED, mixtral())
    await eventually(lambda: api.find(em.RAYSERVICES, NS, "mixtral"), message="RayService")
    await eventually(lambda: is_(api, "Progressing", "True"), message="Progressing")

    await kuberay.fail_first_rollout("mixtral", REPLICA_ERROR)
    await eventually(lambda: is_(api, "Degraded", "True"), message="Degraded")
    degraded = cond(api, "Degraded")
    assert degraded["reason"] == "ServeApplicationFailed"
    assert CAUSE in degraded["message"] and "LLMEngine" in degraded["message"]
    assert "\n" not in degraded["message"] and "File " not in degraded["message"]
    progressing = cond(api, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "ServeApplicationFailed")
    assert cond(api, "Ready")["status"] == "False"

    # The replicas start after all (e.g. the GPU nodes changed): the failure clears.
    await kuberay.serve("mixtral")
    await eventually(lambda: is_(api, "Ready", "True"), message="Ready")
    assert cond(api, "Degraded")["status"] == "False"
    assert cond(api, "Progressing")["reason"] == "UpToDate"


async def test_kuberay_initializing_timeout_is_degraded(
    api: em.ApiServer, operator: Operator, kuberay: KubeRay
) -> None:
    await operator.start()
    await api.create(MOED, mixtral())
    await eventually(lambda: api.find(em.RAYSERVICES, NS, "mixtral"), message="RayService")
    await kuberay.time_out_initializing("mixtral")
    await eventually(lambda: is_(api, "Degraded", "True"), message="Degraded")
    degraded = cond(api, "Degraded")
    assert degraded["reason"] == "RayServiceFailed"
    assert (
        "InitializingTimeout" in degraded["message"]
        and "delete the RayService" in (degraded["message"])
    )
    assert cond(api, "Progressing")["status"] == "False"
