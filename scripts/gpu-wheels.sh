#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that a GPU machine without internet needs to run craft, for
# its Python and platform (default: CPython 3.12 on x86-64 Linux): fastcore and the server's web stack
# (fastapi, pydantic, uvicorn) with their dependencies. torch, numpy, safetensors, tqdm, matplotlib and pyyaml
# are expected there already. The top-level versions are the ones installed in this environment (run it in
# the development environment, after pip install -e ".[dev]"), so the GPU machine runs what the tests ran here.
#
#   bash scripts/gpu-wheels.sh                 # then copy the repository and .whl/ to the GPU machine, and there:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#   python3 -m craft.cli bench --suite gpu --out nbs/bench
#
# Settings: PYTHON (the python whose pip downloads and whose versions are pinned; default python3),
# GPU_PYTHON (the GPU machine's Python version; default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
gpu_python=${GPU_PYTHON:-3.12}
packages=(fastcore fastapi uvicorn)

pins=$("$python" - "${packages[@]}" <<'EOF'
import sys
from importlib.metadata import version, PackageNotFoundError
pins = []
for name in sys.argv[1:]:
    try: pins.append(f"{name}=={version(name)}")
    except PackageNotFoundError: sys.exit(f"gpu-wheels: {name} is not installed here; run pip install -e \".[dev]\" first")
print(' '.join(pins))
EOF
)

rm -rf .whl && mkdir .whl          # one version of each package: two would stop the install there
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
echo "gpu-wheels: downloading $pins and their dependencies for Python $gpu_python on x86-64 Linux into .whl/"
# shellcheck disable=SC2086
"$python" -m pip download -q --only-binary=:all: --python-version "$gpu_python" --implementation cp \
  "${platforms[@]}" -d .whl $pins 2>&1 | { grep -v '^WARNING: Location' || true; }
ls .whl
echo "gpu-wheels: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
