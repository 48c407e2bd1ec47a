"""Thin entry point: the evaluate stage alone, on the outputs already on disk; the logic lives in finetune/.

Reads the same variables as run.sh (environment and .env). JOB=resume_training makes train.py resume.
"""

import sys

from finetune.pipeline import main

if __name__ == "__main__":
    sys.exit(main(only=("evaluate",)))
