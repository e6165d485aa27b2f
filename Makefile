# Two commands do everything on a fresh machine:  make demo  and  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# UTF-8 file I/O whatever the locale: Qt and VTK may switch the C locale under the tests, and
# torch reads its own sources as text.
export PYTHONUTF8 := 1

.PHONY: demo test test-fast lint system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pclseg demo --out demo-output

# Debian packages for the headless browser tests (Chromium) and offscreen VTK rendering (Mesa EGL).
system-deps:
	@if ! command -v chromium >/dev/null || ! ldconfig -p | grep -q libEGL_mesa; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    chromium libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 libglu1-mesa libxt6 libxrender1 \
	    libfontconfig1 libxkbcommon0 libdbus-1-3 >/dev/null; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not realdata and not browser"

lint: $(STAMP)
	$(VENV)/bin/ruff check PCLSegment PCLPretrain Testing benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
