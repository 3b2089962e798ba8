//go:build integration

package redis

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

// TestIntegrationHistoryReplicaWait: with WithReplicaWait, an append is
// given its positions only once that many replicas have it. On the
// Sentinel setup (one replica) one replica is had and positions follow;
// two are not, and the append fails — the push is refused, not accepted
// with a position a failover could give again. On the Cluster (masters
// without replicas) each slot's master is asked, and none has one.
func TestIntegrationHistoryReplicaWait(t *testing.T) {
	ctx := context.Background()
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: time.Minute} }
	entry := pipeline.HistoryEntry{Op: 1000, Body: []byte("w")}
	for _, tc := range []struct {
		setup    string
		replicas int
		ok       bool
	}{
		{"sentinel", 1, true},
		{"sentinel", 2, false},
		{"cluster", 1, false},
		{"cluster", 0, true},
	} {
		t.Run(fmt.Sprintf("%s/%d", tc.setup, tc.replicas), func(t *testing.T) {
			rdb := connect(t, setup(t, tc.setup))
			prefix := registrytest.Prefix(t) + "history:"
			t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
			h := NewHistory(rdb, prefix, pipeline.HistoryCaps{}).WithReplicaWait(tc.replicas, 200*time.Millisecond)
			// Streams over several slots, so that under Cluster several
			// masters are asked.
			streams := []string{"user:1", "user:2", "user:3", "room:live://w"}
			for round := uint64(1); round <= 3; round++ {
				pos, err := h.Append(ctx, streams, entry, limit)
				if !tc.ok {
					if err == nil || !strings.Contains(err.Error(), "replicas") {
						t.Fatalf("append with %d replicas to wait for on %s: %v, want a failure naming the replicas", tc.replicas, tc.setup, err)
					}
					// Made all the same, the append is void: a gap fill
					// or a history read never delivers the refused push.
					for _, s := range streams {
						es, top, err := h.Since(ctx, s, "", 0, 10)
						if err != nil {
							t.Fatal(err)
						}
						if top.Pos != 1 || len(es) != 1 || !es[0].Void {
							t.Fatalf("%s after a refused append: top %d, entries %+v; want position 1 void", s, top.Pos, es)
						}
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				for i, p := range pos {
					if p.Pos != round {
						t.Fatalf("round %d: %s at %d", round, streams[i], p.Pos)
					}
				}
			}
		})
	}
}

// TestIntegrationCheckReplicas: start-up refuses a wait_replicas the
// masters cannot meet — on the Cluster (no replicas) naming every master —
// and takes one they can.
func TestIntegrationCheckReplicas(t *testing.T) {
	ctx := context.Background()
	sentinel, cluster := connect(t, setup(t, "sentinel")), connect(t, setup(t, "cluster"))
	if err := CheckReplicas(ctx, sentinel, 1); err != nil {
		t.Fatalf("sentinel, 1 replica wanted: %v", err)
	}
	if err := CheckReplicas(ctx, sentinel, 2); err == nil || !strings.Contains(err.Error(), "has 1") {
		t.Fatalf("sentinel, 2 replicas wanted: %v, want refused naming its 1", err)
	}
	err := CheckReplicas(ctx, cluster, 1)
	if err == nil {
		t.Fatal("cluster without replicas, 1 wanted: accepted")
	}
	for _, port := range []string{"7000", "7001", "7002"} {
		if !strings.Contains(err.Error(), ":"+port+" has 0") {
			t.Fatalf("cluster: %v, want every master named", err)
		}
	}
	if err := CheckReplicas(ctx, cluster, 0); err != nil {
		t.Fatalf("nothing wanted: %v", err)
	}
}
