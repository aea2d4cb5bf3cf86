# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install patchq with its pinned dependencies into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install demo test lint format bench bench-anomalib system-test-deps screenshot

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(VENV)/bin/patchq demo

# Debian packages the integration tests drive: Chromium for the HTML report,
# docker-compose (client only, no engine needed) to validate docker-compose.yml.
system-test-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v docker-compose >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver docker-compose >/dev/null; }

# In parallel (docs/testing.md): the tests spend most of their time waiting on worker
# processes, servers and leases, so more pytest-xdist workers than cores pay. loadscope sends a
# module's tests to one worker together, but for the modules tests/parallel.py sends test by
# test, in the order it sets (slowest first). TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 4
test: $(INSTALLED) system-test-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(INSTALLED)
	$(PY) -m bench.run
	$(PY) -m bench.worker_bench --images 480 --image-size 224 --batch-size 16

# patchq's engine vs anomalib's PatchCore at realistic train sizes (~40 min on 2 cores: anomalib's
# coreset at 200 images is most of it); anomalib goes into its own git-ignored venv.
ANOMALIB_TRAIN ?= 200 800
bench-anomalib: $(INSTALLED)
	test -x bench/anomalib/.venv/bin/python || bench/anomalib/install.sh $(VENV)
	$(PY) -m bench.engine_vs_anomalib --train $(ANOMALIB_TRAIN)

# The README's picture of the report (docs/report-screenshot.png), from a fresh `patchq demo`
# with the current code in its own folder and database, photographed by headless Chromium.
SHOT_DIR ?= build/screenshot
SHOT_SIZE ?= 1150,2350
screenshot: $(INSTALLED) system-test-deps
	rm -rf $(SHOT_DIR) && mkdir -p $(SHOT_DIR)
	PATCHQ_DATABASE_URL=sqlite:///$(SHOT_DIR)/patchq.db $(VENV)/bin/patchq demo \
	  --root $(SHOT_DIR)/demo-data --run elpv-demo --out $(SHOT_DIR)/report
	chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
	  --disable-background-networking --user-data-dir=$(CURDIR)/$(SHOT_DIR)/chromium-profile \
	  --window-size=$(SHOT_SIZE) --screenshot=$(CURDIR)/docs/report-screenshot.png \
	  file://$(CURDIR)/$(SHOT_DIR)/report/index.html
