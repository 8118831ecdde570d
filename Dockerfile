# cmb-bidsapp container: detect cerebral microbleeds in a BIDS dataset, write BIDS-Derivatives.
#
# Build (CPU torch, the default):
#   docker build --build-arg VERSION="$(git describe --tags --always)" -t cmb-bidsapp .
# Build with a CUDA torch (any index of https://download.pytorch.org/whl/):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t cmb-bidsapp:cuda .
# Run (no network is needed at run time):
#   docker run --rm --network none -v /data:/data:ro -v /out:/out cmb-bidsapp /data /out participant
#
# The Python dependencies come from the same place as in CI (the Makefile's venv target):
# torch pinned to TORCH_VERSION from TORCH_INDEX first, then the package itself, so that
# pyproject.toml is the single list of dependencies. tests/test_ship_docker.py checks this.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# Stage 1: build the wheel of the package (with its default weights, which are package data).
FROM ${BASE_IMAGE} AS wheel
ARG VERSION=0.0.0+unknown
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . /src
# .git is not in the build context: hatch-vcs takes the version from VERSION instead.
RUN SETUPTOOLS_SCM_PRETEND_VERSION="${VERSION}" \
        python -m pip wheel --no-deps --wheel-dir /wheels /src \
    && ls -l /wheels

# ---------------------------------------------------------------------------------------------
# Stage 2: a virtual environment with torch, the package and its dependencies, and the
# TemplateFlow files that the app reads, fetched now (never at run time).
FROM ${BASE_IMAGE} AS venv
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    PATH="/opt/venv/bin:${PATH}"
# (/opt/venv/bin/python by its path: the shell would reuse the python it found before the venv)
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --retries=3 \
        "torch==${TORCH_VERSION}" --extra-index-url "${TORCH_INDEX}"
COPY --from=wheel /wheels /wheels
# The [test] extra lets CI run the test suite inside the image.
RUN /opt/venv/bin/python -m pip install --retries=3 "$(ls /wheels/cmb_bidsapp-*.whl)[test]" \
    && /opt/venv/bin/python -m pip check
# MNI152NLin2009cAsym: brain-extracted T1w, brain mask and GM/WM/CSF priors at 1 and 2 mm
# (what cmb_bidsapp/anatomy/templates.py reads). Every file must be real (not a 0-byte stub).
RUN /opt/venv/bin/python -c "\
from pathlib import Path; \
from templateflow import api; \
kinds = [dict(desc='brain', suffix='T1w'), dict(desc='brain', suffix='mask')] \
    + [dict(desc=None, label=t, suffix='probseg') for t in ('GM', 'WM', 'CSF')]; \
files = [Path(api.get('MNI152NLin2009cAsym', resolution=r, **k)) for r in (1, 2) for k in kinds]; \
bad = [str(f) for f in files if not f.is_file() or f.stat().st_size < 1000]; \
assert not bad, f'TemplateFlow download failed: {bad}'; \
print(*(f'{f.stat().st_size:>10} {f}' for f in files), sep='\\n')" \
    && chmod -R a+rX /opt/templateflow

# ---------------------------------------------------------------------------------------------
# Stage 3: the runtime image, without build tools or caches.
FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.0.0+unknown
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

LABEL org.opencontainers.image.title="cmb-bidsapp" \
      org.opencontainers.image.description="BIDS-App that detects cerebral microbleeds on SWI, T2*-GRE, multi-echo GRE and QSM and writes BIDS-Derivatives" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/cmb-bidsapp/cmb-bidsapp" \
      org.opencontainers.image.url="https://github.com/cmb-bidsapp/cmb-bidsapp" \
      org.opencontainers.image.documentation="https://cmb-bidsapp.readthedocs.io" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="cmb-bidsapp developers" \
      org.opencontainers.image.authors="cmb-bidsapp developers" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm" \
      org.cmb-bidsapp.torch="${TORCH_VERSION} from ${TORCH_INDEX}"

COPY --from=venv /opt/venv /opt/venv
COPY --from=venv /opt/templateflow /opt/templateflow

# A non-root user. Its home is writable by any uid, so `docker run --user "$(id -u):$(id -g)"`
# and Apptainer work too.
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash cmb \
    && chmod 0777 /home/cmb

# Threads: one per process by default; the app sets threads per node from --omp-nthreads.
# No telemetry, no TemplateFlow updates: the app runs with --network none.
# CMB_BIDSAPP_CONTAINER goes into GeneratedBy.Container of dataset_description.json.
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/home/cmb \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    NUMEXPR_NUM_THREADS=1 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    NO_ET=1 \
    NIPYPE_NO_ET=1 \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CMB_BIDSAPP_CONTAINER="docker:cmbbidsapp/cmb-bidsapp:${VERSION}"

USER 1000:1000
WORKDIR /home/cmb
# Smoke test of the installed app and warm-up of the Python caches (offline).
RUN cmb-bidsapp --version \
    && /opt/venv/bin/python -c "import cmb_bidsapp.cli.parser, nipype, bids, nibabel, torch, SimpleITK"

ENTRYPOINT ["cmb-bidsapp"]
CMD ["--help"]
