"""How a source's prompts become the text the model reads.

- a format string with `{prompt}` (the default `{prompt}` leaves it as it
  is); other braces are literal only when doubled: `\\boxed{{}}`;
- `chat`: the tokenizer's own chat template over the row's messages (or one
  user message), with the generation prompt, as an instruct model expects,
  and an optional system message.

Rendered prompts that, with the response budget, do not fit the model's
context are an error naming the set and the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from cropi.data.types import Prompt, row_label
from cropi.errors import InputError

CHAT = "chat"


def format_prompts(prompts: Sequence[Prompt], template: str, field: str) -> list[Prompt]:
    if template == "{prompt}":
        return list(prompts)
    try:
        return [replace(p, text=template.format(prompt=p.text)) for p in prompts]
    except (KeyError, IndexError, ValueError) as err:
        # Neither the template nor the name it uses is repeated (a pasted secret would be); the
        # parser's own ValueError text says what is malformed without quoting it.
        reason = "it names a field other than {prompt}" if isinstance(err, (KeyError, IndexError)) else str(err)
        raise InputError(
            f"{field}: not a valid format template ({reason}). It may use "
            "{prompt} and nothing else between single braces; write literal braces doubled, e.g. "
            "'... put the answer in \\\\boxed{{}}: {prompt}', or use template: chat") from None


def chat_prompts(prompts: Sequence[Prompt], tokenizer: Any, system_prompt: str | None, field: str) -> list[Prompt]:
    """Each prompt rendered by `tokenizer.apply_chat_template` with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(f"{field}: template is 'chat' but the model's tokenizer has no chat template "
                         "(use a format template such as '{prompt}')")
    # A tokenizer that adds BOS itself would get it twice from a template that writes it too.
    bos = tokenizer.bos_token if tokenizer.bos_token_id in tokenizer("")["input_ids"] else None
    out = []
    for p in prompts:
        messages = list(p.meta.get("chat") or [{"role": "user", "content": p.text}])
        if system_prompt is not None and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if bos and text.startswith(bos):
            text = text[len(bos):]
        out.append(replace(p, text=text))
    return out


def check_context(prompts: Sequence[Prompt], tokenizer: Any, max_positions: int, max_new_tokens: int,
                  set_name: str) -> None:
    """Every prompt plus `max_new_tokens` fits in `max_positions` tokens, or an error naming the first row."""
    budget = max_positions - max_new_tokens
    for p in prompts:
        n = len(tokenizer(p.text)["input_ids"])
        if n > budget:
            where = p.meta["where"] if "where" in p.meta else row_label(p)
            raise InputError(f"data set {set_name}, {where}: the prompt is {n} tokens; with rollout.max_new_tokens "
                             f"{max_new_tokens} it exceeds the model's context of {max_positions} tokens")
