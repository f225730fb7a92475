"""`ray job submit ... -- python jobs/evaluate.py -c CONFIG [key=value ...]`: the evaluation of one model as a Ray job."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run from a job's working_dir

from eqrlhf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
