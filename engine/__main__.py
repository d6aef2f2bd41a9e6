"""`python -m rlhf_engine <stage>` (`rlhf-engine <stage>`), and `python -m engine <stage>` from a
checkout's root: the command line of cli.py.

From a checkout's root this file runs as `engine.__main__`; the engine must still run as the one
installed package `rlhf_engine` (a second copy under the folder's name would hold classes of its own,
its errors uncaught by the first's), so the CLI is imported by that name.
"""

import importlib
import sys

sys.exit(importlib.import_module("rlhf_engine.cli").main())
