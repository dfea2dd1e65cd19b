"""The entry point of `python -m balancer` and of the `balancer` command.

It imports nothing but `signal` before it sets SIGINT to its default action: a Ctrl-C
while the modules load (or, for `balancer serve`, until the event loop takes SIGINT
over) ends the process quietly, by the signal, not with a KeyboardInterrupt traceback.
"""

import signal


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from balancer.cli import main as cli_main

    return cli_main()
