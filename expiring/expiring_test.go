package expiring

import (
	"testing"
	"time"
)

func TestExpiring(t *testing.T) {
	clk := &clock{t: time.Unix(1_700_000_000, 0)}
	e := New[int](time.Minute)
	e.now, e.rotated = clk.now, clk.t
	e.Put("a", 1)
	clk.t = clk.t.Add(59 * time.Second)
	if v, ok := e.Get("a"); !ok || v != 1 {
		t.Fatalf("a within ttl: %v %v", v, ok)
	}
	clk.t = clk.t.Add(2 * time.Second) // rotation: a moves to the old generation
	e.Put("b", 2)
	if _, ok := e.Get("a"); !ok {
		t.Fatal("a dropped before 2×ttl")
	}
	clk.t = clk.t.Add(61 * time.Second) // rotation: a's generation goes
	if _, ok := e.Get("a"); ok {
		t.Fatal("a kept beyond 2×ttl")
	}
	if _, ok := e.Get("b"); !ok {
		t.Fatal("b dropped within 2×ttl")
	}
	clk.t = clk.t.Add(10 * time.Minute) // idle far longer: everything goes
	if _, ok := e.Get("b"); ok {
		t.Fatal("b kept after a long idle")
	}
}

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestPutIfAbsent(t *testing.T) {
	e := New[struct{}](time.Minute)
	if !e.PutIfAbsent("a", struct{}{}) || e.PutIfAbsent("a", struct{}{}) {
		t.Fatal("PutIfAbsent stored twice or not at all")
	}
}
