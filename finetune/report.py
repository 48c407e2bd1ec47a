"""Human-readable outputs of a run: the loss curve PNG and report.md."""

from __future__ import annotations

import json
from pathlib import Path


def loss_curve(metrics: Path, out: Path) -> Path | None:
    if not Path(metrics).is_file():
        return None
    recs = [json.loads(l) for l in open(metrics, encoding="utf-8")]
    train = [(r["step"], r["loss"]) for r in recs if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _eval_set_lines(e: dict | None) -> list[str]:
    """EVAL_PATH: questions that were not trained on, beside the trained ones."""
    if not e:
        return []
    b, f = e["base"], e["finetuned"]
    lines = ["", f"## Questions not trained on (EVAL_PATH `{e['path']}`)", "",
             "| metric | base | fine-tuned |", "|---|---|---|",
             f"| contains match | {b['contains_match']:.1%} | {f['contains_match']:.1%} |",
             f"| exact match | {b['exact_match']:.1%} | {f['exact_match']:.1%} |",
             f"| questions | {b['n']} | {f['n']} |"]
    if e.get("n_skipped"):
        lines += ["", f"{e['n_skipped']} rows could not be used; first: {e['skipped'][0]}"]
    lines += ["", "| question | answer | base | fine-tuned |", "|---|---|---|---|"]
    for x in e["examples"][:20]:
        cell = lambda s, ok: (("✅ " if ok else "❌ ") + s.replace("|", "\\|").replace("\n", " ")[:80])
        lines.append(f"| {x['question'][:60].replace('|', '/')} | {x['answer'][:40]} | {cell(x['base'], x['base_ok'])} | "
                     f"{cell(x['finetuned'], x['finetuned_ok'])} |")
    return lines


def markdown(report: dict, png: Path | None) -> str:
    b, f = report["base"], report["finetuned"]
    lines = [f"# Evaluation: {report['model']}", "",
             f"Fine-tuned model: `{report['finetuned_from']}`", "",
             "| metric | base | fine-tuned |", "|---|---|---|",
             f"| contains match | {b['contains_match']:.1%} | {f['contains_match']:.1%} |",
             f"| exact match | {b['exact_match']:.1%} | {f['exact_match']:.1%} |"]
    for k in ("rouge1", "rouge2", "rougeL"):
        lines.append(f"| {k.upper().replace('ROUGE', 'ROUGE-')} | {b['rouge'][k]:.3f} | {f['rouge'][k]:.3f} |")
    lines.append(f"| questions | {b['n']} | {f['n']} |")
    lines += _eval_set_lines(report.get("eval_set"))
    pm = report.get("preference")
    if pm:  # issue 20
        b, f = pm["base"], pm["finetuned"]
        lines += ["", f"## Preference pairs ({pm['pairs']} held out; reference: {pm['reference']}, beta {pm['beta']:g})", "",
                  "| metric | base | fine-tuned |", "|---|---|---|",
                  f"| preference accuracy (implicit reward prefers chosen) | {b['reward_accuracy']:.1%} | {f['reward_accuracy']:.1%} |",
                  f"| mean reward margin | {b['reward_margin']:.3f} | {f['reward_margin']:.3f} |",
                  f"| log-likelihood prefers chosen | {b['logp_accuracy']:.1%} | {f['logp_accuracy']:.1%} |",
                  f"| mean log-likelihood margin | {b['logp_margin']:.2f} | {f['logp_margin']:.2f} |"]
    r = report.get("retention")
    if r:
        frac = f"{r['fraction']:.1%}" if r["fraction"] is not None else "n/a"
        lines += ["", "## Retention (general knowledge the base model had)", "",
                  f"Kept **{r['kept']} of {r['of']}** ({frac}); newly right: {r['gained']}."]
        if r["lost"]:
            lines += ["", "Lost:"] + [f"- {q}" for q in r["lost"]]
    t = report.get("training") or {}
    if t:
        lines += ["", "## Training", "", f"Steps: {t.get('steps')}; loss {t.get('first_loss', float('nan')):.4f} -> "
                  f"{t.get('last_loss', float('nan')):.4f}"
                  + (f"; last eval loss {t['last_eval_loss']:.4f}" if "last_eval_loss" in t else "")]
    h = report.get("harness")
    if h:
        lines += ["", f"## lm-evaluation-harness {h.get('lm_eval', '')} (fine-tuned model)", "", "| task | metric | value |",
                  "|---|---|---|"]
        for task, metrics in h["results"].items():
            lines += [f"| {task} | {k.split(',')[0]} | {v:.3f} |" for k, v in metrics.items()
                      if isinstance(v, (int, float)) and "stderr" not in k]
    g = report.get("gguf")
    if g:
        lines += ["", f"## GGUF files in llama.cpp ({g['questions']} {g['source']} questions, greedy)", "",
                  "| file | answers identical to the merged model | contains the reference (merged) | stops at EOS "
                  "(merged) | verdict |", "|---|---|---|---|---|"]
        for fmt, r in g["files"].items():
            lines.append(f"| {fmt} | {r['agree']}/{r['questions']} | {r['contains']} ({r['contains_hf']}) | "
                         f"{r['eos']} ({r['eos_hf']}) | {r['verdict']}: {r['why']} |")
    if png:
        lines += ["", f"![loss curve]({Path(png).name})"]
    lines += ["", "## Examples", "", "| question | answer | base | fine-tuned |", "|---|---|---|---|"]
    for e in report["examples"][:20]:
        cell = lambda s, ok: (("✅ " if ok else "❌ ") + s.replace("|", "\\|").replace("\n", " ")[:80])
        lines.append(f"| {e['question'][:60].replace('|', '/')} | {e['answer'][:40]} | {cell(e['base'], e['base_ok'])} | "
                     f"{cell(e['finetuned'], e['finetuned_ok'])} |")
    return "\n".join(lines) + "\n"
