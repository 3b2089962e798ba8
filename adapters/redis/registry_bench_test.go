//go:build integration

package redis

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/pipeline"
)

// BenchmarkRegistry measures the registry's operations per second on each
// Redis setup, as a cluster's logic makes them: connects (AddSession),
// heartbeats (RenewSession) and push lookups by user (KeysByMids, 4 users)
// and by key (SessionsByKeys, 4 keys), in the proportions 1 : 4 : 4 : 1,
// from 64 goroutines (b.SetParallelism with GOMAXPROCS 2). On the Cluster
// the keys of one call spread over masters: a lookup of 4 users is a
// pipeline to each master holding one. BENCHMARKS.md has the figures:
//
//	go test -tags integration -run '^$' -bench Registry -benchtime 5s ./adapters/redis/
func BenchmarkRegistry(b *testing.B) {
	for _, name := range []string{"single", "cluster"} {
		b.Run(name, func(b *testing.B) {
			ctx := context.Background()
			rdb := connect(b, setup(b, name))
			prefix := "imcloud-bench:" + strconv.FormatInt(time.Now().UnixNano(), 36) + ":"
			b.Cleanup(func() { dropKeys(b, rdb, prefix+"*") })
			r := NewRegistry(rdb, prefix, time.Minute, time.Minute)
			const users = 10_000
			for m := range users {
				if _, _, err := r.AddSession(ctx, int64(m), "k"+strconv.Itoa(m), "node-1", uint64(m)); err != nil {
					b.Fatal(err)
				}
			}
			var next atomic.Int64
			b.SetParallelism(32)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := next.Add(1)
					m := i % users
					var err error
					switch i % 10 {
					case 0:
						_, _, err = r.AddSession(ctx, m, "k"+strconv.FormatInt(m, 10), "node-1", uint64(i))
					case 1, 2, 3, 4:
						err = r.RenewSession(ctx, m, "k"+strconv.FormatInt(m, 10), "node-1", 0)
					case 5, 6, 7, 8:
						_, err = r.KeysByMids(ctx, []int64{m, (m + 1) % users, (m + 2) % users, (m + 3) % users})
					default:
						_, err = r.SessionsByKeys(ctx, []string{"k" + strconv.FormatInt(m, 10), "k" + strconv.FormatInt((m+7)%users, 10),
							"k" + strconv.FormatInt((m+13)%users, 10), "k" + strconv.FormatInt((m+19)%users, 10)})
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "ops/s")
		})
	}
}

// BenchmarkHistoryAppendWait is what registry.redis.wait_replicas costs:
// appends to 1,000 user streams from 64 goroutines on the Sentinel setup
// (a master and one replica), without WAIT and with WAIT 1 on each
// batch's connection.
//
//	go test -tags integration -run '^$' -bench HistoryAppendWait -benchtime 5s ./adapters/redis/
func BenchmarkHistoryAppendWait(b *testing.B) {
	for _, replicas := range []int{0, 1} {
		b.Run("wait_replicas="+strconv.Itoa(replicas), func(b *testing.B) {
			ctx := context.Background()
			rdb := connect(b, setup(b, "sentinel"))
			prefix := "imcloud-bench:" + strconv.FormatInt(time.Now().UnixNano(), 36) + ":"
			b.Cleanup(func() { dropKeys(b, rdb, prefix+"*") })
			h := NewHistory(rdb, prefix, pipeline.HistoryCaps{}).WithReplicaWait(replicas, time.Second)
			limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: time.Minute} }
			e := pipeline.HistoryEntry{Op: 1000, Body: make([]byte, 200)}
			var next atomic.Int64
			b.SetParallelism(32)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					s := pipeline.UserStream(next.Add(1) % 1000)
					if _, err := h.Append(ctx, []string{s}, e, limit); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "appends/s")
		})
	}
}
