# ihf-bids container (minimal first version; GPU base, pinned lock file, baked model and
# OCI labels come with the containers issue). Build: docker build -t ihf-bids .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    HOME=/home/ihf

WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY ihf_bids ./ihf_bids
# The CPU build of torch from PyTorch's CPU index; everything else from PyPI.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt . \
    && mkdir -p "$HOME" && chmod -R a+rwX "$HOME"

ENTRYPOINT ["ihf-bids"]
