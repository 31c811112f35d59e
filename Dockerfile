# megatron_mpo on the NVIDIA PyTorch container.
#
#   docker build -t megatron_mpo .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v "$PWD":/workspace megatron_mpo \
#     torchrun --nproc-per-node 8 -m megatron_mpo.train --config /opt/megatron_mpo/examples/recipes/internvl2_8b.yaml
#
# The base image brings CUDA, cuDNN, NCCL, PyTorch, Transformer Engine and apex, built together;
# they are kept as they are. setup.py asks for torch>=2.4 and megatron-core==0.16.1, whose own
# requirements are torch>=2.6.0, numpy and packaging>=24.2 (nothing pins torch), and the
# container's torch (2.10.0a0+..., a pre-release version string) satisfies both because pip
# accepts an installed pre-release. The container's pip constraint file (/etc/pip/constraint.txt,
# since 25.03) pins torch and its companions as well, so a future dependency that wanted another
# torch would fail the build instead of replacing it; the build also checks that torch's version
# is unchanged. megatron-core is not part of the PyTorch container (it is in the NeMo one): pip
# installs the cp312 wheel. --no-build-isolation builds setup.py with the container's setuptools.
#
# Slurm + pyxis/enroot: enroot import dockerd://megatron_mpo, then
#   MPO_SRUN_ARGS="--container-image=megatron_mpo.sqsh --container-mounts=$PWD:$PWD --container-workdir=$PWD" \
#     sbatch --nodes 4 examples/launch/slurm_mpo.sbatch examples/recipes/internvl2_8b.yaml
#
# Build arguments: MPO_UID / MPO_GID give the runtime user the owner of the mounted work
# directory (default 1000; duplicates such as Ubuntu's own uid 1000 are allowed).
FROM nvcr.io/nvidia/pytorch:25.12-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_NCCL_AVOID_RECORD_STREAMS=1 \
    MPO_HOME=/opt/megatron_mpo

WORKDIR /opt/megatron_mpo

# Dependencies first, in a layer that only setup.py invalidates: an empty stand-in package lets pip
# resolve install_requires; the real package replaces it below without touching dependencies.
COPY setup.py ./
RUN mkdir megatron_mpo \
    && touch megatron_mpo/__init__.py \
    && torch_before="$(python -c 'import torch; print(torch.__version__)')" \
    && pip install --no-cache-dir --no-build-isolation . \
    && pip uninstall --yes megatron_mpo \
    && rm -rf megatron_mpo build ./*.egg-info \
    && torch_after="$(python -c 'import torch; print(torch.__version__)')" \
    && if [ "$torch_after" != "$torch_before" ]; then \
           echo "torch changed from $torch_before to $torch_after: a dependency replaced the container's build" >&2; \
           exit 1; \
       fi \
    && python -c 'import megatron.core; print("megatron-core", megatron.core.__version__)'

COPY megatron_mpo ./megatron_mpo
COPY tools ./tools
COPY examples ./examples
RUN pip install --no-cache-dir --no-build-isolation --no-deps . \
    && rm -rf build ./*.egg-info \
    && python -c 'import megatron_mpo'

ARG MPO_UID=1000
ARG MPO_GID=1000
RUN groupadd --non-unique --gid "${MPO_GID}" mpo \
    && useradd --no-log-init --non-unique --uid "${MPO_UID}" --gid "${MPO_GID}" \
       --create-home --shell /bin/bash mpo \
    && mkdir -p /workspace \
    && chown mpo:mpo /workspace

USER ${MPO_UID}:${MPO_GID}
# Recipes use paths relative to the working directory (checkpoints/, data/, runs/, hf/): mount
# the directory that holds them at /workspace.
WORKDIR /workspace

# The base image's ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh: CUDA compatibility setup, then
# exec of the command) is kept. The default command prints the trainer's usage; run torchrun, the
# tools (/opt/megatron_mpo/tools) or the launchers (/opt/megatron_mpo/examples/launch) instead.
CMD ["python", "-m", "megatron_mpo.train", "--help"]
