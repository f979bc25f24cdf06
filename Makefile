# The README's commands. Each installs what it needs first (scripts/install.sh is
# idempotent: a second run skips everything already done).
PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: install test test-fast test-multiprocess demo demo-cnn doctor

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

demo-cnn: install   # about an hour on 2 cores (README, Results on a CNN)
	$(PY) -m hvd_lb.launch demo --preset cnn --out-dir out/demo_cnn

doctor:
	python3 -m hvd_lb.launch doctor
