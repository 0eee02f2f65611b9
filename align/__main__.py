"""`python -m align COMMAND ...` is the `align` command (align.cli)."""

from align.cli import main

if __name__ == "__main__":
    main()
