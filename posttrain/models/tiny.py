"""The embedded default model: a tiny Llama with a character-level tokenizer.

Everything here is a real ``transformers`` object, so the tiny model takes exactly the code paths a user's
Llama or Qwen takes. Nothing is downloaded.

    >>> from posttrain.models.tiny import build_tokenizer, build_model
    >>> tok = build_tokenizer()
    >>> tok.decode(tok("7+5=12")["input_ids"])
    '7+5=12'
    >>> build_model(tok, seed=0).config.hidden_size
    128
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = ["\n"] + [chr(i) for i in range(32, 127)]

# One turn is <|role|>content</s>; the assistant's turn ends with </s> (the EOS token), so a model trained on
# rendered conversations learns to stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

TINY_SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
SMALL_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII + newline + specials) with a chat template.

    A BPE model with no merges is a character tokenizer that ``tokenizers`` saves and loads natively.
    """
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast, *, size: str = "tiny", seed: int = 0, max_positions: int = 512
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` of the named size ("tiny" ~0.8 M or "small" ~25 M params)."""
    shapes = {"tiny": TINY_SHAPE, "small": SMALL_SHAPE}
    if size not in shapes:
        raise ValueError(f"unknown tiny-model size {size!r}; choose one of {sorted(shapes)}")
    shape = shapes[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
        **shape,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
