# Set-up and the two README commands. `make demo` and `make test` create ./.venv on first use
# and install dirio with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean browser docs napari-deps

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[all,test,docs,napari]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dirio demo --overwrite

test: $(STAMP) browser napari-deps
	$(VENV)/bin/python -m pytest -q

# The HTML report and documentation tests load pages in headless Chromium. When no browser is found (DIRIO_CHROMIUM
# or one of BROWSERS on PATH) and we are root with apt-get (a fresh CI machine), install Debian's
# chromium-headless-shell, the smallest package: a download of about 100 MB, about 300 MB on disk;
# 14 s with `apt-get update` when the packages were already in apt's cache. This step never fails
# the target: without a browser that test is skipped, with the reason.
BROWSERS := chromium-headless-shell chrome-headless-shell chromium chromium-browser google-chrome google-chrome-stable
browser:
	@found="$$DIRIO_CHROMIUM"; \
	for name in $(BROWSERS); do [ -n "$$found" ] || found=$$(command -v $$name || true); done; \
	if [ -z "$$found" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium-headless-shell for the HTML report test"; \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=120 chromium-headless-shell; \
	  } >/dev/null 2>&1 || echo "could not install chromium-headless-shell; the browser test will be skipped"; \
	fi

# The documentation site (mkdocs.yml, docs/) into site/: --strict makes any warning an error (a broken
# link, a missing anchor, a docstring the API reference cannot read). Open site/index.html, or
# `$(VENV)/bin/mkdocs serve` to write with live reload.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The napari plugin's tests need OpenGL under a virtual X display: Xvfb and Mesa's software driver.
# Installed as root with apt-get when missing (a fresh CI machine); never fails the target: without
# them those tests are skipped, with the reason.
napari-deps:
	@sh tests/napari_system_deps.sh

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-out site dist
