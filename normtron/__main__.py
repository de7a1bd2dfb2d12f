"""The `normtron` command (console script and `python -m normtron`): one supervised entry point."""

import sys


def main() -> int:
    from normtron.trainer.supervision import exit_with_launcher

    exit_with_launcher()  # first, before the slow imports: a worker never outlives its torchrun agent
    from normtron.trainer.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
