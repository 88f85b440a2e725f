"""What every benchmark reports about the machine it ran on: CPU, threads, versions, load, matmul peak.

The MFU denominator is *measured*, not taken from a spec sheet: the median rate of a 2048x2048 fp32 GEMM with
the benchmark's thread count, in the same run and under the same background load as the timed steps.

    >>> peak = matmul_peak_flops(threads=1, size=256, repeats=3)
    >>> peak > 0
    True
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or the platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The vector-ISA flags that decide fp32 GEMM speed (avx2, avx512f, amx...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = [x for x in flags if x in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}]
                    return " ".join(keep)
    except OSError:
        pass
    return ""


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(threads: int) -> dict[str, str]:
    """The header every benchmark section starts with."""
    return {
        "cpu": cpu_model(),
        "isa": cpu_flags(),
        "cores": str(os.cpu_count()),
        "threads": str(threads),
        "python": platform.python_version(),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "trl": package_version("trl"),
        "peft": package_version("peft"),
    }


def matmul_peak_flops(*, threads: int, size: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Median GEMM rate (FLOP/s) of a ``size`` x ``size`` matmul in ``dtype`` on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(getattr(torch, dtype))
    b = torch.randn(size, size, generator=g).to(getattr(torch, dtype))
    out = torch.empty(size, size, dtype=getattr(torch, dtype))
    for _ in range(2):
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * size**3 / (time.perf_counter() - t))
    return statistics.median(rates)


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy since boot (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class LoadMeter:
    """How many cores *other* processes kept busy while this process worked: machine-wide busy CPU time minus
    this process's own CPU time, over the wall time between :meth:`start` and :meth:`stop`."""

    wall0: float = 0.0
    busy0: float | None = None
    own0: float = 0.0

    @staticmethod
    def _own() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def start(self) -> LoadMeter:
        self.wall0, self.busy0, self.own0 = time.perf_counter(), _busy_cpu_seconds(), self._own()
        return self

    def stop(self) -> dict[str, float | None]:
        wall = max(time.perf_counter() - self.wall0, 1e-9)
        busy1, own = _busy_cpu_seconds(), self._own() - self.own0
        others = None if self.busy0 is None or busy1 is None else max(busy1 - self.busy0 - own, 0.0) / wall
        return {"own_cores": own / wall, "other_cores": others, "loadavg_1m": os.getloadavg()[0]}


def busy_cores(seconds: float = 2.0) -> float | None:
    """Cores the whole machine keeps busy over the next ``seconds`` (None where /proc/stat is unavailable)."""
    busy0 = _busy_cpu_seconds()
    time.sleep(seconds)
    busy1 = _busy_cpu_seconds()
    return None if busy0 is None or busy1 is None else (busy1 - busy0) / seconds


def wait_until_quiet(*, max_wait_s: float, threshold: float = 0.3, poll_s: float = 10.0) -> float | None:
    """Wait (up to ``max_wait_s``) until other processes use fewer than ``threshold`` cores; return the last
    reading. A benchmark cannot stop other work on a shared machine, but it can choose its moment."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = busy_cores()
        if load is None or load < threshold or time.monotonic() >= deadline:
            return load
        time.sleep(poll_s)


# --------------------------------------------------------------------------------------------------------------
# Benchmark models and precisions, shared by bench_sft, bench_dpo and bench_grpo.
# --------------------------------------------------------------------------------------------------------------

MODELS = ("small", "tiny", "smollm2")
SMOLLM2 = "builtin:smollm2-135m-instruct"
PRECISIONS = ("fp32", "bf16")


def load_bench_model(name: str, *, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) of a benchmark model, fp32: ``tiny``/``small`` are random-init Llamas on the character
    vocabulary (DESIGN.md, "Performance methodology"); ``smollm2`` is the real SmolLM2-135M-Instruct
    (``builtin:smollm2-135m-instruct``: fp32 weights converted into the cache, 49,152-token BPE vocabulary, its own
    ChatML template), loaded the same way on both sides, so they start from the same weights and tokenizer."""
    if name == "smollm2":
        from posttrain.models.loading import load_model

        return load_model(SMOLLM2)
    from posttrain.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    return build_model(tok, size=name, seed=seed), tok


