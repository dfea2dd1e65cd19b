PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: demo test bench soak mutation

# The tutorial's scenario on built-in defaults (creates or reuses .venv).
demo:
	./scripts/demo

# The whole test suite (creates or reuses .venv, installs the test peers).
test:
	./scripts/test


# Mutation testing of the pure core and the message dispatch with the fast tests (tens of
# minutes; not part of `make test`); writes mutants/report.md, see docs/mutation.md.
mutation:
	./scripts/mutation $(MUTATION_ARGS)

# Message mode: direct, HAProxy and the balancer (compiled and pure Python), load from the
# load client's C engine, with rows for more connections, backends and bytes; writes
# bench/results/message.{json,md}. HTTP mode: wrk against nginx direct, HAProxy (mode http),
# nginx as a proxy and the balancer, small and 100 KB responses (under 3 minutes); writes
# bench/results/http.{json,md}. BENCH_ARGS (--duration, --rounds, --quick) go to both.
bench:
	$(PYTHON) bench/message_bench.py $(BENCH_ARGS)
	$(PYTHON) bench/http_bench.py $(BENCH_ARGS)
	$(PYTHON) bench/report.py

# Soak: mixed load with backend kills and restarts for SOAK_MINUTES (default 10), redis
# through tcp mode with redis kills for TCP_SOAK_MINUTES (default 5), GETs through http
# mode with backend kills for HTTP_SOAK_MINUTES (default 2), and 10,000 idle connections;
# writes bench/results/{soak,tcp_soak,http_soak,idle}.{json,md}.
SOAK_MINUTES ?= 10
TCP_SOAK_MINUTES ?= 5
HTTP_SOAK_MINUTES ?= 2
soak:
	$(PYTHON) bench/soak.py --minutes $(SOAK_MINUTES)
	$(PYTHON) bench/tcp_soak.py --minutes $(TCP_SOAK_MINUTES)
	$(PYTHON) bench/http_soak.py --minutes $(HTTP_SOAK_MINUTES)
	$(PYTHON) bench/idle_connections.py
