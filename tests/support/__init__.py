"""Helpers shared by the test folders and by bench/, imported as `tests.support`.

pyproject's pytest settings put the project root on the path (`pythonpath = ["."]`) and bench
runs as a package from the root (`python -m bench.run`), so both import this package by the same
name; its modules import each other relatively. A helper only one test folder uses stays in that
folder and is imported by its bare name (pytest puts a test's folder on the path), never from
another folder; no test module imports another test module.

* ports.py: `free_port()`, a free loopback TCP port.
* waiting.py: `wait_until` (poll a probe until its value is good; fail with the last value),
  `poll_until` (the same, without failing), `wait_for_items` and `change_under_load` (client
  threads filling a list), `eventually` (the asyncio twin of `wait_until`).
* appconfig.py: `tiny_app_config`, the AppConfig the served-app tests deploy on a tiny
  checkpoint.
* served.py: `Served` (a deployed app: HTTP base URL, gRPC target, its config, clients) and
  `running_app` (a Ray cluster in this process serving one app).
* oracle.py: transformers' greedy decoding, what the served engine must answer.
* The Kubernetes API emulator and the operator run against it: kube_emulator.py (kmock's
  emulator extended), k8s_schema.py (CRD structural schemas as kube-apiserver applies them),
  webhook_rules.py (the API server's checks of a webhook configuration), operator_harness.py
  (the emulator's kinds, the operator in-process, the KubeRay stand-in).
* Chart checks the operator and unit tests share with tests/chart: helm_render.py (the real
  `helm` on the chart) and pod_security.py (the "restricted" Pod Security Standard).
"""
