"""Where the tests find things: the checkout, this folder of helpers, the data corpus and the reference numbers.

Tests import these instead of counting `Path(__file__).parent`s, so a test file can move between folders.
"""

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
REPO = SUPPORT.parent.parent
DATA = SUPPORT / "data"  # the data corpus: good/ (one file per format), bad/ (one problem per file), replies
REFERENCE = SUPPORT / "reference"  # numbers computed by other implementations (OpenRLHF, TRL, DeepSpeed-Chat)
