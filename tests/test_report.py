"""report.html draws each trained stage's own curves (GRPO, DPO, RM, PPO) from its metrics.jsonl."""

from __future__ import annotations

import json

from posttrain.report import write_report


def test_report_has_a_figure_per_preference_stage(tmp_path):
    rows = {
        "dpo": [{"step": s, "loss": 0.7 - 0.1 * s, "margin": 0.2 * s, "accuracy": 0.5 + 0.1 * s} for s in (1, 2, 3)],
        "rm": [{"step": s, "loss": 0.6, "accuracy": 0.7, "eval_pair_accuracy": 0.8} for s in (1, 2)],
        "ppo": [{"step": s, "pg_loss": 0.01, "score_mean": 0.1 * s, "kl": 0.2, "accuracy_strict": 0.3} for s in (1, 2)],
    }
    stages = []
    for kind, metrics in rows.items():
        run = tmp_path / kind
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        stages.append({"name": kind, "type": kind, "source": "trained", "run_dir": str(run), "eval": {}})
    page = write_report(tmp_path, {"recipe": "r", "stages": stages, "wall_s": 1.0}).read_text()
    for title in ("dpo: implicit reward margin", "rm: pair accuracy", "ppo: score, KL and accuracy"):
        assert f"<h2>{title}" in page, title
    assert page.count("data:image/png;base64,") == 1 + 3 + 1  # loss curves, one per stage, accuracy by stage
