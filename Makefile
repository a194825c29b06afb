# seamline — the two commands: `make demo` and `make test` (both set everything up first).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# On this machine torch==2.13.0 is a CPU build on local disk; the package metadata keeps a range
# so that GPU servers get a CUDA build from the registry.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test demo bench protos demo-model fuzz lint clean test-arm64

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/seamline demo

# Every figure of the README's performance section; `+` separates a scenario's extra flags.
BENCH ?= codec edge overhead e2e throughput adaptive load load+--replicas+2 speculative

# Every scenario sized for CI (--quick); JSON (and PNG plots) land in bench-results/ (git-ignored).
bench: install
	mkdir -p bench-results
	$(BIN)/python -c "from seamline.bench.models import bundle; bundle('demo'); bundle('gpt2-124m')"
	@status=0; for s in $(BENCH); do \
	  args=$$(echo $$s | tr '+' ' '); name=$$(echo $$s | tr -d '+-'); \
	  echo "== seamline bench $$args --quick"; \
	  timeout 300 $(BIN)/seamline bench $$args --quick --json bench-results/$$name.json || status=1; \
	done; exit $$status

protos: install
	$(BIN)/python -m seamline.protos.generate

demo-model: install
	$(BIN)/python -m seamline.partitioner.train_demo

FUZZ_TIME ?= 300

fuzz: install
	$(BIN)/python -m pip install -q -e ".[fuzz]"
	$(BIN)/python fuzz/fuzz_step.py --time $(FUZZ_TIME)

# The edge package in an arm64 Debian chroot (debootstrap + qemu-user-static, cached under
# ~/.cache/seamline/arm64) generating against a cloud on this machine; root; not part of `make test`.
test-arm64: install
	$(BIN)/python -m seamline.testing.arm64

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
