"""Training: one scaffold (``scaffold``: set-up, ranks, the optimiser step, logging, evaluation cadence,
checkpoints, resume, timing, summary) and, per stage, only its data, its step and its evaluation (``sft``,
``dpo``, ``rm``, ``grpo``, ``ppo``); ``rl`` holds what the RL stages share, ``checkpoint`` and ``metrics`` the
run-directory files."""
