package cloud

import (
	"slices"
	"sync"
	"testing"
	"time"
)

// waitFor polls cond until it holds or a deadline passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func opsOf(items []outItem) []int32 {
	var ops []int32
	for _, it := range items {
		ops = append(ops, it.op)
	}
	return ops
}

func TestRoomRoundsIdleRoomGoesAtOnce(t *testing.T) {
	g := newRoomRounds()
	var got [][]int32
	n := g.send("r", []outItem{{op: 1}, {op: 2}}, func(items []outItem) int {
		got = append(got, opsOf(items))
		return 7
	})
	if n != 7 || len(got) != 1 || !slices.Equal(got[0], []int32{1, 2}) {
		t.Fatalf("n=%d rounds=%v", n, got)
	}
	if len(g.rooms) != 0 {
		t.Fatalf("idle room still tracked: %v", g.rooms)
	}
}

// Pushes arriving while a room's fan-out runs go out together, in
// arrival order, in one round after it; other rooms are not held up.
func TestRoomRoundsGatherWhileBusy(t *testing.T) {
	g := newRoomRounds()
	release := make(chan struct{})
	var mu sync.Mutex
	var rounds [][]int32
	deliver := func(items []outItem) int {
		if items[0].op == 0 {
			<-release // the first round blocks until the others queued
		}
		mu.Lock()
		defer mu.Unlock()
		rounds = append(rounds, opsOf(items))
		return len(items)
	}
	var wg sync.WaitGroup
	results := make([]int, 6)
	wg.Go(func() { results[0] = g.send("r", []outItem{{op: 0}}, deliver) })
	queued := func(n int) func() bool {
		return func() bool {
			g.mu.Lock()
			defer g.mu.Unlock()
			st := g.rooms["r"]
			return st != nil && st.next != nil && len(st.next.items) == n
		}
	}
	waitFor(t, "first round to run", func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.rooms["r"] != nil
	})
	for i := 1; i <= 5; i++ {
		wg.Go(func() { results[i] = g.send("r", []outItem{{op: int32(i)}}, deliver) })
		waitFor(t, "push to join the next round", queued(i))
	}
	if n := g.send("other", []outItem{{op: 9}}, deliver); n != 1 {
		t.Fatalf("another room's push: n=%d", n)
	}
	close(release)
	wg.Wait()
	want := [][]int32{{9}, {0}, {1, 2, 3, 4, 5}}
	if !slices.EqualFunc(rounds, want, slices.Equal) {
		t.Fatalf("rounds %v, want %v", rounds, want)
	}
	if !slices.Equal(results, []int{1, 5, 5, 5, 5, 5}) {
		t.Fatalf("results %v", results)
	}
	if len(g.rooms) != 0 {
		t.Fatalf("rooms still tracked: %v", g.rooms)
	}
}

// Many concurrent pushes to one room: every item is delivered exactly
// once, each sender's items in its own order, and the room ends idle.
func TestRoomRoundsConcurrent(t *testing.T) {
	g := newRoomRounds()
	const senders, each = 8, 200
	var mu sync.Mutex
	seen := map[int32]int{}
	var wg sync.WaitGroup
	for s := range senders {
		wg.Go(func() {
			for i := range each {
				g.send("r", []outItem{{op: int32(s*each + i)}}, func(items []outItem) int {
					mu.Lock()
					defer mu.Unlock()
					for _, it := range items {
						seen[it.op]++
					}
					return len(items)
				})
			}
		})
	}
	wg.Wait()
	if len(seen) != senders*each {
		t.Fatalf("%d distinct items delivered, want %d", len(seen), senders*each)
	}
	for op, n := range seen {
		if n != 1 {
			t.Fatalf("item %d delivered %d times", op, n)
		}
	}
	if len(g.rooms) != 0 {
		t.Fatalf("rooms still tracked: %v", g.rooms)
	}
}
