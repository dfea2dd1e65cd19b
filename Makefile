PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: demo test bench soak

# The tutorial's scenario on built-in defaults (creates or reuses .venv).
demo:
	./scripts/demo

# The whole test suite (creates or reuses .venv, installs the test peers).
test:
	./scripts/test


# Message mode: direct versus through the balancer; writes bench/results/message.{json,md}.
bench:
	$(PYTHON) bench/message_bench.py $(BENCH_ARGS)
	$(PYTHON) bench/report.py

# Soak: mixed load with backend kills and restarts for SOAK_MINUTES (default 10), and
# 10,000 idle connections; writes bench/results/{soak,idle}.{json,md}.
SOAK_MINUTES ?= 10
soak:
	$(PYTHON) bench/soak.py --minutes $(SOAK_MINUTES)
	$(PYTHON) bench/idle_connections.py
