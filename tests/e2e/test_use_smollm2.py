"""The trained model in use, through run.sh on the real SmolLM2: generate, chat in a pseudo-terminal, serve to the
openai client, and the merged folder in transformers 4 (its own environment) answering as in transformers 5."""

import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import ROOT, env_for, read_jsonl, run_sh, start_run_sh, transformers4_python

MODEL = "SmolLM2-135M-Instruct"
QUESTIONS = [q for q, _ in ((r["input"], r["output"]) for r in qa_rows(8))]


@pytest.fixture(scope="session")
def trained(smollm2_run):
    """The shared short QLoRA run of the bundled model (tests/e2e/conftest.py): (tmp, env, run folder)."""
    r = smollm2_run.result
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return smollm2_run.tmp, smollm2_run.env, smollm2_run.dir


def greedy(folder, conversations, max_new_tokens):
    """The reference: transformers 5 in this process, one conversation at a time, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for msgs in conversations:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            g = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


def user(*texts):
    return [{"role": "user", "content": t} for t in texts]


# ---- JOB=generate --------------------------------------------------------------------------------------------------
def test_generate_answers_a_prompts_file_batched_into_the_run_folder(trained, tmp_path):
    tmp, env, run = trained
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"question": q} for q in QUESTIONS[:5]])
    r = run_sh(tmp, "generate", **env, PROMPTS_PATH=prompts, GEN_PRESET="greedy", MAX_NEW_TOKENS=20)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = read_jsonl(run / "answers.jsonl")
    assert [x["prompt"] for x in rows] == QUESTIONS[:5]
    assert all(set(x) == {"prompt", "answer", "tokens", "seconds", "stopped"} for x in rows)
    assert all(0 < x["tokens"] <= 20 and x["seconds"] > 0 for x in rows)
    # Five prompts of different lengths in one left-padded batch answer as each does alone.
    assert [x["answer"] for x in rows] == greedy(run / "qlora_merged", [user(q) for q in QUESTIONS[:5]], 20)
    assert "merged model" in r.stdout and "greedy" in r.stdout
    assert json.loads((run / "run.json").read_text())["stages"]["generate"]["status"] == "ok"


def test_generate_before_a_merge_uses_the_adapter_on_its_base(trained, tmp_path):
    tmp, env, run = trained
    unmerged = tmp_path / "final_model" / MODEL / "3"
    shutil.copytree(run, unmerged, ignore=shutil.ignore_patterns("qlora_merged", "answers.jsonl"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(QUESTIONS[:3]) + "\n")
    r = run_sh(tmp_path, "generate", **env, PROMPTS_PATH=prompts, GEN_PRESET="greedy", MAX_NEW_TOKENS=16)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "not merged yet" in r.stdout
    # The merge's parity gate promises the merged model answers as the adapter on its base: so must generate.
    got = [x["answer"] for x in read_jsonl(unmerged / "answers.jsonl")]
    assert got == greedy(run / "qlora_merged", [user(q) for q in QUESTIONS[:3]], 16)


def test_generate_without_a_run_or_prompts_says_what_to_do(trained, tmp_path):
    _, env, _ = trained
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello?\n")
    # Each fails before it would touch a run; none runs in the shared one.
    for where, extra, says in ((tmp_path, {"PROMPTS_PATH": tmp_path / "missing.jsonl"}, "missing.jsonl: no such file"),
                               (tmp_path, {"PROMPTS_PATH": prompts}, "no trained run of"),
                               (tmp_path, {}, "JOB=generate needs PROMPTS_PATH")):
        r = run_sh(where, "generate", **env, **extra)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]


# ---- JOB=chat ------------------------------------------------------------------------------------------------------
class Terminal:
    """run.sh in a pseudo-terminal, as a person types into it."""

    def __init__(self, tmp, **env):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([str(ROOT / "run.sh"), "chat"], cwd=ROOT, env=env_for(tmp, **env), stdin=slave,
                                     stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        self.screen = ""
        self.reads: list[tuple[float, str]] = []

    def read_until(self, text: str, start: int = 0, timeout: float = 300) -> str:
        deadline = time.time() + timeout
        while text not in self.screen[start:]:
            assert time.time() < deadline, f"no {text!r} within {timeout}s; screen:\n{self.screen[-3000:]}"
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                try:
                    chunk = os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    assert False, f"chat ended before {text!r}; screen:\n{self.screen[-3000:]}"
                self.reads.append((time.time(), chunk))
                self.screen += chunk
        return self.screen[start:]

    def say(self, line: str) -> str:
        """Type a line; return what the model printed for it (up to the next prompt)."""
        start = len(self.screen)
        os.write(self.master, (line + "\n").encode())
        shown = self.read_until("you> ", start + len(line))
        if "model> " not in shown:
            return shown
        return shown.split("model> ", 1)[1].rsplit("you> ", 1)[0].replace("\r", "").strip()

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        os.close(self.master)


def test_chat_in_a_terminal_streams_remembers_the_conversation_and_resets(trained):
    tmp, env, run = trained
    first, second = "Who founded Brackwater?", "Say that again, in one word."
    expect_first, expect_second = greedy(run / "qlora_merged", [user(first)], 24)[0], None
    history = user(first) + [{"role": "assistant", "content": expect_first}] + user(second)
    expect_second, alone = greedy(run / "qlora_merged", [history, user(second)], 24)
    assert expect_second != alone  # else this test could not tell memory from none

    term = Terminal(tmp, **env, GEN_PRESET="greedy", MAX_NEW_TOKENS=24)
    try:
        term.read_until("you> ")
        assert "/reset" in term.screen and "/exit" in term.screen
        t0 = len(term.reads)
        assert term.say(first) == expect_first
        after = "".join(c for _, c in term.reads[t0:]).split("model> ", 1)[1]
        start = next(i for i in range(t0, len(term.reads)) if "model> " in "".join(c for _, c in term.reads[t0:i + 1]))
        # The answer's text in each read: after "model> " in the first, before the next "you> " in the last (a busy
        # machine can hand the tail of the answer and the next prompt over in one read).
        pieces = ["".join(c for _, c in term.reads[t0:start + 1]).split("model> ", 1)[1]]
        pieces += [c for _, c in term.reads[start + 1:]]
        answer_reads = []
        for c in pieces:
            answer_reads.append(c.split("you> ", 1)[0])
            if "you> " in c:
                break
        answer_reads = [c for c in answer_reads if c.strip()]
        assert after.replace("\r", "").strip().startswith(expect_first)
        assert len(answer_reads) > 1, "the answer arrived in one piece: not streamed"
        assert term.say(second) == expect_second       # the model saw the first exchange
        assert "new conversation" in term.say("/reset")
        assert term.say(second) == alone              # ... and after /reset it does not
        os.write(term.master, b"/exit\n")
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()


def test_chat_system_prompt_reaches_the_model(trained):
    tmp, env, run = trained
    system = "You are Captain Hook, a pirate."
    conv = [{"role": "system", "content": system}] + user("Who are you?")
    expect, without = greedy(run / "qlora_merged", [conv, user("Who are you?")], 16)
    assert expect != without
    term = Terminal(tmp, **env, GEN_PRESET="greedy", MAX_NEW_TOKENS=16, SYSTEM_PROMPT=system)
    try:
        term.read_until("you> ")
        assert term.say("Who are you?") == expect
        os.write(term.master, b"\x04")  # Ctrl-D leaves as /exit does
        assert term.proc.wait(timeout=60) == 0
    finally:
        term.close()


# ---- JOB=serve -----------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_the_openai_client_and_stops_cleanly_on_sigterm(trained):
    import httpx
    from openai import OpenAI

    tmp, env, run = trained
    port = free_port()
    proc = start_run_sh(tmp, "serve", **env, SERVE_PORT=port)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(1)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        question = QUESTIONS[1]
        reply = client.chat.completions.create(model="qlora_merged", messages=user(question), max_tokens=16,
                                               temperature=0)
        assert reply.choices[0].message.content.strip() == greedy(run / "qlora_merged", [user(question)], 16)[0]
        stream = client.chat.completions.create(model="qlora_merged", messages=user(question), max_tokens=16,
                                                temperature=0, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in pieces if p]) > 1 and "".join(pieces).strip() == reply.choices[0].message.content.strip()
        # A request's temperature samples (the served defaults carry GEN_PRESET's do_sample): seeds give other stories.
        stories = {client.chat.completions.create(model="qlora_merged", messages=user("Tell me a story."),
                                                  max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content
                   for seed in range(4)}
        assert len(stories) > 1
    finally:
        proc.send_signal(signal.SIGTERM)  # run.sh exec'd python, which forwards it to the server
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "Application shutdown complete" in out and "[serve] stopped" in out
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


# ---- artefacts that load right elsewhere ---------------------------------------------------------------------------
PROBE = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, questions = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).float().eval()
out = {"version": transformers.__version__, "rope_theta": getattr(model.config, "rope_theta", None)
       or model.config.rope_parameters["rope_theta"], "eos": tok.eos_token, "pad": tok.pad_token, "answers": [],
       "ids": [], "logits": []}
for q in questions:
    ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out["logits"].append(model(**ids).logits[0, -1].tolist())
        g = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
    out["ids"].append(ids["input_ids"][0].tolist())
    out["answers"].append(tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
print("PROBE" + json.dumps(out))
"""


