"""The run configuration: one frozen object, parsed once from the environment (and a `.env` file).

Nothing below `RunConfig.from_env` reads `os.environ`. This module imports only the standard library (and
python-dotenv when present) so that `run.sh --help` works on a bare machine before any install.

    python -m finetune.config --help        # every variable with its default
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

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_DATA = "data/sample/korquad_sample.json"
# The bundled sample's questions asked in other words: EVAL_PATH=auto scores them beside the trained questions.
DEFAULT_EVAL = "data/sample/korquad_sample_paraphrases.json"
JOBS = ("train", "resume_training", "prepare", "merge", "evaluate", "export", "test")
DATA_FORMATS = ("auto", "korquad", "input_output", "alpaca", "sharegpt", "messages", "text")

# Variables that belong to the libraries we drive; allowed in `.env` and never treated as typos of ours.
PASSTHROUGH = {
    "WANDB_API_KEY", "WANDB_ENTITY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_BASE_URL", "HF_TOKEN",
    "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF",
    "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
    "RAPA_NO_VENV", "RAPA_CACHE", "RAPA_FAULT", "PYTHON", "VENV", "HOSTFILE", "ENV_FILE", "WORLD_SIZE", "RANK",
    "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE",
}
# Never printed, never saved: they stay in the environment where the libraries find them.
SECRETS = ("WANDB_API_KEY", "HF_TOKEN")


def _f(default: Any, help: str, choices: tuple | None = None, demo: Any = None, embedded: Any = None) -> Any:
    # demo: the value when BASE_MODEL_NAME and DATA_PATH are both unset (the bundled demo);
    # embedded: the value when BASE_MODEL_NAME is unset (the bundled SmolLM2, whatever the data).
    meta = {"help": help, "choices": choices, "demo": demo, "embedded": embedded}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. The environment name of a field is its name in upper case."""

    # --- what to run
    job: str = _f("train", "train | resume_training | prepare | merge | evaluate | export | test", JOBS)
    base_model_name: str = _f(EMBEDDED_MODEL, "HF model folder or name; the default is the bundled SmolLM2-135M-Instruct")
    data_path: str = _f(DEFAULT_DATA, "JSON / JSONL file, folder of them, or datasets.save_to_disk folder")
    base_save_path: str = _f("final_model", "root of the output tree <root>/<model>/<epochs>/")
    checkpoint_path: str = _f("", "checkpoint folder; default checkpoints/<model>/<epochs>/<qlora|lora>")
    overwrite: bool = _f(False, "JOB=train over existing checkpoints/outputs starts over instead of refusing")
    # --- model and adapter
    # The bundled 135M model fits in 1 GB, and NF4 alone costs it 10 of the 24 probe answers it knew
    # (docs/QUALITY.md): QLoRA buys it nothing and loses knowledge, so it trains with plain LoRA unless told.
    use_qlora: bool = _f(True, "load the base in NF4 4-bit with double quantisation (QLoRA); the bundled "
                         "SmolLM2 trains with plain LoRA unless this is set", embedded=False)
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
    qa_with_context: bool = _f(False, "KorQuAD/SQuAD: put the paragraph into the prompt")
    passage_rows: str = _f("auto", "QA rows that come with their passage (KorQuAD/SQuAD context): on also trains each distinct "
                           "passage once as a text row with loss (the facts in the passage's own words, not only as "
                           "question -> answer pairs); auto = on (docs/QUALITY.md, issue 23); the demo keeps it off (its preset was measured "
                           "without)", ("auto", "on", "off"), demo="off")
    train_on_inputs: bool = _f(False, "also compute the loss on prompt/user tokens")
    max_seq_length: int = _f(1024, "longest tokenised row")
    max_length_policy: str = _f("truncate", "rows over MAX_SEQ_LENGTH: truncate | drop | fail", ("truncate", "drop", "fail"))
    data_max_reject_fraction: float = _f(0.1, "stop with exit 3 when more than this fraction of rows is rejected")
    data_strict: bool = _f(False, "stop at the first bad row")
    eval_fraction: float = _f(0.0, "held-out fraction for eval loss; 0 evaluates on the training questions (seed 000)")
    packing: bool = _f(False, "pack rows into MAX_SEQ_LENGTH sequences without cross-row attention")
    replay_fraction: float = _f(1.0, "self-distilled replay rows (base model's own answers) per user row, up to "
                                "the pool's size; 0 = off", demo=1.6)
    replay_loss: str = _f("auto", "auto | sft | kl: train replay rows on the base's greedy answers (sft), or on the base "
                          "model's whole next-token distribution (kl: one extra no-grad forward per batch); auto = kl on "
                          "a CPU, sft on a GPU (kl's full-vocabulary logits are not in the GPU memory plan yet)",
                          ("auto", "sft", "kl"))
    replay_weight: float = _f(1.0, "kl replay: weight of each replay token's KL against one user token's cross-entropy "
                              "(higher keeps the model closer to the base)")
    # --- optimisation
    num_epochs: float = _f(3, "training epochs", demo=9)
    learning_rate: float = _f(0.0, "peak learning rate; 0 = 1e-4 with QLoRA, 5e-6 without", demo=1e-3)
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
    export_gguf: str = _f("", "after merge also write GGUF: comma list of f16, q8_0, bf16, q4_k_m (empty = no export)")
    eval_max_new_tokens: int = _f(32, "greedy tokens generated per evaluation question")
    eval_max_questions: int = _f(0, "evaluate at most N questions (0 = all)")
    eval_path: str = _f("auto", "a separate evaluation file (any supported format: for example the same facts asked in other "
                        "words) scored beside the trained questions; auto = the bundled sample's paraphrases when DATA_PATH "
                        "is the bundled sample, else none; none = off")
    retention_set: str = _f("data/retention/probes.json", "general-knowledge probes for the retention score (none = off)")
    # --- distributed
    num_gpus: int = _f(0, "GPUs to train on (0 = every visible GPU)")
    deepspeed_config: str = _f("", "DeepSpeed JSON for several GPUs (default: configs/deepspeed/zero2.json)")

    # ------------------------------------------------------------------------------------------------
    @property
    def model_slug(self) -> str:
        return Path(self.base_model_name.rstrip("/")).name or self.base_model_name

    @property
    def adapter_kind(self) -> str:
        return "qlora" if self.use_qlora else "lora"

    @property
    def lr(self) -> float:
        if self.learning_rate > 0:
            return self.learning_rate
        return 1e-4 if self.use_qlora else 5e-6

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
        return f"{self.num_epochs:g}"

    def public_dict(self) -> dict:
        """The effective configuration as saved in manifests: secrets are never fields, so nothing to mask."""
        return dataclasses.asdict(self)

    def fingerprint_fields(self) -> dict:
        """The fields a resume must not change (it would train a different thing)."""
        keys = ("base_model_name", "use_qlora", "lora_rank", "lora_alpha", "target_modules", "max_seq_length",
                "grad_accum", "data_format", "qa_with_context", "passage_rows", "train_on_inputs", "chat_template", "packing",
                "replay_fraction", "replay_loss", "replay_weight", "seed", "num_epochs", "lora_dropout")
        return {k: getattr(self, k) for k in keys}

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = ".env") -> "RunConfig":
        """Build the config from `environ` over the `.env` file (the real environment wins). Raise ConfigError
        listing every problem at once."""
        environ = dict(os.environ if environ is None else environ)
        problems: list[str] = []
        file_values = _read_env_file(env_file, problems)
        merged = {**file_values, **environ}
        names = {f.name.upper(): f for f in dataclasses.fields(cls)}

        for key in file_values:
            if key not in names and key not in PASSTHROUGH:
                problems.append(_unknown(key, names, f"in {env_file}"))
        for key in environ:
            if key not in names and key not in PASSTHROUGH and _looks_like_ours(key, names):
                problems.append(_unknown(key, names, "in the environment"))

        user_set = {k for k in names if merged.get(k, "") != ""}
        embedded = "BASE_MODEL_NAME" not in user_set
        demo = embedded and "DATA_PATH" not in user_set
        values: dict[str, Any] = {}
        for name, f in names.items():
            raw = merged.get(name, "")
            if raw == "":
                if demo and f.metadata.get("demo") is not None:
                    values[f.name] = f.metadata["demo"]
                elif embedded and f.metadata.get("embedded") is not None:
                    values[f.name] = f.metadata["embedded"]
                continue
            try:
                values[f.name] = _coerce(raw, f)
            except ValueError as e:
                problems.append(f"{name}={raw!r}: {e}")
        # Range and cross-field checks run on the values that parsed (unparsable ones keep their defaults),
        # so one error lists every problem.
        cfg = cls(**values)
        problems.extend(cfg.problems())
        if not problems:
            return cfg
        raise ConfigError("configuration has %d problem(s):\n  - %s" % (len(problems), "\n  - ".join(problems)))

    def problems(self) -> list[str]:
        """Cross-field and range checks. Paths are checked by the stages that read them."""
        p: list[str] = []
        def need(ok: bool, msg: str) -> None:
            if not ok:
                p.append(msg)
        need(self.lora_rank > 0, f"LORA_RANK={self.lora_rank}: must be a positive integer")
        need(self.lora_alpha > 0, f"LORA_ALPHA={self.lora_alpha}: must be a positive integer")
        need(0 <= self.lora_dropout < 1, f"LORA_DROPOUT={self.lora_dropout}: must be in [0, 1)")
        need(self.num_epochs > 0, f"NUM_EPOCHS={self.num_epochs:g}: must be > 0")
        need(self.learning_rate >= 0, f"LEARNING_RATE={self.learning_rate}: must be > 0 (or 0 for the default)")
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
        need(not (self.replay_weight != 1 and self.replay_loss == "sft"),
             f"REPLAY_WEIGHT={self.replay_weight:g} weights the kl replay loss: it needs REPLAY_LOSS=kl (or auto on a CPU), "
             "not REPLAY_LOSS=sft")
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
        need(self.max_gpu_memory >= 0, f"MAX_GPU_MEMORY={self.max_gpu_memory}: must be >= 0 (GB)")
        need(self.num_gpus >= 0, f"NUM_GPUS={self.num_gpus}: must be >= 0")
        need(self.eval_max_new_tokens >= 1, f"EVAL_MAX_NEW_TOKENS={self.eval_max_new_tokens}: must be >= 1")
        mods = [m.strip() for m in self.target_modules.split(",")]
        need(self.target_modules == "all-linear" or all(m.replace("_", "").replace(".", "").isalnum() for m in mods),
             f"TARGET_MODULES={self.target_modules!r}: comma-separated module names such as q_proj,v_proj, or all-linear")
        for fmt in filter(None, self.export_gguf.split(",")):
            need(fmt.strip() in ("f16", "q8_0", "bf16", "q4_k_m"),
                 f"EXPORT_GGUF={self.export_gguf!r}: allowed are f16, q8_0, bf16, q4_k_m (q4_k_m needs llama-cpp-python)")
        need(self.chat_template in ("auto", "chatml", "alpaca", "llama-3"),
             f"CHAT_TEMPLATE={self.chat_template!r}: allowed are auto, chatml, alpaca, llama-3")
        return p


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


