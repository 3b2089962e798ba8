package memory

import (
	"errors"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"imcloud/pipeline"
)

// heapInUse is the live heap after a full collection.
func heapInUse() int64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// oneOff appends one entry of body bytes to each of n streams named
// prefix+i, in calls of MaxHistoryStreams, from two goroutines: a backend
// pushing to one-off mids.
func oneOff(t *testing.T, h *History, prefix string, n, body int) {
	t.Helper()
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 1000, TTL: 24 * time.Hour} }
	e := pipeline.HistoryEntry{ID: "01J0000000000000000000000", Op: 1000, Body: make([]byte, body)}
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	for g := range 2 {
		wg.Go(func() {
			names := make([]string, 0, pipeline.MaxHistoryStreams)
			for i := g; i < n; i += 2 {
				names = append(names, fmt.Sprintf("%s%d", prefix, i))
				if len(names) == cap(names) || i+2 >= n {
					if _, err := h.Append(t.Context(), names, e, limit); err != nil {
						errs <- err
						return
					}
					names = names[:0]
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// consistent checks the counters against the streams held: each counted
// once, bytes as cost says, lists and maps agreeing.
func (h *History) consistent(t *testing.T) (streams, bytes int64) {
	t.Helper()
	for i := range h.shards {
		sh := &h.shards[i]
		sh.mu.Lock()
		listed := 0
		for st := sh.oldest; st != nil; st = st.newer {
			listed++
			if sh.streams[st.name] != st {
				t.Errorf("shard %d lists %q, which its map does not hold", i, st.name)
			}
			if st.counted != st.cost() {
				t.Errorf("%s counted %d bytes, costs %d", st.name, st.counted, st.cost())
			}
			bytes += int64(st.counted)
		}
		if listed != len(sh.streams) {
			t.Errorf("shard %d lists %d streams, holds %d", i, listed, len(sh.streams))
		}
		streams += int64(listed)
		sh.mu.Unlock()
	}
	if streams != h.count.Load() || bytes != h.bytes.Load() {
		t.Fatalf("counted %d streams, %d bytes; held %d, %d", h.count.Load(), h.bytes.Load(), streams, bytes)
	}
	return streams, bytes
}

// StreamOverhead must cover what a stream really costs on the heap, or
// MaxTotalBytes would not bound the heap. Measured on amd64: 194 bytes a
// stream named "user:<7 digits>" with no entry kept (counted 312).
func TestHistoryStreamOverhead(t *testing.T) {
	const n = 200_000
	h := NewHistory(pipeline.HistoryCaps{})
	size0 := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 0, TTL: time.Hour} }
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("user:%07d", i)
	}
	before := heapInUse()
	for i := 0; i < n; i += pipeline.MaxHistoryStreams {
		if _, err := h.Append(t.Context(), names[i:i+pipeline.MaxHistoryStreams], pipeline.HistoryEntry{}, size0); err != nil {
			t.Fatal(err)
		}
	}
	per := (heapInUse() - before) / n
	t.Logf("%d bytes of heap a stream", per)
	if _, bytes := h.consistent(t); per > bytes/n {
		t.Fatalf("a stream takes %d bytes of heap, counted %d: raise pipeline.StreamOverhead", per, bytes/n)
	}
	runtime.KeepAlive(names)
}

// A flood of one-off streams stays within each cap: the counters, what
// the store holds and the heap.
func TestHistoryCapsHoldUnderFlood(t *testing.T) {
	const flood = 300_000
	const body = 100
	for _, tt := range []struct {
		name string
		caps pipeline.HistoryCaps
		// heap is the most the store may grow the heap by.
		heap int64
	}{
		{
			name: "streams",
			caps: pipeline.HistoryCaps{MaxStreams: 20_000, MaxTotalBytes: 1 << 30},
			// A stream of one entry: overhead, name, entry (its
			// counted size covers the body, the id and its record).
			heap: 20_000 * (pipeline.StreamOverhead + 16 + body + 26 + pipeline.EntryOverhead) * 3 / 2,
		},
		{
			name: "bytes",
			caps: pipeline.HistoryCaps{MaxStreams: 10_000_000, MaxTotalBytes: 8 << 20},
			heap: 8 << 20 * 3 / 2,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := heapInUse()
			h := NewHistory(tt.caps)
			oneOff(t, h, "user:", flood, body)
			grown := heapInUse() - before
			streams, bytes := h.consistent(t)
			t.Logf("%d streams, %d bytes counted, heap +%d bytes, %d evicted", streams, bytes, grown, h.Evictions())
			if streams > int64(tt.caps.MaxStreams) || bytes > int64(tt.caps.MaxTotalBytes) {
				t.Fatalf("%d streams, %d bytes over the caps %+v", streams, bytes, tt.caps)
			}
			if h.Evictions() < uint64(flood-streams) {
				t.Fatalf("%d evictions, %d streams of %d made", h.Evictions(), streams, flood)
			}
			if grown > tt.heap {
				t.Fatalf("heap grew %d bytes, bound %d", grown, tt.heap)
			}
			runtime.KeepAlive(h)
		})
	}
}

// An evicted stream's next use starts a new epoch, so a client holding
// its old positions is told its history is lost; the stream appended to
// throughout the flood is never the least recently appended and stays.
func TestHistoryEvictionNewEpoch(t *testing.T) {
	ctx := t.Context()
	h := NewHistory(pipeline.HistoryCaps{MaxStreams: 1000})
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: time.Hour} }
	app := func(s string) pipeline.StreamPos {
		t.Helper()
		p, err := h.Append(ctx, []string{s}, pipeline.HistoryEntry{Body: []byte("x")}, limit)
		if err != nil {
			t.Fatal(err)
		}
		return p[0]
	}
	app("user:victim")
	old := app("user:victim")
	var hot pipeline.StreamPos
	for i := range 10_000 {
		app(fmt.Sprintf("user:flood-%d", i))
		hot = app("room:hot://1")
	}
	if h.Evictions() == 0 {
		t.Fatal("no eviction past the cap")
	}
	if got := h.count.Load(); got > 1000 {
		t.Fatalf("%d streams, cap 1000", got)
	}
	tops, err := h.Tops(ctx, []string{"user:victim", "room:hot://1"})
	if err != nil {
		t.Fatal(err)
	}
	if tops[0].Epoch == old.Epoch || tops[0].Pos != 0 {
		t.Fatalf("evicted stream's top %+v, before %+v", tops[0], old)
	}
	if _, _, err := h.Since(ctx, "user:victim", old.Epoch, 1, 0); !errors.Is(err, pipeline.ErrEpochChanged) {
		t.Fatalf("since in the evicted epoch: %v", err)
	}
	if err := h.Ack(ctx, "user:victim", old.Epoch, 1); !errors.Is(err, pipeline.ErrEpochChanged) {
		t.Fatalf("ack in the evicted epoch: %v", err)
	}
	if tops[1] != hot {
		t.Fatalf("stream appended to throughout: %+v, last append %+v", tops[1], hot)
	}
	// At the cap, the read-only stream Tops made does not push out one
	// with messages: it may be forgotten itself, so the append may start
	// yet another epoch, but never the evicted one.
	if p := app("user:victim"); p.Epoch == old.Epoch || p.Pos != 1 {
		t.Fatalf("first append after eviction %+v, evicted %+v", p, old)
	}
}

