"""The label mask, token by token: only assistant turns (with their end-of-turn) are supervised."""

import pytest
from transformers import AutoTokenizer

from finetune.data.tokenize import IGNORE, TEMPLATES, encode, setup_tokenizer

CONV = {"messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Capital of Peru?"},
                     {"role": "assistant", "content": "Lima"},
                     {"role": "user", "content": "And of Chile?"},
                     {"role": "assistant", "content": "Santiago"}]}


@pytest.fixture(params=["auto", "llama-3"])
def tok(request, smollm2_dir):
    t = AutoTokenizer.from_pretrained(smollm2_dir)
    if request.param == "llama-3":
        t.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        t.eos_token = "<|eot_id|>"
    setup_tokenizer(t, request.param)
    return t


def supervised_text(tok, enc):
    return tok.decode([i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE])


def test_every_assistant_turn_and_its_end_of_turn_is_supervised_and_nothing_else(tok):
    enc = encode(tok, CONV, 512)
    text = supervised_text(tok, enc)
    assert "Lima" in text and "Santiago" in text
    for prompt_part in ("Capital of Peru", "And of Chile", "You are terse", "user", "system"):
        assert prompt_part not in text
    assert text.count(tok.eos_token) == 2  # one end-of-turn per assistant turn
    # token by token: labels equal ids where supervised, -100 elsewhere, and supervised runs are exactly 2
    runs, prev = 0, False
    for i, l in zip(enc.input_ids, enc.labels):
        assert l in (IGNORE, i)
        cur = l != IGNORE
        runs += cur and not prev
        prev = cur
    assert runs == 2


def test_train_on_inputs_supervises_everything(tok):
    enc = encode(tok, CONV, 512, train_on_inputs=True)
    assert all(l != IGNORE for l in enc.labels)


def test_pad_is_distinct_from_eos(tok):
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_plain_text_rows_are_fully_supervised_with_eos(tok):
    enc = encode(tok, {"text": "Some words."}, 64)
    assert enc.input_ids[-1] == tok.eos_token_id and enc.labels == enc.input_ids


def test_templates_are_registered():
    assert {"chatml", "alpaca", "llama-3"} <= set(TEMPLATES)
