"""Real chat templates: the SFT loss covers exactly each assistant turn's content and its end-of-turn marker,
multi-turn included, for ChatML (SmolLM2), a Llama-3 style template and one that rewrites history (issue 11)."""

from __future__ import annotations

import json

import pytest

from posttrain.data.encode import CHATML, encode_row
from posttrain.data.prepare import prepare_examples
from posttrain.errors import DataError

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Qwen3-style: an assistant turn followed by a later user turn loses its <think>...</think> reasoning.
REWRITING = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user %}"
    "{{ m['content'].split('</think>')[-1] | trim }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+3?"},
    {"role": "assistant", "content": "<think>2 and 3</think>5"},
    {"role": "user", "content": "and 4+4?"},
    {"role": "assistant", "content": "<think>4 twice</think>8"},
]


def trained_runs(tokenizer, example) -> list[str]:
    """The trained tokens as text, one string per contiguous run."""
    runs, current = [], []
    for token, trained in zip(example.input_ids, example.loss_mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def shown(tokenizer, example) -> str:
    return "".join(
        ("«" if m else "") + tokenizer.decode([t]) + ("»" if m else "")
        for t, m in zip(example.input_ids, example.loss_mask)
    )


@pytest.mark.parametrize(
    "template, expected",
    [
        (CHATML, ["<think>2 and 3</think>5<|im_end|>", "<think>4 twice</think>8<|im_end|>"]),
        (LLAMA3, ["<think>2 and 3</think>5<|eot_id|>", "<think>4 twice</think>8<|eot_id|>"]),
        (REWRITING, ["5<|im_end|>", "<think>4 twice</think>8<|im_end|>"]),
    ],
    ids=["chatml", "llama3", "rewrites-history"],
)
def test_the_loss_covers_each_assistant_turn_and_its_end_of_turn(tokenizer, template, expected):
    tokenizer.chat_template = template
    try:
        example = encode_row({"messages": CONVERSATION}, tokenizer)
        assert trained_runs(tokenizer, example) == expected, shown(tokenizer, example)
    finally:
        tokenizer.chat_template = None
        from posttrain.models.tiny import build_tokenizer

        tokenizer.chat_template = build_tokenizer().chat_template


def test_a_row_whose_mask_is_empty_is_an_error_naming_it(tmp_path):
    from posttrain.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATION[1:3]}) + "\n")
    with pytest.raises(DataError, match=r"rows.jsonl:1: field 'messages': no assistant token to train on"):
        prepare_examples(str(data), tok, kind="sft", max_length=256, length_policy="truncate", completion_only=True)


def test_chat_template_file_replaces_the_models_and_is_saved(tmp_path):
    from transformers import AutoTokenizer

    from posttrain.config import SFTConfig, build_config
    from posttrain.train.sft import run_sft

    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION[1:3]}) + "\n" for _ in range(4)))
    cfg = {"out": str(tmp_path / "run"), "data": str(data), "max_steps": 1, "batch_size": 2, "progress": False}
    run_sft(build_config(SFTConfig, {**cfg, "chat_template": str(template)}, path="sft"))
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").chat_template == CHATML
