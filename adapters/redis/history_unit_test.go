package redis

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline"
)

func TestHistoryLuaOverhead(t *testing.T) {
	if !strings.Contains(historyLua, "local OVERHEAD = "+strconv.Itoa(pipeline.EntryOverhead)+" ") {
		t.Fatalf("the scripts' OVERHEAD is not pipeline.EntryOverhead (%d)", pipeline.EntryOverhead)
	}
}

func TestHistoryEntryEncoding(t *testing.T) {
	for _, e := range []pipeline.HistoryEntry{
		{ID: "id-1", Op: 1000, Body: []byte("hello"), At: time.Unix(1_700_000_000, 123)},
		{Op: -1},
		{ID: strings.Repeat("i", 300), Body: make([]byte, 1<<16), At: time.Unix(0, 1)},
		{ID: "keyed", Op: 1001, Body: []byte("to two keys"), Keys: []string{"k1", strings.Repeat("k", 300)}},
		{ID: "empty key", Keys: []string{""}},
	} {
		b := encodeEntry(e)
		got, err := decodeLogEntry([]any{"7-1700000000000", []any{"e", string(b)}})
		if err != nil {
			t.Fatal(err)
		}
		if got.Pos != 7 || got.ID != e.ID || got.Op != e.Op || string(got.Body) != string(e.Body) || !got.At.Equal(e.At) || !slices.Equal(got.Keys, e.Keys) {
			t.Fatalf("decoded %+v, want %+v", got, e)
		}
	}
	for _, bad := range []any{
		"x",
		[]any{"7-1", []any{"e", "short"}},
		[]any{"x-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{}))}},
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc"}))[:13]}},
		// No key count after the id.
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc"}))[:16]}},
		// A key count past the bytes left, a key cut short.
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc"}))[:16] + "\xff\xff\xff\xff\x0f"}},
		[]any{"7-1", []any{"e", string(encodeEntry(pipeline.HistoryEntry{ID: "abc", Keys: []string{"key"}}))[:19]}},
	} {
		if _, err := decodeLogEntry(bad); err == nil {
			t.Fatalf("decoded %v", bad)
		}
	}
}

// TestAppendGroupsBySlot: under Redis Cluster a batch becomes one script
// call a slot, each holding only keys of its slot and each append's
// streams of that slot in queue order; on one server it stays one call.
func TestAppendGroupsBySlot(t *testing.T) {
	// Neither client dials until used: only its type matters here.
	cluster := goredis.NewClusterClient(&goredis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}})
	single := goredis.NewClient(&goredis.Options{Addr: "127.0.0.1:1"})
	t.Cleanup(func() { _ = cluster.Close(); _ = single.Close() })
	var streams []string
	for i := range 40 {
		streams = append(streams, pipeline.RoomStream(fmt.Sprintf("slots://%d", i)))
	}
	call := func(id string, streams ...string) *appendCall {
		limits := make([]int64, 0, 2*len(streams))
		for i := range streams {
			limits = append(limits, int64(i+1), 60_000)
		}
		return &appendCall{streams: streams, entry: encodeEntry(pipeline.HistoryEntry{ID: id}), limits: limits}
	}
	batch := []*appendCall{call("a", streams[:20]...), call("b", streams[10:]...), call("c", streams[0], streams[39], streams[0])}

	h := NewHistory(single, "p:", pipeline.HistoryCaps{})
	if groups := h.appendGroups(batch); len(groups) != 1 || len(groups[0].parts) != len(batch) || len(groups[0].keys) != 2*(20+30+3) {
		t.Fatalf("one server: %d calls, want one call of every append", len(groups))
	}

	h = NewHistory(cluster, "p:", pipeline.HistoryCaps{})
	groups := h.appendGroups(batch)
	if len(groups) < 2 {
		t.Fatalf("40 streams in %d calls: not split by slot", len(groups))
	}
	made := make([][]int, len(batch)) // the stream indexes made of each append
	for _, g := range groups {
		slot := keySlot(g.keys[0])
		for _, k := range g.keys {
			if keySlot(k) != slot {
				t.Fatalf("one call holds keys of slots %d and %d", slot, keySlot(k))
			}
		}
		// The arguments: max bytes, idle, epochs, then per append its
		// stream count, entry and two limits a stream.
		a, k, last := 3, 0, -1
		for _, part := range g.parts {
			if part.call <= last {
				t.Fatalf("appends out of queue order in a call: %d after %d", part.call, last)
			}
			last = part.call
			c := batch[part.call]
			if g.args[a] != len(part.streams) || string(g.args[a+1].([]byte)) != string(c.entry) {
				t.Fatalf("append %d: count %v and entry in the arguments, want %d", part.call, g.args[a], len(part.streams))
			}
			a += 2
			for _, si := range part.streams {
				if g.keys[k] != h.metaKey(c.streams[si]) || g.keys[k+1] != h.logKey(c.streams[si]) {
					t.Fatalf("append %d stream %d: keys %v", part.call, si, g.keys[k:k+2])
				}
				if g.args[a] != c.limits[2*si] || g.args[a+1] != c.limits[2*si+1] {
					t.Fatalf("append %d stream %d: limits %v, want %v", part.call, si, g.args[a:a+2], c.limits[2*si:2*si+2])
				}
				k, a = k+2, a+2
				made[part.call] = append(made[part.call], si)
			}
		}
		if k != len(g.keys) || a != len(g.args) {
			t.Fatalf("a call's keys and arguments do not add up: %d of %d keys, %d of %d arguments", k, len(g.keys), a, len(g.args))
		}
	}
	for ci, c := range batch {
		got := slices.Sorted(slices.Values(made[ci]))
		want := make([]int, len(c.streams))
		for i := range want {
			want[i] = i
		}
		if !slices.Equal(got, want) {
			t.Fatalf("append %d: streams %v made, want each of its %d once", ci, got, len(c.streams))
		}
	}
}