_PREFIXES = ("LORA_", "DATA_", "EVAL_", "MERGE_", "EXPORT_", "QLORA", "USE_", "NUM_", "MAX_SEQ", "BASE_MODEL",
             "BASE_SAVE", "CHECKPOINT_", "SAVE_", "LEARNING_", "GRAD_", "TRAIN_", "REPLAY_", "RETENTION_")


def _looks_like_ours(key: str, names: Mapping[str, Any]) -> bool:
    # The process environment holds many unrelated variables: only flag the ones close to ours.
    return key.startswith(_PREFIXES) or bool(difflib.get_close_matches(key, list(names), n=1, cutoff=0.85))


def _unknown(key: str, names: Mapping[str, Any], where: str) -> str:
    guess = difflib.get_close_matches(key, list(names) + sorted(PASSTHROUGH), n=1, cutoff=0.6)
    hint = f" (did you mean {guess[0]}?)" if guess else " (run ./run.sh --help for the list)"
    return f"{key}: unknown variable {where}{hint}"


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


def _coerce(raw: str, f: dataclasses.Field) -> Any:
    raw = raw.strip()
    kind = type(f.default)
    choices = f.metadata.get("choices")
    if kind is bool:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("expected true or false")
    if kind is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
    if kind is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError("expected a number") from None
    if choices and raw not in choices:
        raise ValueError("allowed values are " + ", ".join(choices))
    return raw


