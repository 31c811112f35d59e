#!/usr/bin/env bash
# Build the wheel folder that tools/gpu_kit/run_kit.sh installs on an offline GPU machine.
#
#     tools/gpu_kit/build_wheels.sh [DIR]        (default DIR: .whl in the repository root)
#
# Run it on a machine with package-index access. The target machine has Python 3.12 on
# x86_64 Linux with torch, numpy, pillow, pyyaml, psutil, safetensors, sentencepiece,
# tokenizers, matplotlib, transformers and pytest, but no megatron-core, webdataset or
# braceexpand, and no package index. So wheels are fetched for that interpreter
# (--python-version 3.12, manylinux x86_64 tags), not for the one running this script,
# with pinned versions and --no-deps: every dependency is listed here on purpose, and each
# wheel's Requires-Dist is checked against this list plus what the target already has.
# The folder must stay under 64 MiB (what the GPU machine's file transfer carries).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:-$ROOT/.whl}"
LIMIT_BYTES=$((64 * 1024 * 1024))

# Pinned: what setup.py's INSTALL_REQUIRES needs beyond the target's packages, plus the
# dependencies of those wheels. packaging is present on the target (transformers and pytest
# need it) but possibly older than megatron-core's floor (packaging>=24.2); it is pure
# Python and tiny, so it is carried to make the floor hold.
PINS=(
    "megatron-core==0.16.1"
    "webdataset==1.0.2"
    "braceexpand==0.1.7"
    "packaging==25.0"
)
# Distributions the target machine already has (normalised names); torch's own
# dependencies come with torch.
TARGET_HAS="torch numpy pillow pyyaml psutil safetensors sentencepiece tokenizers matplotlib transformers pytest"

mkdir -p "$DIR"
# A stale wheel from an older pin would be installed too: start from an empty folder.
rm -f "$DIR"/*.whl "$DIR"/SHA256SUMS

python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" "${PINS[@]}"

# Every non-optional Requires-Dist of every wheel must be carried here or present there.
python3 - "$DIR" "$TARGET_HAS" "${PINS[@]}" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

folder, target_has, pins = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3:]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


carried = {norm(p.split("==")[0]) for p in pins}
known = carried | {norm(n) for n in target_has}
wheels = sorted(folder.glob("*.whl"))
found = {norm(w.name.split("-")[0]) for w in wheels}
if found != carried:
    sys.exit(f"error: wheels {sorted(found)} do not match the pins {sorted(carried)}")
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if re.search(r"\bextra\s*==", req):
            continue  # optional extras are not installed
        name = norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
        print(f"  {wheel.name.split('-')[0]} requires {req}")
        if name not in known:
            missing.append(f"{wheel.name} requires {req}")
if missing:
    sys.exit("error: dependencies neither carried nor on the target: " + "; ".join(missing)
             + " (add them to PINS in tools/gpu_kit/build_wheels.sh)")
EOF

(cd "$DIR" && sha256sum ./*.whl > SHA256SUMS)
total=$(find "$DIR" -maxdepth 1 -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
ls -l "$DIR"
echo "total: $total bytes ($(awk -v b="$total" 'BEGIN {printf "%.2f", b / 1048576}') MiB) in $DIR"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "error: $DIR holds $total bytes, more than the 64 MiB that can be carried" >&2
    exit 1
fi
echo "ok: carry $DIR to the GPU machine and run tools/gpu_kit/run_kit.sh there"
