package memory

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/adapters/historytest"
	"imcloud/pipeline"
)

func TestHistoryContract(t *testing.T) {
	historytest.Run(t, func(_ *testing.T, caps pipeline.HistoryCaps) (pipeline.History, func() pipeline.History) {
		// A restarted process is a new, empty store.
		return NewHistory(caps), func() pipeline.History { return NewHistory(caps) }
	})
}

// Streams idle past their life are forgotten by the sweep, not only when
// next used: one-off user streams do not pile up.
func TestHistorySweepForgetsIdleStreams(t *testing.T) {
	h := NewHistory(pipeline.HistoryCaps{Idle: time.Hour})
	// No sweep while the streams are made: on a loaded machine making
	// 5,000 may take longer than their ttl.
	h.sweepEvery = time.Hour
	short := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: 100 * time.Millisecond} }
	long := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: time.Hour} }
	const n = 5000
	for i := range n {
		if _, err := h.Append(t.Context(), []string{fmt.Sprintf("user:%d", i)}, pipeline.HistoryEntry{Body: []byte("x")}, short); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.Append(t.Context(), []string{"room:kept://1"}, pipeline.HistoryEntry{}, long); err != nil {
		t.Fatal(err)
	}
	if got := h.streams(); got != n+1 {
		t.Fatalf("%d streams, want %d", got, n+1)
	}
	h.sweepEvery = 50 * time.Millisecond
	// Uses of other streams touch every shard, which sweeps when due.
	// 4,000 probe streams miss none of 256 shards but with odds of 1e-5.
	probes := make([]string, 4*pipeline.MaxHistoryStreams)
	for i := range probes {
		probes[i] = fmt.Sprintf("room:probe://%d", i)
	}
	deadline := time.Now().Add(5 * time.Second)
	for h.streams() > 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%d streams left after their ttl", h.streams())
		}
		time.Sleep(20 * time.Millisecond)
		for i := 0; i < len(probes); i += pipeline.MaxHistoryStreams {
			if _, err := h.Tops(t.Context(), probes[i:i+pipeline.MaxHistoryStreams]); err != nil {
				t.Fatal(err)
			}
		}
		h.forgetProbes()
	}
	if p, _ := h.Tops(t.Context(), []string{"room:kept://1"}); p[0].Pos != 1 {
		t.Fatalf("a stream within its ttl was swept: %+v", p[0])
	}
}

// forgetProbes drops the probe streams the sweep test creates, so that
// only the streams under test are counted.
func (h *History) forgetProbes() {
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.Lock()
		for name, st := range sh.streams {
			if len(name) > 12 && name[:12] == "room:probe:/" {
				h.drop(sh, st)
			}
		}
		sh.mu.Unlock()
	}
}

// BenchmarkHistoryAppend measures appends of a 200-byte push: to one of
// 1,000 room streams (the common case) and all to one stream (the worst
// contention), from GOMAXPROCS goroutines.
func BenchmarkHistoryAppend(b *testing.B) {
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: 5 * time.Minute} }
	e := pipeline.HistoryEntry{ID: "01J0000000000000000000000", Op: 1000, Body: make([]byte, 200), At: time.Now()}
	for _, streams := range []int{1000, 1} {
		b.Run(fmt.Sprintf("streams=%d", streams), func(b *testing.B) {
			h := NewHistory(pipeline.HistoryCaps{})
			names := make([]string, streams)
			for i := range names {
				names[i] = pipeline.RoomStream(fmt.Sprintf("live://%d", i))
			}
			var next atomic.Uint64
			b.ReportAllocs()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					s := names[next.Add(1)%uint64(streams)]
					if _, err := h.Append(b.Context(), []string{s}, e, limit); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "appends/s")
		})
	}
}
