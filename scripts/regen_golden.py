"""Regenerate tests/golden/sft_tiny_loss.json and tests/golden/grpo_tiny.json. Run only when a change is *meant*
to move a pinned curve, and say why in the commit message:  python scripts/regen_golden.py"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from pinned import GOLDEN, GRPO_GOLDEN, pinned_grpo_curve, pinned_sft_losses  # noqa: E402

torch.set_num_threads(2)
losses = pinned_sft_losses()
GOLDEN.write_text(json.dumps({"losses": losses, "torch": torch.__version__}, indent=1) + "\n")
print(losses)
curve = pinned_grpo_curve()
GRPO_GOLDEN.write_text(json.dumps({**curve, "torch": torch.__version__}, indent=1) + "\n")
print(curve)
