"""The planner's constants measured per card (finetune/calibrate.py): the host-floor fit, the record, and the plan
that reads it. No GPU: step times are generated from a known law, and the plan is the CPU planner's."""

import math
import random

import pytest

from finetune import calibrate
from finetune import plan as planner
from tests.test_plan import GPU, H100_MEMORY, SHAPE, gpu_cfg


def bench_lengths(n=296, seed=42):
    """The GPU bench's variable rows: log-normal, median 300, clipped to 32..2048."""
    rng = random.Random(seed)
    return [int(min(max(round(math.exp(math.log(300) + rng.gauss(0, 1))), 32), 2048)) for _ in range(n)]


def steps_from_law(host_s, s_per_token, micro, tokens, noise=0.02, seed=0):
    rng = random.Random(seed)
    return [((host_s * micro + s_per_token * t) * (1 + rng.uniform(-noise, noise)), t, micro) for t in tokens]


def test_the_fit_recovers_the_host_floor_through_warm_up_outliers():
    rng = random.Random(1)
    tokens = [sum(rng.choice(bench_lengths()) for _ in range(8)) for _ in range(60)]
    steps = steps_from_law(0.3, 70e-6, 1, tokens)
    for i in (4, 8, 10):  # the first run's shape-specialisation stalls (docs/BENCHMARKS.md, run I21-6)
        steps[i] = (steps[i][0] + 1.5, steps[i][1], 1)
    fit = calibrate.fit_host_floor(steps)
    assert fit["fixed_tokens"] == pytest.approx(0.3 / 70e-6, rel=0.08)
    assert fit["s_per_token"] == pytest.approx(70e-6, rel=0.08)


def test_the_host_floor_is_per_micro_batch():
    tokens = [random.Random(i).randint(8000, 30000) for i in range(40)]  # 2,000-7,500 a micro-batch of 4
    fit = calibrate.fit_host_floor(steps_from_law(0.2, 50e-6, 4, tokens, noise=0.0))
    assert fit["fixed_tokens"] == pytest.approx(0.2 / 50e-6, rel=0.01)


def test_micro_batches_that_never_meet_the_floor_measure_none():
    """The planner's law is max(host, GPU) per micro-batch: micro-batches all far above the floor keep the GPU busy,
    the host's time hides behind it, and a line through the steps would report a floor near zero."""
    rng = random.Random(3)
    tokens = [rng.randint(20000, 60000) for _ in range(40)]
    steps = [(max(0.3, 70e-6 * t) + 0.01, t, 1) for t in tokens]  # + the step's sync and optimizer
    assert "the host's time hides behind the GPU's" in calibrate.fit_host_floor(steps)["why"]


def test_host_bound_steps_measure_none_and_say_so():
    """Run I21-8 (H100, 24 GiB, variable rows): steps whose time does not follow their tokens."""
    rng = random.Random(5)
    tokens = [rng.randint(2000, 6000) for _ in range(40)]
    steps = [(0.6 + rng.uniform(-0.15, 0.15) + 1e-6 * t, t, 1) for t in tokens]
    fit = calibrate.fit_host_floor(steps)
    assert "fixed_tokens" not in fit and "host-bound" in fit["why"]


def test_rows_of_one_length_or_too_few_steps_measure_no_floor():
    assert "the same tokens" in calibrate.fit_host_floor(steps_from_law(0.3, 70e-6, 1, [16384] * 40))["why"]
    assert calibrate.fit_host_floor(steps_from_law(0.3, 70e-6, 1, [1000, 5000] * 5))["why"] == \
        "7 steady steps (a fit needs 8)"  # 10 - 3 warm-up


