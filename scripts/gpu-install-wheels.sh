#!/usr/bin/env bash
# On the GPU machine: install the staged wheels (/root/stage/out/*.whl) whose distribution python3 lacks into
# /root/site, so the image's own torch, numpy and transformers are never shadowed. Used by gpu-study-b.sh and
# gpu-judges.sh (export PYTHONPATH=/root/site afterwards).
set -euo pipefail
mkdir -p /root/site
missing=$(python3 - /root/stage/out/*.whl <<'PY'
import importlib.metadata as md, re, sys
for wheel in sys.argv[1:]:
    name = re.split(r"-\d", wheel.rsplit("/", 1)[-1], maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(wheel)
PY
)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /root/site $missing