def describe(cfg: RunConfig) -> str:
    """The config banner, one variable a line, derived values after."""
    lines = [f"  {k.upper():<26} {v}" for k, v in cfg.public_dict().items()]
    lines.append(f"  {'(effective learning rate)':<26} {cfg.lr:g}")
    return "\n".join(lines)


def help_text() -> str:
    out = ["Variables (environment or .env; the environment wins). Defaults in brackets;",
           "the embedded demo (BASE_MODEL_NAME and DATA_PATH both unset) uses the preset in braces ({demo: ...}),",
           "and the bundled model (BASE_MODEL_NAME unset) its own ({embedded: ...}).", ""]
    for f in dataclasses.fields(RunConfig):
        demo, emb = f.metadata.get("demo"), f.metadata.get("embedded")
        preset = (f" {{demo: {demo}}}" if demo is not None else "") + (f" {{embedded: {emb}}}" if emb is not None else "")
        out.append(f"  {f.name.upper():<26} [{f.default}]{preset}  {f.metadata['help']}")
    out.append("")
    out.append("  Secrets, read from the environment only and never printed or saved: " + ", ".join(SECRETS))
    return "\n".join(out)


def env_example() -> str:
    """The body of .env.example, generated from the dataclass (a test keeps the file in sync)."""
    out = ["# Every variable the pipeline reads, with its default. Copy to .env and edit; the environment wins.",
           "# Generated from finetune/config.py: python -m finetune.config --env-example > .env.example", ""]
    for f in dataclasses.fields(RunConfig):
        default = f.default if not isinstance(f.default, bool) else str(f.default).lower()
        out.append(f"# {f.metadata['help']}")
        out.append(f"# {f.name.upper()}={default}")
    out += ["", "# Secrets: set them here or in the environment; they are never printed or written anywhere.",
            "# WANDB_API_KEY=", "# HF_TOKEN="]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if "--env-example" in sys.argv:
        print(env_example(), end="")
    elif "--get" in sys.argv:  # run.sh asks for a value that may come from .env
        name = sys.argv[sys.argv.index("--get") + 1]
        try:
            print(getattr(RunConfig.from_env(env_file=os.environ.get("ENV_FILE", ".env")), name.lower()))
        except ConfigError:
            print(getattr(RunConfig(), name.lower()))  # the full error comes from the job itself
    elif "--check" in sys.argv:
        try:
            print(json.dumps(RunConfig.from_env().public_dict(), indent=1))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        print(help_text())
