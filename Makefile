GO ?= go
BIN := bin/imcloud
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: build sdk run run-cluster stop-cluster test test-integration test-js bench bench-cluster bench-shards bench-go proto lint

build: sdk
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/imcloud
	$(GO) build -o bin/imcloud-bench ./cmd/imcloud-bench

# The TypeScript SDK (sdk/js) and its browser bundle, which the binary
# embeds for the demo page (stages/cloud/demo). Without npm the binary is
# built all the same; its demo page then says how to get the bundle.
SDK_DEPS := sdk/js/node_modules/.package-lock.json
SDK_BUNDLE := stages/cloud/demo/imcloud-client.js
ifeq ($(shell command -v npm 2>/dev/null),)
sdk:
	@echo "make: npm not found: imcloud is built without the demo page's SDK bundle (install Node 20+ and npm, or run scripts/js-deps.sh)" >&2
else
sdk: $(SDK_BUNDLE)
endif

$(SDK_DEPS): sdk/js/package.json sdk/js/package-lock.json
	cd sdk/js && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(SDK_BUNDLE): $(SDK_DEPS) $(wildcard sdk/js/src/*.ts) sdk/js/scripts/bundle.mjs sdk/js/tsconfig.json
	cd sdk/js && npm run --silent build

# Standalone: every stage in one process, embedded broker and registry.
# make run ARGS='--set cloud.ws_addr=:8102' passes flags on.
run: build
	./$(BIN) standalone $(ARGS)

# 1 logic, 2 job and 2 cloud processes on the local RabbitMQ and Redis.
run-cluster:
	scripts/cluster.sh start

stop-cluster:
	scripts/cluster.sh stop

test:
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

# Needs RabbitMQ, Redis and NATS on their standard ports, and the Redis
# Cluster and Sentinel setups: scripts/services.sh rabbitmq redis nats
# redis-cluster redis-sentinel (the Sentinel failover test starts its own
# redis-server processes). A missing service fails a test; none skips.
test-integration:
	$(GO) test -race -count=1 -tags integration -run Integration -p 1 -v ./...

# The SDK's tests: unit (codec against proto/wire's bytes, fake clock and
# socket), against a real imcloud built from this tree (the restart test
# keeps history in Redis on 127.0.0.1:6379), npm pack in a fresh project,
# and the demo page in Chromium (CHROMIUM, default /usr/bin/chromium).
# scripts/js-deps.sh installs Node, npm and Chromium; scripts/services.sh redis.
# Screenshots go to sdk/js/build/test-output.
test-js: build
	cd sdk/js && npx tsc -p tsconfig.test.json
	$(GO) run ./proto/wire/internal/fixtures > sdk/js/build/fixtures.json
	cd sdk/js && IMCLOUD_BIN=$(CURDIR)/$(BIN) node --experimental-websocket --test --test-reporter=spec \
		build/test/unit/ build/test/integration/ build/test/browser/

# A short run of every imcloud bench mode (under two minutes); BENCHMARKS.md
# has the longer runs.
bench:
	scripts/bench.sh

# 100,000 WebSocket clients on six cloud processes, logic and job on
# RabbitMQ and Redis (about 3 minutes; CLIENTS, NODES, USERS, RATE, SPEED).
bench-cluster:
	scripts/bench-cluster.sh

# Confirmed pushes/s through RabbitMQ with 1, 2, 4 push shards and 1, 2, 4
# job processes (about three minutes).
bench-shards:
	scripts/bench-shards.sh

# Go micro-benchmarks: codec, room fan-out, memory per idle connection.
bench-go:
	$(GO) test -run '^$$' -bench . -benchmem ./proto/wire ./pipeline/expiring
	$(GO) test -run '^$$' -bench RoomFanout -benchmem ./stages/cloud
	$(GO) test -run '^$$' -bench IdleConnectionMemory -benchtime 10000x ./stages/cloud

# Needs protoc (Debian: protobuf-compiler); the Go plugins are pinned in go.mod.
proto:
	protoc -I proto \
		--plugin=protoc-gen-go="$$($(GO) tool -n protoc-gen-go)" \
		--plugin=protoc-gen-go-grpc="$$($(GO) tool -n protoc-gen-go-grpc)" \
		--go_out=proto/pb --go_opt=paths=source_relative \
		--go-grpc_out=proto/pb --go-grpc_opt=paths=source_relative \
		proto/*.proto

lint:
	test -z "$$(gofmt -l $$(git ls-files '*.go'))"
	$(GO) vet -tags integration ./...
	$(GO) tool staticcheck -tags integration ./...
	@# No tracked file over 1 MB: data, binaries and profiles stay out of git.
	@big=$$(git ls-files -z | xargs -0 sh -c 'find /dev/null "$$@" -type f -size +1048576c' sh 2>/dev/null); \
	if [ -n "$$big" ]; then printf 'lint: tracked files over 1 MB (keep them out of git):\n%s\n' "$$big" >&2; exit 1; fi
