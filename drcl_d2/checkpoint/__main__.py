"""``python -m drcl_d2.checkpoint INPUT OUTPUT ...``: the same command as ``drcl-convert``."""
import sys

from .convert import main

if __name__ == "__main__":
    sys.exit(main())
