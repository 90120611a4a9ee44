# drcl2 — two commands do everything: `make demo` and `make test` (see README.md).
# Both install what is missing into $(VENV) first and are safe to run again.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# pip on these machines warns about every empty local index it looks at; keep real messages only.
QUIET := grep -v "is ignored: it is neither a file nor a directory" || true
STAMP := $(VENV)/.drcl2-installed

TORCH_PINS := torch==2.14.1 torchvision==0.29.1
D2_WHEEL := sal_detectron2-0.7.2-cp310-none-any.whl
# What detectron2 imports: the wheel's declared requirements plus fvcore and iopath, which it omits.
D2_DEPS := "numpy<2" "omegaconf>=2.1,<2.4" "hydra-core>=1.1" "pycocotools>=2.0.2" "yacs>=0.1.8" \
	"termcolor>=1.1" tabulate cloudpickle "tqdm>4.29.0" tensorboard matplotlib "Pillow>=7.1" \
	black packaging fvcore iopath "setuptools<81"

DEMO_OUT ?= output/demo

.PHONY: install detectron2 demo test test-fast lint format study clean-demo device-check install-wheels device-wheels

install: $(STAMP)

$(STAMP): setup.py Makefile
	@test -x $(PY) || { echo "[install] creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	@$(PIP) install -q "setuptools<81" wheel installer 2>&1 | $(QUIET)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || { \
		echo "[install] $(TORCH_PINS)"; $(PIP) install -q $(TORCH_PINS) 2>&1 | $(QUIET); }
	@$(PY) -c "import detectron2" 2>/dev/null && echo "[install] keeping the detectron2 already in $(VENV)" \
		|| $(MAKE) --no-print-directory detectron2
	@echo "[install] drcl2 (editable) and its dependencies"
	@$(PIP) install -q -e '.[test]' "setuptools<81" 2>&1 | $(QUIET)
	@$(PY) -c "import detectron2, drcl2; print('[install] ok: detectron2', detectron2.__version__, 'from', detectron2.__path__[0])"
	@touch $@

# detectron2 is not on PyPI from its authors; sal-detectron2 0.7.2 is a faithful copy of its main
# branch, tagged for CPython 3.10 only. Its pure-Python part runs on 3.11: install it with `installer`,
# which does not check the interpreter tag (the 3.10 _C extension is then never loaded, and detectron2
# falls back to torchvision's RoIAlign / NMS). See README.md, "Two commands".
detectron2:
	@echo "[install] detectron2 from the PyPI copy sal-detectron2==0.7.2 (pure Python)"
	@mkdir -p $(VENV)/wheels
	@test -f $(VENV)/wheels/$(D2_WHEEL) || $(PIP) download -q --no-deps --only-binary=:all: \
		--python-version 3.10 sal-detectron2==0.7.2 -d $(VENV)/wheels 2>&1 | $(QUIET)
	@$(PY) -m installer $(VENV)/wheels/$(D2_WHEEL)
	@$(PIP) install -q $(D2_DEPS) 2>&1 | $(QUIET)

# pre-train (2DRCL, toy) -> export -> fine-tune Mask R-CNN from the export -> LVIS evaluation,
# printed above the committed means of the study that ran the same recipe (docs/study/toy/) and of
# the main study, the paper's setting (docs/study/toy_init/; not the demo's, see docs/RESULTS.md).
# --resume: a second run reuses the finished runs (it only evaluates again); an interrupted one
# goes on from its last checkpoint.
demo: install
	@$(PY) datasets/prepare_toy_lvis.py
	@dev=$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')"); \
	$(PY) train_net.py --config-file configs/toy/pretrain_2drcl.yaml --resume \
		MODEL.DEVICE $$dev OUTPUT_DIR $(DEMO_OUT)/pretrain && \
	$(PY) train_net.py --config-file configs/toy/mask_rcnn_finetune.yaml --resume \
		MODEL.DEVICE $$dev MODEL.WEIGHTS $(DEMO_OUT)/pretrain/model_final_finetune.pth \
		OUTPUT_DIR $(DEMO_OUT)/finetune
	@$(PY) -m drcl2.tools.summarize $(DEMO_OUT)/finetune \
		--study docs/study/toy/results.csv --arms scratch,scratch_long,supervised_pretrain,2drcl,2drcl_v1 \
		--study docs/study/toy_init/results.csv --arms scratch,init,init_long,init_det,init_2drcl

# The whole suite, after the style check (ruff, configured in pyproject.toml).
test: install lint
	@$(PY) -m pytest -q tests

# The fast loop while editing: everything but the end-to-end runs (@pytest.mark.slow).
test-fast: install
	@$(PY) -m pytest -q -m "not slow" tests

lint: install
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

# Format the tree and fix what ruff can (import order, ...).
format: install
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

clean-demo:
	rm -rf $(DEMO_OUT)

# The seeded long-tail study (configs/study/toy.yaml: arms x 3 seeds, pre-train -> export ->
# fine-tune -> LVIS evaluation on val and test); resumable. Its report lands in docs/study/toy/.
STUDY ?= configs/study/toy.yaml
STUDY_REPORT ?= docs/study/toy
study: install
	@$(PY) datasets/prepare_toy_lvis.py
	@$(PY) -m drcl2.tools.study --config-file $(STUDY) --report-dir $(STUDY_REPORT)

# ---- the GPU day (docs/BENCHMARKS.md, "The device check")
# make device-check: install, then python -m drcl2.tools.device_check (report in docs/device/).
# On a GPU machine that reaches no package index, bring the wheels: `make device-wheels` here fills
# .whl/ (Python $(DEVICE_PYTHON), manylinux x86_64, about 9 MB), and there `make device-check WHEELS=.whl`
# makes .venv on the machine's own python3 and torch (--system-site-packages) and installs drcl2's
# other dependencies from the folder, offline.
WHEELS ?=
DEVICE_PYTHON ?= 3.12
DEVICE_CHECK_ARGS ?=
DEVICE_BINARY := pycocotools faster-coco-eval orjson
DEVICE_PURE := fvcore iopath yacs "omegaconf>=2.1,<2.4" "hydra-core>=1.1" lvis termcolor installer \
	"antlr4-python3-runtime==4.9.3"

device-check:
	@if [ -n "$(WHEELS)" ]; then $(MAKE) --no-print-directory install-wheels; else $(MAKE) --no-print-directory install; fi
	@$(PY) -m drcl2.tools.device_check $(DEVICE_CHECK_ARGS)

install-wheels:
	@test -x $(PY) || { echo "[install] creating $(VENV) on python3 (its torch)"; python3 -m venv --system-site-packages $(VENV); }
	@$(PIP) install -q --no-index --no-deps --no-build-isolation $$(ls $(WHEELS)/*.whl $(WHEELS)/*.tar.gz | grep -v sal_detectron2)
	@$(PY) -c "import detectron2" 2>/dev/null || $(PY) -m installer $(WHEELS)/$(D2_WHEEL)
	@$(PIP) install -q --no-index --no-deps --no-build-isolation -e .
	@$(PY) -c "import torch, detectron2, drcl2; print('[install] ok: torch', torch.__version__, 'CUDA', torch.cuda.is_available(), 'detectron2', detectron2.__version__)"

device-wheels: install
	@mkdir -p .whl
	@$(PIP) download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(DEVICE_BINARY) 2>&1 | $(QUIET)
	@$(PIP) download -q --no-deps -d .whl $(DEVICE_PURE) 2>&1 | $(QUIET)
	@$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.10 -d .whl sal-detectron2==0.7.2 2>&1 | $(QUIET)
	@du -sh .whl
