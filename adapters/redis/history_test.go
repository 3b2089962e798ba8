//go:build integration

package redis

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/historytest"
	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

func TestIntegrationHistoryContract(t *testing.T) {
	eachSetup(t, func(t *testing.T, rdb goredis.UniversalClient) {
		historytest.Run(t, func(t *testing.T, caps pipeline.HistoryCaps) (pipeline.History, func() pipeline.History) {
			prefix := registrytest.Prefix(t) + "history:"
			drop := func() { dropKeys(t, rdb, prefix+"*") }
			t.Cleanup(drop)
			// Lost state: the keys flushed or expired.
			return NewHistory(rdb, prefix, caps), func() pipeline.History {
				drop()
				return NewHistory(rdb, prefix, caps)
			}
		})
	})
}

// TestIntegrationHistoryThroughput measures the round trip of an Append
// of one stream from 8 and 32 goroutines, and logs appends/s (the number in
// History's doc).
func TestIntegrationHistoryThroughput(t *testing.T) {
	rdb, prefix := historyRedis(t)
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

// TestIntegrationHistoryAppendCost measures what the append script costs
// Redis itself (INFO commandstats' evalsha time, server side, so the
// client's and the network's share is left out) on the push benchmark's
// shape: one room stream at its limit (100 entries, 5 min), 200-byte
// bodies, 8 goroutines. Other clients of the same Redis add their own
// EVALSHA calls to the count: IMCLOUD_TEST_REDIS_ADDR pointing at a
// private Redis gives the number in History's doc.
func TestIntegrationHistoryAppendCost(t *testing.T) {
	ctx := context.Background()
	rdb, prefix := historyRedis(t)
	h := NewHistory(rdb, prefix, pipeline.HistoryCaps{})
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 100, TTL: 5 * time.Minute} }
	e := pipeline.HistoryEntry{ID: "01J0000000000000000000000", Op: 1000, Body: make([]byte, 200), At: time.Now()}
	s := pipeline.RoomStream("live://bench")
	// Fill the log to its limit first: the steady state trims.
	for range 200 {
		if _, err := h.Append(ctx, []string{s}, e, limit); err != nil {
			t.Fatal(err)
		}
	}
	evalsha := func() (calls, usec int64) {
		info, err := rdb.Info(ctx, "commandstats").Result()
		if err != nil {
			t.Fatal(err)
		}
		for line := range strings.SplitSeq(info, "\n") {
			if rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_evalsha:"); ok {
				for kv := range strings.SplitSeq(rest, ",") {
					k, v, _ := strings.Cut(kv, "=")
					switch k {
					case "calls":
						calls, _ = strconv.ParseInt(v, 10, 64)
					case "usec":
						usec, _ = strconv.ParseInt(v, 10, 64)
					}
				}
			}
		}
		return calls, usec
	}
	const goroutines, each = 8, 2500
	c0, u0 := evalsha()
	var wg sync.WaitGroup
	errs := make(chan error, goroutines)
	for range goroutines {
		wg.Go(func() {
			for range each {
				if _, err := h.Append(ctx, []string{s}, e, limit); err != nil {
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
	c1, u1 := evalsha()
	// Appends share script calls (group commit): at least one call, and
	// the Redis time is counted per append.
	if c1-c0 < 1 {
		t.Fatalf("%d EVALSHA calls counted for %d appends", c1-c0, goroutines*each)
	}
	t.Logf("append script: %d appends in %d calls (%.1f a call), %.1f µs of Redis time an append, %.1f a call",
		goroutines*each, c1-c0, float64(goroutines*each)/float64(c1-c0),
		float64(u1-u0)/float64(goroutines*each), float64(u1-u0)/float64(c1-c0))
	es, top, err := h.Since(ctx, s, "", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if top.Pos != 200+goroutines*each || len(es) != 100 || es[0].Pos != top.Pos-99 {
		t.Fatalf("after %d appends: top %d, %d entries from %d", 200+goroutines*each, top.Pos, len(es), es[0].Pos)
	}
}

// logBytes checks that a stream's meta counts the bytes its log holds:
// appends trim only now and then, and every entry they keep past the
// stream's size still counts against the byte cap.
func logBytes(t *testing.T, rdb goredis.UniversalClient, h *History, stream string) int64 {
	t.Helper()
	ctx := context.Background()
	counted, err := rdb.HGet(ctx, h.metaKey(stream), "bytes").Int64()
	if err != nil {
		t.Fatalf("meta bytes of %s: %v", stream, err)
	}
	es, err := rdb.XRange(ctx, h.logKey(stream), "-", "+").Result()
	if err != nil {
		t.Fatalf("log of %s: %v", stream, err)
	}
	var held int64
	for _, e := range es {
		held += int64(len(e.Values["e"].(string)) + pipeline.EntryOverhead)
	}
	if counted != held {
		t.Fatalf("%s: meta counts %d bytes, the log's %d entries hold %d", stream, counted, len(es), held)
	}
	return held
}

func TestIntegrationHistoryBytesAccounting(t *testing.T) {
	ctx := context.Background()
	rdb, prefix := historyRedis(t)
	const maxBytes = 256 << 10
	h := NewHistory(rdb, prefix, pipeline.HistoryCaps{MaxSize: 1000, MaxBytes: maxBytes, Idle: time.Hour})
	cases := []struct {
		name    string
		size    int
		body    int
		appends int
		// most is the most entries the log may hold: size + slack,
		// or what the byte cap leaves.
		most int
	}{
		{"size 1", 1, 100, 100, 1 + 16},
		{"size 100", 100, 200, 1000, 100 + 16},
		{"size 800: slack an eighth", 800, 10, 3000, 800 + 100},
		{"byte cap binds", 1000, 8000, 200, maxBytes / (8000 + pipeline.EntryOverhead)},
		{"size 0", 0, 100, 50, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := pipeline.RoomStream("bytes://" + strings.ReplaceAll(tc.name, " ", "-"))
			limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: tc.size, TTL: time.Hour} }
			e := pipeline.HistoryEntry{ID: "x", Op: 1000, Body: make([]byte, tc.body)}
			var top pipeline.StreamPos
			for i := range tc.appends {
				ps, err := h.Append(ctx, []string{s}, e, limit)
				if err != nil {
					t.Fatal(err)
				}
				top = ps[0]
				if i%97 == 0 {
					logBytes(t, rdb, h, s)
				}
			}
			held := logBytes(t, rdb, h, s)
			if held > maxBytes {
				t.Fatalf("log holds %d bytes, cap %d", held, maxBytes)
			}
			if n := rdb.XLen(ctx, h.logKey(s)).Val(); n > int64(tc.most) {
				t.Fatalf("log holds %d entries, at most %d expected", n, tc.most)
			}
			// Since sees exactly the size, whatever the log holds.
			es, _, err := h.Since(ctx, s, "", 0, pipeline.MaxHistorySince)
			if err != nil {
				t.Fatal(err)
			}
			want := min(tc.size, tc.appends, tc.most, pipeline.MaxHistorySince)
			if len(es) != want || (want > 0 && es[len(es)-1].Pos != top.Pos) {
				t.Fatalf("Since returned %d entries, want %d ending at %d", len(es), want, top.Pos)
			}
			logBytes(t, rdb, h, s)
		})
	}
}

// An append whose caller gave up before it was sent is not made: the
// stream's position does not move.
func TestIntegrationHistoryCancelledAppend(t *testing.T) {
	ctx := context.Background()
	rdb, prefix := historyRedis(t)
	h := NewHistory(rdb, prefix, pipeline.HistoryCaps{})
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: time.Minute} }
	s := pipeline.RoomStream("cancel://1")
	e := pipeline.HistoryEntry{ID: "x", Op: 1000, Body: []byte("b")}
	if _, err := h.Append(ctx, []string{s}, e, limit); err != nil {
		t.Fatal(err)
	}
	gone, cancel := context.WithCancel(ctx)
	cancel()
	for range 20 {
		if _, err := h.Append(gone, []string{s}, e, limit); !errors.Is(err, context.Canceled) {
			t.Fatalf("append with a cancelled context: %v", err)
		}
	}
	ps, err := h.Append(ctx, []string{s}, e, limit)
	if err != nil {
		t.Fatal(err)
	}
	if ps[0].Pos != 2 {
		t.Fatalf("next append at %d, want 2: a cancelled append took a position", ps[0].Pos)
	}
}

