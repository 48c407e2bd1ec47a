"""`python -m finetune` runs the job named by JOB (see finetune/pipeline.py)."""

import os
import sys
from pathlib import Path

from finetune.pipeline import main

code = main()
# Under torchrun, run.sh reads its node's first process's own exit code from here (torchrun itself would only say 1).
if os.environ.get("RAPA_EXIT_FILE") and os.environ.get("LOCAL_RANK", "0") == "0":
    Path(os.environ["RAPA_EXIT_FILE"]).write_text(str(code))
sys.exit(code)
