# Operator image: kopf + the pure planner/renderer; no Ray, no vLLM, no torch.
# Build from the project root: `make images` (IMAGE_REPO=..., TAG=...; README "Building the images"),
# or docker build -f images/operator.Dockerfile -t moe-operator:0.1.0 .
# (Not built in this repository's CI: the development machines have no Docker engine.)
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY serving ./serving
# `operator` extra only; moe_serving ships its pydantic-only config module for the renderer.
# The webhook's certificate is made with `cryptography` (moe_operator.webhook), so kopf's
# optional certbuilder is not needed.
RUN pip install --no-cache-dir ".[operator]" \
    && useradd --uid 65532 --no-create-home --shell /usr/sbin/nologin operator
USER 65532
ENTRYPOINT ["kopf", "run", "--module", "moe_operator.handlers"]
