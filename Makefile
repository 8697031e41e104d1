# make demo: set up .venv and run the whole pipeline on the embedded demo data (CPU, minutes)
# make test: set up .venv and run the test suite
# make protocol: the multi-seed protocol on the demo (arms A-F, 3 seeds; python -m stedm.experiment)
PYTHON ?= python3
VENV ?= .venv
# torch first, from the pair this project is tested with; override for another CUDA/CPU build,
# e.g. make test TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.stedm-installed
DEMO := preset=tiny location.result_dir=results/demo location.data_dir=results/demo/data
# The demo's tiny networks run fastest on one thread per process (and several threads
# oversubscribe a busy machine badly: measured 8 ms vs 0.68 s per step); override as you like.
export OMP_NUM_THREADS ?= 1
DIFF_RUN := demo-demo_anno-augmented-mean-tiny-k4-seed0
SSL_RUN := demo-demo_unanno_demo_anno-tiny-seed0
SEG_RUN := demo-demo_anno-tiny-k4-seed0

.PHONY: install test demo protocol clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m stedm.data.preview $(DEMO) 'data/dataset=[demo_anno,demo_unanno]'
	$(BIN)/python train_diff.py $(DEMO)
	$(BIN)/python predict_diff.py $(DEMO) +ckpt_name=$(DIFF_RUN) +predict_dir=demo_syn num_pairs=64
	$(BIN)/python train_seg.py $(DEMO)
	$(BIN)/python -m stedm.qc results/demo/data/syn_data/demo_syn --segmenter results/demo/runs/train_seg/$(SEG_RUN)
	$(BIN)/python train_seg.py $(DEMO) 'data/dataset=[demo_anno,demo_syn]' data.ratios=[0.5,0.5] data.dataset.demo_syn.folder_name=demo_syn
	$(BIN)/python pretrain_ssl.py $(DEMO)
	$(BIN)/python finetune_ssl.py $(DEMO) pretrained=results/demo/runs/pretrain_ssl/$(SSL_RUN)/pretrained_unet.pt
	$(BIN)/python finetune_ssl.py $(DEMO) from_scratch=true
	$(BIN)/python -m stedm.report results/demo/runs/train_seg/* results/demo/runs/finetune_ssl/* --out results/demo/report.png

protocol: $(STAMP)
	$(BIN)/python -m stedm.experiment seeds=3 trainer.enable_progress_bar=false location.result_dir=results/protocol_3seeds

clean-demo:
	rm -rf results/demo
