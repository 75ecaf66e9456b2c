"""A checker for the "restricted" Pod Security Standard (baseline + restricted controls).

Written from the Kubernetes Pod Security Standards page (policy version 1.30). It returns a
list of human-readable violations for any object that carries a pod template, so a test can
print exactly what is wrong; an empty list means the object passes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Obj = dict[str, Any]

# restricted: "Restricted volume types".
ALLOWED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
# restricted: the only capability a container may add.
ALLOWED_ADDED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
# restricted: seccomp profile types (pod level, or every container).
ALLOWED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})
# baseline: AppArmor profiles.
ALLOWED_APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
# baseline: SELinux types.
ALLOWED_SELINUX_TYPES = frozenset(
    {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
)
# baseline: the "safe" sysctl set.
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
CONTAINER_FIELDS = ("initContainers", "containers", "ephemeralContainers")


def pod_template(obj: Obj) -> tuple[Obj, Obj] | None:
    """(pod metadata, pod spec) of a Pod or of a workload's pod template; None if it has none."""
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return obj.get("metadata") or {}, spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    template = spec.get("template")
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"}:
        template = template or {}
        return template.get("metadata") or {}, template.get("spec") or {}
    return None


def containers(pod_spec: Obj) -> Iterator[Obj]:
    for field in CONTAINER_FIELDS:
        yield from pod_spec.get(field) or []


def restricted_violations(obj: Obj) -> list[str]:
    """Every "restricted" Pod Security Standard violation of the object's pod (empty = passes)."""
    found = pod_template(obj)
    if found is None:
        return []
    pod_meta, spec = found
    pod_sc: Obj = spec.get("securityContext") or {}
    problems: list[str] = []

    # --- baseline, pod level
    for host_ns in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host_ns):
            problems.append(f"pod: {host_ns} must be unset or false")
    if (pod_sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append("pod: securityContext.windowsOptions.hostProcess must be unset or false")
    for volume in spec.get("volumes") or []:
        types = set(volume) - {"name"}
        if "hostPath" in types:
            problems.append(f"volume {volume.get('name')}: hostPath volumes are forbidden")
        for vtype in sorted(types - ALLOWED_VOLUME_TYPES - {"hostPath"}):
            problems.append(f"volume {volume.get('name')}: volume type {vtype} is not allowed")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            problems.append(f"pod: sysctl {sysctl.get('name')} is not in the safe set")
    problems += _selinux_problems("pod", pod_sc)
    problems += _apparmor_problems("pod", pod_sc)
    for key, value in (pod_meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            problems.append(f"pod: AppArmor annotation {key}={value} is not allowed")

    # --- restricted, pod level
    if pod_sc.get("runAsUser") == 0:
        problems.append("pod: securityContext.runAsUser must not be 0")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if pod_seccomp is not None and pod_seccomp not in ALLOWED_SECCOMP:
        problems.append(f"pod: seccompProfile.type {pod_seccomp} is not RuntimeDefault/Localhost")

    if not any(True for _ in containers(spec)):
        problems.append("pod: has no containers")
    for container in containers(spec):
        problems += _container_problems(container, pod_sc)
    return problems


def _container_problems(container: Obj, pod_sc: Obj) -> list[str]:
    where = f"container {container.get('name', '?')}"
    sc: Obj = container.get("securityContext") or {}
    caps: Obj = sc.get("capabilities") or {}
    problems: list[str] = []

    # --- baseline
    if sc.get("privileged"):
        problems.append(f"{where}: privileged must be unset or false")
    if (sc.get("windowsOptions") or {}).get("hostProcess"):
        problems.append(f"{where}: windowsOptions.hostProcess must be unset or false")
    for port in container.get("ports") or []:
        if port.get("hostPort"):
            problems.append(f"{where}: hostPort {port['hostPort']} is forbidden")
    if sc.get("procMount", "Default") != "Default":
        problems.append(f"{where}: procMount must be Default")
    problems += _selinux_problems(where, sc)
    problems += _apparmor_problems(where, sc)

    # --- restricted
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if sc.get("runAsNonRoot") is False or (
        sc.get("runAsNonRoot") is None and pod_sc.get("runAsNonRoot") is not True
    ):
        problems.append(f"{where}: runAsNonRoot must be true (container or pod)")
    if sc.get("runAsUser") == 0:
        problems.append(f"{where}: runAsUser must not be 0")
    seccomp = (sc.get("seccompProfile") or {}).get("type")
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp is not None and seccomp not in ALLOWED_SECCOMP:
        problems.append(f"{where}: seccompProfile.type {seccomp} is not RuntimeDefault/Localhost")
    if seccomp is None and pod_seccomp is None:
        problems.append(f"{where}: seccompProfile must be set (container or pod)")
    if "ALL" not in (caps.get("drop") or []):
        problems.append(f"{where}: capabilities.drop must include ALL")
    for cap in caps.get("add") or []:
        if cap not in ALLOWED_ADDED_CAPABILITIES:
            problems.append(f"{where}: capability {cap} may not be added")
    return problems


def _selinux_problems(where: str, sc: Obj) -> list[str]:
    opts: Obj = sc.get("seLinuxOptions") or {}
    problems = []
    if opts.get("type", "") not in ALLOWED_SELINUX_TYPES:
        problems.append(f"{where}: seLinuxOptions.type {opts['type']} is not allowed")
    for field in ("user", "role"):
        if opts.get(field):
            problems.append(f"{where}: seLinuxOptions.{field} must be unset")
    return problems


def _apparmor_problems(where: str, sc: Obj) -> list[str]:
    profile = (sc.get("appArmorProfile") or {}).get("type")
    if profile is not None and profile not in ALLOWED_APPARMOR_TYPES:
        return [f"{where}: appArmorProfile.type {profile} is not allowed"]
    return []
