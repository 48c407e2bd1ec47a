"""Each exported GGUF, run by llama.cpp itself, against the merged Hugging Face model it came from.

Both answer the same questions greedily from the same prompt token ids (the tokenizer's chat template, tokenised by
the HF tokenizer; llama.cpp's own tokenisation of those prompts is compared separately). Per file:

    agreement       answers identical to the merged model's, token for token (EOS included)
    contains        answers containing the reference answer (evaluate's contains match), beside the merged model's
    eos             answers that ended with EOS, beside the merged model's (a GGUF must stop where the model stops)
    flip_nats       where an answer first departs from the merged model's: how strongly the merged model preferred its
                    own token over llama.cpp's, as a log-probability difference (0 when they never depart)
    logprob_diff    the largest |log p| difference of a chosen token along the shared part of the answers

The f16 file must compute what the merged model computes. f16 rounds each weight (and llama.cpp's CPU matmul each
activation) to 11 significant bits; on the bundled model that moves the chosen tokens' log-probabilities by at most
0.011 nats (docs/QUALITY.md), and it can flip a greedy choice only where the merged model itself nearly tied. The
export fails when, for f16, a chosen token's log-probability differs from the merged model's by more than
F16_MAX_LOGPROB_DIFF = 0.1 nats (9 times the measured rounding effect), or an answer departs at a token the merged
model preferred by more than F16_MAX_FLIP_NATS = 0.5 nats. Both catch a file that computes a different function: the
RoPE base of issue 19 read as 10000 instead of 100000 moves them by 0.30 nats on the same three questions, although
it flips no confident token there. A share of identical answers cannot be the bound: on a barely trained model many
answers hang on near-ties and even correct files depart (the bundled model's "capital of France" answer starts with
"The" or "L'" 0.08 nats apart, so q8_0 departs there; issue 19: q8_0 kept 2 of 10 answers of such a model, and
llama.cpp's own quantiser did the same). Any file whose prompts tokenise differently, or that never stops at EOS
where the merged model does, fails. A quantised file that loses reference answers the merged model had is a warning
with the numbers: a smaller file losing some answers is a trade-off the user makes, not a broken export.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from finetune.errors import PipelineError

F16_MAX_LOGPROB_DIFF = 0.1
F16_MAX_FLIP_NATS = 0.5
N_PROBS = 10  # llama.cpp's top log-probabilities kept per step
BUILTIN_QUESTIONS = [  # used only when the run has no eval split and no retention probes
    {"id": "builtin-1", "messages": [{"role": "user", "content": "What is the capital of France?"}], "answers": ["Paris"]},
    {"id": "builtin-2", "messages": [{"role": "user", "content": "How many days are in a week?"}], "answers": ["7", "seven"]},
    {"id": "builtin-3", "messages": [{"role": "user", "content": "What colour is the sky on a clear day?"}], "answers": ["blue"]},
]


def reference(merged: Path, questions: list[dict], max_new_tokens: int, device: str = "cpu") -> dict:
    """The merged model's greedy answers in float32: prompt ids, answer ids (EOS included when it stopped) and the
    log-probabilities over the vocabulary at every step."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).to(device).eval()
    eos = tok.eos_token_id
    out = {"prompts": [], "texts": [], "answers": [], "logprobs": [], "eos_id": eos}
    for q in questions:
        text = tok.apply_chat_template(q["messages"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            g = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), device=device,
                               dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos,
                               output_logits=True, return_dict_in_generate=True)
        answer = g.sequences[0, len(ids):].tolist()
        if eos in answer:
            answer = answer[:answer.index(eos) + 1]
        out["prompts"].append(ids)
        out["texts"].append(text)
        out["answers"].append(answer)
        out["logprobs"].append([torch.log_softmax(s[0].float(), -1).cpu() for s in g.logits[:len(answer)]])
    del model
    out["tokenizer"] = tok
    return out


