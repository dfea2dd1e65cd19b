"""Load client, as in the tutorial.

    python client.py --requests_per_client 1000 --client_count 1 \
        --balancerPort 8080 --balancerIp localhost
"""

import sys
from pathlib import Path

try:
    from balancer.tools.client.cli import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from balancer.tools.client.cli import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: a quiet exit
        sys.exit(130)
