"""The run configuration: one frozen object, parsed once from the environment (and a `.env` file).

Nothing below `RunConfig.from_env` reads `os.environ`. This module imports only the standard library (and
python-dotenv when present) so that `run.sh --help` works on a bare machine before any install.

    python -m finetune.config --help         # the jobs, and every variable with its default
    python -m finetune.config --launch-plan  # what run.sh needs to start the job (shell assignments), or exit 2
    python -m finetune.config --check        # the effective configuration as JSON, or exit 2
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from finetune.errors import ConfigError
from finetune.jobs import JOBS as _JOB_TABLE

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_DATA = "data/sample/korquad_sample.json"
JOBS = tuple(_JOB_TABLE)
DATA_FORMATS = ("auto", "korquad", "input_output", "alpaca", "sharegpt", "messages", "qa", "text")
DATA_COLUMN_ROLES = ("question", "answer", "context")
GGUF_FORMATS = ("f16", "bf16", "q8_0", "q5_k_m", "q4_k_m")
DEFAULT_GGUF = "f16,q8_0,q5_k_m,q4_k_m"  # what JOB=export writes when EXPORT_GGUF is empty
GEN_PRESETS = ("greedy", "factual", "balanced", "creative")  # their values: finetune/generation.py PRESETS
OBJECTIVES = ("sft", "dpo", "orpo")
DEFAULT_PREFERENCE_DATA = "data/sample/preference_sample.jsonl"
# Preference objectives (issue 20): defaults that differ from SFT's (finetune/defaults.py resolves their rate and epochs)
# but never over a value the user set. Measured in docs/QUALITY.md ("Preference training").
PREFERENCE_DEFAULTS = {"replay_fraction": 0.0, "eval_fraction": 0.2}
PREFERENCE_LR = 1e-4  # LEARNING_RATE=0 with a preference objective (LoRA; seed 004's 5e-7 is for full fine-tuning)
# The bundled sample's questions asked in other words: EVAL_PATH=auto scores them beside the trained questions.
DEFAULT_EVAL = "data/sample/korquad_sample_paraphrases.json"

# Variables of the libraries we drive: allowed in `.env` (exported to the process there, where the libraries look)
# and in the environment, and never treated as typos of ours.
PASSTHROUGH = {
    "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_BASE_URL", "HF_TOKEN",
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
    "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "RAPA_CALLER_DIR",
    # NCCL and its torch watchdog (README, "Several GPUs and several nodes"): read when the process group starts
    "NCCL_DEBUG", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT",
    "TORCH_NCCL_ENABLE_MONITORING", "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC",
}
# run.sh's launcher settings: honoured from the environment or `.env` through `--launch-plan`; not RunConfig fields
# because they choose how processes start, not what a run computes. name -> (default, help)
LAUNCH = {
    "NNODES": ("1", "nodes taking part in a multi-node run (torchrun; every node runs ./run.sh)"),
    "NODE_RANK": ("0", "this node's index, 0 .. NNODES-1"),
    "MASTER_ADDR": ("127.0.0.1", "address of node 0 (torchrun rendezvous)"),
    "MASTER_PORT": ("29500", "port on node 0 (torchrun, or DeepSpeed's launcher with HOSTFILE)"),
    "HOSTFILE": ("", "DeepSpeed hostfile: launch on every host it lists over ssh, from this node"),
}
# Read by run.sh before a Python is chosen or `.env` is found, so `.env` cannot set them: refused there, loudly.
# name -> help
SHELL_ONLY = {
    "RAPA_NO_VENV": "1: use $PYTHON as it is (a provisioned image or GPU machine); never create .venv or install",
    "PYTHON": "the Python that creates .venv (default python3)",
    "VENV": "the virtual environment's folder (default .venv next to run.sh)",
    "ENV_FILE": "the settings file to read instead of .env",
}
# Set by the launcher (torchrun / DeepSpeed) for each process; a value in `.env` would never reach it.
LAUNCHER_SET = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
                "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "RAPA_EXIT_FILE"}
# Never printed, never saved: they stay in the environment where the libraries find them.
SECRETS = ("WANDB_API_KEY", "HF_TOKEN")


def gguf_list(raw: str) -> str:
    """EXPORT_GGUF in one spelling: lower case, _ not -, no blanks or repeats, order kept ("Q8-0, f16" -> "q8_0,f16")."""
    out: list[str] = []
    for part in raw.split(","):
        fmt = part.strip().lower().replace("-", "_")
        if fmt and fmt not in out:
            out.append(fmt)
    return ",".join(out)


def _f(default: Any, help: str, choices: tuple | None = None, auto: bool = False, normalise: Any = None) -> Any:
    # auto: the variable also takes "auto", which is the same as leaving it unset: finetune/defaults.py resolves it
    # from the model and the data once they are known (one rule for every run; the banner says what it chose);
    # normalise: str -> str applied to the raw value before it is checked, so every later reader sees one spelling.
    meta = {"help": help, "choices": choices, "auto": auto, "normalise": normalise}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. The environment name of a field is its name in upper case."""

    # --- what to run
    job: str = _f("train", " | ".join(JOBS) + " (./run.sh --help says what each does)", JOBS)
    base_model_name: str = _f(EMBEDDED_MODEL, "HF model folder or name; the default is the bundled SmolLM2-135M-Instruct")
    data_path: str = _f(DEFAULT_DATA, "JSON, JSONL, CSV, TSV, Parquet or Arrow file (also .gz/.zst/.bz2), a folder of "
                        "them, or a datasets.save_to_disk folder; relative to where you ran run.sh (in .env: to the repository)")
    base_save_path: str = _f("final_model", "root of the output tree <root>/<model>/<epochs>/")
    checkpoint_path: str = _f("", "checkpoint folder; default checkpoints/<model>/<epochs>/<qlora|lora>")
    rapa_cache: str = _f("", "cache folder (the converted bundled model, base-model replay and eval answers, the "
                         "planner's per-card constants); default $XDG_CACHE_HOME/rapa, else ~/.cache/rapa")
    overwrite: bool = _f(False, "JOB=train over existing checkpoints/outputs starts over instead of refusing")
    # --- objective (issue 20): preference training runs through the same stages and output tree
    training_objective: str = _f("sft", "sft | dpo | orpo: supervised answers, or preference pairs (prompt, chosen, "
                                 "rejected) with DPO (reference = the base with the adapter off) or ORPO (no reference)",
                                 OBJECTIVES)
    init_adapter: str = _f("", "dpo/orpo: start from this finished adapter of the same base (e.g. an SFT run's "
                           "lora_adapters/); it is also DPO's reference. Empty: a fresh adapter on the base")
    preference_beta: float = _f(0.1, "dpo: beta, the strength of the pull towards the reference; orpo: lambda, the "
                                "weight of the odds-ratio term")
    # --- model and adapter
    # auto (finetune/defaults.py): 4-bit from 1B parameters up; a smaller model fits anyway, and NF4 alone costs the
    # bundled 135M model 10 of the 24 probe answers it knew (docs/QUALITY.md).
    use_qlora: bool = _f(True, "true | false | auto: load the base in NF4 4-bit with double quantisation (QLoRA); "
                         "auto = true from 1B parameters up, false below", auto=True)
    base_precision: str = _f("auto", "auto | nf4 | bf16 | fp8: how the frozen base is stored and multiplied. nf4 is QLoRA, "
                             "bf16 plain LoRA; fp8 stores it in e4m3 with row-wise scales and runs its GEMMs on FP8 "
                             "tensor cores (compute capability 8.9+, e.g. H100/H200/L4; elsewhere it falls back to bf16 "
                             "and says so). auto follows USE_QLORA; nf4/bf16/fp8 set USE_QLORA to match",
                             ("auto", "nf4", "bf16", "fp8"))
    backend: str = _f("auto", "auto | unsloth | hf (auto: unsloth on a CUDA GPU when it imports)", ("auto", "unsloth", "hf"))
    lora_rank: int = _f(16, "LoRA rank r")
    lora_alpha: int = _f(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA path (0 saves ~25% of activation memory on a GPU)")
    lora_kernels: str = _f("auto", "auto | fast | unsloth: on the Unsloth backend, fast reorders its fused LoRA GEMMs in eager "
                           "decoder blocks (same math, fewer memory passes: finetune/fast_lora.py); unsloth runs Unsloth's "
                           "own in its compiled blocks; auto: fast for hidden size >= 3072, else unsloth",
                           ("auto", "fast", "unsloth"))
    target_modules: str = _f("all-linear", "comma-separated module names, or all-linear (every projection)")
    chat_template: str = _f("auto", "auto (the tokenizer's own) | chatml | alpaca | llama-3")
    # --- data
    data_format: str = _f("auto", "auto | " + " | ".join(DATA_FORMATS[1:]), DATA_FORMATS)
    data_columns: str = _f("", "question=COL,answer=COL[,context=COL]: your column names (default: found by common names "
                           "such as question/answer, prompt/response, prompt/completion, query/response)")
    qa_with_context: bool = _f(False, "put the paragraph (KorQuAD/SQuAD) or the context/passage column (qa) into the prompt")
    passage_rows: str = _f("auto", "QA rows that come with their passage (KorQuAD/SQuAD context): on also trains each distinct "
                           "passage once as a text row with loss (the facts in the passage's own words, not only as "
                           "question -> answer pairs); auto = on (docs/QUALITY.md, issue 23), except on the bundled sample, whose "
                           "demo numbers were measured without", ("auto", "on", "off"))
    question_variants: str = _f("auto", "question/answer rows (KorQuAD/SQuAD, qa columns): on also trains each question in up to "
                                "three rewordings written by grammar rules (Korean particles and endings, English "
                                "wh-words, a framing sentence), same answer; more steps on a small file; auto = off until measured on two "
                                "seeds of every file (docs/QUALITY.md, issue 23)", ("auto", "on", "off"))
    train_on_inputs: bool = _f(False, "also compute the loss on prompt/user tokens")
    max_seq_length: int = _f(1024, "longest tokenised row")
    max_length_policy: str = _f("truncate", "rows over MAX_SEQ_LENGTH: truncate | drop | fail", ("truncate", "drop", "fail"))
    data_max_reject_fraction: float = _f(0.1, "stop with exit 3 when more than this fraction of rows is rejected")
    data_strict: bool = _f(False, "stop at the first bad row")
    eval_fraction: float = _f(0.0, "held-out fraction for eval loss; 0 evaluates on the training questions (seed 000); "
                                "dpo/orpo default to 0.2 (held-out pairs)")
    packing: bool = _f(False, "pack rows into MAX_SEQ_LENGTH sequences without cross-row attention")
    replay_fraction: float = _f(1.6, "self-distilled replay rows (base model's own answers) per user row, up to "
                                "the pool's size; 0 = off (and the default for dpo/orpo)")
    replay_loss: str = _f("auto", "auto | sft | kl: train replay rows on the base's greedy answers (sft), or on the base "
                          "model's whole next-token distribution (kl: one extra no-grad forward per batch); auto = kl on "
                          "a CPU and for a model under 1B on a GPU, sft for larger models on a GPU and under fp8",
                          ("auto", "sft", "kl"))
    replay_weight: float = _f(1.0, "kl replay: weight of each replay token's KL against one user token's cross-entropy "
                              "(higher keeps the model closer to the base)")
    # --- optimisation
    num_epochs: float = _f(0.0, "training epochs (1.5 is fine), or auto: enough epochs for 110 optimiser steps, at least "
                           "3 (dpo/orpo: 3); a follow-up job takes the run's own", auto=True)
    learning_rate: float = _f(0.0, "peak learning rate, or auto: 1e-3 for a model under 1B parameters, 2e-4 from 1B up "
                              "(LoRA and QLoRA alike); 1e-4 for TRAINING_OBJECTIVE=dpo|orpo", auto=True)
    batch_size: str = _f("auto", "per-device batch, or auto (8; on a GPU split into micro-batches that fit)")
    grad_accum: int = _f(1, "gradient accumulation steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.03, "fraction of steps spent warming up the learning rate")
    lr_scheduler: str = _f("cosine", "transformers scheduler name (cosine, linear, constant, ...)")
    max_grad_norm: float = _f(1.0, "gradient clipping")
    max_steps: int = _f(-1, "stop after this many optimiser steps (-1: run NUM_EPOCHS)")
    seed: int = _f(42, "seed for data split, shuffling and initialisation")
    gradient_checkpointing: str = _f("auto", "auto | on | off | offload", ("auto", "on", "off", "offload"))
    max_gpu_memory: float = _f(0.0, "cap the GPU memory this run may use, in GB (0 = all)")
    offload_weights: str = _f("auto", "auto | on | off: keep the frozen decoder layers and the input embedding in host RAM "
                              "and stream each layer to the GPU as it runs (Unsloth backend; with offloaded "
                              "checkpointing); auto = only when nothing else fits the GPU or MAX_GPU_MEMORY",
                              ("auto", "on", "off"))
    optim: str = _f("auto", "auto | adamw_torch_fused | adamw_8bit | adamw_torch: auto = adamw_torch_fused on a GPU of "
                    "40 GB or more (one fused kernel; a LoRA's fp32 moments are small), adamw_8bit on a smaller one, "
                    "adamw_torch on a CPU",
                    ("auto", "adamw_torch_fused", "adamw_8bit", "adamw_torch"))
    # --- checkpoints and logging
    save_steps: int = _f(50, "save a resumable checkpoint every N optimiser steps")
    save_total_limit: int = _f(3, "keep at most N complete checkpoints (the newest always kept)")
    logging_steps: int = _f(1, "log loss / lr / grad-norm every N steps")
    eval_steps: int = _f(0, "eval loss every N steps during training (0 = off; needs EVAL_FRACTION > 0)")
    early_stopping_patience: int = _f(0, "stop after N evals without improvement (0 = off)")
    report_to: str = _f("wandb", "wandb | tensorboard | none (wandb runs offline without WANDB_API_KEY)", ("wandb", "tensorboard", "none"))
    wandb_project: str = _f("RAPA", "wandb project")
    # --- merge, export, evaluate
    merge_parity: str = _f("on", "on | off: compare adapter-on-base with the merged model before accepting it", ("on", "off"))
    merge_mode: str = _f("auto", "auto | whole | sharded: sharded streams the base shard by shard (memory bounded by the "
                         "largest shard); auto picks sharded when the base is larger than half the free RAM",
                         ("auto", "whole", "sharded"))
    qlora_merge_base: str = _f("original", "QLoRA merge into: original (the unquantised base) | dequantized (its NF4 "
                               "round trip, exactly what was trained)", ("original", "dequantized"))
    merge_parity_tol: float = _f(1e-3, "largest allowed max-abs logit difference (relative to logit scale) in the parity gate")
    export_gguf: str = _f("", "after merge also write GGUF: comma list of " + ", ".join(GGUF_FORMATS) + " (case and - "
                          "vs _ do not matter; empty = no export after merge, " + DEFAULT_GGUF + " for JOB=export)",
                          normalise=gguf_list)
    export_check_questions: int = _f(10, "after export, llama.cpp answers this many eval questions greedily with each "
                                     "GGUF, compared with the merged model; f16 must agree (0 = skip the check)")
    llama_cpp_dir: str = _f("", "folder with llama.cpp's llama-server and llama-quantize (empty: built once, portably, "
                            "into the cache from the pinned llama-cpp-python sdist's vendored source)")
    eval_max_new_tokens: int = _f(0, "greedy tokens generated per evaluation question, or auto: the longest reference "
                                  "answer + 16, at least 32, at most 256", auto=True)
    eval_max_questions: int = _f(0, "evaluate at most N questions (0 = all)")
    eval_path: str = _f("auto", "a separate evaluation file (any supported format: for example the same facts asked in other "
                        "words) scored beside the trained questions; auto = the bundled sample's paraphrases when DATA_PATH "
                        "is the bundled sample, else none; none = off")
    retention_set: str = _f("data/retention/probes.json", "general-knowledge probes for the retention score (none = off)")
    lm_eval_tasks: str = _f("", "JOB=evaluate also runs lm-evaluation-harness on the merged model: comma list of task "
                            "names or YAML files; `run_eval` is the bundled local task over the run's eval split")
    # --- using the trained model (JOB=chat, generate, serve)
    gen_preset: str = _f("factual", "sampling preset for chat and generate: greedy | factual (temperature 0.1, top_p 0.9, "
                         "repetition_penalty 1.0) | balanced (0.5, 0.9, 1.1) | creative (0.8, 0.95, 1.15)", GEN_PRESETS)
    temperature: str = _f("", "overrides the preset's temperature (0 = greedy)")
    top_p: str = _f("", "overrides the preset's top_p, in (0, 1]")
    repetition_penalty: str = _f("", "overrides the preset's repetition penalty (1 = none)")
    max_new_tokens: int = _f(256, "longest answer in tokens, for chat and generate")
    system_prompt: str = _f("", "system message for chat and generate (empty: the chat template's default, as in training)")
    prompts_path: str = _f("", "JOB=generate: prompts as JSONL (a prompt, question, input, instruction or text field), CSV "
                           "(a column of those names) or plain text (one prompt a line); answers go to <run>/answers.jsonl")
    serve_host: str = _f("127.0.0.1", "JOB=serve: address to listen on (0.0.0.0 to accept other machines)")
    serve_port: int = _f(8000, "JOB=serve: port of the OpenAI-compatible endpoint")
    # --- distributed
    num_gpus: int = _f(0, "GPUs to train on (0 = every visible GPU)")
    deepspeed_config: str = _f("", "DeepSpeed JSON for several GPUs (default: configs/deepspeed/zero2.json)")
    dist_timeout_minutes: float = _f(30.0, "several processes: a collective (gradient all-reduce, barrier) that waits "
                                     "longer than this on a hung rank fails the job instead of hanging it")

    # ------------------------------------------------------------------------------------------------
    @property
    def model_slug(self) -> str:
        return Path(self.base_model_name.rstrip("/")).name or self.base_model_name

    @property
    def cache_dir(self) -> Path:
        """from_env resolves RAPA_CACHE; a config built in code without it resolves it the same way."""
        return Path(self.rapa_cache or default_cache_dir(os.environ))

    @property
    def adapter_kind(self) -> str:
        return "qlora" if self.use_qlora else "lora"

    @property
    def preference(self) -> bool:
        return self.training_objective != "sft"

    @property
    def lr(self) -> float:
        """LEARNING_RATE as resolved by finetune/defaults.py; a config built in code without one gets the rule's
        rate for a large model (or the preference rate)."""
        if self.learning_rate > 0:
            return self.learning_rate
        return PREFERENCE_LR if self.preference else 2e-4

    @property
    def columns(self) -> dict[str, str] | None:
        """DATA_COLUMNS as {"question": column, "answer": column[, "context": column]}; None when unset."""
        if not self.data_columns.strip():
            return None
        return dict((k.strip(), v.strip()) for k, _, v in (item.partition("=") for item in self.data_columns.split(",")))

    @property
    def run_label(self) -> str:
        """The output tree's per-run folder: the epochs, prefixed by the objective when it is not SFT (a DPO run
        over an SFT run's adapter must not land in that run's folder)."""
        return self.epochs_label if not self.preference else f"{self.training_objective}-{self.epochs_label}"

    @property
    def eval_set_path(self) -> str:
        """EVAL_PATH resolved: a path, or "" for none."""
        if self.eval_path.lower() in ("", "none", "off"):
            return ""
        if self.eval_path == "auto":
            same = os.path.normpath(self.data_path) == os.path.normpath(DEFAULT_DATA) or \
                Path(self.data_path).resolve() == Path(DEFAULT_DATA).resolve()
            return DEFAULT_EVAL if same else ""
        return self.eval_path

    @property
    def epochs_label(self) -> str:
        """The run's folder name: the epoch count (resolved before any path is used; "auto" only in unresolved
        configs built in code)."""
        return f"{self.num_epochs:g}" if self.num_epochs > 0 else "auto"

    def public_dict(self) -> dict:
        """The effective configuration as saved in manifests: secrets are never fields, so nothing to mask."""
        return dataclasses.asdict(self)

    def fingerprint_fields(self) -> dict:
        """The fields a resume must not change (it would train a different thing)."""
        keys = ("base_model_name", "use_qlora", "lora_rank", "lora_alpha", "target_modules", "max_seq_length",
                "grad_accum", "data_format", "data_columns", "qa_with_context", "passage_rows", "train_on_inputs", "chat_template", "packing",
                "replay_fraction", "replay_loss", "replay_weight", "seed", "num_epochs", "lora_dropout",
                "training_objective", "init_adapter", "preference_beta")
        out = {k: getattr(self, k) for k in keys}
        if self.base_precision != "auto":  # absent under auto, so checkpoints from before it resume unchanged
            out["base_precision"] = self.base_precision
        if self.question_variants != "auto":  # the same, for checkpoints from before it
            out["question_variants"] = self.question_variants
        return out

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = "") -> "RunConfig":
        """Build the config from `environ` over the settings file (the real environment wins). Raise ConfigError
        listing every problem at once. `env_file` "" means $ENV_FILE, else `.env`; None reads no file."""
        return load(environ, env_file).config

    # ------------------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Cross-field and range checks. Paths are checked by the stages that read them."""
        p: list[str] = []
        def need(ok: bool, msg: str) -> None:
            if not ok:
                p.append(msg)
        need(self.lora_rank > 0, f"LORA_RANK={self.lora_rank}: must be a positive integer")
        need(self.lora_alpha > 0, f"LORA_ALPHA={self.lora_alpha}: must be a positive integer")
        need(0 <= self.lora_dropout < 1, f"LORA_DROPOUT={self.lora_dropout}: must be in [0, 1)")
        need(self.num_epochs >= 0, f"NUM_EPOCHS={self.num_epochs:g}: must be > 0 (or auto)")
        need(self.learning_rate >= 0, f"LEARNING_RATE={self.learning_rate}: must be > 0 (or auto)")
        need(self.learning_rate < 1, f"LEARNING_RATE={self.learning_rate}: must be < 1 (a typical value is 1e-4)")
        need(self.max_seq_length >= 16, f"MAX_SEQ_LENGTH={self.max_seq_length}: must be at least 16")
        need(self.grad_accum >= 1, f"GRAD_ACCUM={self.grad_accum}: must be >= 1")
        need(self.batch_size == "auto" or (self.batch_size.isdigit() and int(self.batch_size) >= 1),
             f"BATCH_SIZE={self.batch_size!r}: must be a positive integer or auto")
        need(self.save_steps >= 1, f"SAVE_STEPS={self.save_steps}: must be >= 1")
        need(self.save_total_limit >= 1, f"SAVE_TOTAL_LIMIT={self.save_total_limit}: must be >= 1 (the newest is always kept)")
        need(self.logging_steps >= 1, f"LOGGING_STEPS={self.logging_steps}: must be >= 1")
        need(0 <= self.data_max_reject_fraction <= 1, f"DATA_MAX_REJECT_FRACTION={self.data_max_reject_fraction}: must be in [0, 1]")
        need(0 <= self.eval_fraction < 1, f"EVAL_FRACTION={self.eval_fraction}: must be in [0, 1)")
        need(0 <= self.replay_fraction <= 4, f"REPLAY_FRACTION={self.replay_fraction}: must be in [0, 4]")
        need(0 < self.replay_weight <= 100, f"REPLAY_WEIGHT={self.replay_weight:g}: must be in (0, 100]")
        # REPLAY_LOSS=auto is checked once the device resolves it (finetune/plan.py), by the same rule.
        replay_problem = replay_weight_problem(self.replay_weight, self.replay_loss)
        need(replay_problem is None, replay_problem or "")
        need(not (self.preference and self.replay_fraction > 0),
             f"REPLAY_FRACTION={self.replay_fraction:g}: replay rows are SFT rows; TRAINING_OBJECTIVE="
             f"{self.training_objective} keeps the model near its reference through its own loss: set REPLAY_FRACTION=0")
        need(not (self.init_adapter and not self.preference),
             f"INIT_ADAPTER={self.init_adapter}: only TRAINING_OBJECTIVE=dpo or orpo starts from an adapter")
        # DPO's reference pass runs the base with the adapter switched off; the FP8 Functions need the adapter.
        need(not (self.training_objective == "dpo" and self.base_precision == "fp8"),
             "BASE_PRECISION=fp8: TRAINING_OBJECTIVE=dpo scores its reference with the adapter off, which the FP8 "
             "kernels do not run; use BASE_PRECISION=auto (or nf4/bf16) for dpo, or TRAINING_OBJECTIVE=orpo")
        need(not (self.replay_loss == "kl" and self.base_precision == "fp8" and self.replay_fraction > 0),
             "BASE_PRECISION=fp8: REPLAY_LOSS=kl scores the replay rows against the base with the adapter off, which "
             "the FP8 kernels do not run; use REPLAY_LOSS=sft (auto picks it under fp8), or BASE_PRECISION=auto")
        need(not (self.preference and self.packing), f"PACKING=true: TRAINING_OBJECTIVE={self.training_objective} "
             "trains on pairs, which are not packed")
        need(0 < self.preference_beta <= 10, f"PREFERENCE_BETA={self.preference_beta:g}: must be in (0, 10]")
        need(self.max_steps == -1 or self.max_steps >= 1, f"MAX_STEPS={self.max_steps}: must be -1 or >= 1")
        need(self.eval_steps >= 0, f"EVAL_STEPS={self.eval_steps}: must be >= 0")
        need(not (self.eval_steps and self.eval_fraction == 0),
             f"EVAL_STEPS={self.eval_steps} needs a held-out split: set EVAL_FRACTION (e.g. 0.1)")
        need(not (self.early_stopping_patience and not self.eval_steps),
             f"EARLY_STOPPING_PATIENCE={self.early_stopping_patience} needs EVAL_STEPS > 0 and EVAL_FRACTION > 0")
        need(not (self.early_stopping_patience and self.eval_steps and self.save_steps % self.eval_steps),
             f"EARLY_STOPPING_PATIENCE needs SAVE_STEPS ({self.save_steps}) to be a multiple of EVAL_STEPS ({self.eval_steps}): "
             "the best checkpoint is restored at the end")
        need(not (self.offload_weights == "on" and self.gradient_checkpointing in ("off", "on")),
             f"OFFLOAD_WEIGHTS=on streams the layers through offloaded checkpointing: it needs GRADIENT_CHECKPOINTING="
             f"offload or auto, not {self.gradient_checkpointing}")
        need(not (self.base_precision == "fp8" and self.offload_weights == "on"),
             "BASE_PRECISION=fp8 keeps its FP8 weights on the GPU: it cannot stream them (OFFLOAD_WEIGHTS=on); use "
             "BASE_PRECISION=nf4 for the leanest memory")
        need(self.max_gpu_memory >= 0, f"MAX_GPU_MEMORY={self.max_gpu_memory}: must be >= 0 (GB)")
        need(self.num_gpus >= 0, f"NUM_GPUS={self.num_gpus}: must be >= 0")
        need(self.max_new_tokens >= 1, f"MAX_NEW_TOKENS={self.max_new_tokens}: must be >= 1")
        need(1 <= self.serve_port <= 65535, f"SERVE_PORT={self.serve_port}: must be a port number (1-65535)")
        need(not (self.job == "generate" and not self.prompts_path),
             "JOB=generate needs PROMPTS_PATH: a .jsonl, .csv or .txt file of prompts")
        for name, low, high, low_open in (("temperature", 0, 10, False), ("top_p", 0, 1, True),
                                          ("repetition_penalty", 0, 10, True)):
            raw = getattr(self, name)
            try:
                v = float(raw) if raw != "" else None
            except ValueError:
                v = float("nan")
            need(v is None or ((low < v if low_open else low <= v) and v <= high),
                 f"{name.upper()}={raw!r}: must be a number in {'(' if low_open else '['}{low}, {high}] "
                 f"(or unset for GEN_PRESET={self.gen_preset}'s)")
        need(0 < self.dist_timeout_minutes <= 24 * 60,
             f"DIST_TIMEOUT_MINUTES={self.dist_timeout_minutes:g}: must be in (0, 1440] (a fraction is allowed)")
        need(self.eval_max_new_tokens >= 0, f"EVAL_MAX_NEW_TOKENS={self.eval_max_new_tokens}: must be >= 1 (or auto)")
        mods = [m.strip() for m in self.target_modules.split(",")]
        need(self.target_modules == "all-linear" or all(m.replace("_", "").replace(".", "").isalnum() for m in mods),
             f"TARGET_MODULES={self.target_modules!r}: comma-separated module names such as q_proj,v_proj, or all-linear")
        bad = [fmt for fmt in gguf_list(self.export_gguf).split(",") if fmt and fmt not in GGUF_FORMATS]
        need(not bad, f"EXPORT_GGUF={self.export_gguf!r}: unknown format(s) {', '.join(bad)}; allowed are "
             f"{', '.join(GGUF_FORMATS)}")
        need(self.export_check_questions >= 0, f"EXPORT_CHECK_QUESTIONS={self.export_check_questions}: must be >= 0")
        p.extend(self._data_columns_problems())
        need(self.chat_template in ("auto", "chatml", "alpaca", "llama-3"),
             f"CHAT_TEMPLATE={self.chat_template!r}: allowed are auto, chatml, alpaca, llama-3")
        return p


    def _data_columns_problems(self) -> list[str]:
        if not self.data_columns.strip():
            return []
        name = f"DATA_COLUMNS={self.data_columns!r}"
        items = [item.partition("=") for item in self.data_columns.split(",")]
        if any(not sep or not k.strip() or not v.strip() for k, sep, v in items):
            return [f"{name}: expected question=COLUMN,answer=COLUMN[,context=COLUMN]"]
        keys = [k.strip() for k, _, _ in items]
        p = [f"{name}: unknown role {k!r} (allowed: {', '.join(DATA_COLUMN_ROLES)})" for k in keys if k not in DATA_COLUMN_ROLES]
        p += [f"{name}: {k} is given twice" for k in DATA_COLUMN_ROLES if keys.count(k) > 1]
        p += [f"{name}: {k}=COLUMN is missing" for k in ("question", "answer") if k not in keys]
        if self.data_format not in ("auto", "qa"):
            p.append(f"{name} maps question/answer columns: it needs DATA_FORMAT=auto or qa, not {self.data_format}")
        if "context" in keys and not self.qa_with_context:
            p.append(f"{name} maps a context column, which only QA_WITH_CONTEXT=true puts into the prompt: set it, "
                     "or drop context=")
        return p


# ----------------------------------------------------------------------------------------------------
def replay_weight_problem(weight: float, loss: str, why: str = "") -> str | None:
    """REPLAY_WEIGHT weights the kl replay loss only; with sft it would be silently ignored."""
    if weight == 1 or loss != "sft":
        return None
    return (f"REPLAY_WEIGHT={weight:g} weights the kl replay loss, but REPLAY_LOSS={why or loss}: set REPLAY_LOSS=kl, "
            "or leave REPLAY_WEIGHT at 1")


@dataclass(frozen=True)
class Settings:
    """Everything read from the environment and the settings file, checked once."""

    config: RunConfig
    launch: dict  # LAUNCH name -> value, for run.sh
    library_env: dict  # PASSTHROUGH values from the settings file, for the process environment
    explicit: frozenset = frozenset()  # the fields the user set (not left empty or auto): never overridden


def load(environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = "") -> Settings:
    """Read and check everything; raise ConfigError listing every problem at once."""
    environ = dict(os.environ if environ is None else environ)
    if env_file == "":
        env_file = environ.get("ENV_FILE") or ".env"
    problems: list[str] = []
    file_values = _read_env_file(env_file, problems)
    merged = {**file_values, **environ}
    names = {f.name.upper(): f for f in dataclasses.fields(RunConfig)}

    for key in file_values:  # our file: every name must be one we read from it
        if key in SHELL_ONLY:
            problems.append(f"{key} in {env_file}: run.sh reads it before the file is found; set it in the environment "
                            f"({key}=... ./run.sh)")
        elif key in LAUNCHER_SET:
            problems.append(f"{key} in {env_file}: set by the launcher (torchrun) for each process, not by you")
        elif key not in names and key not in PASSTHROUGH and key not in LAUNCH:
            problems.append(_unknown(key, names, f"in {env_file}"))
    for key in environ:  # everyone's environment: only a close misspelling of one of ours is an error
        if _misspells_ours(key, names):
            problems.append(_unknown(key, names, "in the environment"))

    # run.sh works in the repository; a DATA_PATH given on the command line means the caller's folder.
    caller = environ.get("RAPA_CALLER_DIR", "")
    if caller and environ.get("DATA_PATH", ""):
        merged["DATA_PATH"] = str(Path(caller) / Path(environ["DATA_PATH"]).expanduser())  # an absolute path stays
    preference = merged.get("TRAINING_OBJECTIVE", "sft").strip() in OBJECTIVES[1:]
    values: dict[str, Any] = {}
    explicit: set[str] = set()
    for name, f in names.items():
        raw = merged.get(name, "")
        if raw == "" and preference and f.name in PREFERENCE_DEFAULTS:
            values[f.name] = PREFERENCE_DEFAULTS[f.name]  # pairs: held out for the pair metrics, no SFT replay
            continue
        if raw == "" and preference and f.name == "data_path":
            values[f.name] = DEFAULT_PREFERENCE_DATA
            continue
        if raw == "" or (f.metadata.get("auto") and raw.strip().lower() == "auto"):
            continue  # the default; an automatic one is resolved by finetune/defaults.py
        try:
            values[f.name] = _coerce(raw, f)
            explicit.add(f.name)
        except ValueError as e:
            problems.append(f"{name}={raw!r}: {e}")
    values["rapa_cache"] = values.get("rapa_cache") or str(default_cache_dir(merged))
    launch = {k: merged.get(k, "") or default for k, (default, _) in LAUNCH.items()}
    for k in ("NNODES", "NODE_RANK", "MASTER_PORT"):
        if not launch[k].isdigit():
            problems.append(f"{k}={launch[k]!r}: expected a non-negative integer")
    if launch["NNODES"].isdigit() and launch["NODE_RANK"].isdigit() and not int(launch["NODE_RANK"]) < int(launch["NNODES"]) >= 1:
        problems.append(f"NODE_RANK={launch['NODE_RANK']} with NNODES={launch['NNODES']}: must be in 0 .. NNODES-1")
    if launch["HOSTFILE"] and not Path(launch["HOSTFILE"]).is_file():
        problems.append(f"HOSTFILE={launch['HOSTFILE']}: no such file")
    # BASE_PRECISION names the base's storage; USE_QLORA (the seed's switch) follows it unless set against it.
    bp = values.get("base_precision", "auto")
    if bp != "auto":
        want = bp == "nf4"
        if "use_qlora" in explicit and values.get("use_qlora", want) != want:
            problems.append(f"BASE_PRECISION={bp} contradicts USE_QLORA={merged['USE_QLORA']}: unset one "
                            f"(BASE_PRECISION=nf4 is QLoRA; bf16 and fp8 are not)")
        values["use_qlora"] = want
        explicit.add("use_qlora")  # set through BASE_PRECISION: the size rule leaves it alone
    # Range and cross-field checks run on the values that parsed (unparsable ones keep their defaults),
    # so one error lists every problem.
    cfg = RunConfig(**values)
    problems.extend(cfg.problems())
    if len(problems) == 1:
        raise ConfigError(f"configuration: {problems[0]}")
    if problems:
        raise ConfigError("configuration has %d problem(s):\n  - %s" % (len(problems), "\n  - ".join(problems)))
    return Settings(cfg, launch, {k: merged[k] for k in file_values if k in PASSTHROUGH and merged[k] != ""},
                    frozenset(explicit))


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """RAPA_CACHE, else $XDG_CACHE_HOME/rapa, else ~/.cache/rapa."""
    if environ.get("RAPA_CACHE"):
        return Path(environ["RAPA_CACHE"])
    return Path(environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")) / "rapa"


def launch_plan(settings: Settings) -> str:
    """What run.sh needs to start the job, as shell assignments it can `eval`: one question, asked once."""
    import shlex

    cfg, job = settings.config, _JOB_TABLE[settings.config.job]
    plan = {"JOB": cfg.job, "JOB_RUNNER": job.runner, "JOB_GPUS": "1" if job.gpus else "0", "NUM_GPUS": str(cfg.num_gpus),
            **settings.launch, **{k: v for k, v in settings.library_env.items() if k == "CUDA_VISIBLE_DEVICES"}}
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in plan.items())


# ----------------------------------------------------------------------------------------------------
def _read_env_file(path: str | os.PathLike | None, problems: list[str]) -> dict[str, str]:
    if not path or not Path(path).is_file():
        return {}
    try:
        from dotenv import dotenv_values
    except ImportError:  # bare machine (run.sh --help): a minimal KEY=VALUE reader
        values = {}
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.removeprefix("export ").split("=", 1)
                values[k.strip()] = v.strip().strip("'\"")
        return values
    return {k: (v or "") for k, v in dotenv_values(path).items()}


# Third-party variables that sit close to one of ours; never read as a misspelling.
OTHERS = {"DATA_DIR", "SAVE_DIR", "NUM_THREADS", "USE_CUDA", "MAX_JOBS", "NUM_WORKERS", "EPOCHS", "BATCH", "SEED_VALUE"}


def _misspells_ours(key: str, names: Mapping[str, Any]) -> bool:
    """The process environment holds every tool's variables (DATA_DIR, NUM_THREADS, ...): an unknown one is an error
    only when it is a near miss of ours: within two edits (one for names up to five letters), or the same words or
    letters in another order (RANK_LORA, LORA_RNAK)."""
    if key in names or key in PASSTHROUGH or key in LAUNCH or key in SHELL_ONLY or key in LAUNCHER_SET or key in OTHERS:
        return False
    for name in names:
        limit = 1 if min(len(key), len(name)) <= 5 else 2
        if abs(len(key) - len(name)) <= limit and _edits(key, name) <= limit:
            return True
        if sorted(key) == sorted(name) or sorted(key.split("_")) == sorted(name.split("_")):
            return True
    return False


def _edits(a: str, b: str) -> int:
    """Levenshtein distance, with a swap of neighbours counting once (LORA_RNAK is one slip)."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[-1]


def _unknown(key: str, names: Mapping[str, Any], where: str) -> str:
    known = list(names) + sorted(PASSTHROUGH | set(LAUNCH) | set(SHELL_ONLY))
    guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {guess[0]}?)" if guess else " (run ./run.sh --help for the list)"
    return f"{key}: unknown variable {where}{hint}"


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _coerce(raw: str, f: dataclasses.Field) -> Any:
    raw = raw.strip()
    if f.metadata.get("normalise"):
        raw = f.metadata["normalise"](raw)
    kind = type(f.default)
    choices = f.metadata.get("choices")
    if kind is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected true or false" + (" or auto" if f.metadata.get("auto") else ""))
    auto = " or auto" if f.metadata.get("auto") else ""
    if kind is int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected an integer" + auto) from None
    elif kind is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("expected a number" + auto) from None
    if kind in (int, float):
        if auto and not value > 0:
            raise ValueError("must be > 0" + auto)
        return value
    if choices and raw not in choices:
        raise ValueError("allowed values are " + ", ".join(choices))
    return raw


def describe(cfg: RunConfig) -> str:
    """The config banner, one variable a line, derived values after."""
    lines = [f"  {k.upper():<26} {v}" for k, v in cfg.public_dict().items()]
    lines.append(f"  {'(effective learning rate)':<26} {cfg.lr:g}")
    return "\n".join(lines)


def _shown_default(f: dataclasses.Field) -> str:
    if f.metadata.get("auto"):
        return "auto"
    return str(f.default).lower() if isinstance(f.default, bool) else str(f.default)


def help_text() -> str:
    from finetune.jobs import summary

    out = ["Jobs (JOB=<job> or ./run.sh <job>):", summary(), "",
           "Variables (environment or .env; the environment wins). Defaults in brackets; [auto] is resolved from",
           "the model and the data by one rule for every run, and the banner's [preset] line says what it chose.", ""]
    for f in dataclasses.fields(RunConfig):
        out.append(f"  {f.name.upper():<26} [{_shown_default(f)}]  {f.metadata['help']}")
    out += ["", "Launching (run.sh; environment or .env):"]
    out += [f"  {k:<26} [{d}]  {h}" for k, (d, h) in LAUNCH.items()]
    out += ["", "run.sh itself (environment only: read before .env is found):"]
    out += [f"  {k:<26} {h}" for k, h in SHELL_ONLY.items()]
    out.append("")
    out.append("  Secrets, read from the environment or .env, never printed or saved: " + ", ".join(SECRETS))
    return "\n".join(out)


def env_example() -> str:
    """The body of .env.example, generated from the dataclass (a test keeps the file in sync)."""
    out = ["# Every variable the pipeline reads, with its default. Copy to .env and edit; the environment wins.",
           "# Generated from finetune/config.py: python -m finetune.config --env-example > .env.example", ""]
    for f in dataclasses.fields(RunConfig):
        default = _shown_default(f)
        out.append(f"# {f.metadata['help']}")
        out.append(f"# {f.name.upper()}={default}")
    out += ["", "# Launching several processes (run.sh)."]
    for k, (d, h) in LAUNCH.items():
        out += [f"# {h}", f"# {k}={d}"]
    out += ["", "# Read by run.sh before this file is found: set these in the environment, never here (refused here).",
            *[f"#   {k}: {h}" for k, h in SHELL_ONLY.items()]]
    out += ["", "# Secrets: set them here or in the environment; they are never printed or written anywhere.",
            "# WANDB_API_KEY=", "# HF_TOKEN="]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if "--env-example" in sys.argv:
        print(env_example(), end="")
    elif "--launch-plan" in sys.argv:  # run.sh: everything it needs to start the job, or one error and exit 2
        try:
            print(launch_plan(load()), end="")
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    elif "--check" in sys.argv:
        try:
            print(json.dumps(load().config.public_dict(), indent=1))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        print(help_text())
