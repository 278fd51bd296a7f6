#!/usr/bin/env bash
# The main job on the bundled example: teacher → distilled, int8-QAT student → model.onnx, benchmarked, gated.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
compress run examples/digits.yaml --out runs/digits --overwrite
compress bench runs/digits --target x86-cpu
compress gate runs/digits/report.json --budgets examples/budgets.yaml
echo "demo: open runs/digits/report.md"
