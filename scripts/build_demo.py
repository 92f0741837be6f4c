"""Build the bundled demo's tiny Llama model and planted-teacher data (deterministic, CPU).

    python scripts/build_demo.py [OUT_DIR]      # default: ~/.cache/flexora/demo

`flexora run recipe=demo` does this by itself on first use; this script is for inspecting the
assets or pointing `model.name_or_path` / `dataset.data_dir` at them by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flexora_cli.demo import PLANTED_LAYERS, ensure_assets

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.home() / ".cache" / "flexora" / "demo"
    root = ensure_assets(out)
    print(
        f"demo assets in {root}: model/ (tiny Llama, 8 layers), data/ (Hellaswag schema); planted layers {list(PLANTED_LAYERS)}"
    )
