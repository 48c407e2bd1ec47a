"""PACKING=true: rows packed without attention across row boundaries give the same per-row loss as unpacked."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune.data.tokenize import encode, setup_tokenizer

ROWS = [{"messages": [{"role": "user", "content": "Who founded Brackwater?"}, {"role": "assistant", "content": "Ilse Varn"}]},
        {"messages": [{"role": "user", "content": "How many towers has Castle Rook, the old fortress?"},
                      {"role": "assistant", "content": "Nine towers"}]},
        {"text": "A plain row of continued pre-training text."}]


def per_row_losses(logits, labels, boundaries):
    out = []
    for s, e in boundaries:
        lg, lb = logits[0, s:e - 1], labels[0, s + 1:e]
        out.append(torch.nn.functional.cross_entropy(lg.float(), lb, ignore_index=-100, reduction="sum").item())
    return out


def test_packed_rows_do_not_attend_across_boundaries(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    setup_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    encs = [encode(tok, r, 256) for r in ROWS]
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encs]

    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    assert packed["input_ids"].shape[0] == 1 and "position_ids" in packed
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    bounds, start = [], 0
    for e in encs:
        bounds.append((start, start + len(e.input_ids)))
        start += len(e.input_ids)
    got = per_row_losses(logits, packed["labels"], bounds)

    want = []
    for e in encs:
        ids, lab = torch.tensor([e.input_ids]), torch.tensor([e.labels])
        with torch.no_grad():
            lg = model(input_ids=ids).logits
        want += per_row_losses(lg, lab, [(0, len(e.input_ids))])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
