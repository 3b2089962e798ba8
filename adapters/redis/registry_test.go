//go:build integration

package redis

import (
	"context"
	"os"
	"testing"
	"time"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
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
	registrytest.Run(t, func(t *testing.T, sessionTTL, nodeTTL time.Duration) pipeline.Registry {
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