// TestIntegrationHistoryReadsKeepNoStreamForADay: a read of a stream no one
// pushed to (GET /im/history of any name, a connect's tops) creates its
// keys for HistoryCaps.ReadIdle, not a day; an append gives the stream its
// class's life.
func TestIntegrationHistoryReadsKeepNoStreamForADay(t *testing.T) {
	ctx := context.Background()
	rdb, prefix := historyRedis(t)
	h := NewHistory(rdb, prefix, pipeline.HistoryCaps{ReadIdle: time.Minute})
	read, pushed := pipeline.UserStream(424242), pipeline.UserStream(424243)
	if _, err := h.Tops(ctx, []string{read}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := h.Since(ctx, pushed, "", 0, 10); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{read, pushed} {
		if ttl := rdb.PTTL(ctx, h.metaKey(s)).Val(); ttl <= 0 || ttl > time.Minute {
			t.Fatalf("a read-created %s lives %s, want at most ReadIdle (1m)", s, ttl)
		}
	}
	limit := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 10, TTL: time.Hour} }
	if _, err := h.Append(ctx, []string{pushed}, pipeline.HistoryEntry{ID: "x", Op: 1000, Body: []byte("b")}, limit); err != nil {
		t.Fatal(err)
	}
	if ttl := rdb.PTTL(ctx, h.metaKey(pushed)).Val(); ttl <= time.Minute {
		t.Fatalf("a stream pushed to with a 1h ttl lives %s, want its class's life", ttl)
	}
}

