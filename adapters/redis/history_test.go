//go:build integration

package redis

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"imcloud/adapters/historytest"
	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

func TestIntegrationHistoryContract(t *testing.T) {
	rdb, err := Connect(context.Background(), testAddr(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	historytest.Run(t, func(t *testing.T, caps pipeline.HistoryCaps) (pipeline.History, func() pipeline.History) {
		prefix := registrytest.Prefix(t) + "history:"
		drop := func() {
			keys, err := rdb.Keys(context.Background(), prefix+"*").Result()
			if err != nil {
				t.Errorf("keys %s*: %v", prefix, err)
			}
			if len(keys) > 0 {
				_ = rdb.Del(context.Background(), keys...).Err()
			}
		}
		t.Cleanup(drop)
		// Lost state: the keys flushed or expired.
		return NewHistory(rdb, prefix, caps), func() pipeline.History {
			drop()
			return NewHistory(rdb, prefix, caps)
		}
	})
}

// TestIntegrationHistoryThroughput measures the round trip of an Append
// of one stream from 8 and 32 goroutines, and logs appends/s (the number in
// History's doc).
func TestIntegrationHistoryThroughput(t *testing.T) {
	rdb, err := Connect(context.Background(), testAddr(), "", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rdb.Close() })
	prefix := registrytest.Prefix(t) + "history:"
	t.Cleanup(func() {
		keys, _ := rdb.Keys(context.Background(), prefix+"*").Result()
		if len(keys) > 0 {
			_ = rdb.Del(context.Background(), keys...).Err()
		}
	})
	h := NewHistory(rdb, prefix, pipeline.HistoryCaps{})
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: time.Minute} }
	e := pipeline.HistoryEntry{ID: "01J0000000000000000000000", Op: 1000, Body: make([]byte, 200), At: time.Now()}
	for _, goroutines := range []int{8, 32} {
		const each = 8000
		n := each / goroutines
		start := time.Now()
		var wg sync.WaitGroup
		errs := make(chan error, goroutines)
		for g := range goroutines {
			wg.Go(func() {
				for i := range n {
					s := pipeline.RoomStream(fmt.Sprintf("live://%d", (g*n+i)%100))
					if _, err := h.Append(t.Context(), []string{s}, e, limit); err != nil {
						errs <- err
						return
					}
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
		d := time.Since(start)
		t.Logf("%d goroutines: %d appends in %s: %.0f appends/s, %s a call", goroutines, each, d, each/d.Seconds(), d/time.Duration(n))
	}
	tops, err := h.Tops(t.Context(), []string{pipeline.RoomStream("live://0")})
	if err != nil {
		t.Fatal(err)
	}
	if tops[0].Pos != 2*8000/100 {
		t.Fatalf("live://0 at %d, want %d", tops[0].Pos, 2*8000/100)
	}
}
