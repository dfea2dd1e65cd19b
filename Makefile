PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: demo test bench

# The tutorial's scenario on built-in defaults (creates or reuses .venv).
demo:
	./scripts/demo

# The whole test suite (creates or reuses .venv, installs the test peers).
test:
	./scripts/test


# Message mode: direct versus through the balancer; writes bench/results/message.{json,md}.
bench:
	$(PYTHON) bench/message_bench.py $(BENCH_ARGS)
