//go:build integration

package redis

import (
	"context"
	"testing"
	"time"

	"imcloud/adapters/dedupetest"
	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

func TestIntegrationDedupeContract(t *testing.T) {
	rdb, err := Connect(context.Background(), testAddr(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	dedupetest.Run(t, func(t *testing.T, _ time.Duration) pipeline.DedupeStore {
		prefix := registrytest.Prefix(t) + "dedupe:"
		t.Cleanup(func() {
			keys, _ := rdb.Keys(context.Background(), prefix+"*").Result()
			if len(keys) > 0 {
				_ = rdb.Del(context.Background(), keys...).Err()
			}
		})
		return NewDedupe(rdb, prefix)
	})
}
