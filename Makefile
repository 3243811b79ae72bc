# Set-up and the two everyday commands. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lomar-installed

.PHONY: install demo test test-fast lint bench digits

$(STAMP): pyproject.toml
	# torch's x86_64 build is ~6 GiB: check the disk before pip half-fills it (LOMAR_SKIP_DISK_CHECK=1 skips).
	$(PYTHON) tools/check_disk.py $(VENV)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the build this project is tested with (on x86_64 it comes from local disk here).
	$(BIN)/python -m pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lomar pretrain

# Two workers: the suite's subprocess tests (torchrun, signals) wait on I/O, and CI has 2 cores. worksteal: a worker
# that runs out takes half of the other's queue (load scheduling commits batches of tests to a worker up front).
test: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist worksteal

# Everything but the subprocess / torchrun tests (marked `slow`): the quick loop while editing.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools

bench: $(STAMP)
	$(BIN)/lomar bench --model vit_base_patch16 --batch-size 4 --windows paper 4 --steps 3 --warmup 1 \
	    --threads 2 --json benchmarks/cpu-vitb16.json --plot benchmarks/cpu-vitb16.png

digits: $(STAMP)
	$(BIN)/python benchmarks/digits.py
