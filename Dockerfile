# patchq image: the `patchq` command with every dependency, for workers, Flower and the jobs.
#
# torch comes from PyPI by default; its Linux x86_64 wheels are CUDA builds (the CUDA runtime
# arrives as nvidia-* wheels), so the default image runs on a GPU host and on a plain CPU.
# Pick another build with TORCH_INDEX_URL; the versions stay the ones pinned in pyproject.toml,
# pip takes the index's local build (2.x.y+cpu, +cu128, ...) because it sorts above the plain one:
#   CPU only, much smaller:  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#   a given CUDA release:    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (choose a CUDA release the host's NVIDIA driver supports: `nvidia-smi` shows the highest).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATCHQ_MODEL_CACHE_DIR=/cache/models

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so editing the code does not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir common producer worker aggregator review \
 && pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[s3]"

COPY common ./common
COPY producer ./producer
COPY worker ./worker
COPY aggregator ./aggregator
COPY review ./review
RUN pip install --no-deps . \
 && useradd --create-home --uid 1000 patchq \
 && mkdir -p /cache/models /demo-images \
 && chown -R patchq:patchq /cache /demo-images

# Not root: a worker only reads the image storage and writes its model cache.
USER patchq
ENTRYPOINT ["patchq"]
CMD ["--help"]
