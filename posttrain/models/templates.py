"""Chat templates: a user's Jinja file in place of a model's own (``--chat-template FILE``).

>>> import tempfile
>>> from posttrain.models.tiny import build_tokenizer
>>> path = Path(tempfile.mkdtemp()) / "t.jinja"
>>> _ = path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\\n{% endfor %}")
>>> tok = use_chat_template(build_tokenizer(), str(path), key="sft.chat_template")
>>> tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
'[user] hi\\n'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError


def use_chat_template(tokenizer: Any, path: str, *, key: str) -> Any:
    """``tokenizer`` with the template read from ``path`` (empty: unchanged); the template is checked by rendering
    a two-turn conversation, so a broken file fails here, naming the key, not in the middle of a run."""
    if not path:
        return tokenizer
    from jinja2 import TemplateError

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: cannot read {path} ({getattr(err, 'strerror', None) or err})") from None
    tokenizer.chat_template = text
    probe = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    try:
        tokenizer.apply_chat_template(probe, tokenize=False)
    except (TemplateError, TypeError, ValueError) as err:
        raise ConfigError(f"{key}: {path} is not a working chat template ({err})") from None
    return tokenizer
