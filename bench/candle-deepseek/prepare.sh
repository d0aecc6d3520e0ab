#!/usr/bin/env bash
# Writes src/deepseek2_v3.rs: candle-transformers 0.11.1's own src/models/deepseek2.rs with
# deepseek2-v3-routing.patch applied (DeepSeek-V3's router; everything else is candle's).
# The file is generated, not committed: Switchyard carries only its patch.
set -euo pipefail
cd "$(dirname "$0")"
cargo fetch --quiet
src=$(cargo metadata --format-version 1 --quiet \
  | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "candle-transformers"))')
patch --silent -o src/deepseek2_v3.rs "$(dirname "$src")/src/models/deepseek2.rs" deepseek2-v3-routing.patch
echo "wrote src/deepseek2_v3.rs from $(dirname "$src")"
