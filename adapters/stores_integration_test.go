//go:build integration

package adapters

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

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

// TestIntegrationStoresRedisModes: registry.redis in mode cluster and
// sentinel opens every Redis store on one shared client of that mode, and
// they work through it (scripts/services.sh redis-cluster redis-sentinel).
func TestIntegrationStoresRedisModes(t *testing.T) {
	for _, mode := range []string{config.RedisCluster, config.RedisSentinel} {
		t.Run(mode, func(t *testing.T) {
			cfg := config.Default()
			cfg.Registry.Kind = config.RegistryRedis
			cfg.Job.Dedupe.Enabled, cfg.Job.Dedupe.Store = true, config.DedupeRedis
			rc := &cfg.Registry.Redis
			rc.Mode, rc.Prefix = mode, fmt.Sprintf("imcloud:test:%d:", time.Now().UnixNano())
			if mode == config.RedisCluster {
				rc.Addrs = []string{"127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"}
			} else {
				rc.Addrs, rc.MasterName = []string{"127.0.0.1:26380", "127.0.0.1:26381", "127.0.0.1:26382"}, "imcloud"
			}
			stores, err := OpenStores(t.Context(), cfg, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatalf("%v (scripts/services.sh redis-cluster redis-sentinel starts them)", err)
			}
			t.Cleanup(func() { _ = stores.Close() })
			_, isCluster := stores.rdb.(*goredis.ClusterClient)
			if isCluster != (mode == config.RedisCluster) {
				t.Fatalf("mode %s opened a %T", mode, stores.rdb)
			}
			ctx := t.Context()
			stream := "room:live://modes"
			t.Cleanup(func() { // t.Context is done by now
				ctx := context.Background()
				for _, k := range []string{"key:k1", "mid:7", "dedupe:m1", "history:{" + stream + "}:meta", "history:{" + stream + "}:log"} {
					_ = stores.rdb.Del(ctx, rc.Prefix+k).Err()
				}
			})
			if _, _, err := stores.Registry.AddSession(ctx, 7, "k1", "cloud1", 1); err != nil {
				t.Fatal(err)
			}
			if keys, err := stores.Registry.KeysByMids(ctx, []int64{7}); err != nil || keys[7]["k1"] != "cloud1" {
				t.Fatalf("KeysByMids after AddSession: %v %v", keys, err)
			}
			if err := stores.Dedupe.MarkDelivered(ctx, "m1", time.Minute); err != nil {
				t.Fatal(err)
			}
			if seen, err := stores.Dedupe.Delivered(ctx, "m1"); err != nil || !seen {
				t.Fatalf("Delivered after MarkDelivered: %v %v", seen, err)
			}
			ps, err := stores.History.Append(ctx, []string{stream}, pipeline.HistoryEntry{ID: "m"}, func(string) pipeline.StreamLimit {
				return pipeline.StreamLimit{Size: 10, TTL: time.Minute}
			})
			if err != nil || ps[0].Pos != 1 {
				t.Fatalf("Append: %v %v", ps, err)
			}
		})
	}
}
