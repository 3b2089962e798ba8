package memory

import (
	"context"
	"maps"
	"slices"
	"testing"
	"time"
)

// clock is a settable time source.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func newTestRegistry() (*Registry, *clock) {
	c := &clock{t: time.Unix(1_700_000_000, 0)}
	r := New(time.Minute, 30*time.Second)
	r.now = c.now
	return r, c
}

func TestSessions(t *testing.T) {
	ctx := context.Background()
	r, clk := newTestRegistry()
	mustAdd := func(mid int64, key, server string) string {
		t.Helper()
		prev, err := r.AddSession(ctx, mid, key, server)
		if err != nil {
			t.Fatal(err)
		}
		return prev
	}
	mustAdd(1, "a", "n1")
	mustAdd(1, "b", "n2")
	mustAdd(2, "c", "n1")
	if prev := mustAdd(2, "c", "n2"); prev != "n1" {
		t.Fatalf("moving key c returned previous server %q, want n1", prev)
	}

	servers, _ := r.ServersByKeys(ctx, []string{"a", "c", "zz"})
	if want := map[string]string{"a": "n1", "c": "n2"}; !maps.Equal(servers, want) {
		t.Fatalf("ServersByKeys = %v, want %v", servers, want)
	}
	keys, offline, _ := r.KeysByMids(ctx, []int64{1, 3})
	if want := map[string]string{"a": "n1", "b": "n2"}; !maps.Equal(keys, want) || !slices.Equal(offline, []int64{3}) {
		t.Fatalf("KeysByMids = %v offline %v", keys, offline)
	}

	// A disconnect reported by a server that no longer holds the key is ignored.
	if had, _ := r.DelSession(ctx, 2, "c", "n1"); had {
		t.Fatal("stale disconnect deleted the moved session")
	}
	if had, _ := r.DelSession(ctx, 2, "c", "n2"); !had {
		t.Fatal("disconnect did not delete the session")
	}

	// Sessions expire without heartbeats; a heartbeat keeps one alive.
	clk.t = clk.t.Add(50 * time.Second)
	if err := r.RenewSession(ctx, 1, "a", "n1"); err != nil {
		t.Fatal(err)
	}
	clk.t = clk.t.Add(20 * time.Second)
	servers, _ = r.ServersByKeys(ctx, []string{"a", "b"})
	if want := map[string]string{"a": "n1"}; !maps.Equal(servers, want) {
		t.Fatalf("after expiry ServersByKeys = %v, want %v", servers, want)
	}
	r.Sweep()
	if len(r.byKey) != 1 || len(r.byMid[1]) != 1 {
		t.Fatalf("sweep left %d keys, mid 1 has %d", len(r.byKey), len(r.byMid[1]))
	}
}

func TestNodesAndRoomCounts(t *testing.T) {
	ctx := context.Background()
	r, clk := newTestRegistry()
	if _, err := r.RenewNode(ctx, "n1", "10.0.0.1:3109", 4, map[string]int32{"live://1": 3, "live://2": 1}); err != nil {
		t.Fatal(err)
	}
	all, _ := r.RenewNode(ctx, "n2", "10.0.0.2:3109", 2, map[string]int32{"live://1": 2})
	if want := map[string]int32{"live://1": 5}; !maps.Equal(all, want) {
		t.Fatalf("room counts = %v, want %v", all, want)
	}
	if n, _ := r.Online(ctx, "live://1"); n != 5 {
		t.Fatalf("Online(live://1) = %d, want 5", n)
	}
	if n, _ := r.Online(ctx, ""); n != 6 {
		t.Fatalf("Online(all) = %d, want 6", n)
	}
	clk.t = clk.t.Add(20 * time.Second)
	_, _ = r.RenewNode(ctx, "n2", "10.0.0.2:3109", 2, map[string]int32{"live://1": 2})
	clk.t = clk.t.Add(20 * time.Second) // n1 lapsed, n2 did not
	nodes, _ := r.Nodes(ctx)
	if want := map[string]string{"n2": "10.0.0.2:3109"}; !maps.Equal(nodes, want) {
		t.Fatalf("Nodes = %v, want %v", nodes, want)
	}
}
