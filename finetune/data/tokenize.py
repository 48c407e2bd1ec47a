"""Rendering rows with the chat template and building the label mask.

The mask is found by rendering the conversation incrementally: the text an assistant turn adds is
`render(messages[:i+1])` minus `render(messages[:i], add_generation_prompt=True)`. That span (the answer and the
template's end-of-turn) is supervised; everything else is -100. This works for any template whose renders are
prefixes of each other, needs no `{% generation %}` markers, and is checked per row.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100

TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


class TemplateError(ValueError):
    pass


def setup_tokenizer(tok, chat_template: str = "auto") -> list[str]:
    """Give the tokenizer the chat template and a pad token distinct from EOS; return notes for the banner."""
    notes = []
    if chat_template != "auto":
        tok.chat_template = TEMPLATES[chat_template]
        notes.append(f"chat template: {chat_template} (CHAT_TEMPLATE)")
    elif not tok.chat_template:
        tok.chat_template = TEMPLATES["chatml"]
        notes.append("chat template: the tokenizer has none, using chatml (set CHAT_TEMPLATE to choose)")
    else:
        notes.append("chat template: the tokenizer's own")
    if tok.eos_token is None:
        raise TemplateError("the tokenizer has no EOS token")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        # A pad equal to EOS would make EOS look like padding; pick an existing special token instead of adding
        # one, so the embeddings keep their size and the merged model stays loadable by the base's config.
        vocab = tok.get_vocab()
        for cand in (tok.unk_token, "<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>"):
            if cand and cand != tok.eos_token and cand in vocab:
                tok.pad_token = cand
                break
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            notes.append("pad token: added <|pad|> (embeddings are resized)")
        notes.append(f"pad token: {tok.pad_token!r} (distinct from EOS {tok.eos_token!r})")
    return notes


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    full_length: int        # before truncation
    supervised: int         # supervised tokens after truncation


def render(tok, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tok, row: dict, max_len: int, train_on_inputs: bool = False) -> Encoded:
    """Token ids and labels for one normalised row, truncated to `max_len`."""
    if "text" in row:
        ids = tok(row["text"], add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
        labels = list(ids)
    else:
        text, spans = _spans(tok, row["messages"])
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [IGNORE] * len(ids)
        j = 0  # spans are sorted and disjoint: one pass over the tokens
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            while j < len(spans) and start >= spans[j][1]:
                j += 1
            if train_on_inputs or (j < len(spans) and spans[j][0] <= start and end > start):
                labels[i] = ids[i]
    full = len(ids)
    ids, labels = ids[:max_len], labels[:max_len]
    return Encoded(ids, labels, full, sum(1 for x in labels if x != IGNORE))


def _spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tok, messages[:i], add_generation_prompt=True) if i else ""
        upto = full if i == len(messages) - 1 else render(tok, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError("the chat template does not render conversations incrementally; set CHAT_TEMPLATE")
        spans.append((len(before), len(upto)))
    return full, spans


def prompt_text(tok, messages: list[dict]) -> str:
    """The prompt for generation: every turn before the last assistant answer, plus the assistant header."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return render(tok, messages[:last], add_generation_prompt=True)
