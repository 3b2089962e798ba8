//go:build integration

package adapters

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"imcloud/adapters/redis"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
)

// TestIntegrationHistoryStores: registry.kind redis keeps the history in
// Redis, on the registry's one client, under its prefix.
func TestIntegrationHistoryStores(t *testing.T) {
	cfg := config.Default()
	cfg.Registry.Kind = config.RegistryRedis
	if a := os.Getenv("IMCLOUD_TEST_REDIS_ADDR"); a != "" {
		cfg.Registry.Redis.Addr = a
	}
	cfg.Registry.Redis.Prefix = fmt.Sprintf("imcloud:test:%d:", time.Now().UnixNano())
	stores, err := OpenStores(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stores.Close() })
	if _, ok := stores.History.(*redis.History); !ok {
		t.Fatalf("registry.kind redis opened history %T, want *redis.History", stores.History)
	}
	stream := "room:live://stores"
	t.Cleanup(func() { // t.Context is done by now
		_ = stores.rdb.Del(context.Background(), cfg.Registry.Redis.Prefix+"history:{"+stream+"}:meta", cfg.Registry.Redis.Prefix+"history:{"+stream+"}:log").Err()
	})
	ps, err := stores.History.Append(t.Context(), []string{stream}, pipeline.HistoryEntry{ID: "m"}, func(string) pipeline.StreamLimit {
		return pipeline.StreamLimit{Size: 10, TTL: time.Minute}
	})
	if err != nil || ps[0].Pos != 1 {
		t.Fatalf("Append: %v %v", ps, err)
	}
	n, err := stores.rdb.Exists(t.Context(), cfg.Registry.Redis.Prefix+"history:{"+stream+"}:meta").Result()
	if err != nil || n != 1 {
		t.Fatalf("the stream's meta key under the registry prefix: %d %v", n, err)
	}
}

// TestIntegrationHistoryStoresDisabled: history.enabled = false opens no
// history on the Redis registry either.
func TestIntegrationHistoryStoresDisabled(t *testing.T) {
	cfg := config.Default()
	cfg.Registry.Kind = config.RegistryRedis
	cfg.History.Enabled = false
	if a := os.Getenv("IMCLOUD_TEST_REDIS_ADDR"); a != "" {
		cfg.Registry.Redis.Addr = a
	}
	cfg.Registry.Redis.Prefix = fmt.Sprintf("imcloud:test:%d:", time.Now().UnixNano())
	stores, err := OpenStores(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stores.Close() })
	if stores.History != nil {
		t.Fatalf("history.enabled = false opened history %T, want none", stores.History)
	}
	if _, ok := stores.Registry.(*redis.Registry); !ok {
		t.Fatalf("registry.kind redis opened registry %T, want *redis.Registry", stores.Registry)
	}
}
