"""Evaluation: metrics (pure), batched generation, and the ``posttrain eval`` harness."""
