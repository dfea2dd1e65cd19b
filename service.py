"""Sample backend service, as in the tutorial: `python service.py -p 9090`."""

import sys
from pathlib import Path

try:
    from balancer.tools.service import main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    from balancer.tools.service import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: a quiet exit
        sys.exit(130)
