"""`python -m balancer.tools.client`: the load client."""

import sys

from balancer.tools.client.cli import main

sys.exit(main())
