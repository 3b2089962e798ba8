//go:build integration

package redis

import (
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

// TestIntegrationRegistryContract runs the registry's contract on a single
// Redis, a 3-master Redis Cluster and a Sentinel-watched master.
func TestIntegrationRegistryContract(t *testing.T) {
	eachSetup(t, func(t *testing.T, rdb goredis.UniversalClient) {
		registrytest.Run(t, func(t *testing.T, sessionTTL, nodeTTL time.Duration) pipeline.Registry {
			prefix := registrytest.Prefix(t)
			t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
			return NewRegistry(rdb, prefix, sessionTTL, nodeTTL)
		})
	})
}
