"""Every pod the chart renders meets the "restricted" Pod Security Standard; the checker bites."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import cast

import pytest

from tests.support.helm_render import VALUE_SETS, Obj, one, render
from tests.support.pod_security import pod_template, restricted_violations


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_pods_are_restricted(name: str) -> None:
    objs = render(VALUE_SETS[name])
    pods = [o for o in objs if pod_template(o) is not None]
    assert pods, "no pod-bearing object rendered"
    for obj in pods:
        assert restricted_violations(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


# Accessors into the Deployment's pod: they return the live dicts, which the mutations change.
def _pod(d: Obj) -> Obj:
    return cast(Obj, d["spec"]["template"]["spec"])


def _container(d: Obj) -> Obj:
    return cast(Obj, _pod(d)["containers"][0])


def _sc(d: Obj) -> Obj:
    return cast(Obj, _container(d)["securityContext"])


# (mutation of the rendered Deployment, text the checker must report)
MUTATIONS: dict[str, tuple[Callable[[Obj], object], str]] = {
    "privileged": (lambda d: _sc(d).update(privileged=True), "privileged"),
    "escalation allowed": (
        lambda d: _sc(d).update(allowPrivilegeEscalation=True),
        "allowPrivilegeEscalation",
    ),
    "escalation unset": (
        lambda d: _sc(d).pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
    ),
    "runs as root allowed": (lambda d: _sc(d).update(runAsNonRoot=False), "runAsNonRoot"),
    "non-root nowhere": (
        lambda d: (_sc(d).pop("runAsNonRoot"), _pod(d)["securityContext"].pop("runAsNonRoot")),
        "runAsNonRoot",
    ),
    "uid 0": (lambda d: _sc(d).update(runAsUser=0), "runAsUser"),
    "pod uid 0": (lambda d: _pod(d)["securityContext"].update(runAsUser=0), "runAsUser"),
    "caps not dropped": (lambda d: _sc(d).update(capabilities={}), "drop must include ALL"),
    "cap added": (
        lambda d: _sc(d).update(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}),
        "SYS_ADMIN",
    ),
    "seccomp unconfined": (
        lambda d: _sc(d).update(seccompProfile={"type": "Unconfined"}),
        "seccompProfile",
    ),
    "seccomp nowhere": (
        lambda d: (_sc(d).pop("seccompProfile"), _pod(d)["securityContext"].pop("seccompProfile")),
        "seccompProfile",
    ),
    "host network": (lambda d: _pod(d).update(hostNetwork=True), "hostNetwork"),
    "host pid": (lambda d: _pod(d).update(hostPID=True), "hostPID"),
    "host ipc": (lambda d: _pod(d).update(hostIPC=True), "hostIPC"),
    "host path": (
        lambda d: _pod(d)["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "hostPath",
    ),
    "disallowed volume": (
        lambda d: _pod(d)["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
        "nfs",
    ),
    "host port": (
        lambda d: _container(d)["ports"].append({"containerPort": 80, "hostPort": 80}),
        "hostPort",
    ),
    "unsafe sysctl": (
        lambda d: _pod(d)["securityContext"].update(
            sysctls=[{"name": "kernel.msgmax", "value": "1"}]
        ),
        "kernel.msgmax",
    ),
    "proc mount": (lambda d: _sc(d).update(procMount="Unmasked"), "procMount"),
    "selinux user": (
        lambda d: _sc(d).update(seLinuxOptions={"user": "system_u"}),
        "seLinuxOptions.user",
    ),
    "apparmor unconfined": (
        lambda d: _sc(d).update(appArmorProfile={"type": "Unconfined"}),
        "appArmorProfile",
    ),
    "privileged init container": (
        lambda d: _pod(d).update(
            initContainers=[{"name": "init", "image": "x", "securityContext": {"privileged": True}}]
        ),
        "container init",
    ),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_checker_catches_each_violation(case: str) -> None:
    deployment = copy.deepcopy(one(render({}), "Deployment"))
    assert restricted_violations(deployment) == []
    mutate, expected = MUTATIONS[case]
    mutate(deployment)
    problems = restricted_violations(deployment)
    assert any(expected in p for p in problems), problems


def test_net_bind_service_is_the_one_allowed_capability() -> None:
    deployment = copy.deepcopy(one(render({}), "Deployment"))
    _sc(deployment).update(capabilities={"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]})
    assert restricted_violations(deployment) == []


def test_checker_reads_pods_and_cronjobs_too() -> None:
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "x"}]},
    }
    assert any("allowPrivilegeEscalation" in p for p in restricted_violations(pod))
    cronjob = {
        "kind": "CronJob",
        "metadata": {"name": "cj"},
        "spec": {"jobTemplate": {"spec": {"template": {"spec": {"hostNetwork": True}}}}},
    }
    problems = restricted_violations(cronjob)
    assert any("hostNetwork" in p for p in problems)
    assert any("no containers" in p for p in problems)
    assert restricted_violations({"kind": "ConfigMap", "metadata": {"name": "c"}}) == []
