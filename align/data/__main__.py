"""`python -m align.data check FILE` (see align.data.check)."""

from align.data.check import main

main()