def compare_file(server, ref: dict, questions: list[dict], max_new_tokens: int) -> dict:
    """One GGUF (served by llama.cpp) against the reference; the numbers, not yet a verdict."""
    from finetune.evaluate import contains_match

    tok, eos = ref["tokenizer"], ref["eos_id"]
    t0 = time.time()
    mismatched = [q["id"] for q, text, ids in zip(questions, ref["texts"], ref["prompts"]) if server.tokenize(text) != ids]
    rows = []
    for q, ids, want, lps in zip(questions, ref["prompts"], ref["answers"], ref["logprobs"]):
        r = server.greedy(ids, max_new_tokens, N_PROBS)
        got = list(r.get("tokens", []))
        stopped = r.get("stop_type") == "eos"
        if stopped and (not got or got[-1] != eos):
            got = got + [eos]  # the server reports why it stopped rather than the EOS token itself
        probs = r.get("completion_probabilities") or []
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        if k is None and len(want) != len(got):
            k = min(len(want), len(got))
        flip = 0.0
        if k is not None and k < len(want) and k < len(got):
            flip = float(lps[k][want[k]] - lps[k][got[k]])
        diff = 0.0
        for i, step in enumerate(probs[:len(got) if k is None else k + 1]):
            if i >= len(lps) or step.get("id") is None:
                break
            tops = {p["id"]: p["logprob"] for p in step.get("top_logprobs", [])}
            t = step["id"]
            if t in tops and math.isfinite(tops[t]):
                diff = max(diff, abs(float(lps[i][t]) - tops[t]))
        text_hf = tok.decode(want, skip_special_tokens=True).strip()
        text = tok.decode(got, skip_special_tokens=True).strip()
        rows.append({"id": q["id"], "agree": k is None, "flip_nats": round(flip, 4), "logprob_diff": diff,
                     "eos": stopped, "eos_hf": bool(want) and want[-1] == eos,
                     "contains": contains_match(text, q["answers"]), "contains_hf": contains_match(text_hf, q["answers"]),
                     "question": q["messages"][-1]["content"][:120], "answer": text[:160], "answer_hf": text_hf[:160]})
    n = len(rows)
    return {
        "questions": n, "agree": sum(r["agree"] for r in rows), "agreement": round(sum(r["agree"] for r in rows) / n, 4),
        "contains": sum(r["contains"] for r in rows), "contains_hf": sum(r["contains_hf"] for r in rows),
        "eos": sum(r["eos"] for r in rows), "eos_hf": sum(r["eos_hf"] for r in rows),
        "max_flip_nats": round(max(r["flip_nats"] for r in rows), 4),
        "max_logprob_diff": round(max(r["logprob_diff"] for r in rows), 5),
        "prompt_tokenisation_differs": mismatched,
        "lost": [{"question": r["question"], "merged": r["answer_hf"], "gguf": r["answer"]}
                 for r in rows if r["contains_hf"] and not r["contains"]],
        "departures": [{"question": r["question"], "merged": r["answer_hf"], "gguf": r["answer"], "flip_nats": r["flip_nats"]}
                       for r in rows if not r["agree"]][:5],
        "seconds": round(time.time() - t0, 1),
    }


def verdict(fmt: str, r: dict) -> tuple[str, str]:
    """("ok" | "warn" | "fail", why) for one file's numbers."""
    if r["prompt_tokenisation_differs"]:
        return "fail", (f"llama.cpp tokenises {len(r['prompt_tokenisation_differs'])} of {r['questions']} prompts "
                        "differently from the merged model's tokenizer")
    if r["eos_hf"] and not r["eos"]:
        return "fail", f"never stops at EOS (the merged model stopped in {r['eos_hf']} of {r['questions']} answers)"
    if fmt == "f16" and r["max_logprob_diff"] > F16_MAX_LOGPROB_DIFF:
        return "fail", (f"log-probabilities of its chosen tokens differ from the merged model's by up to "
                        f"{r['max_logprob_diff']:.3f} nats (f16 rounding: about 0.01; bound {F16_MAX_LOGPROB_DIFF}); "
                        f"{r['agree']}/{r['questions']} answers identical")
    if fmt == "f16" and r["max_flip_nats"] > F16_MAX_FLIP_NATS:
        return "fail", (f"departs from the merged model's greedy answer at a token it preferred by "
                        f"{r['max_flip_nats']:.2f} nats (f16 rounding can flip only near-ties: bound "
                        f"{F16_MAX_FLIP_NATS} nats); {r['agree']}/{r['questions']} answers identical")
    if r["contains"] < r["contains_hf"]:
        return "warn", (f"keeps {r['contains']} of the {r['contains_hf']} reference answers the merged model gives "
                        f"({r['agree']}/{r['questions']} answers identical)")
    return "ok", f"{r['agree']}/{r['questions']} answers identical, {r['contains']}/{r['questions']} contain the reference"


def check(files: dict[str, Path], merged: Path, questions: list[dict], source: str, max_new_tokens: int, tools,
          scratch: Path, device: str = "cpu", log=print) -> dict:
    """Run every file in llama.cpp against the merged model; raise PipelineError when a file fails, log warnings."""
    from finetune.llamacpp import Server

    t0 = time.time()
    ref = reference(merged, questions, max_new_tokens, device)
    log(f"[export] llama.cpp check: {len(questions)} {source} questions, greedy, {max_new_tokens} new tokens; merged "
        f"model (float32) answered in {time.time() - t0:.0f} s")
    results, failures = {}, []
    for fmt, path in files.items():
        with Server(tools, path, scratch / f"llama-server-{fmt}.log") as server:
            r = compare_file(server, ref, questions, max_new_tokens)
        r["verdict"], r["why"] = verdict(fmt, r)
        results[fmt] = r
        log(f"[export] {fmt} in llama.cpp: {r['agree']}/{r['questions']} answers identical to the merged model, "
            f"contains {r['contains']}/{r['questions']} (merged {r['contains_hf']}), EOS {r['eos']}/{r['questions']} "
            f"(merged {r['eos_hf']}), largest flip {r['max_flip_nats']:.2f} nats, log-prob diff "
            f"{r['max_logprob_diff']:.3f} ({r['seconds']:.0f} s)")
        if r["verdict"] == "warn":
            log(f"[export] warning: {path.name} {r['why']}; lost: " +
                "; ".join(f"{x['question']!r}: {x['gguf'][:60]!r} (merged: {x['merged'][:60]!r})" for x in r["lost"][:3]))
        elif r["verdict"] == "fail":
            failures.append(f"{path.name} {r['why']}")
    if failures:
        raise PipelineError("GGUF check in llama.cpp failed: " + "; ".join(failures))
    return {"questions": len(questions), "source": source, "max_new_tokens": max_new_tokens,
            "f16_max_logprob_diff": F16_MAX_LOGPROB_DIFF, "f16_max_flip_nats": F16_MAX_FLIP_NATS, "files": results}
