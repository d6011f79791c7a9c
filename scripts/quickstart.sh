#!/usr/bin/env bash
# The main job, end to end, from a fresh clone: install, run the retrain flow on the Grocery Store
# dataset (validate -> fine-tune -> evaluate -> gate -> register -> index -> promote), package
# @champion into a Bento, serve it on localhost and match one query photo against it.
#
#   bash scripts/quickstart.sh [DATASET_PATH]     (default: ../shared/datasets/grocery-store)
set -euo pipefail
cd "$(dirname "$0")/.."

DATA="${1:-../shared/datasets/grocery-store}"
PORT="${SKUMATCH_PORT:-3000}"

bash scripts/install.sh
# shellcheck disable=SC1091
. .venv/bin/activate

echo "== retrain flow on $DATA"
skumatch retrain --data "$DATA"

echo "== package @champion into a Bento"
skumatch build

echo "== serve it on 127.0.0.1:$PORT"
mkdir -p .skumatch
skumatch serve --port "$PORT" > .skumatch/serve.log 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  if curl -fs "http://127.0.0.1:$PORT/readyz" > /dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then cat .skumatch/serve.log; echo "the service did not start" >&2; exit 1; fi
  sleep 1
done
curl -fs "http://127.0.0.1:$PORT/readyz" > /dev/null || { tail -50 .skumatch/serve.log; echo "service not ready after 180 s" >&2; exit 1; }

# Four photos of the query split, never seen in training, spread over its SKUs.
mapfile -t PHOTOS < <(python - "$DATA" <<'PY'
import sys
from components.config import load_params
from components.data import load_manifest, select
params = load_params("params.yaml", [f"data.root={sys.argv[1]}"])
queries = select(load_manifest(params.data.root), split=params.data.query_split, role="query")
for position in (1, 2, 3, 4):
    print(queries["image_path"].iloc[position * len(queries) // 5])
PY
)
echo "== /match for ${PHOTOS[0]}"
skumatch match "${PHOTOS[0]}" --url "http://127.0.0.1:$PORT" --top-k 5
echo "== /match_batch for ${#PHOTOS[@]} photos in one request"
skumatch match "${PHOTOS[@]}" --url "http://127.0.0.1:$PORT" --top-k 3
