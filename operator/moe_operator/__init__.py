"""Kubernetes operator for MoEDeployment: plans expert-parallel layouts and renders RayServices."""

__version__ = "0.1.0"
