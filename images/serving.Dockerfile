# Serving image for head and worker pods: Ray + CUDA vLLM + moe_serving.
# Build from the project root: `make images` (IMAGE_REPO=..., TAG=...; README "Building the images"),
# or docker build -f images/serving.Dockerfile -t moe-serving:0.1.0 .
# (Not built in this repository's CI: the development machines have no Docker engine or GPU.)
# Use the plain `vllm` wheel here (CUDA); never `ray[llm]`, whose pin may replace it.
FROM rayproject/ray:2.60.0-py311-cu128
COPY --chown=ray:users pyproject.toml README.md /home/ray/moe/
COPY --chown=ray:users operator /home/ray/moe/operator
COPY --chown=ray:users serving /home/ray/moe/serving
RUN pip install --no-cache-dir "vllm==0.32.0" "/home/ray/moe[serving]"
# The moe_cpu_ep_fix vLLM plugin installed with moe_serving detects a CUDA vLLM and does nothing.
