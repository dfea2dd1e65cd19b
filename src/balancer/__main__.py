"""`python -m balancer`: the command line (see `balancer.cli`)."""

import signal

# First of all: a Ctrl-C while the modules load ends the process quietly, by the signal.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys  # noqa: E402

from balancer.cli import main  # noqa: E402

sys.exit(main())
