"""Fixtures shared by the end-to-end tests."""

from types import SimpleNamespace

import pytest

from tests.conftest import qa_rows, write_jsonl
from tests.e2e.helpers import probe_file, run_sh

# Short enough for CI, long enough to leave every artefact and to learn some of the 8 short answers: 12 QLoRA steps,
# merged through the parity gate, evaluated.
SMOLLM2_RUN = dict(USE_QLORA="true", MAX_STEPS=12, BATCH_SIZE=4, LEARNING_RATE=1e-3, SAVE_STEPS=2,
                   EVAL_MAX_NEW_TOKENS=12, REPLAY_FRACTION=0)


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory, smollm2_dir):
    """One training run of the bundled SmolLM2 through run.sh, shared by every test that needs a trained run.

    They read it and run other jobs on it (adding answers.jsonl and lines to run.json); none changes an artefact.
    `env` finds the run again: pass it to run_sh."""
    tmp = tmp_path_factory.mktemp("qlora")
    env = dict(DATA_PATH=write_jsonl(tmp / "qa.jsonl", qa_rows(8)), RETENTION_SET=probe_file(tmp), **SMOLLM2_RUN)
    result = run_sh(tmp, **env)
    return SimpleNamespace(tmp=tmp, env=env, result=result, dir=tmp / "final_model" / "SmolLM2-135M-Instruct" / "3")
