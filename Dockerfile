# syntax=docker/dockerfile:1
# Three images from one file:
#   docker build --target bot -t tuneops-bot .          the Slack bot and the RQ worker (no torch, runs as a user)
#   docker build --target payload -t tuneops-payload .  what runs in the ACA GPU container: trainer + inference server
#   docker build --target demo -t tuneops-demo .        the bot image plus the payload and redis-server: `tuneops demo`
#                                                       and the benchmarks (python -m bot.bench, bot.bench_thread,
#                                                       jobs.backends.aca.bench_sync, payload.bench) run from it
# Run the bot image as `tuneops-bot bot` (the default) or `tuneops-bot worker`. Push the payload image to a registry
# and set IMAGE in infra/finetuning.config.json (and inference.config.json) so that runs do not spend billed GPU
# minutes on `pip install`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# transformers 5 uses torch 2.6 or newer only (it disables an older one): the base's torch must be that new.
ARG PYTORCH_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

# ---- the bot and the worker ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS bot
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 tuneops && useradd --uid 10001 --gid tuneops --create-home tuneops
WORKDIR /app
# Dependencies first, so that a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p bot jobs payload && touch bot/__init__.py jobs/__init__.py payload/__init__.py \
    && pip install . && pip uninstall -y tuneops
COPY bot ./bot
COPY jobs ./jobs
COPY payload ./payload
COPY infra ./infra
RUN pip install --no-deps . && mkdir -p /home/tuneops/workspace && chown tuneops:tuneops /home/tuneops/workspace
USER tuneops
ENV TUNEOPS_WORKSPACE=/home/tuneops/workspace \
    TUNEOPS_INFRA_DIR=/app/infra \
    PORT=3000
EXPOSE 3000
ENTRYPOINT ["tuneops"]
CMD ["bot", "--http"]

# ---- the demo and the benchmarks: the bot image, the payload (torch, on the CPU) and a Redis to start ---------------
FROM bot AS demo
USER root
RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/* \
    && pip install ".[payload,serve]"
USER tuneops
CMD ["demo"]

# ---- the GPU container: trainer and inference server ---------------------------------------------------------------
# The PyTorch image brings CUDA and a CUDA build of torch; pip adds the payload and serve extras around that torch. A
# constraint pins torch to the image's own build, so that no requirement can swap in another wheel from PyPI (a
# CPU-only one, or one built for another CUDA), and the build fails unless torch has CUDA and transformers can use it.
# It runs as root like the seed's image: the Azure Files mount at /mount is writable by root only.
FROM ${PYTORCH_IMAGE} AS payload
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/mount/cache/huggingface
WORKDIR /opt/tuneops
COPY pyproject.toml README.md ./
RUN mkdir -p bot jobs payload && touch bot/__init__.py jobs/__init__.py payload/__init__.py \
    && python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > /tmp/torch.txt \
    && pip install -c /tmp/torch.txt ".[payload,serve]" && pip uninstall -y tuneops \
    && python -P -c "import torch, transformers.utils as t; \
assert torch.version.cuda, f'torch {torch.__version__} has no CUDA'; \
assert t.is_torch_available(), f'transformers cannot use torch {torch.__version__}'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
COPY payload ./payload
RUN pip install --no-deps .
# -P: the working directory is the workspace on the share, whose datasets/ folder must not shadow the datasets package.
WORKDIR /mount
EXPOSE 7860
CMD ["python", "-P", "-m", "payload.serve", "--help"]
