import sys

from trainer.supervision import exit_with_launcher

exit_with_launcher()  # first, before the slow imports: a worker never outlives its torchrun agent

from trainer.cli import main  # noqa: E402

sys.exit(main())
