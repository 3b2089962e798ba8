//go:build integration

package process

import (
	"context"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"imcloud/adapters/amqp/amqptest"
	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
)

// redisPrefix is a registry prefix of the test's own.
func redisPrefix(t *testing.T) string {
	return "imcloud-test:" + strings.ReplaceAll(t.Name(), "/", "-") + ":" + time.Now().Format("150405.000000") + ":"
}

// startOnRedis starts a process on loopback with the registry in the
// test's Redis under prefix, sets over those, logging to logs.
func startOnRedis(t *testing.T, prefix string, logs io.Writer, sets ...string) (*Process, error) {
	t.Helper()
	addr := os.Getenv("IMCLOUD_TEST_REDIS_ADDR")
	if addr == "" {
		addr = "127.0.0.1:6379"
	}
	cfg, err := config.Load(config.Sources{Sets: append([]string{
		"registry.kind=redis", "registry.redis.addr=" + addr, "registry.redis.prefix=" + prefix,
		"logic.http_addr=127.0.0.1:0", "logic.grpc_addr=127.0.0.1:0",
		"cloud.tcp_addr=127.0.0.1:0", "cloud.ws_addr=127.0.0.1:0", "cloud.grpc_addr=127.0.0.1:0",
		"logic.auth.jwt_secret=agree-secret", "logic.api_keys=agree-api-key-0123456789",
		"cluster.secret=agree-cluster-secret-0123456789", "job.canary_interval=0", "cloud.canary_timeout=0",
	}, sets...)})
	if err != nil {
		t.Fatal(err)
	}
	return Start(context.Background(), cfg, slog.New(slog.NewTextHandler(logs, nil)))
}

// TestIntegrationShardAgreement: a logic or job with a topics.push_shards
// other than a running one's is refused at start, naming the value the
// cluster runs with; a cloud-only process takes no part; once the running
// one stops cleanly, the new value starts at once.
func TestIntegrationShardAgreement(t *testing.T) {
	prefix := redisPrefix(t)
	start := func(shards string, sets ...string) (*Process, error) {
		return startOnRedis(t, prefix, io.Discard, append([]string{"broker.kind=gochannel", "topics.push_shards=" + shards}, sets...)...)
	}
	shutdown := func(p *Process) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Shutdown(ctx); err != nil {
			t.Error(err)
		}
	}

	first, err := start("4", "stages=logic,job")
	if err != nil {
		t.Fatal(err)
	}
	for _, stages := range []string{"logic", "job"} {
		p, err := start("2", "stages="+stages)
		if err == nil {
			shutdown(p)
			t.Fatalf("stages=%s with 2 shards started beside one with 4", stages)
		}
		if !strings.Contains(err.Error(), "topics.push_shards = 2 here") || !strings.Contains(err.Error(), "runs with 4") {
			t.Fatalf("stages=%s refused with %v; want it to name both values", stages, err)
		}
	}
	same, err := start("4", "stages=job")
	if err != nil {
		t.Fatalf("a job agreeing with the cluster: %v", err)
	}
	cloud, err := start("2", "stages=cloud", "cloud.logic_addr="+first.Addrs().LogicGRPC)
	if err != nil {
		t.Fatalf("a cloud node (it reads no push topic): %v", err)
	}
	shutdown(cloud)

	shutdown(same)
	shutdown(first)
	after, err := start("2", "stages=logic,job")
	if err != nil {
		t.Fatalf("after every process with 4 stopped: %v", err)
	}
	shutdown(after)
}

// TestIntegrationUnreadShardsAreSaid: a logic says which push shards no
// live job reads — here a job reads 0 and 1 of 4 — naming them.
func TestIntegrationUnreadShardsAreSaid(t *testing.T) {
	prefix := redisPrefix(t)
	start := func(logs io.Writer, sets ...string) *Process {
		p, err := startOnRedis(t, prefix, logs, append([]string{"broker.kind=amqp", "topics.push_shards=4",
			"topics.push=" + prefix + "push", "topics.poison=" + prefix + "poison", "topics.upstream=" + prefix + "upstream",
			"cloud.renew_interval=200ms"}, sets...)...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = p.Shutdown(ctx)
		})
		return p
	}
	amqptest.DeleteAtEnd(t, config.Default().Broker.AMQP.URL,
		prefix+"push.0", prefix+"push.1", prefix+"push.2", prefix+"push.3", prefix+"poison", prefix+"upstream")
	start(io.Discard, "stages=job", "job.shards=0,1", "job.cloud_addrs=127.0.0.1:1")
	var logs logtest.Buffer
	start(&logs, "stages=logic")
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "push shards no live job reads") {
		if time.Now().After(deadline) {
			t.Fatalf("no word of the unread shards within 10s:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond) // polling the log, with a deadline
	}
	if line := logs.String(); !strings.Contains(line, "shards=\"[2 3]\"") && !strings.Contains(line, "shards=[2 3]") {
		t.Fatalf("the warning does not name shards 2 and 3:\n%s", line)
	}
}
