"""`python -m finetune` runs the job named by JOB (see finetune/pipeline.py)."""

import sys

from finetune.pipeline import main

sys.exit(main())