def model_source(name: str, model: Any, tok: Any, directory: Path) -> str:
    """What a stage config's ``model`` names for a benchmark model: the builtin itself for ``smollm2`` (the weights
    the peer is handed too), else the random-init model saved into ``directory``."""
    if name == "smollm2":
        return SMOLLM2
    from posttrain.models.loading import save_model_dir

    save_model_dir(model, tok, directory)
    return str(directory)


def model_label(name: str) -> str:
    """How a report names the model."""
    if name == "smollm2":
        return "`smollm2` SmolLM2-135M-Instruct (`builtin:smollm2-135m-instruct`, fp32 weights, 49,152-token BPE)"
    return f"`{name}` random-init LlamaForCausalLM (character vocabulary)"


def peak_dtype(precision: str) -> str:
    """The GEMM dtype whose measured peak is the MFU denominator of a ``precision`` run: bf16 autocast runs its
    matmuls in bf16, so it is measured against the bf16 peak, fp32 against the fp32 one."""
    return {"fp32": "float32", "bf16": "bfloat16"}[precision]


def step_floor(model: Any, *, tokens: int, precision: str, threads: int, repeats: int = 3) -> dict[str, float]:
    """The measured floor of one training step on ``tokens`` tokens (packed, no padding) of a Llama-family
    ``model``: the seconds its matmuls take at the model's own shapes, and the optimiser's.

    Matmuls: forward, input gradient and weight gradient of every linear layer of one decoder layer (times the
    layer count) and of the output head, as ``precision``'s GEMMs (bf16 for bf16 autocast), the median of
    ``repeats`` timings: the 6N of a token's training FLOPs at the shapes this model really has (attention scores,
    norms, activations and the loss excluded). Optimiser: the fused AdamW step that posttrain uses over the model's
    parameters, plus the gradient-norm clip. ``matmul_rate / peak`` caps the MFU a step could reach even if
    nothing else took time; ``6 N tokens / floor_s / peak`` caps it with the optimiser counted too.
    """
    import torch

    torch.set_num_threads(threads)
    cfg = model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    shapes = _linear_shapes(cfg)
    dtype = getattr(torch, peak_dtype(precision))
    g = torch.Generator().manual_seed(0)

    def operands(out_f: int, in_f: int) -> tuple[Any, Any, Any]:
        return tuple(
            torch.randn(*shape, generator=g).to(dtype) for shape in ((out_f, in_f), (tokens, in_f), (tokens, out_f))
        )

    def timed(mats: list[tuple[Any, Any, Any]]) -> float:
        runs = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            for w, x, dy in mats:
                torch.mm(x, w.t())  # forward
                torch.mm(dy, w)  # input gradient
                torch.mm(dy.t(), x)  # weight gradient
            runs.append(time.perf_counter() - t)
        return statistics.median(runs[1:])

    layer_s = timed([operands(o, i) for o, i in shapes])
    head_s = timed([operands(vocab, d)])
    linear_params = layers * sum(o * i for o, i in shapes) + vocab * d

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    opt_runs = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        opt_runs.append(time.perf_counter() - t)
    matmul_s = layers * layer_s + head_s
    n = sum(p.numel() for p in params)
    return {
        "tokens": tokens,
        "matmul_s": matmul_s,
        "matmul_rate": 6 * linear_params * tokens / matmul_s,
        "optimizer_s": statistics.median(opt_runs[1:]),
        "floor_s": matmul_s + statistics.median(opt_runs[1:]),
        "model_flops": 6 * n * tokens,
    }


