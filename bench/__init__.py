"""The benchmark (bench/README.md), a package run from the project root: `python -m bench.run`.

Its modules import each other relatively; the operator section imports the Kubernetes API
emulator the operator's tests use from `tests.support` (the project root is on the path when
run as `python -m` from there). raylm_app.py and serve_observer.py are scripts the benchmark
starts by path, in their own processes.
"""
