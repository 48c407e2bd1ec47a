"""Issue 22: several GPUs and two nodes, measured in one call; results in OUT/scaling.json (rewritten after every arm).

Parts (--parts, in this order):
  scale    tokens/s of ZeRO-2 LoRA, ZeRO-2 QLoRA and ZeRO-3 QLoRA on 1, 2, 4, 8 processes with the same per-process
           plan (BATCH_SIZE = micro x N, GRAD_ACCUM=1), and the efficiency against N x one process
  loss     the same effective batch (--loss-batch) on 1 and on the most processes, --loss-steps steps: max relative
           loss difference (target: within 2 %)
  sigterm  SIGTERM to run.sh during a run on the most processes -> exit 75, one sealed checkpoint ->
           JOB=resume_training on as many: the resumed steps against the uninterrupted `loss` run
  nodes    two "nodes" of half the processes each on this host (two run.sh, NNODES=2, NODE_RANK 0 and 1,
           MASTER_ADDR=127.0.0.1): train, SIGTERM to node 0's run.sh alone -> both exit 75 -> both resume; the
           curve against the one-node `loss` run

The scale and loss arms launch the train stage as run.sh does (`torchrun --nproc_per_node N ... train.py`, after
prepare_data.py); sigterm and nodes go through run.sh itself. One process is the plain one-GPU path (no DeepSpeed).

    bench/scaling.sh $OUT                                  # on nvidia-h200-x8 (see docs/BENCHMARKS.md)
    python bench/scaling.py --cpu --out /tmp/scaling_cpu   # the same driver on CPU: tiny Llama, gloo, 1 and 2 processes
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the of and to in a is that for it as with was on be by this are from at".split()
KINDS = {  # name -> environment
    "zero2_lora": dict(USE_QLORA="false"),
    "zero2_qlora": dict(USE_QLORA="true"),
    "zero3_qlora": dict(USE_QLORA="true", DEEPSPEED_CONFIG="configs/deepspeed/zero3.json"),
}


class Bench:
    def __init__(self, a):
        self.a, self.out, self.t0 = a, Path(a.out), time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work)
        self.res = {"args": vars(a), "arms": {}, "skipped": [], "summary": {}}
        self.port = 29500 + random.Random().randrange(300)
        self.qlora = "false" if a.cpu else "true"  # bitsandbytes' 4-bit needs a GPU
        self.data = self.work / "data.jsonl"
        self.work.mkdir(parents=True, exist_ok=True)
        r = random.Random(0)
        with open(self.data, "w") as f:  # every row longer than MAX_SEQ_LENGTH: a step is batch x seq tokens
            for i in range(a.rows):  # question/answer rows, so that the run's evaluate stage has questions
                f.write(json.dumps({"question": f"What does passage {i} say?",
                                    "answer": " ".join(r.choice(WORDS) for _ in range(a.seq + 50))}) + "\n")

    # ---- environment and launching ---------------------------------------------------------------------------
    def env(self, name: str, **kw) -> dict:
        e = {k: v for k, v in os.environ.items()}
        e.update(RAPA_NO_VENV="1", PYTHON=sys.executable, BASE_MODEL_NAME=self.a.model, DATA_PATH=str(self.data),
                 DATA_FORMAT="qa", MAX_SEQ_LENGTH=str(self.a.seq), REPLAY_FRACTION="0", RETENTION_SET="none",
                 REPORT_TO="none", LORA_DROPOUT="0", WARMUP_RATIO="0", SAVE_STEPS="1000", GRAD_ACCUM="1",
                 BASE_SAVE_PATH=str(self.work / name / "out"), CHECKPOINT_PATH=str(self.work / name / "ckpt"),
                 EVAL_MAX_QUESTIONS="2", EVAL_MAX_NEW_TOKENS="4", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                 ENV_FILE=str(self.work / "none.env"))
        if not self.a.cpu:
            e.update(BACKEND="hf", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
        e.update({k: str(v) for k, v in kw.items()})
        return e

    def next_port(self) -> int:
        self.port += 7
        return self.port

    def left(self) -> float:
        return self.a.deadline - (time.time() - self.t0)

    def metrics(self, name: str) -> list[dict]:
        found = glob.glob(str(self.work / name / "out" / "*" / "*" / "metrics.jsonl"))
        return [json.loads(l) for l in open(found[0])] if found else []

    def log(self, name: str) -> Path:
        return self.out / f"{name}.log"

    def train_stage(self, name: str, n: int, **env) -> int:
        """prepare_data.py, then the train stage as run.sh launches it; returns the exit code."""
        e = self.env(name, **env)
        with open(self.log(name), "w") as lf:
            subprocess.run([sys.executable, "prepare_data.py"], cwd=ROOT, env=e, stdout=lf, stderr=subprocess.STDOUT)
            cmd = [sys.executable, "train.py"] if n == 1 else [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                str(self.next_port()), "train.py"]
            try:
                return subprocess.run(cmd, cwd=ROOT, env=e, stdout=lf, stderr=subprocess.STDOUT,
                                      timeout=max(30, self.left())).returncode
            except subprocess.TimeoutExpired:
                return 124

    def run_sh(self, name: str, node_envs: list[dict], kill_at: int = 0) -> list[int]:
        """run.sh once per node (each with its env); SIGTERM to node 0's run.sh once `kill_at` steps are logged."""
        procs = []
        for i, extra in enumerate(node_envs):
            lf = open(self.out / f"{name}_node{i}.log", "a")
            procs.append(subprocess.Popen([str(ROOT / "run.sh")], cwd=ROOT, env=self.env(name.split("-")[0], **extra),
                                          stdout=lf, stderr=subprocess.STDOUT))
        if kill_at:
            while procs[0].poll() is None and sum("loss" in m for m in self.metrics(name.split("-")[0])) < kill_at:
                time.sleep(0.2)
            procs[0].send_signal(signal.SIGTERM)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(30, self.left())))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(124)
        return codes

    def record(self, name: str, **kw) -> None:
        self.res["arms"][name] = kw
        (self.out / "scaling.json").write_text(json.dumps(self.res, indent=1))
        print(f"[scaling] {name}: {json.dumps({k: v for k, v in kw.items() if k != 'losses'})}", flush=True)

    def banner(self, name: str) -> str:
        for p in [self.log(name), *sorted(self.out.glob(f"{name}*_node0.log"))]:
            if p.is_file():
                for line in open(p, errors="replace"):
                    if "effective batch" in line:
                        return line.strip()[:200]
        return ""

    def tok_s(self, name: str, batch: int) -> float | None:
        c = [m for m in self.metrics(name) if "loss" in m]
        skip = self.a.skip
        if len(c) <= skip + 1:
            return None
        dt, steps = c[-1]["time"] - c[skip - 1]["time"], c[-1]["step"] - c[skip - 1]["step"]
        return round(steps * batch * self.a.seq / dt, 1)

    def losses(self, name: str) -> dict[int, float]:
        return {m["step"]: m["loss"] for m in self.metrics(name) if "loss" in m}

    # ---- parts -------------------------------------------------------------------------------------------------
    def scale(self) -> None:
        for kind in self.a.kinds:
            one = None
            for n in self.a.procs:
                name = f"scale_{kind}_{n}"
                if self.left() < self.a.arm_budget:
                    self.res["skipped"].append(name)
                    continue
                batch = self.a.micro * n
                rc = self.train_stage(name, n, MAX_STEPS=self.a.steps, BATCH_SIZE=batch, **KINDS[kind])
                ts = self.tok_s(name, batch)
                one = ts if n == 1 else one
                eff = round(ts / (n * one), 3) if ts and one else None
                self.record(name, rc=rc, procs=n, batch=batch, tok_s=ts, efficiency=eff, banner=self.banner(name))
                self.res["summary"].setdefault(kind, {})[n] = {"tok_s": ts, "efficiency": eff}

    def loss(self) -> None:
        for n in self.a.loss_procs or (1, self.a.procs[-1]):
            name = f"loss_{n}"
            if self.left() < self.a.arm_budget * 2:
                self.res["skipped"].append(name)
                continue
            rc = self.train_stage(name, n, MAX_STEPS=self.a.loss_steps, BATCH_SIZE=self.a.loss_batch, USE_QLORA=self.qlora)
            self.record(name, rc=rc, procs=n, losses=self.losses(name), banner=self.banner(name))
        a, b = self.losses("loss_1"), self.losses(f"loss_{self.a.procs[-1]}")
        common = sorted(set(a) & set(b))
        self.res["summary"]["loss_1_vs_max"] = {
            "steps": len(common), "max_rel_diff": max((abs(a[s] - b[s]) / abs(a[s]) for s in common), default=None)}

    def stop_and_resume(self, name: str, node_envs: list[dict]) -> None:
        if self.left() < self.a.arm_budget * 3:
            self.res["skipped"].append(name)
            return
        common = dict(MAX_STEPS=self.a.loss_steps, BATCH_SIZE=self.a.loss_batch, USE_QLORA=self.qlora)
        port = self.next_port()
        cut = self.run_sh(f"{name}-cut", [dict(common, MASTER_PORT=port, **e) for e in node_envs], kill_at=self.a.kill_at)
        stopped = max(self.losses(name), default=None)
        ckpts = sorted(p.parent.name for p in (self.work / name / "ckpt").glob("checkpoint-*/COMPLETE"))
        resumed = self.run_sh(f"{name}-resume",
                              [dict(common, JOB="resume_training", MASTER_PORT=port + 1, **e) for e in node_envs])
        ref, got = self.losses(f"loss_{self.a.procs[-1]}"), self.losses(name)
        after = [s for s in got if stopped is not None and s > stopped and s in ref]
        self.record(name, cut_exit=cut, sealed=ckpts, stopped_at=stopped, resume_exit=resumed, losses=got,
                    max_abs_diff_after_resume_vs_uninterrupted=max((abs(got[s] - ref[s]) for s in after), default=None),
                    banner=self.banner(name))

    def sigterm(self) -> None:
        self.stop_and_resume("sigterm", [dict(NUM_GPUS=self.a.procs[-1])])

    def nodes(self) -> None:
        n = self.a.procs[-1]
        half = max(1, n // 2)
        envs = []
        for rank in (0, 1):
            e = dict(NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1", NUM_GPUS=half)
            if not self.a.cpu:
                e["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(rank * half, (rank + 1) * half))
            envs.append(e)
        self.stop_and_resume("nodes", envs)


def tiny_model(dest: Path) -> str:
    """The CPU variant's model: a 2-layer random Llama with the bundled SmolLM2's tokenizer (as tests/conftest.py)."""
    if (dest / "config.json").is_file():
        return str(dest)
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.config import RunConfig
    from finetune.embedded import materialize

    tok = AutoTokenizer.from_pretrained(materialize(RunConfig().cache_dir))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return str(dest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/scaling_work", help="outputs and checkpoints of the arms")
    ap.add_argument("--model", default="/tmp/llama8b_mg")
    ap.add_argument("--cpu", action="store_true", help="tiny Llama, gloo, 1 and 2 processes (checks the driver here)")
    ap.add_argument("--parts", default="scale,loss,sigterm,nodes")
    ap.add_argument("--procs", default="1,2,4,8")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4, help="rows a process a step in the scale arms")
    ap.add_argument("--steps", type=int, default=8, help="steps of a scale arm (throughput from the end of --skip)")
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--loss-steps", type=int, default=30)
    ap.add_argument("--loss-batch", type=int, default=8, help="the effective batch of the loss, sigterm and nodes arms")
    ap.add_argument("--loss-procs", default="", help="the loss arms' process counts (default: 1 and the most); "
                    "sigterm and nodes compare with the one of the most")
    ap.add_argument("--kill-at", type=int, default=10, help="sigterm/nodes: SIGTERM once this many steps are logged")
    ap.add_argument("--deadline", type=float, default=560, help="seconds; arms that would not fit are skipped")
    ap.add_argument("--arm-budget", type=float, default=45, help="seconds one arm is assumed to need at least")
    a = ap.parse_args()
    if a.cpu:
        a.model = tiny_model(Path(a.work) / "tiny-llama")
        a.procs, a.kinds, a.seq, a.rows, a.micro = "1,2", "zero2_lora", 64, 64, 2
        a.loss_steps, a.loss_batch, a.kill_at, a.arm_budget, a.steps = 8, 4, 3, 5, 8
    a.procs = [int(x) for x in str(a.procs).split(",")]
    a.kinds = [k for k in str(a.kinds).split(",") if k]
    a.loss_procs = [int(x) for x in a.loss_procs.split(",") if x]
    if a.cpu:
        KINDS["zero2_lora"] = dict(USE_QLORA="false", LEARNING_RATE="5e-3")  # plain DDP on gloo: no DeepSpeed on a CPU
    b = Bench(a)
    for part in a.parts.split(","):
        getattr(b, part)()
    b.res["wall_s"] = round(time.time() - b.t0, 1)
    (b.out / "scaling.json").write_text(json.dumps(b.res, indent=1))
    print(json.dumps(b.res["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
