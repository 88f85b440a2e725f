"""Regenerate tests/golden/sft_tiny_loss.json, grpo_tiny.json and preference_tiny.json. Run only when a change
is *meant* to move a pinned curve, and say why in the commit message:  python scripts/regen_golden.py"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
from pinned import (  # noqa: E402
    GOLDEN,
    GRPO_GOLDEN,
    PREFERENCE_GOLDEN,
    pinned_grpo_curve,
    pinned_preference_curves,
    pinned_sft_losses,
)

torch.set_num_threads(2)
losses = pinned_sft_losses()
GOLDEN.write_text(json.dumps({"losses": losses, "torch": torch.__version__}, indent=1) + "\n")
print(losses)
curve = pinned_grpo_curve()
GRPO_GOLDEN.write_text(json.dumps({**curve, "torch": torch.__version__}, indent=1) + "\n")
print(curve)
curves = pinned_preference_curves()
PREFERENCE_GOLDEN.write_text(json.dumps({**curves, "torch": torch.__version__}, indent=1) + "\n")
print(curves)
