"""Helm chart and install-bundle tests (real helm; no cluster, no engine)."""
