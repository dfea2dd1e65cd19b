"""`python -m balancer`: the command line (see `balancer.cli`)."""

import sys

from balancer.entry import main

sys.exit(main())