// oneInEachShard returns a stream name of every shard.
func (h *History) oneInEachShard() []string {
	names := make([]string, 0, historyShards)
	seen := map[*historyShard]bool{}
	for i := 0; len(names) < historyShards; i++ {
		n := fmt.Sprintf("room:probe://%d", i)
		if sh := h.shard(n); !seen[sh] {
			seen[sh] = true
			names = append(names, n)
		}
	}
	return names
}

// Reads of streams never appended to keep them a minute (ReadIdle), not
// a day; an Append within it keeps the epoch the read gave and the full
// life; at the cap, reads never push out a stream that holds messages.
func TestHistoryReadsDoNotKeepStreams(t *testing.T) {
	ctx := t.Context()
	clock := time.Now()
	h := NewHistory(pipeline.HistoryCaps{MaxStreams: 2000})
	h.now = func() time.Time { return clock }
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: 24 * time.Hour} }
	kept := make([]string, 1000)
	for i := range kept {
		kept[i] = fmt.Sprintf("user:kept-%d", i)
	}
	keptTops, err := h.Append(ctx, kept, pipeline.HistoryEntry{Body: []byte("x")}, limit)
	if err != nil {
		t.Fatal(err)
	}
	// A connection's Tops, then its first message 30 s later.
	first, err := h.Tops(ctx, []string{"user:new"})
	if err != nil {
		t.Fatal(err)
	}
	// A flood of reads of made-up streams, past the cap.
	for i := range 20 {
		made := make([]string, pipeline.MaxHistoryStreams)
		for j := range made {
			made[j] = fmt.Sprintf("user:made-up-%d-%d", i, j)
		}
		if _, err := h.Tops(ctx, made); err != nil {
			t.Fatal(err)
		}
		if _, _, err := h.Since(ctx, made[0]+"x", "", 0, 0); err != nil {
			t.Fatal(err)
		}
		if _, err := h.Acked(ctx, made[1]+"x"); err != nil {
			t.Fatal(err)
		}
	}
	if got := h.count.Load(); got > 2000 {
		t.Fatalf("%d streams after the read flood, cap 2000", got)
	}
	again, err := h.Tops(ctx, kept)
	if err != nil {
		t.Fatal(err)
	}
	for i := range kept {
		if again[i] != keptTops[i] {
			t.Fatalf("read flood pushed out %s: %+v, was %+v", kept[i], again[i], keptTops[i])
		}
	}

	clock = clock.Add(30 * time.Second)
	ps, err := h.Append(ctx, []string{"user:new"}, pipeline.HistoryEntry{}, limit)
	if err != nil {
		t.Fatal(err)
	}
	// user:new may have been churned out by the flood at the cap: then
	// its epoch is new and says so. Not churned, it keeps Tops's.
	if ps[0].Pos != 1 {
		t.Fatalf("first append %+v", ps[0])
	}
	_ = first

	// Past a minute the read-only streams go, at the next sweep of each
	// shard; the appended ones stay.
	clock = clock.Add(time.Minute + historySweepEvery)
	probes := h.oneInEachShard()
	if _, err := h.Tops(ctx, probes); err != nil {
		t.Fatal(err)
	}
	// user:new was appended with the store at its cap: when its shard
	// held no read-only stream to let go (the flood's are spread over 256
	// shards at random), the least recently pushed-to appended one went
	// instead (1 run in about 30 failed here, in CI too), so one fewer
	// may be held.
	if streams, _ := h.consistent(t); streams != int64(len(kept)+1+len(probes)) && streams != int64(len(kept)+len(probes)) {
		t.Fatalf("%d streams a minute after the reads, want the %d appended ones (or one fewer) and %d probes", streams, len(kept)+1, len(probes))
	}
	if p, err := h.Tops(ctx, []string{"user:new"}); err != nil || p[0] != ps[0] {
		t.Fatalf("appended stream after a minute: %+v, %v; was %+v", p, err, ps[0])
	}
}

