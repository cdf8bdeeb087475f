"""`ray job submit -- python jobs/predict.py --config ...`: same options as `dakd predict`."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))

from dakd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(job="predict"))