// TestIntegrationHistoryBatch: one batch's appends are made in queue
// order by one script call, an append whose caller gave up is not made,
// and each stream the batch creates gets its own epoch.
func TestIntegrationHistoryBatch(t *testing.T) {
	ctx := context.Background()
	rdb, prefix := historyRedis(t)
	h := NewHistory(rdb, prefix, pipeline.HistoryCaps{})
	s1, s2, s3 := pipeline.RoomStream("batch://1"), pipeline.RoomStream("batch://2"), pipeline.RoomStream("batch://3")
	gone, cancel := context.WithCancel(ctx)
	cancel()
	call := func(ctx context.Context, id string, streams ...string) *appendCall {
		limits := make([]int64, 0, 2*len(streams))
		for range streams {
			limits = append(limits, 10, time.Minute.Milliseconds())
		}
		e := pipeline.HistoryEntry{ID: id, Op: 1000, Body: []byte("body " + id)}
		return &appendCall{ctx: ctx, streams: streams, entry: encodeEntry(e), limits: limits}
	}
	batch := []*appendCall{
		call(ctx, "a", s1, s2),
		call(gone, "b", s1),
		call(ctx, "c", s1),
		call(ctx, "d", s3, s1),
	}
	h.send(ctx, slices.Clone(batch)) // send drops the calls it does not make from its slice
	tests := []struct {
		call int
		err  error
		want []uint64
	}{
		{0, nil, []uint64{1, 1}},
		{1, context.Canceled, nil},
		{2, nil, []uint64{2}},
		{3, nil, []uint64{1, 3}},
	}
	epochs := map[string]string{}
	for _, tt := range tests {
		c := batch[tt.call]
		if !errors.Is(c.err, tt.err) {
			t.Fatalf("append %d: error %v, want %v", tt.call, c.err, tt.err)
		}
		if tt.err != nil {
			continue
		}
		if len(c.res) != len(tt.want) {
			t.Fatalf("append %d: %d results, want %d", tt.call, len(c.res), len(tt.want))
		}
		for i, r := range c.res {
			epoch, pos, err := epochPos(r)
			if err != nil || pos != tt.want[i] || len(epoch) != 16 {
				t.Fatalf("append %d, %s: epoch %q at %d (%v), want position %d", tt.call, c.streams[i], epoch, pos, err, tt.want[i])
			}
			if old, ok := epochs[c.streams[i]]; ok && old != epoch {
				t.Fatalf("%s: epoch %q, then %q in one batch", c.streams[i], old, epoch)
			}
			epochs[c.streams[i]] = epoch
		}
	}
	if epochs[s1] == epochs[s2] || epochs[s1] == epochs[s3] || epochs[s2] == epochs[s3] {
		t.Fatalf("streams created in one batch share an epoch: %v", epochs)
	}
	es, top, err := h.Since(ctx, s1, epochs[s1], 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range es {
		got = append(got, fmt.Sprintf("%d:%s", e.Pos, e.ID))
	}
	if want := []string{"1:a", "2:c", "3:d"}; top.Pos != 3 || !slices.Equal(got, want) {
		t.Fatalf("%s: top %d, entries %v, want %v", s1, top.Pos, got, want)
	}
	// The meta was written once, at the batch's end, with its last state.
	meta, err := rdb.HMGet(ctx, h.metaKey(s1), "seq", "size", "ttl").Result()
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(meta) != "[3 10 60000]" {
		t.Fatalf("%s meta seq, size, ttl: %v", s1, meta)
	}
}

// historyRedis connects to the test Redis (single) and gives the test a
// key prefix of its own, whose keys are deleted when it ends.
func historyRedis(t *testing.T) (goredis.UniversalClient, string) {
	t.Helper()
	rdb := connect(t, setup(t, "single"))
	prefix := registrytest.Prefix(t) + "history:"
	t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
	return rdb, prefix
}
