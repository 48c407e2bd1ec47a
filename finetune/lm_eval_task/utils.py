"""Scores for the run_eval harness task: the same exact and contains match as JOB=evaluate (finetune.evaluate)."""

from finetune.evaluate import contains_match, exact_match


def process_results(doc, results):
    pred = results[0].strip()
    answers = [doc["answer"]]
    return {"contains_match": float(contains_match(pred, answers)), "exact_match": float(exact_match(pred, answers))}
