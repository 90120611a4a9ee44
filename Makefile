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

.PHONY: install detectron2 demo test study clean-demo

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

# pre-train (2DRCL, toy) -> export -> fine-tune Mask R-CNN from the export -> LVIS evaluation.
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
	@$(PY) -m drcl2.tools.summarize $(DEMO_OUT)/finetune --study docs/study/toy/results.csv \
		--arms scratch,scratch_long,supervised_pretrain,2drcl,init,init_2drcl

test: install
	@$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_OUT)

# The seeded long-tail study (configs/study/toy.yaml: arms x 3 seeds, pre-train -> export ->
# fine-tune -> LVIS evaluation on val and test); resumable. Its report lands in docs/study/toy/.
STUDY ?= configs/study/toy.yaml
STUDY_REPORT ?= docs/study/toy
study: install
	@$(PY) datasets/prepare_toy_lvis.py
	@$(PY) -m drcl2.tools.study --config-file $(STUDY) --report-dir $(STUDY_REPORT)
