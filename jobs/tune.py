"""`ray job submit -- python jobs/tune.py --config ...`: same options as `dakd tune`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from dakd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(job="tune"))