// Without the cap in the way, a connection's Tops gives the epoch its
// first message keeps, and that message gives the stream its full life.
func TestHistoryReadThenAppendKeepsEpoch(t *testing.T) {
	ctx := t.Context()
	clock := time.Now()
	h := NewHistory(pipeline.HistoryCaps{})
	h.now = func() time.Time { return clock }
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: 24 * time.Hour} }
	top, err := h.Tops(ctx, []string{"user:1", "user:2"})
	if err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(50 * time.Second)
	p, err := h.Append(ctx, []string{"user:1"}, pipeline.HistoryEntry{}, limit)
	if err != nil {
		t.Fatal(err)
	}
	if p[0].Epoch != top[0].Epoch || p[0].Pos != 1 {
		t.Fatalf("append %+v after Tops %+v", p[0], top[0])
	}
	clock = clock.Add(2 * time.Hour)
	after, err := h.Tops(ctx, []string{"user:1", "user:2"})
	if err != nil {
		t.Fatal(err)
	}
	if after[0] != p[0] {
		t.Fatalf("appended stream 2 h later %+v, was %+v", after[0], p[0])
	}
	if after[1].Epoch == top[1].Epoch {
		t.Fatalf("read-only stream kept its epoch for 2 h: %+v", after[1])
	}
}

// A change to a stream's entries whose caller unlocks without counting it
// (sh.mu.Unlock, not h.unlock) is counted at the stream's next use, and a
// stream dropped takes back exactly what was counted: the totals never
// drift, so the store never evicts for bytes it does not hold.
func TestHistoryCountsNeverDrift(t *testing.T) {
	ctx := t.Context()
	h := NewHistory(pipeline.HistoryCaps{})
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: time.Hour} }
	for i := range 10 {
		if _, err := h.Append(ctx, []string{"user:a", "user:b"}, pipeline.HistoryEntry{Body: make([]byte, 100*i)}, limit); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []string{"user:a", "user:b"} {
		sh, st := h.lock(s, h.now(), false)
		st.trim(h.now(), 1, h.caps.MaxBytes) // uncounted
		sh.mu.Unlock()
	}
	if _, err := h.Tops(ctx, []string{"user:a"}); err != nil {
		t.Fatal(err)
	}
	sh, st := h.lock("user:b", h.now(), false)
	h.drop(sh, st)
	sh.mu.Unlock()
	_, bytes := h.Size()
	sh, a := h.lock("user:a", h.now(), false)
	want := int64(a.cost())
	sh.mu.Unlock()
	if bytes != want {
		t.Fatalf("store counts %d bytes, holds %d", bytes, want)
	}
	h.consistent(t)
}
