# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= ../shared/data
EXTRAS ?= embedded,llamacpp,transformers,server,fit,batch,ray,test
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint install browser screenshots clean

# The venv is (re)built when pyproject.toml changes. torch==2.13.0 goes first: it is the CPU
# build on this machine's disk, and a plain `torch` requirement would pull a multi-GB CUDA build.
# llama-cpp-python is compiled from source the first time (10-15 min); pip caches the wheel.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the browser test (Playwright drives it with executablePath).
browser:
	@{ command -v chromium && dpkg -s fonts-noto-color-emoji; } >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-color-emoji >/dev/null; }

demo: install
	$(VENV)/bin/allinone analyze "I just got promoted and I can't stop smiling!" --max-tokens 64 --temperature 0
	$(VENV)/bin/allinone analyze "这家餐厅的服务太差了，等了一个小时才上菜。" --max-tokens 64 --temperature 0
	printf '%s\n' "The movie was a complete waste of time." "What a delightful little book." "这部手机的电池非常耐用，我很满意。" "房间又小又脏，再也不会来了。" \
		| $(VENV)/bin/allinone sentiment
	$(VENV)/bin/allinone eval sentiment --data $(DATA)/sst2_dev.jsonl --limit 100

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test: install browser lint
	$(PY) -m pytest

# Refresh the UI pictures in docs/ (the test run itself writes its screenshots to a temp folder).
screenshots: install browser
	SCREENSHOT_DIR=docs $(PY) -m pytest -m browser -q

clean:
	rm -rf $(VENV) build src/*.egg-info
