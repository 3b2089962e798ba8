//go:build integration

package redis

import (
	"context"
	"os"
	"testing"
	"time"

	"imcloud/adapters/registrytest"
)

func testAddr() string {
	if a := os.Getenv("IMCLOUD_TEST_REDIS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:6379"
}

func TestIntegrationRegistryContract(t *testing.T) {
	rdb, err := Connect(context.Background(), testAddr(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	registrytest.Run(t, func(t *testing.T, sessionTTL, nodeTTL time.Duration) registrytest.Registry {
		prefix := registrytest.Prefix(t)
		t.Cleanup(func() {
			ctx := context.Background()
			if keys, _ := rdb.Keys(ctx, prefix+"*").Result(); len(keys) > 0 {
				rdb.Del(ctx, keys...)
			}
		})
		return NewRegistry(rdb, prefix, sessionTTL, nodeTTL)
	})
}

func TestIntegrationReplies(t *testing.T) {
	ctx := context.Background()
	rdb, err := Connect(ctx, testAddr(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	prefix := registrytest.Prefix(t) + "reply:"
	t.Cleanup(func() { rdb.Del(ctx, prefix+"k") })
	// Two logic nodes: what one saved, the other answers.
	a, b := NewReplies(rdb, prefix, time.Minute), NewReplies(rdb, prefix, time.Minute)
	if _, ok, err := b.Reply(ctx, "k"); err != nil || ok {
		t.Fatalf("reply before any was saved: %v %v", ok, err)
	}
	if err := a.SaveReply(ctx, "k", []byte(`{"code":0}`)); err != nil {
		t.Fatal(err)
	}
	got, ok, err := b.Reply(ctx, "k")
	if err != nil || !ok || string(got) != `{"code":0}` {
		t.Fatalf("reply = %q %v %v", got, ok, err)
	}
	if ttl := rdb.TTL(ctx, prefix+"k").Val(); ttl <= 0 || ttl > time.Minute {
		t.Fatalf("reply TTL %s, want up to 1m", ttl)
	}
}
