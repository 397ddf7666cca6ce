# Two commands for a fresh machine (see README): `make demo` and `make test`.
# torch comes first, from the CPU index, so pip does not pull a CUDA build; where a CPU wheel of
# torch 2.13.0 is already on disk (CI), pass TORCH_INDEX= to install it as it is.
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
PIP_FLAGS ?=
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_OUT ?= m3d-edge-demo
TEST_EXTRAS ?= export,dev,serve,dicom-net,retrieval,ray

.PHONY: torch demo test

torch:
	$(PIP) install $(PIP_FLAGS) $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

demo: torch  ## install the package with the [export] extra, then run the demo
	$(PIP) install $(PIP_FLAGS) -e ".[export]"
	$(PYTHON) -m m3d_edge.cli.app demo --out $(DEMO_OUT)

test: torch  ## install what the tests need (every extra but gpu), then run README's test command
	$(PIP) install $(PIP_FLAGS) -e ".[$(TEST_EXTRAS)]"
	$(PYTHON) -m pytest -q
