//go:build integration

package redis

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

// scriptCounter counts the script calls (EVALSHA, EVAL) a client sends,
// alone or in pipelines.
type scriptCounter struct{ n atomic.Int64 }

func (c *scriptCounter) count(cmds ...goredis.Cmder) {
	for _, cmd := range cmds {
		if name := strings.ToLower(cmd.Name()); name == "evalsha" || name == "eval" {
			c.n.Add(1)
		}
	}
}

func (c *scriptCounter) DialHook(next goredis.DialHook) goredis.DialHook { return next }
func (c *scriptCounter) ProcessHook(next goredis.ProcessHook) goredis.ProcessHook {
	return func(ctx context.Context, cmd goredis.Cmder) error {
		c.count(cmd)
		return next(ctx, cmd)
	}
}
func (c *scriptCounter) ProcessPipelineHook(next goredis.ProcessPipelineHook) goredis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []goredis.Cmder) error {
		c.count(cmds...)
		return next(ctx, cmds)
	}
}

// TestIntegrationHistoryClusterSlots: on a 3-master Redis Cluster one
// batch's appends spread over many slots on every node, one script call a
// slot, and every stream gets each of its positions in queue order;
// concurrent Appends, Tops and Void across slots agree.
func TestIntegrationHistoryClusterSlots(t *testing.T) {
	ctx := context.Background()
	rdb := connect(t, setup(t, "cluster"))
	cc := rdb.(*goredis.ClusterClient)
	prefix := registrytest.Prefix(t) + "history:"
	t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
	h := NewHistory(rdb, prefix, pipeline.HistoryCaps{})
	counter := &scriptCounter{}
	rdb.AddHook(counter)

	var streams []string
	slots, nodes := map[int]bool{}, map[string]bool{}
	for i := range 30 {
		s := pipeline.RoomStream(fmt.Sprintf("cluster://%d", i))
		streams = append(streams, s)
		slots[keySlot(h.metaKey(s))] = true
		if got := cc.ClusterKeySlot(ctx, h.metaKey(s)).Val(); got != int64(keySlot(h.metaKey(s))) {
			t.Fatalf("%s: CLUSTER KEYSLOT %d, keySlot %d", h.metaKey(s), got, keySlot(h.metaKey(s)))
		}
		m, err := cc.MasterForKey(ctx, h.metaKey(s))
		if err != nil {
			t.Fatal(err)
		}
		nodes[m.Options().Addr] = true
	}
	if len(slots) < 20 || len(nodes) < 3 {
		t.Fatalf("30 streams on %d slots and %d nodes: too few to show a spread batch", len(slots), len(nodes))
	}

	// One batch: append i goes to three streams, the batch to them all.
	limit := []int64{100, time.Minute.Milliseconds()}
	var batch []*appendCall
	want := map[string][]string{} // the ids each stream should hold, in order
	for i := range 20 {
		ss := []string{streams[i%30], streams[(i+7)%30], streams[(i+19)%30]}
		id := fmt.Sprint("m", i)
		for _, s := range ss {
			want[s] = append(want[s], id)
		}
		limits := slices.Concat(limit, limit, limit)
		e := pipeline.HistoryEntry{ID: id, Op: 1000, Body: []byte(id)}
		batch = append(batch, &appendCall{ctx: ctx, streams: ss, entry: encodeEntry(e), limits: limits})
	}
	batchSlots := map[int]bool{}
	for s := range want {
		batchSlots[keySlot(h.metaKey(s))] = true
	}
	// Loaded on every master: the count below is then one call a slot,
	// with no reruns for NOSCRIPT (checked at the end).
	if err := appendScript.Load(ctx, rdb).Err(); err != nil {
		t.Fatal(err)
	}
	before := counter.n.Load()
	h.send(ctx, slices.Clone(batch))
	if calls := counter.n.Load() - before; calls != int64(len(batchSlots)) {
		t.Fatalf("a batch over %d slots took %d script calls, want one a slot", len(batchSlots), calls)
	}
	next := map[string]uint64{}
	epochs := map[string]string{}
	for i, c := range batch {
		if c.err != nil || len(c.res) != len(c.streams) {
			t.Fatalf("append %d: %d results, %v", i, len(c.res), c.err)
		}
		for j, r := range c.res {
			epoch, pos, err := epochPos(r)
			s := c.streams[j]
			next[s]++
			if err != nil || pos != next[s] {
				t.Fatalf("append %d to %s: position %d (%v), want %d", i, s, pos, err, next[s])
			}
			if old, ok := epochs[s]; ok && old != epoch {
				t.Fatalf("%s: epoch %q then %q", s, old, epoch)
			}
			epochs[s] = epoch
		}
	}
	for s, ids := range want {
		es, top, err := h.Since(ctx, s, epochs[s], 0, 0)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range es {
			got = append(got, e.ID)
		}
		if top.Pos != uint64(len(ids)) || !slices.Equal(got, ids) {
			t.Fatalf("%s: top %d, ids %v, want %v", s, top.Pos, got, ids)
		}
	}

	// Concurrent Appends to streams of several slots each: group commit
	// batches them, and no position is lost or given twice.
	lim := func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 1000, TTL: time.Minute} }
	const goroutines, each = 8, 40
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[string]map[uint64]bool{}
	errs := make(chan error, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				ss := []string{streams[(g+i)%30], streams[(g+i+11)%30]}
				ps, err := h.Append(ctx, ss, pipeline.HistoryEntry{ID: fmt.Sprint(g, "-", i), Op: 1000}, lim)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				for _, p := range ps {
					if seen[p.Stream] == nil {
						seen[p.Stream] = map[uint64]bool{}
					}
					if seen[p.Stream][p.Pos] {
						errs <- fmt.Errorf("%s: position %d given twice", p.Stream, p.Pos)
					}
					seen[p.Stream][p.Pos] = true
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	tops, err := h.Tops(ctx, streams)
	if err != nil {
		t.Fatal(err)
	}
	for i, top := range tops {
		s := streams[i]
		if top.Stream != s || top.Epoch != epochs[s] && epochs[s] != "" || top.Pos != next[s]+uint64(len(seen[s])) {
			t.Fatalf("%s: top %+v, want %d appended in the batch and %d since", s, top, next[s], len(seen[s]))
		}
	}

	// Every master lost its scripts (restarted, or a replica promoted):
	// a batch over every slot loads the script again and is made.
	if err := cc.ForEachMaster(ctx, func(ctx context.Context, c *goredis.Client) error { return c.ScriptFlush(ctx).Err() }); err != nil {
		t.Fatal(err)
	}
	before = counter.n.Load()
	var again []*appendCall
	for _, s := range streams {
		e := pipeline.HistoryEntry{ID: "after flush", Op: 1000}
		again = append(again, &appendCall{ctx: ctx, streams: []string{s}, entry: encodeEntry(e), limits: limit})
	}
	h.send(ctx, slices.Clone(again))
	for i, c := range again {
		if c.err != nil || len(c.res) != 1 {
			t.Fatalf("append to %s after a script flush: %v", c.streams[0], c.err)
		}
		if _, pos, err := epochPos(c.res[0]); err != nil || pos != next[streams[i]]+uint64(len(seen[streams[i]]))+1 {
			t.Fatalf("append to %s after a script flush: position %d (%v)", streams[i], pos, err)
		}
	}
	if calls, want := counter.n.Load()-before, 2*int64(len(slots)); calls != want {
		t.Fatalf("after a script flush a batch over %d slots took %d script calls, want %d (each sent, then again once loaded)", len(slots), calls, want)
	}

	// Void across slots: the first position of every stream the batch
	// wrote to.
	var void []pipeline.StreamPos
	for s := range want {
		void = append(void, pipeline.StreamPos{Stream: s, Epoch: epochs[s], Pos: 1})
	}
	if err := h.Void(ctx, void); err != nil {
		t.Fatal(err)
	}
	for s := range want {
		es, _, err := h.Since(ctx, s, epochs[s], 0, 1)
		if err != nil {
			t.Fatal(err)
		}
		if len(es) != 1 || !es[0].Void || es[0].Pos != 1 {
			t.Fatalf("%s: first entry %+v, want position 1 void", s, es)
		}
	}
}