def test_a_record_keeps_the_last_runs_and_a_broken_one_is_ignored(tmp_path):
    path = calibrate.path_for(tmp_path, calibrate.key_of("NVIDIA H200", "unsloth", "nf4", "fast", SHAPE))
    assert path.name == "NVIDIA-H200_unsloth_nf4_fast_L32h4096i14336v128256.json"
    assert calibrate.load(path) is None
    record = None
    for i in range(calibrate.HISTORY + 2):
        record = calibrate.save(path, calibrate.load(path), {"device": "NVIDIA H200", "fixed_tokens": 1000.0 + i})
    runs = calibrate.load(path)["runs"]
    assert [r["fixed_tokens"] for r in runs] == [1000.0 + i for i in range(2, calibrate.HISTORY + 2)]
    assert not list(path.parent.glob("*.tmp*"))
    path.write_text("{not json")
    assert calibrate.load(path) is None


def test_constants_take_the_median_floor_the_largest_memory_factor_and_a_measured_recompute():
    off = {"mode": "off", "s_per_token": 60e-6, "micro_tokens": 4000.0, "fixed_tokens": 3000.0, "mem_scale": 1.05}
    record = {"device": "NVIDIA H200", "updated": "2026-12-07", "runs": [
        off, {**off, "fixed_tokens": 3400.0, "mem_scale": 1.1},
        {"mode": "offload", "s_per_token": 84e-6, "micro_tokens": 5000.0, "fixed_tokens": 9000.0, "mem_scale": 0.7},
        {"mode": "partial", "recomputed_share": 0.5, "s_per_token": 69e-6, "micro_tokens": 3000.0, "mem_scale": None},
        # not comparable: a partial run recomputing 2 of 32 layers, and an "on" run with LoRA dropout
        {"mode": "partial", "recomputed_share": 2 / 32, "s_per_token": 90e-6, "micro_tokens": 4000.0},
        {"mode": "on", "dropout": 0.05, "s_per_token": 99e-6, "micro_tokens": 4000.0}]}
    k = calibrate.constants_from(record, qlora=True)
    assert k.fixed_tokens == pytest.approx(3400.0)
    assert k.mem_scale == pytest.approx(1.1)             # the largest: the safe side of memory
    assert k.recompute["offload"] == pytest.approx(0.4)  # 84 / 60 - 1
    assert k.recompute["partial"] == pytest.approx(0.3)  # (69 / 60 - 1) / 0.5 of the layers
    assert k.recompute["on"] == planner.RECOMPUTE["on"]  # only measured with dropout: the default
    assert "measured on NVIDIA H200 by 6 earlier run(s)" in k.source
    # Micro-batches of another size than the runs without checkpointing: no recompute cost from them.
    far = calibrate.constants_from({"runs": [off, {**record["runs"][2], "micro_tokens": 20000.0}]}, qlora=True)
    assert far.recompute["offload"] == planner.RECOMPUTE["offload"]
    # A peak under the estimate never makes the plan tighter; nonsense entries are skipped, not fatal.
    low = calibrate.constants_from({"runs": [{"mem_scale": 0.5}, {"fixed_tokens": "many"}, {"mode": 3}]}, qlora=False)
    assert low.mem_scale == 1.0 and low.fixed_tokens == planner.FIXED_TOKENS["lora"]
    assert calibrate.constants_from({"runs": []}, qlora=True) is None


def test_a_run_without_a_fit_still_records_its_memory():
    run = calibrate.measure(steps_from_law(0.3, 70e-6, 1, [16384] * 40), 20 * 2**30, 25 * 2**30, "H200", "off", 0.0)
    assert run["mem_scale"] == pytest.approx(0.8) and "fixed_tokens" not in run and "same tokens" in run["no_floor"]
    assert calibrate.measure([], 0, 25 * 2**30, "H200", "off", 0.0) is None


