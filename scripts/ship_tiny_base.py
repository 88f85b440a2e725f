"""Copy a finished pretraining run into the package as ``builtin:tiny-base``, with its provenance.

Usage (after the pretrain command in posttrain/recipes/tiny_base.yaml):
    python scripts/ship_tiny_base.py runs/tiny-base
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
import yaml

ASSET = Path(__file__).resolve().parent.parent / "posttrain" / "assets" / "tiny-base"


def main(run_dir: str) -> None:
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    shutil.rmtree(ASSET, ignore_errors=True)
    shutil.copytree(run / "final", ASSET)
    recipe = Path(__file__).resolve().parent.parent / "posttrain" / "recipes" / "tiny_base.yaml"
    command = [line[2:].strip() for line in recipe.read_text().splitlines() if line.startswith("#   ")]
    provenance = {
        "command": " ".join(command).replace(" \\", ""),
        "config": config,
        "steps": summary["steps"],
        "final_train_loss": summary["final_train_loss"],
        "heldout": summary["heldout"],
        "train_wall_s": summary["train_wall_s"],
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    (ASSET / "PROVENANCE.json").write_text(json.dumps(provenance, indent=1))
    print(f"shipped {run / 'final'} -> {ASSET}")


if __name__ == "__main__":
    main(sys.argv[1])
