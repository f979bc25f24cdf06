# The README's commands. Each installs what it needs first (scripts/install.sh is
# idempotent: a second run skips everything already done).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast test-multiprocess demo doctor

install:
	bash scripts/install.sh

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not multiprocess" $(PYTEST_ARGS)

test-multiprocess: install
	$(PY) -m pytest -q -m multiprocess $(PYTEST_ARGS)

demo: install
	$(PY) -m hvd_lb.launch demo

doctor:
	python3 -m hvd_lb.launch doctor
