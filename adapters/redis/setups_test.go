//go:build integration

package redis

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline/config"
)

func testAddr() string {
	if a := os.Getenv("IMCLOUD_TEST_REDIS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:6379"
}

// envAddrs is the comma-separated list in the environment variable name,
// or def.
func envAddrs(name, def string) []string {
	v := os.Getenv(name)
	if v == "" {
		v = def
	}
	return strings.Split(v, ",")
}

// redisSetup is a Redis the stores' integration tests run against: the
// single server on 6379, and the Cluster and Sentinel setups
// scripts/services.sh redis-cluster and redis-sentinel start.
type redisSetup struct {
	name string
	cfg  config.Redis
}

func redisSetups() []redisSetup {
	base := config.Default().Registry.Redis
	single := base
	single.Addr = testAddr()
	cluster := base
	cluster.Mode, cluster.Addrs = config.RedisCluster,
		envAddrs("IMCLOUD_TEST_REDIS_CLUSTER_ADDRS", "127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002")
	sentinel := base
	sentinel.Mode, sentinel.Addrs = config.RedisSentinel,
		envAddrs("IMCLOUD_TEST_REDIS_SENTINEL_ADDRS", "127.0.0.1:26380,127.0.0.1:26381,127.0.0.1:26382")
	sentinel.MasterName = os.Getenv("IMCLOUD_TEST_REDIS_SENTINEL_MASTER")
	if sentinel.MasterName == "" {
		sentinel.MasterName = "imcloud"
	}
	return []redisSetup{{"single", single}, {"cluster", cluster}, {"sentinel", sentinel}}
}

// setup returns the setup named name.
func setup(t testing.TB, name string) redisSetup {
	t.Helper()
	for _, s := range redisSetups() {
		if s.name == name {
			return s
		}
	}
	t.Fatalf("no Redis setup %q", name)
	return redisSetup{}
}

// connect opens a client on s, closed when the test ends. An absent
// service fails the test: integration tests run, never skip.
func connect(t testing.TB, s redisSetup) goredis.UniversalClient {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rdb, err := Connect(ctx, s.cfg)
	if err != nil {
		t.Fatalf("redis %s: %v (scripts/services.sh redis redis-cluster redis-sentinel starts them)", s.name, err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	return rdb
}

// eachSetup runs f as a subtest on each Redis setup.
func eachSetup(t *testing.T, f func(t *testing.T, rdb goredis.UniversalClient)) {
	for _, s := range redisSetups() {
		t.Run(s.name, func(t *testing.T) { f(t, connect(t, s)) })
	}
}

// dropKeys deletes the keys matching pattern: on every master of a Redis
// Cluster (KEYS sees one node's keys), one DEL a key (a DEL of several
// keys must not cross slots).
func dropKeys(t testing.TB, rdb goredis.UniversalClient, pattern string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	drop := func(ctx context.Context, c *goredis.Client) error {
		keys, err := c.Keys(ctx, pattern).Result()
		if err != nil || len(keys) == 0 {
			return err
		}
		pipe := c.Pipeline()
		for _, k := range keys {
			pipe.Del(ctx, k)
		}
		_, err = pipe.Exec(ctx)
		return err
	}
	if err := forEachMaster(ctx, rdb, drop); err != nil {
		t.Errorf("drop keys %s: %v", pattern, err)
	}
}