def probe(python, folder, questions):
    r = subprocess.run([str(python), "-c", PROBE, str(folder), json.dumps(questions)], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("PROBE", 1)[1])


@pytest.mark.transformers4
def test_merged_model_answers_identically_in_transformers_4_and_5(trained):
    import sys

    _, _, run = trained
    questions = QUESTIONS[:4] + ["1847년에 무슨 일이 있었나요?"]
    new = probe(sys.executable, run / "qlora_merged", questions)
    old = probe(transformers4_python(), run / "qlora_merged", questions)
    assert new["version"].startswith("5.") and old["version"].startswith("4.")
    assert old["rope_theta"] == new["rope_theta"] == 100000.0
    assert (old["eos"], old["pad"]) == (new["eos"], new["pad"])
    assert old["ids"] == new["ids"]            # same tokenizer and chat template
    assert old["answers"] == new["answers"]
    # float32 rounding of two library versions' kernels, relative to the logits' scale (a misread RoPE base moves
    # them by whole units)
    worst = max(abs(a - b) for la, lb in zip(old["logits"], new["logits"]) for a, b in zip(la, lb))
    scale = max(abs(a) for la in new["logits"] for a in la)
    assert worst < 1e-4 * scale, (worst, scale)


def test_adapter_names_its_base_by_its_hub_id_and_our_stages_still_find_the_local_one(trained):
    _, _, run = trained
    acfg = json.loads((run / "qlora_adapters/adapter_config.json").read_text())
    assert acfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # The run that wrote it merged (through the parity gate) and evaluated from that adapter afterwards.
    stages = json.loads((run / "run.json").read_text())["stages"]
    assert stages["merge"]["status"] == stages["evaluate"]["status"] == "ok"
    tok_cfg = json.loads((run / "qlora_merged/tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
