"""The load client (`load`: connections and run, `run`: a run with its report, `cli`: the
command line) and the tutorial's synchronous classes (`tutorial`)."""
