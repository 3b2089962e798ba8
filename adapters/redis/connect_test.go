//go:build integration

package redis

import (
	"context"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline/config"
)

// TestIntegrationConnectModes: each mode gives the client its Redis
// needs — a Redis Cluster a ClusterClient, which the stores split their
// scripts by slot for; Sentinel a client of the master it names.
func TestIntegrationConnectModes(t *testing.T) {
	ctx := context.Background()
	for _, s := range redisSetups() {
		t.Run(s.name, func(t *testing.T) {
			rdb := connect(t, s)
			_, isCluster := rdb.(*goredis.ClusterClient)
			if isCluster != (s.cfg.Mode == config.RedisCluster) || clustered(rdb) != isCluster {
				t.Fatalf("mode %s opened a %T", s.cfg.Mode, rdb)
			}
			if s.cfg.Mode != config.RedisSentinel {
				return
			}
			// The master the sentinels name is the one written to.
			role, err := rdb.Do(ctx, "ROLE").Slice()
			if err != nil || len(role) == 0 || role[0] != "master" {
				t.Fatalf("sentinel mode talks to a %v (%v), want the master", role, err)
			}
		})
	}
}

// TestIntegrationConnectRefuses: a Redis that is not what the
// configuration says is refused at start-up with an error, not a client
// that fails later: TLS to a server that speaks none, a password the
// server does not have, a master no sentinel knows, cluster mode against
// a single server.
func TestIntegrationConnectRefuses(t *testing.T) {
	single, cluster, sentinel := setup(t, "single").cfg, setup(t, "cluster").cfg, setup(t, "sentinel").cfg
	tlsSingle := single
	tlsSingle.TLS = true
	badPassword := cluster
	badPassword.Username, badPassword.Password = "nobody", "wrong"
	unknownMaster := sentinel
	unknownMaster.MasterName = "no-such-master"
	clusterOnSingle := single
	clusterOnSingle.Mode, clusterOnSingle.Addrs = config.RedisCluster, []string{single.Addr}
	badMode := single
	badMode.Mode = "replicated"
	for name, cfg := range map[string]config.Redis{
		"tls to a plain server":      tlsSingle,
		"wrong credentials":          badPassword,
		"a master no sentinel knows": unknownMaster,
		"cluster mode on a single":   clusterOnSingle,
		"an unknown mode":            badMode,
	} {
		t.Run(name, func(t *testing.T) {
			// No deadline of the caller's: Connect bounds itself.
			start := time.Now()
			rdb, err := Connect(context.Background(), cfg)
			if err == nil {
				_ = rdb.Close()
				t.Fatal("Connect succeeded")
			}
			if d := time.Since(start); d > connectTimeout+2*time.Second {
				t.Fatalf("Connect took %s to fail: %v", d, err)
			}
			if name == "a master no sentinel knows" && !strings.Contains(err.Error(), `none knows a master named "no-such-master"`) {
				t.Fatalf("an unknown master: %v, want it said that no sentinel knows it", err)
			}
			t.Log(err)
		})
	}
}
