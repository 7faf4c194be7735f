# Two commands do all the set-up:  `make demo`  and  `make test`.
# Both build .venv on first use.  Torch is installed first, on its own:
#   CPU machines (and this project's CI):  make test            -> torch==2.13.0 (CPU wheel from the local wheel cache)
#   CUDA machines:  make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128
#   (or any build you already trust:  make venv TORCH_SPEC="torch==2.8.0")
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed

.PHONY: venv demo test bench clean-cache
venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .   # the medgen command and `import medgen`
	touch $(STAMP)

DEMO_EPOCHS ?= 40
DEMO_TRAIN  := --config config/tiny.yaml --strategy rflow --positive_only --epochs $(DEMO_EPOCHS)
demo: $(STAMP)
	$(PY) Generation/TrainGen/demo.py
	$(PY) Generation/TrainGen/train.py $(DEMO_TRAIN) --mode seg --run_dir runs/demo/seg --resume auto
	$(PY) Generation/TrainGen/train.py $(DEMO_TRAIN) --mode bravo --run_dir runs/demo/bravo --resume auto
	$(PY) Generation/TrainGen/generate.py --seg_model runs/demo/seg --image_model runs/demo/bravo \
	    --num_images 128 --batch_size 16 --output_dir runs/demo/synthetic --progression
	$(PY) Generation/TrainGen/generate.py --image_model runs/demo/bravo --masks_from .cache/demo/brain/test \
	    --num_images 32 --batch_size 16 --output_dir runs/demo/synthetic_paired
	$(PY) eval/obj_eval/run_evaluation.py --synthetic_dir runs/demo/synthetic_paired --real_dir .cache/demo/brain/test \
	    --metrics all --positive-only --output runs/demo/eval
	$(PY) eval/obj_eval/run_utility.py --real_dir .cache/demo/brain --synthetic_dir runs/demo/synthetic --positive-only \
	    --real_fraction 0.1,1 --recipes real,real+synthetic --seeds 3 --preset tiny --max_steps 200 --output runs/demo/utility
	@echo "demo done: runs/demo/{seg,bravo}/samples/, runs/demo/synthetic/preview_8x8.png, runs/demo/eval/report.md, runs/demo/utility/utility.md"

TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

bench: $(STAMP)
	$(PY) bench/benchmark.py --device cpu --preset tiny

clean-cache:
	rm -rf .cache