def test_the_plan_follows_the_cards_constants_and_says_where_they_came_from(tmp_path):
    cfg, lengths = gpu_cfg(tmp_path, max_gpu_memory=24), bench_lengths()
    plan = lambda k: planner.plan(cfg, GPU, len(lengths), lengths=lengths, shape=SHAPE, gpu_memory=H100_MEMORY,
                                  measured=k)
    default = plan(None)
    assert (default.micro_batch, default.grad_ckpt) == (8, "partial")
    assert "the H100 defaults" in default.notes[-2]
    # A card whose host costs little per micro-batch: small micro-batches lose nothing, so no layer is recomputed.
    quick = plan(planner.Constants(300.0, source="measured on a test card"))
    assert (quick.micro_batch, quick.grad_accum, quick.grad_ckpt) == (1, 8, "off")
    assert "measured on a test card" in quick.notes[-2]
    # A memory estimate known to be high lets more layers keep their activations; one known to be low, fewer.
    tight = plan(planner.Constants(4300.0, mem_scale=0.9))
    loose = plan(planner.Constants(4300.0, mem_scale=1.3))
    assert loose.keep_layers < default.keep_layers < tight.keep_layers
    assert tight.est_bytes * 0.9 <= planner.budget_bytes(cfg, H100_MEMORY) < tight.est_bytes  # the unscaled estimate


def test_the_recorder_pairs_each_steps_time_with_the_tokens_it_trained(tmp_path):
    seen = [0]
    rec = calibrate.Recorder(tmp_path / "r.json", "card", "off", 0.0, 1.0, micro_batches=2,
                             tokens_seen=lambda: seen[0])
    for tokens in (0, 900, 1500, 700):  # the first step end only starts the clock
        seen[0] += tokens
        rec.on_step_end(None, None, None)
    assert [(t, m) for _, t, m in rec.steps] == [(900, 2), (1500, 2), (700, 2)]
    assert all(s >= 0 for s, _, _ in rec.steps)


def test_only_a_gpu_run_has_a_record_and_keys_differ_by_process_count(tmp_path):
    from finetune.model import Backend

    assert calibrate.record_path(gpu_cfg(tmp_path), Backend("hf", "test", "cpu"), SHAPE) is None
    one = calibrate.key_of("NVIDIA H100 80GB HBM3", "unsloth", "fp8", "fast", SHAPE)
    assert calibrate.key_of("NVIDIA H100 80GB HBM3", "unsloth", "fp8", "fast", SHAPE, 2) == one + "_x2"


def test_a_real_trainer_step_is_timed_with_the_tokens_it_trained(tmp_path, tiny_llama_dir):
    """The Recorder on build_trainer's trainer (a CPU run of the tiny Llama): every step after the first is one
    entry, and the entries' tokens are the tokens the trainer counted for those steps."""
    from finetune import model as model_lib
    from finetune.train import load_rows, to_dataset
    from finetune.trainer import build_trainer
    from tests.test_train import CPU, setup_run

    cfg, paths, tok = setup_run(tmp_path, tiny_llama_dir, num_epochs=2, batch_size="2")
    rows, _ = load_rows(paths, cfg)
    ds = to_dataset(rows, tok, cfg, "sft")
    p = planner.plan(cfg, CPU, len(rows), lengths=[len(x) for x in ds["input_ids"]])
    trainer = build_trainer(cfg, paths, model_lib.load_for_training(cfg, str(tiny_llama_dir), tok, CPU, p), tok, p, ds)
    per_step = []
    rec = calibrate.Recorder(tmp_path / "cal" / "card.json", "cpu", p.grad_ckpt, 0.0, 0.0, p.grad_accum,
                             lambda: per_step.append(trainer._total_train_tokens) or trainer._total_train_tokens)
    trainer.add_callback(rec)
    trainer.train()
    assert len(rec.steps) == trainer.state.global_step - 1 > 8
    assert [t for _, t, _ in rec.steps] == [b - a for a, b in zip(per_step, per_step[1:])]
    assert sum(t for _, t, _ in rec.steps) == trainer._total_train_tokens - per_step[0]
    assert all(s > 0 and m == p.grad_accum for s, _, m in rec.steps)