def _linear_shapes(cfg: Any) -> list[tuple[int, int]]:
    """(out, in) of one Llama-family decoder layer's linear layers: q, k, v, o, gate, up, down."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    return [(q, d), (kv, d), (kv, d), (d, q), (inter, d), (inter, d), (d, inter)]


def rollout_floor(
    model: Any, *, batch: int, prompt_tokens: int, new_tokens: int, precision: str, threads: int, repeats: int = 3
) -> dict[str, float]:
    """The measured floor of one rollout call (one prompt, ``batch`` samples of ``new_tokens`` tokens): the
    seconds of its matmuls alone, with every layer's own weights (so they stream from memory as in decoding, not
    from cache), in bf16 for ``precision`` bf16 (the rollout copy) else fp32: one prefill of ``prompt_tokens``
    (the prompt's KV cache shared by the samples) plus ``new_tokens`` decode steps of ``batch`` rows each.
    Attention over the cache, norms, sampling and per-op overhead excluded: no engine can be faster than this."""
    import torch

    torch.set_num_threads(threads)
    cfg = model.config
    dtype = getattr(torch, peak_dtype(precision))
    g = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(o, i, generator=g).to(dtype) for _ in range(cfg.num_hidden_layers) for o, i in _linear_shapes(cfg)
    ]
    weights.append(torch.randn(cfg.vocab_size, cfg.hidden_size, generator=g).to(dtype))

    def forward_s(rows: int) -> float:
        inputs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=g).to(dtype) for w in weights}
        runs = []
        for _ in range(repeats + 1):  # the first is a warm-up
            t = time.perf_counter()
            for w in weights:
                torch.mm(inputs[w.shape[1]], w.t())
            runs.append(time.perf_counter() - t)
        return statistics.median(runs[1:])

    decode_s, prefill_s = forward_s(batch), forward_s(prompt_tokens)
    return {"decode_step_s": decode_s, "prefill_s": prefill_s, "call_s": prefill_s + new_tokens * decode_s}


def floor_lines(floor: dict[str, float], peak: float, precision: str) -> list[str]:
    """Report lines for :func:`step_floor` measured against ``peak`` (same run, same precision)."""
    cap = floor["model_flops"] / floor["floor_s"] / peak
    return [
        f"- Measured floor (`--floor`, {floor['tokens']:.0f} tokens per step, {precision}): the step's matmuls at this"
        f" model's own shapes take {floor['matmul_s']:.3f} s, i.e. they run at {floor['matmul_rate'] / 1e9:.1f}"
        f" GFLOP/s = {100 * floor['matmul_rate'] / peak:.0f}% of the 2048 GEMM peak; the fused AdamW step + clip"
        f" takes {floor['optimizer_s']:.3f} s. A step cannot take less than {floor['floor_s']:.3f} s, so MFU"
        f" <= {100 * cap:.0f}% with nothing else (attention, norms, activations, loss) costing any time."
    ]


def emit_report(lines: list[str], args: Any, payload: dict) -> None:
    """Print a benchmark's report, write ``payload`` to ``--json`` if given, and append the report to ``--out``
    unless ``--no-write``."""
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))
    if not args.no_write:
        with open(args.out, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")


def rss_mib() -> float:
    """Current resident set size (MiB) from /proc/self/status (0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


RESULT_TAG = "BENCH_RESULT "


def run_worker(script: str, spec: dict, timeout: float, *, wait_quiet: float = 0) -> dict:
    """Run ``script --worker SPEC`` in a fresh process (after waiting up to ``wait_quiet`` s for a quiet
    machine) with the thread count pinned and every hub offline; return the JSON it printed after
    ``RESULT_TAG``."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if wait_quiet:
        load = wait_until_quiet(max_wait_s=wait_quiet)
        if load is not None and load >= 0.3:
            print(f"  (still {load:.2f} busy cores after waiting {wait_quiet:.0f} s; running anyway)", flush=True)
    threads = str(spec["threads"])
    repo = Path(script).resolve().parents[1]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=str(repo),
    )
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=repo,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG) and proc.returncode == 0:
            return json.loads(line[len(RESULT_TAG) :])
    raise SystemExit(f"benchmark worker {spec['side']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
