# effmaml: the targets are the interface; CI runs the same ones.
# `make test` and `make bench` set up what they need: on first use they create .venv with
# the pinned torch pair (pip finds it on this machine's disk) unless PYTHON names an
# interpreter that already has torch, e.g. `make test PYTHON=python3`.

VENV   ?= .venv
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
ifdef PYTHON
PY := $(PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
endif

.PHONY: setup test test-slow lint docs zoo format bench bench-full bench-micro report fewshot fewshot-horizon fewshot-speed fewshot-omniglot fewshot-omniglot-search scaling bilevel horizons learned-optimizer outer-cost clean

setup: $(SETUP)

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH_PINS)
	$(VENV)/bin/python -m pip install -q -e '.[dev,peers,bench,transformers,docs]'
	touch $@

lint: $(SETUP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(SETUP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# the documentation site -> site/ (warnings are errors: a broken link or docstring fails)
docs: $(SETUP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# lint and the docs build, then the suite without the slow tests (GPU tests skip without CUDA; micro-benchmarks
# run once, untimed); `make test-slow` runs the slow ones (subprocess memory, ResNet18)
test: lint docs
	$(PY) -m pytest -q --benchmark-disable -m "not slow" --durations=20

test-slow: $(SETUP)
	$(PY) -m pytest -q --benchmark-disable -m slow

# with a GPU: the resnet18-224 preset; without: cpu-quick (about 6 minutes on 2 cores).
# Writes results/<preset>/ and prints its table; `make report` updates README.md.
bench: $(SETUP)
	$(PY) -m bench

# the full CPU sweep, N = 5 ... 160 (75 minutes measured on 2 cores)
bench-full: $(SETUP)
	$(PY) -m bench --preset cpu-small

report: $(SETUP)
	$(PY) -m bench.report

# 5-way 1-shot image classification (Conv-4; DATA=characters, the embedded set, or
# omniglot:/path, miniimagenet:/path) and sine: MAML, first order, iMAML, transfer, random
DATA ?= characters
fewshot: $(SETUP)
	$(PY) -m bench.fewshot --data $(DATA)

# real Omniglot (data/omniglot/, the committed zips): Lake et al.'s 20 one-shot runs and
# held-out 5-/20-way episodes, every method meta-trained for the same CPU-minutes on each
# minimal background set with the values results/fewshot-omniglot/search.json chose, the MHD
# and pixel baselines and the published figures (about 70 minutes on 2 idle cores)
fewshot-omniglot: $(SETUP)
	$(PY) -m bench.omniglot

# the hyperparameter search on small1's validation characters, each configuration at the
# main run's 4 CPU-minutes (about 80 minutes on 2 idle cores): rewrites search.json
fewshot-omniglot-search: $(SETUP)
	$(PY) -m bench.omniglot --search

# MAML and iMAML with 1, 5, 25 and 100 inner steps at train and test: accuracy and cost
# (16 minutes on 2 cores)
fewshot-horizon: $(SETUP)
	$(PY) -m bench.fewshot --horizon --data $(DATA) --problems characters

# the daily workload (Conv-4 64 filters, 5-way 1-shot; meta-batch 32 on a GPU, 8 on a CPU):
# MAML at N = 1, 5, 10 (effmaml, higher, TorchOpt, a torch.func loop) and iMAML at N = 5, 10
# (effmaml implicit, TorchOpt's implicit differentiation), alternated in one run
fewshot-speed: $(SETUP)
	$(PY) -m bench.fewshot_speed

# exact hypergradients through long unrolls on real data (scikit-learn's digits, MNIST-1D):
# dataset distillation at N = 10, 100, 300, a learning-rate schedule through 200 steps,
# data hyper-cleaning -> results/bilevel/ (about 12 minutes on 2 cores)
bilevel: $(SETUP)
	$(PY) -m bench.bilevel

# the short-horizon bias measured: a 1000-step learning-rate schedule meta-learned by the
# exact hypergradient, by truncated ones (K = 1, 10, 100) and by online hypergradient
# descent, against the tuned constant and cosine; distillation at N = 300, exact against
# RaT-BPTT's random window of 60 -> results/horizons/ (about 45 minutes on 2 idle cores; a run
# stopped between its stages starts again from the next; `--report-only` rebuilds the summary)
horizons: $(SETUP)
	$(PY) -m bench.horizons

# a learned optimizer (a coordinate-wise MLP rule) meta-trained on MLPs on digits and
# MNIST-1D through N = 50, 200, 1000 inner steps, exactly (checkpoint) and truncated to the
# last K = 10, 50 steps, against SGD-momentum and Adam with tuned rates, on held-out tasks
# for N and 2N steps -> results/learned-optimizer/ (about 30 minutes on 2 cores);
# `python -m bench.learned_optimizer --report-only` rebuilds the report from raw.json
learned-optimizer: $(SETUP)
	$(PY) -m bench.learned_optimizer

# what differentiating with respect to the data costs: each exact schedule with learned
# images against the same without
outer-cost: $(SETUP)
	$(PY) -m bench.outer_cost

# every torchvision classification model up to 8 M parameters and six Hugging Face families
# at tiny size, through every exact strategy against naive -> results/zoo/
zoo: $(SETUP)
	$(PY) -m bench.zoo

# meta-iterations/s and memory for 1 and 2 processes (torchrun, gloo, one thread each)
scaling: $(SETUP)
	$(PY) -m bench.scaling

bench-micro: $(SETUP)
	$(PY) -m pytest -q tests/benchmarks --benchmark-only --benchmark-json=bench-micro.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-micro.json
